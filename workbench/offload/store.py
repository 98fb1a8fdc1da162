"""The three tiers of weight storage: device tensors, (pinned) host RAM, memory-mapped files.

Every weight tensor sits on the tier the policy gives it (:func:`~workbench.offload.policy.param_tiers`).
A unit's offloaded tensors are laid out so that loading it takes *one* read per tier:

    slot (fast memory)   [ disk-tier tensors ............ | cpu-tier tensors ........ ]
    disk file (per unit) [ disk-tier tensors, same offsets ]
    host image (per unit)                                  [ cpu-tier tensors, pinned ]

so a unit streams in as one contiguous file read (disk -> pinned staging) and one or two large
host-to-device copies, the pattern that reaches the bandwidth a copy engine can give. Tensors of the
gpu tier stay resident on the device. With ``compress_weights`` the offloaded matrices are stored as
4-bit group-wise codes + fp16 scales (:mod:`workbench.quant.groupwise`, group 64) and dequantized
after the copy. On a CPU-only machine the cpu tier is RAM used in place; only disk is staged.

Disk reads are *cold* by default: after each read the file's pages are dropped from the page cache
(``madvise``/``posix_fadvise`` DONTNEED), so the next read really comes from the disk, not from RAM.
Taught in notebook ``06_offloading``.
"""

from __future__ import annotations

import mmap
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

from workbench.model.config import ModelConfig
from workbench.offload.layout import Param, Unit, _itemsize, weight_units
from workbench.offload.policy import Policy, Split, _compressible, param_tiers
from workbench.quant.groupwise import QuantConfig, QuantizedTensor, quantize

