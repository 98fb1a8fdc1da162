"""What crosses from the driver (rank 0) to the followers each step of parallel generation.

* the batch: every field of a :class:`ForwardBatch` and its packed layout as CPU tensors and Python
  values (:func:`batch_to_wire`), rebuilt on the follower's device (:func:`wire_to_batch`);
* a new KV storage: a small spec of the one the driver's engine just made (:func:`kv_spec`), from
  which each follower builds its own part - its heads, its stage's layers (:func:`kv_from_spec`);
* the block moves of a paged pool since the last step (``PagedKVCache.move_log``), replayed by
  every follower before the forward pass.

Used by :mod:`workbench.parallel.engine`.
"""

from __future__ import annotations

import dataclasses

import torch

from workbench.errors import WorkbenchError
from workbench.kv.base import KVCache
from workbench.kv.contiguous import ContiguousKVCache
from workbench.kv.paged import PagedKVCache
from workbench.kv.slots import SlotKVCache
from workbench.model.batch import ForwardBatch, PackedLayout
from workbench.model.config import ModelConfig

__all__ = ["batch_to_wire", "kv_from_spec", "kv_spec", "wire_to_batch"]


def _to_cpu(value):
    return value.cpu() if isinstance(value, torch.Tensor) else value


def batch_to_wire(batch: ForwardBatch) -> dict:
    """Every field of the batch (and of its packed layout) as CPU tensors and Python values."""
    wire = {f.name: _to_cpu(getattr(batch, f.name)) for f in dataclasses.fields(batch)}
    if batch.layout is not None:
        wire["layout"] = {f.name: _to_cpu(getattr(batch.layout, f.name))
                          for f in dataclasses.fields(batch.layout) if f.name != "scratch"}
    return wire


def wire_to_batch(wire: dict, device: torch.device) -> ForwardBatch:
    move = lambda v: v.to(device) if isinstance(v, torch.Tensor) else v  # noqa: E731
    fields = {k: move(v) for k, v in wire.items() if k != "layout"}
    if wire.get("layout") is not None:
        fields["layout"] = PackedLayout(**{k: move(v) for k, v in wire["layout"].items()})
    return ForwardBatch(**fields)


def kv_spec(kv: KVCache) -> tuple:
    """How followers build their part of a KV storage the driver's engine just created."""
    if isinstance(kv, ContiguousKVCache):
        first = next(iter(kv.k.values()))  # [B, Hkv, max_len, d]
        return ("contiguous", first.shape[0], kv.max_len)
    if isinstance(kv, SlotKVCache):
        return ("slots", kv.num_slots, kv.max_len)
    if isinstance(kv, PagedKVCache):
        return ("paged", kv.num_blocks, kv.block_size, kv.num_cpu_blocks)
    raise WorkbenchError(f"parallel generation supports contiguous, slot and paged KV storage, "
                         f"not {type(kv).__name__}")


def kv_from_spec(spec: tuple, local: ModelConfig, layers: range, device: torch.device,
                 dtype: torch.dtype) -> KVCache:
    """A follower's part of the storage ``spec`` describes: ``local`` is its TP shard's shape,
    ``layers`` its pipeline stage's."""
    kind, rows, size, *rest = spec
    if kind == "contiguous":
        return ContiguousKVCache(local, rows, size, device, dtype, layers=layers)
    if kind == "paged":  # rows blocks of size tokens (+ CPU blocks for swapping)
        return PagedKVCache(local, rows, size, device, dtype, rest[0], layers=layers)
    return SlotKVCache(local, rows, size, device, dtype)
