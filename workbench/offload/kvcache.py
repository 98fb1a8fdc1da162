"""The KV cache and the activations on tiers: device, host RAM (pinned) or a memory-mapped file.

:class:`TieredKVCache` keeps each layer's keys/values on the tier the policy gives that layer (on the
device ``[B, Hkv, max_len, d]``; off it position-major, ``[max_len, B, Hkv, d]``: :class:`_HostLayer`).
A layer off the fast tier is attended in one of two ways:

* bring its keys/values ``[B, Hkv, S, d]`` to the compute device, attend there (bytes ~ S per row);
* ``cpu_attention``: send the new q/k/v (one token per row) to the CPU, attend *where the cache
  lives*, send the output back (FlexGen's ``cpu_cache_compute``): bytes ~ 1 token per row, paid for
  with the CPU's slower arithmetic.

With ``compress`` the offloaded keys/values are stored as 4-bit group-wise codes
(:mod:`workbench.quant.groupwise`, groups along ``head_dim``). :class:`ActivationStore` holds each
batch's hidden states between units of the block schedule. Notebook ``06_offloading``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from workbench.attention.sdpa import sdpa
from workbench.kv.base import KVCache
from workbench.model.batch import ForwardBatch
from workbench.model.config import ModelConfig
from workbench.offload.layout import _itemsize
from workbench.offload.store import ALIGN, DiskFile, carve
from workbench.quant.groupwise import QuantConfig, QuantizedTensor, quantize


def kv_quant_config(head_dim: int) -> QuantConfig:
    """4-bit symmetric, groups of 64 along head_dim (of head_dim itself when it is smaller)."""
    return QuantConfig(bits=4, group_size=min(64, head_dim), symmetric=True)


class _HostLayer:
    """Keys and values of one layer off the fast tier: dense or 4-bit, in RAM or in a file.

    Stored position-major, ``[max_len, B, Hkv, d]``: the first ``end`` positions of every row are one
    contiguous block, so a step's read is a single copy (one DMA from pinned memory). In the
    ``[B, Hkv, max_len, d]`` layout the same read is a strided view that PyTorch first gathers into
    pageable memory on the CPU, then copies: the third H100 run spent 2.7 s a step where the bytes
    needed 0.45 s at the pinned bandwidth.
    """

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, tier: str, pin: bool,
                 path: Path | None, quant: QuantConfig | None) -> None:
        B, Hkv, max_len, d = shape
        shape = (max_len, B, Hkv, d)  # position-major (see the class docstring)
        self.quant, self.dtype, self.file = quant, dtype, None
        self.pinned = pin and tier != "disk"  # RAM pages the GPU can copy to without waiting
        if quant is None:
            arrays = [("k", dtype, shape), ("v", dtype, shape)]
        else:
            G, _ = quant.groups(shape[-1])
            codes, scales = (*shape[:-1], shape[-1] // 2), (*shape[:-1], G)
            arrays = [("k", torch.uint8, codes), ("ks", quant.scale_dtype, scales),
                      ("v", torch.uint8, codes), ("vs", quant.scale_dtype, scales)]
        sizes = [_itemsize(dt) * _numel(s) for _, dt, s in arrays]
        offsets = [sum((n + ALIGN - 1) // ALIGN * ALIGN for n in sizes[:i]) for i in range(len(sizes))]
        total = offsets[-1] + sizes[-1]
        if tier == "disk":
            self.file = DiskFile(path, nbytes=total, cold=False)
            flat = self.file.flat
        else:
            flat = torch.zeros(total, dtype=torch.uint8, pin_memory=pin)
        self.arrays = {name: carve(flat, off, dt, s) for (name, dt, s), off in zip(arrays, offsets)}

    def write(self, start: int, k: torch.Tensor, v: torch.Tensor, wait: bool = True) -> None:
        """New tokens' keys and values ``[B, Hkv, T, d]`` (any device) at positions ``start ..``.

        ``wait=False``: a device -> pinned-host copy is queued on the current stream and not waited
        for; only a later copy on that stream (the :meth:`read` that follows) may use the bytes.
        Waiting on every write stalled the host 512 times a step in the fourth GPU run (KV of 16
        batches x 32 layers in RAM), so the GPU idled while the host queued the next kernels."""
        end = start + k.shape[2]
        for name, x in (("k", k), ("v", v)):
            x = x.permute(2, 0, 1, 3)  # [T, B, Hkv, d]
            if self.quant is None:
                dst = self.arrays[name][start:end]  # device -> host straight into place
                dst.copy_(x.contiguous(), non_blocking=not wait and self.pinned)
                continue
            q = quantize(x.cpu().contiguous(), self.quant)
            self.arrays[name][start:end] = q.data
            self.arrays[name + "s"][start:end] = q.scale

    def read(self, end: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the first ``end`` positions, ``[B, Hkv, end, d]`` on ``device``
        (one contiguous copy each from host memory; a view, not contiguous)."""
        out = []
        for name in ("k", "v"):
            if self.quant is None:
                x = self.arrays[name][:end].to(device, non_blocking=True)  # [end, B, Hkv, d]
            else:
                codes, scales = self.arrays[name][:end], self.arrays[name + "s"][:end]
                shape = torch.Size((*codes.shape[:-1], codes.shape[-1] * 2))
                x = QuantizedTensor(codes.to(device, non_blocking=True), scales.to(device, non_blocking=True),
                                    None, shape, self.quant).dequantize(self.dtype)
            out.append(x.permute(1, 2, 0, 3))  # [B, Hkv, end, d]
        return out[0], out[1]

    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() for a in self.arrays.values())


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


