"""Group-wise integer quantization of a tensor along its last dimension (int8 and 4-bit).

The last dimension is cut into groups of ``group_size`` values; each group gets its own scale (and,
when asymmetric, its own offset), so one outlier only coarsens the grid of its own group:

    symmetric  (qmax = 2^(b-1) - 1):  s = max|x| / qmax,  q = round(x / s) in [-qmax, qmax],
                                      x_hat = s * q
    asymmetric (qmax = 2^b - 1):      z = min(x),  s = (max(x) - z) / qmax,
                                      q = round((x - z) / s) in [0, qmax],  x_hat = s * q + z

Every value lands within half a grid step of its original: ``|x - x_hat| <= s / 2``. To keep that
true after the scales and offsets are rounded to their storage dtype (float16 by default), the
offset is rounded down and the scale up before ``q`` is computed, so no value ever needs clamping.
The offset is stored as a float (FlexGen's ``min``), not as an integer zero point.

Storage: int8 values take one byte each; 4-bit values are packed two per byte along the last
dimension (element ``2j`` in the low nibble of byte ``j``, element ``2j + 1`` in the high nibble).
``group_size=None`` means one group per row: per output channel for a weight ``[out, in]``.
Taught in notebook ``07_quantization``; lab 07 (``labs/solutions/lab07_quantization.ipynb``) has the
student write :func:`group_scales` and :func:`group_codes`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from workbench.errors import WorkbenchError
from workbench.plug import pluggable

SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize: ``bits`` (4 or 8), ``group_size`` (None = one group per row), symmetry,
    and the dtype the scales/offsets are stored in."""

    bits: int
    group_size: int | None = 64
    symmetric: bool = True
    scale_dtype: torch.dtype = torch.float16

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or self.bits not in (4, 8):
            raise WorkbenchError(f"bits must be 4 or 8, got {self.bits}")
        if self.group_size is not None and (not isinstance(self.group_size, int)
                                            or self.group_size < 2):
            raise WorkbenchError(f"group_size must be an integer >= 2 or None (one group per "
                                 f"row), got {self.group_size!r}")
        if self.bits == 4 and self.group_size is not None and self.group_size % 2:
            raise WorkbenchError(f"4-bit values are packed two per byte: group_size must be "
                                 f"even, got {self.group_size}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise WorkbenchError(f"scale_dtype must be one of {SCALE_DTYPES}, "
                                 f"got {self.scale_dtype}")

    @property
    def qmax(self) -> int:
        """Largest integer code: 127 / 7 symmetric (codes -qmax..qmax), 255 / 15 asymmetric."""
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2 ** self.bits - 1

    @property
    def name(self) -> str:
        """Short label for tables and figures, e.g. ``int4-g64-sym`` or ``int8-ch-asym``."""
        group = "ch" if self.group_size is None else f"g{self.group_size}"
        return f"int{self.bits}-{group}-{'sym' if self.symmetric else 'asym'}"

    def groups(self, last_dim: int) -> tuple[int, int]:
        """(number of groups, group size) for a last dimension of ``last_dim`` values."""
        size = self.group_size or last_dim
        if last_dim % size:
            raise WorkbenchError(f"last dimension {last_dim} is not divisible by group_size "
                                 f"{size}: pick a group size that divides it")
        if self.bits == 4 and last_dim % 2:
            raise WorkbenchError(f"4-bit packing needs an even last dimension, got {last_dim}")
        return last_dim // size, size

    def nbytes(self, shape: tuple[int, ...]) -> int:
        """Bytes of a tensor of ``shape`` stored quantized along its last dimension: packed codes
        (``bits / 8`` bytes a value) + one scale per group (+ one offset when asymmetric), as
        :class:`QuantizedTensor` holds them."""
        rows, last = math.prod(shape[:-1]), shape[-1]
        groups, _ = self.groups(last)
        scale = torch.empty((), dtype=self.scale_dtype).element_size()
        return rows * last * self.bits // 8 + rows * groups * scale * (1 if self.symmetric else 2)


def parse_quant_config(text: str) -> QuantConfig:
    """``"int4-g64-sym"``, ``"int8-ch-asym"`` (the :attr:`QuantConfig.name` form), or the short
    ``"int8"`` (per channel, symmetric) and ``"int4"`` (group 64, symmetric)."""
    short = {"int8": QuantConfig(8, None), "int4": QuantConfig(4, 64)}
    if text in short:
        return short[text]
    parts = text.split("-")
    ok = (len(parts) == 3 and parts[0] in ("int4", "int8") and parts[2] in ("sym", "asym")
          and (parts[1] == "ch" or (parts[1][:1] == "g" and parts[1][1:].isdigit())))
    if not ok:
        raise WorkbenchError(f"bad quantization setting {text!r}: expected int8, int4 or "
                             "int<4|8>-<gN|ch>-<sym|asym>, e.g. int4-g64-asym")
    group = None if parts[1] == "ch" else int(parts[1][1:])
    return QuantConfig(int(parts[0][3:]), group, parts[2] == "sym")