ALIGN = 4096  # bytes: page-aligned offsets keep every view aligned for any dtype
QUANT = QuantConfig(bits=4, group_size=64, symmetric=True)


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def carve(flat: torch.Tensor, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A ``dtype`` tensor of ``shape`` viewing bytes ``flat[offset:]`` of a uint8 buffer."""
    n = _itemsize(dtype)
    for s in shape:
        n *= s
    return flat[offset:offset + n].view(dtype).view(shape)


class DiskFile:
    """A file of the disk tier, memory-mapped; ``flat`` is a uint8 tensor over all its bytes."""

    def __init__(self, path: Path, data: torch.Tensor | None = None, nbytes: int | None = None,
                 cold: bool = True) -> None:
        self.path, self.cold = Path(path), cold
        with open(self.path, "wb") as f:
            if data is not None:
                f.write(memoryview(data.contiguous().view(torch.uint8).numpy()))
            else:
                f.truncate(nbytes or 0)
            f.flush()
            os.fsync(f.fileno())
        self.fd = os.open(self.path, os.O_RDWR)
        size = os.fstat(self.fd).st_size
        self.mm = mmap.mmap(self.fd, size) if size else None
        self.flat = (torch.frombuffer(self.mm, dtype=torch.uint8) if self.mm is not None
                     else torch.empty(0, dtype=torch.uint8))
        self.evict()

    def evict(self) -> None:
        """Drop the file's pages from this process and the page cache (cold reads next time)."""
        if self.cold and self.mm is not None:
            self.mm.madvise(mmap.MADV_DONTNEED)
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        self.flat = None  # the tensor holds an export of the mmap: release it before closing
        if self.mm is not None:
            try:
                self.mm.close()
            except BufferError:  # a view is still alive somewhere: let the GC close it
                pass
        os.close(self.fd)


@dataclass(frozen=True)
class Item:
    """One array of a unit's offloaded part at ``offset`` in its slot: a dense weight ("w") or
    the codes / scales of a compressed one."""

    param: Param
    part: str
    tier: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        n = _itemsize(self.dtype)
        for s in self.shape:
            n *= s
        return n


@lru_cache(maxsize=64)
def unit_layout(config: ModelConfig, dtype: torch.dtype, weights: Split, compress: bool
                ) -> tuple[tuple[tuple[Item, ...], ...], tuple[int, ...], tuple[int, ...]]:
    """Where each offloaded array of each unit goes in its slot: disk-tier arrays first (the same
    offsets as in the unit's file), then cpu-tier arrays. Returns (items, disk_len, slot_len)."""
    tiers = param_tiers(Policy(weights=weights), weight_units(config))
    all_items, disk_len, slot_len = [], [], []
    for unit in weight_units(config):
        items, offset = [], 0
        for tier in ("disk", "cpu"):
            for p in unit.params:
                if tiers[p.name] != tier:
                    continue
                compressed = compress and _compressible(p.shape)
                for part, dt, shape in _parts(p, dtype, compressed):
                    items.append(Item(p, part, tier, dt, shape, offset))
                    offset = _align(offset + items[-1].nbytes)
            if tier == "disk":
                disk_len.append(offset)
        all_items.append(tuple(items))
        slot_len.append(offset)
    return tuple(all_items), tuple(disk_len), tuple(slot_len)


def _parts(p: Param, dtype: torch.dtype, compressed: bool) -> list[tuple[str, torch.dtype, tuple]]:
    if not compressed:
        return [("w", dtype, p.shape)]
    G, _ = QUANT.groups(p.shape[-1])
    return [("codes", torch.uint8, (*p.shape[:-1], p.shape[-1] // 2)),
            ("scales", QUANT.scale_dtype, (*p.shape[:-1], G))]


class WeightStore:
    """All weights of one model on their tiers, plus the layout each unit is loaded with."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, policy: Policy,
                 device: torch.device, disk_dir: str | Path | None = None,
                 cold_disk: bool = True) -> None:
        self.config, self.dtype, self.policy, self.device = config, dtype, policy, device
        self.units: tuple[Unit, ...] = weight_units(config)
        self.tiers = param_tiers(policy, self.units)
        self.cuda = device.type == "cuda"
        self.disk_dir, self.cold_disk = (Path(disk_dir) if disk_dir else None), cold_disk
        self.resident: dict[str, torch.Tensor] = {}
        # per unit: its offloaded arrays, the bytes of its slot's disk region and of the whole slot
        self.items, self.disk_len, self.slot_len = unit_layout(config, dtype, policy.weights,
                                                                   policy.compress_weights)
        self.images: list[torch.Tensor | None] = []  # host RAM: the cpu-tier region of each unit
        self.files: list[DiskFile | None] = []

    # ---- filling ------------------------------------------------------------------------------
    def fill(self, source: Callable[[Param, torch.Tensor], None]) -> WeightStore:
        """Write every weight: ``source(param, out)`` fills ``out`` (a CPU or device tensor of the
        param's shape and dtype) with its values. Params come in ``named_parameters`` order."""
        order = self._fill_order()
        buffers: dict[int, dict[str, torch.Tensor]] = {}
        for u, unit in enumerate(self.units):
            disk = torch.zeros(self.disk_len[u], dtype=torch.uint8)
            host_n = self.slot_len[u] - self.disk_len[u]  # every byte but alignment gaps is filled
            host = torch.empty(host_n, dtype=torch.uint8, pin_memory=self.cuda and host_n > 0)
            buffers[u] = {"disk": disk, "cpu": host}
            self.images.append(host if host_n else None)
        by_name = {p.name: (u, p) for u, unit in enumerate(self.units) for p in unit.params}
        for name in order:
            u, p = by_name[name]
            tier = self.tiers[name]
            if tier == "gpu":
                out = torch.empty(p.shape, dtype=self.dtype, device=self.device)
                source(p, out)
                self.resident[name] = out
                continue
            items = [it for it in self.items[u] if it.param.name == name]
            base = self.disk_len[u] if tier == "cpu" else 0
            flat = buffers[u][tier]
            if items[0].part == "w":  # dense: fill the bytes in place
                source(p, carve(flat, items[0].offset - base, self.dtype, p.shape))
                continue
            dense = torch.empty(p.shape, dtype=self.dtype)
            source(p, dense)
            q = quantize(dense, QUANT)
            carve(flat, items[0].offset - base, torch.uint8, items[0].shape).copy_(q.data)
            carve(flat, items[1].offset - base, QUANT.scale_dtype, items[1].shape).copy_(q.scale)
        if any(self.disk_len):  # a folder of its own: stores sharing a disk folder never collide
            self.disk_dir = Path(tempfile.mkdtemp(prefix="weights-", dir=self.disk_dir))
        for u in range(len(self.units)):
            if self.disk_len[u]:
                path = self.disk_dir / f"unit-{u:03d}.bin"
                self.files.append(DiskFile(path, buffers[u]["disk"], cold=self.cold_disk))
            else:
                self.files.append(None)
        return self

    def _fill_order(self) -> list[str]:
        names = [p.name for unit in self.units for p in unit.params]
        if self.config.tie_word_embeddings:  # named_parameters lists the tied matrix first
            names.remove("lm_head.weight")
            names.insert(0, "lm_head.weight")
        return names

    @classmethod
    def from_model(cls, model, policy: Policy, device: torch.device,
                   disk_dir: str | Path | None = None, cold_disk: bool = True) -> WeightStore:
        """Place the weights of a :class:`LlamaModel` (on any device) on their tiers."""
        params = dict(model.named_parameters())
        if model.config.tie_word_embeddings:
            params["lm_head.weight"] = params["embed_tokens.weight"]
        store = cls(model.config, model.dtype, policy, device, disk_dir, cold_disk)
        return store.fill(lambda p, out: out.copy_(params[p.name].detach()))

    @classmethod
    def random(cls, config: ModelConfig, dtype: torch.dtype, policy: Policy, device: torch.device,
               disk_dir: str | Path | None = None, seed: int = 0, std: float = 0.02,
               init_device: str | torch.device = "cpu", cold_disk: bool = True) -> WeightStore:
        """Random N(0, std) weights written straight into their tiers (no whole-model copy).

        With ``init_device="cpu"`` the values equal ``random_model(config, "cpu", dtype, seed)``'s;
        ``init_device="cuda"`` draws each tensor on the GPU and copies it out (fast for 8B shapes).
        """
        gen = torch.Generator(device=init_device).manual_seed(seed)

        def source(p: Param, out: torch.Tensor) -> None:
            if p.name.endswith("norm.weight"):
                out.fill_(1.0)
            elif len(p.shape) == 1:
                out.zero_()
            else:
                tmp = torch.empty(p.shape, dtype=dtype, device=init_device)
                out.copy_(tmp.normal_(0.0, std, generator=gen))

        return cls(config, dtype, policy, device, disk_dir, cold_disk).fill(source)

    # ---- reading ------------------------------------------------------------------------------
    def streamed_bytes(self, u: int) -> tuple[int, int]:
        """(disk bytes, bytes copied to the device) that loading unit ``u`` moves."""
        if self.units[u].kind == "embed":
            return 0, 0
        disk = self.disk_len[u]
        return disk, (self.slot_len[u] if self.cuda else 0)

    def params_from_slot(self, u: int, slot: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The unit's weights as tensors on the compute device: resident ones, plus views of the
        loaded ``slot`` (dequantized when compressed). On a CPU the cpu tier is used in place."""
        if self.units[u].kind == "embed":
            return {}  # the embedding is gathered where it lives: see embedding_rows
        out = {p.name: self.resident[p.name] for p in self.units[u].params
               if self.tiers[p.name] == "gpu"}
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for it in self.items[u]:
            if self.cuda or it.tier == "disk":
                src, off = slot, it.offset
            else:
                src, off = self.images[u], it.offset - self.disk_len[u]
            parts.setdefault(it.param.name, {})[it.part] = carve(src, off, it.dtype, it.shape)
        for name, arrays in parts.items():
            out[name] = arrays["w"] if "w" in arrays else _dequantize(arrays, self._shape(name),
                                                                      self.dtype)
        return out

    def embedding_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids [B, T]`` of the embedding matrix, gathered where the matrix lives (no load
        of the whole table): ``[B, T, hidden]`` on the compute device."""
        name = "lm_head.weight" if self.config.tie_word_embeddings else "embed_tokens.weight"
        if self.tiers[name] == "gpu":
            return F.embedding(ids, self.resident[name])
        u = next(i for i, unit in enumerate(self.units) if any(p.name == name for p in unit.params))
        host_ids = ids.cpu()
        arrays = {}
        for it in self.items[u]:
            if it.param.name == name:
                src, off = ((self.files[u].flat, it.offset) if it.tier == "disk"
                            else (self.images[u], it.offset - self.disk_len[u]))
                arrays[it.part] = carve(src, off, it.dtype, it.shape)[host_ids]  # [B, T, ...]
        rows = (arrays["w"] if "w" in arrays
                else _dequantize(arrays, (*host_ids.shape, self.config.hidden_size), self.dtype))
        return rows.to(self.device)

    def _shape(self, name: str) -> tuple[int, ...]:
        return next(p.shape for unit in self.units for p in unit.params if p.name == name)

    def tier_bytes(self) -> dict[str, int]:
        """Bytes of weights stored on each tier (as stored: compressed where compressed)."""
        out = {"gpu": sum(t.numel() * t.element_size() for t in self.resident.values()),
               "cpu": 0, "disk": 0}
        for items in self.items:
            for it in items:
                out[it.tier] += it.nbytes
        return out

    def fast_tier_bytes(self) -> int:
        """Bytes of weight tensors allocated in fast memory: the resident ones, and on a CPU-only
        machine also the cpu tier's images (RAM there is the fast tier)."""
        resident = sum(t.numel() * t.element_size() for t in self.resident.values())
        return resident + (0 if self.cuda else sum(i.numel() for i in self.images if i is not None))

    def close(self) -> None:
        """Unmap and delete the disk tier's files."""
        for f in self.files:
            if f is not None:
                f.close()
                f.path.unlink(missing_ok=True)
        if self.files and any(self.disk_len):
            shutil.rmtree(self.disk_dir, ignore_errors=True)
        self.files = []


def _dequantize(arrays: dict[str, torch.Tensor], shape: tuple[int, ...],
                dtype: torch.dtype) -> torch.Tensor:
    q = QuantizedTensor(arrays["codes"], arrays["scales"], None, torch.Size(shape), QUANT)
    return q.dequantize(dtype)