class TieredKVCache(KVCache):
    """Per-layer KV storage on the gpu, cpu or disk tier (see the module docstring)."""

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, tiers: list[str],
                 device: torch.device, dtype: torch.dtype, disk_dir: str | Path | None = None,
                 name: str = "kv", cpu_attention: bool = False, compress: bool = False,
                 counters: dict | None = None) -> None:
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.device, self.max_len, self.length, self.tiers = device, max_len, 0, tiers
        self.cpu_attention = cpu_attention and device.type != "cpu"
        self.counters = counters if counters is not None else {}
        quant = kv_quant_config(config.head_dim) if compress else None
        self.fast: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.host: dict[int, _HostLayer] = {}
        for i, tier in enumerate(tiers):
            if tier == "gpu":
                self.fast[i] = (torch.zeros(shape, device=device, dtype=dtype),
                                torch.zeros(shape, device=device, dtype=dtype))
            else:
                path = Path(disk_dir) / f"{name}-layer{i:03d}.bin" if tier == "disk" else None
                self.host[i] = _HostLayer(shape, dtype, tier, device.type == "cuda", path, quant)

    def _count(self, key: str, *tensors: torch.Tensor) -> None:
        self.counters[key] = self.counters.get(key, 0) + sum(t.numel() * t.element_size()
                                                             for t in tensors)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor,
               batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = batch.kv_start, batch.kv_start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens, step needs {end}")
        if layer in self.fast:
            kf, vf = self.fast[layer]
            kf[:, :, start:end] = k  # k: [B, Hkv, T, d]
            vf[:, :, start:end] = v
            return kf[:, :, :end], vf[:, :, :end]
        host = self.host[layer]
        host.write(start, k, v, wait=False)  # device -> host: the new tokens only
        k_all, v_all = host.read(end, self.device)  # [B, Hkv, end, d], ordered after the write
        if self.device.type != "cpu":
            self._count("kv_d2h", k, v)
            self._count("kv_h2d", k_all, v_all)
        return k_all, v_all

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               batch: ForwardBatch) -> torch.Tensor:
        if layer in self.fast or not self.cpu_attention:
            return super().attend(layer, q, k, v, batch)
        start, end = batch.kv_start, batch.kv_start + k.shape[2]
        host = self.host[layer]
        host.write(start, k, v)
        k_all, v_all = host.read(end)  # [B, Hkv, end, d] in RAM
        mask = None if batch.mask is None else batch.mask.cpu()
        out = sdpa(q.cpu(), k_all, v_all, mask, causal=mask is None)  # [B, H, T, d] on the CPU
        self._count("kv_d2h", q, k, v)
        self._count("attn_h2d", out)
        return out.to(self.device)

    def advance(self, batch: ForwardBatch) -> None:
        self.length = batch.kv_start + batch.input_ids.shape[1]

    def nbytes(self) -> int:
        fast = sum(2 * k.numel() * k.element_size() for k, _ in self.fast.values())
        return fast + sum(h.nbytes() for h in self.host.values())

    def fast_nbytes(self) -> int:
        return sum(2 * k.numel() * k.element_size() for k, _ in self.fast.values())

    def close(self) -> None:
        for h in self.host.values():
            if h.file is not None:
                h.arrays = {}
                h.file.close()


class ActivationStore:
    """Hidden states ``[B, T, hidden]`` of each batch between units, on its policy tier."""

    def __init__(self, tiers: list[str], device: torch.device, disk_dir: str | Path | None,
                 max_bytes: int, counters: dict | None = None) -> None:
        self.tiers, self.device, self.values = tiers, device, {}
        self.counters = counters if counters is not None else {}
        self.files = {k: DiskFile(Path(disk_dir) / f"act-{k:03d}.bin", nbytes=max_bytes, cold=False)
                      for k, t in enumerate(tiers) if t == "disk"}

    def put(self, k: int, x: torch.Tensor) -> None:
        tier = self.tiers[k]
        if tier == "gpu":
            self.values[k] = x
            return
        if tier == "cpu":
            self.values[k] = x.to("cpu")
        else:
            view = carve(self.files[k].flat, 0, x.dtype, tuple(x.shape))
            view.copy_(x)
            self.values[k] = view
        if self.device.type != "cpu":
            self.counters["act_moved"] = self.counters.get("act_moved", 0) + 2 * x.numel() * x.element_size()

    def get(self, k: int) -> torch.Tensor:
        return self.values[k].to(self.device)

    def close(self) -> None:
        self.values.clear()
        for f in self.files.values():
            f.close()