@dataclass
class QuantizedTensor:
    """Packed integer codes plus per-group scales (and offsets when asymmetric).

    ``data``: int8 ``[..., K]`` (symmetric int8), uint8 ``[..., K]`` (asymmetric int8) or uint8
    ``[..., K / 2]`` (4-bit, two codes a byte); ``scale`` and ``zero``: ``[..., K / group_size]``;
    ``shape``: the original shape ``[..., K]``.
    """

    data: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    shape: torch.Size
    config: QuantConfig

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The approximation ``x_hat`` of the original tensor, in ``dtype``."""
        G, size = self.config.groups(self.shape[-1])
        q = unpack_int4(self.data) if self.config.bits == 4 else self.data
        if self.config.bits == 4 and self.config.symmetric:
            q = q.to(torch.int8) - 8  # nibbles hold code + 8
        q = q.to(dtype).unflatten(-1, (G, size))  # [..., G, size]
        x = q * self.scale.to(dtype).unsqueeze(-1)
        if self.zero is not None:
            x = x + self.zero.to(dtype).unsqueeze(-1)
        return x.flatten(-2)  # [..., K]

    @property
    def nbytes(self) -> int:
        """Bytes of storage: packed codes + scales + offsets."""
        parts = (self.data, self.scale) + (() if self.zero is None else (self.zero,))
        return sum(t.numel() * t.element_size() for t in parts)

    @property
    def bits_per_value(self) -> float:
        """Storage bits per original value, scales and offsets included (4.25 for int4-g64)."""
        return 8 * self.nbytes / max(1, self.shape.numel())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> QuantizedTensor:
        """The same quantized tensor on ``device`` (codes, scales and offsets all move)."""
        zero = None if self.zero is None else self.zero.to(device, non_blocking=non_blocking)
        return QuantizedTensor(self.data.to(device, non_blocking=non_blocking),
                               self.scale.to(device, non_blocking=non_blocking), zero, self.shape,
                               self.config)


@pluggable("quant.scales")
def group_scales(x: torch.Tensor, config: QuantConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and offset of every group of ``x [..., G, size]`` (float32), in ``config.scale_dtype``.

    symmetric:  s = max|x| / qmax, no offset (None)
    asymmetric: z = min(x), s = (max(x) - z) / qmax
    Rounded for storage so no value needs clamping: z down (``z - |z| eps``), s up (``* (1 + eps)``,
    eps of the scale dtype, and at least its smallest normal value).
    """
    eps = torch.finfo(config.scale_dtype).eps  # > the relative rounding of the storage dtype
    tiny = torch.finfo(config.scale_dtype).tiny
    if config.symmetric:
        zero = None
        span = x.abs().amax(-1)  # [..., G]
    else:
        low = x.amin(-1)  # [..., G]
        zero = (low - low.abs() * eps).to(config.scale_dtype)  # rounded down: zero <= min
        span = x.amax(-1) - zero.float()
    scale = (span / config.qmax * (1 + eps)).clamp(min=tiny).to(config.scale_dtype)  # rounded up
    return scale, zero


@pluggable("quant.codes")
def group_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                config: QuantConfig) -> torch.Tensor:
    """Integer codes (as float32) of ``x [..., G, size]`` on the grid of its group's ``scale`` and
    ``zero`` (``[..., G]``): ``round((x - z) / s)``, clamped to ``[-qmax, qmax]`` (symmetric, no
    offset) or ``[0, qmax]`` (asymmetric)."""
    shifted = x if zero is None else x - zero.float().unsqueeze(-1)  # [..., G, size]
    q = torch.round(shifted / scale.float().unsqueeze(-1))
    low_code = -config.qmax if config.symmetric else 0
    return q.clamp(low_code, config.qmax)  # clamping only guards rounding ulps


def quantize(x: torch.Tensor, config: QuantConfig) -> QuantizedTensor:
    """Quantize floating-point ``x [..., K]`` group-wise along its last dimension
    (:func:`group_scales`, then :func:`group_codes`, then packing)."""
    if not x.is_floating_point():
        raise WorkbenchError(f"can only quantize floating-point tensors, got {x.dtype}")
    if x.ndim == 0:
        raise WorkbenchError("cannot quantize a scalar: need at least one dimension")
    G, size = config.groups(x.shape[-1])
    xf = x.detach().float().unflatten(-1, (G, size))  # [..., G, size]
    scale, zero = group_scales(xf, config)
    if not torch.isfinite(scale).all() or (zero is not None and not torch.isfinite(zero).all()):
        raise WorkbenchError(f"values of magnitude {x.abs().max().item():.3g} (or inf/nan) do "
                             f"not fit {config.scale_dtype} scales: use scale_dtype=torch.float32")
    q = group_codes(xf, scale, zero, config).flatten(-2)  # [..., K]
    if config.bits == 4:
        data = pack_int4((q + 8 if config.symmetric else q).to(torch.uint8))
    else:
        data = q.to(torch.int8 if config.symmetric else torch.uint8)
    return QuantizedTensor(data, scale, zero, x.shape, config)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes in [0, 15], ``[..., K]`` (K even) -> bytes ``[..., K / 2]``, two codes each."""
    if codes.shape[-1] % 2:
        raise WorkbenchError(f"4-bit packing needs an even last dimension, got {codes.shape[-1]}")
    pairs = codes.unflatten(-1, (-1, 2))  # [..., K/2, 2]
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_int4(data: torch.Tensor) -> torch.Tensor:
    """Bytes ``[..., K / 2]`` -> uint8 codes ``[..., K]`` (low nibble first)."""
    return torch.stack((data & 0x0F, data >> 4), dim=-1).flatten(-2)  # [..., K/2, 2] -> [..., K]
