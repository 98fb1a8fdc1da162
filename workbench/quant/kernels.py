"""Fused weight-only matmuls: read the packed codes once, never write a dequantized copy.

:class:`~workbench.quant.linear.QuantLinear` dequantizes its whole weight and then multiplies,
which moves *more* bytes than a bf16 layer does. PyTorch ships kernels that dequantize inside the
matmul, the way gpt-fast and torchao decode:

* ``int8mm``: ``torch._weight_int8pack_mm(x, W_int8, s)`` = ``(x @ W_int8^T) * s`` (int8,
  symmetric, one scale per output channel); CPU, and CUDA in recent PyTorch.
* ``int4mm``: ``torch._weight_int4pack_mm`` (tinygemm, CUDA, bf16) and its CPU twin: 4-bit codes
  ``u`` in a tiled layout, groups of 32-256 along ``in``, ``w = (u - 8) * s + o`` with
  ``o = zero + 8 s`` for our asymmetric codes and ``o = 0`` for symmetric ones.
* ``compiled``: :func:`torch.compile` of dequantize-then-matmul, which Inductor fuses.

:func:`use_kernel` installs one on every compatible :class:`QuantLinear` of a model; each kernel is
checked against the dequantizing layer before it is kept. Whether a kernel *wins* depends on the
device and batch size: ``bench quant`` measures it. Taught in notebook ``07_quantization``.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from workbench.errors import WorkbenchError
from workbench.quant.groupwise import QuantConfig, QuantizedTensor, unpack_int4
from workbench.quant.linear import QuantLinear, quantized_layers

KERNELS = ("int8mm", "int4mm", "compiled")
TINYGEMM_GROUPS = (32, 64, 128, 256)
INNER_K_TILES = 8  # tinygemm's tiling on CUDA (gpt-fast's choice): in_features % 128 == 0


class Int8PackKernel:
    """``x [M, K] -> (x @ W^T) * s`` via ``torch._weight_int8pack_mm``."""

    name = "int8mm"

    def __init__(self, q: QuantizedTensor) -> None:
        c = q.config
        if not (c.bits == 8 and c.symmetric and c.group_size in (None, q.shape[-1])):
            raise WorkbenchError(f"int8mm needs int8, symmetric, per-channel weights, got {c.name}")
        self.weight = q.data.contiguous()  # [N, K] int8
        self.scale = q.scale.reshape(-1)  # [N]
        self._scales: dict[torch.dtype, torch.Tensor] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        scale = self._scales.get(x.dtype)
        if scale is None:
            scale = self._scales[x.dtype] = self.scale.to(x.dtype)
        return torch._weight_int8pack_mm(x.contiguous(), self.weight, scale)  # [M, N]


class Int4PackKernel:
    """``x [M, K] -> x @ W^T`` via tinygemm (``torch._weight_int4pack_mm``), 4-bit groups."""

    name = "int4mm"

    def __init__(self, q: QuantizedTensor) -> None:
        c, (N, K) = q.config, q.shape
        if c.bits != 4 or c.group_size not in TINYGEMM_GROUPS:
            raise WorkbenchError(f"int4mm needs 4-bit weights in groups of {TINYGEMM_GROUPS}, "
                                 f"got {c.name}")
        self.group_size, self.cuda = c.group_size, q.data.is_cuda
        if self.cuda:
            if K % (INNER_K_TILES * 16) or N % 8:
                raise WorkbenchError(f"int4mm on CUDA needs in % 128 == 0 and out % 8 == 0, "
                                     f"got [{N}, {K}]")
            swapped = (q.data << 4) | (q.data >> 4)  # tinygemm wants element 2j in the high nibble
            self.weight = torch._convert_weight_to_int4pack(swapped.contiguous(), INNER_K_TILES)
        else:
            codes = unpack_int4(q.data).to(torch.int32)  # [N, K]
            self.weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        scale = q.scale.float()  # [N, G]
        offset = torch.zeros_like(scale) if q.zero is None else q.zero.float() + 8 * scale
        # [G, N, 2]: each group's scale and offset side by side, as the kernel reads them
        self.scale_offset = torch.stack((scale, offset), dim=-1).transpose(0, 1).contiguous()
        self._cast: dict[torch.dtype, torch.Tensor] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        so = self._cast.get(x.dtype)
        if so is None:
            so = self._cast[x.dtype] = self.scale_offset.to(x.dtype)
        mm = torch._weight_int4pack_mm if self.cuda else torch.ops.aten._weight_int4pack_mm_for_cpu
        return mm(x.contiguous(), self.weight, self.group_size, so)  # [M, N]


@functools.cache
def _compiled_dequant_linear():
    """One compiled function for every layer; Inductor specializes it once per weight shape."""

    def dequant_linear(x, data, scale, zero, in_features: int, group: int | None, bits: int,
                       symmetric: bool) -> torch.Tensor:
        config = QuantConfig(bits, group, symmetric, scale.dtype)
        q = QuantizedTensor(data, scale, zero, torch.Size((data.shape[0], in_features)), config)
        return F.linear(x, q.dequantize(x.dtype))

    return torch.compile(dequant_linear, dynamic=False)


class CompiledKernel:
    """Dequantize-then-matmul through :func:`torch.compile`, which fuses the dequantization."""

    name = "compiled"

    def __init__(self, q: QuantizedTensor) -> None:
        c = q.config
        self.tensors = (q.data, q.scale, q.zero)
        self.static = (q.shape[-1], c.group_size, c.bits, c.symmetric)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return _compiled_dequant_linear()(x, *self.tensors, *self.static)


_BUILDERS = {"int8mm": Int8PackKernel, "int4mm": Int4PackKernel, "compiled": CompiledKernel}


def make_kernel(layer: QuantLinear, name: str):
    """The fused kernel ``name`` for one layer (WorkbenchError if its format does not fit)."""
    if name not in _BUILDERS:
        raise WorkbenchError(f"unknown kernel {name!r}: expected one of {KERNELS}")
    return _BUILDERS[name](layer.qweight.tensor())


@torch.inference_mode()
def use_kernel(model: nn.Module, name: str | None, dtype: torch.dtype | None = None,
               atol: float = 0.05) -> int:
    """Install kernel ``name`` (None: back to dequantize-then-matmul) on every QuantLinear.

    Each kernel is checked on random inputs in ``dtype`` (default: the model's) against the
    dequantizing path (max error within ``atol`` times the output scale); a kernel that fails to
    build or to agree is an error.
    Returns the number of layers switched.
    """
    layers = quantized_layers(model)
    if not layers:
        raise WorkbenchError("the model has no quantized layers: run quantize_model first")
    for layer in layers:
        layer.kernel = None
    if name is None:
        return 0
    for layer in layers:
        kernel = make_kernel(layer, name)
        x_dtype = dtype or getattr(model, "dtype", torch.float32)
        x = torch.randn(4, layer.in_features, device=layer.qweight.data.device, dtype=x_dtype)
        expected = F.linear(x, layer.weight(x_dtype)).float()
        try:
            got = kernel(x).float()
        except (RuntimeError, NotImplementedError) as err:
            raise WorkbenchError(f"kernel {name} does not run here: "
                                 f"{str(err).splitlines()[0]}") from None
        error = (got - expected).abs().max().item() / expected.abs().max().clamp(min=1e-6).item()
        if error > atol:
            raise WorkbenchError(f"kernel {name} disagrees with dequantize-then-matmul: relative "
                                 f"error {error:.3g} on layer {layer.extra_repr()}")
        layer.kernel = kernel
    return len(layers)
