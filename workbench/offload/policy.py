"""Where the weights, the KV cache and the activations live: FlexGen's placement policy.

A policy splits each of the three kinds of tensors across three tiers by percentages (FlexGen's six
numbers ``wg, wc, cg, cc, hg, hc``; the disk share is what is left of 100):

    tier   on a GPU machine                      on a CPU-only machine
    gpu    device memory (the fast tier)         RAM (compute happens here)
    cpu    host RAM, pinned for fast copies      RAM too: same memory as "gpu"
    disk   memory-mapped files in a folder       memory-mapped files (the slow tier)

It also fixes the batching: ``num_gpu_batches`` batches of ``gpu_batch_size`` rows (the *effective
batch* is their product) and the schedule: ``"row"`` loads each layer's weights once per batch
(Accelerate, ZeRO-Inference), ``"block"`` once per block of batches (FlexGen's zig-zag block).

:func:`plan_memory` adds up what a policy keeps in fast memory; :func:`check_policy` compares it with
a :class:`Budget` ("pretend the GPU has 4 GiB") and raises :class:`WorkbenchError` *before any work*
when the percentages do not add up, the budget is below one layer, the policy does not fit, or the
disk folder cannot be written. Taught in notebook ``06_offloading``.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from workbench.errors import WorkbenchError
from workbench.model.config import ModelConfig
from workbench.offload.layout import Unit, _itemsize, weight_units

TIERS = ("gpu", "cpu", "disk")
SCHEDULES = ("block", "row")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30, "TIB": 2**40, "TB": 10**12}


def parse_bytes(text: str | int | float) -> int:
    """``"4GiB"``, ``"512 MB"``, ``1e9`` -> bytes; anything else is a WorkbenchError."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
        if match is None or match.group(2).upper() not in _UNITS:
            raise WorkbenchError(f"cannot read {text!r} as a size: write e.g. 4GiB, 512MiB, 2GB")
        value, unit = float(match.group(1)), match.group(2).upper()
    return int(value * _UNITS[unit])


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class Split:
    """Percentages of one kind of tensor on the gpu / cpu / disk tiers; they add up to 100."""

    gpu: float = 100.0
    cpu: float = 0.0
    disk: float = 0.0
    what: str = field(default="placement", compare=False)

    def __post_init__(self) -> None:
        values = (self.gpu, self.cpu, self.disk)
        for tier, v in zip(TIERS, values):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or not 0 <= v <= 100:
                raise WorkbenchError(f"{self.what}: the {tier} percentage must be a number in "
                                     f"[0, 100], got {v!r}")
        if abs(sum(values) - 100) > 1e-6:
            raise WorkbenchError(f"{self.what}: percentages gpu {self.gpu:g} + cpu {self.cpu:g} + "
                                 f"disk {self.disk:g} = {sum(values):g}; they must add up to 100")

    def assign(self, sizes: list[int]) -> list[str]:
        """A tier per item, FlexGen style: item i goes to the tier whose cumulative percentage
        range holds the midpoint of the item's own cumulative range (``[0, 100]`` over all)."""
        total, done, tiers = max(1, sum(sizes)), 0, []
        bounds = (self.gpu, self.gpu + self.cpu, 100.0)
        for size in sizes:
            mid = (done + size / 2) / total * 100
            tiers.append(next(t for t, b in zip(TIERS, bounds) if mid < b or t == "disk"))
            done += size
        return tiers

    @property
    def label(self) -> str:
        return f"{self.gpu:g}/{self.cpu:g}/{self.disk:g}"


@dataclass(frozen=True)
class Policy:
    """A placement (weights, KV cache, activations over gpu/cpu/disk) plus batching and schedule."""

    weights: Split = Split(what="weights")
    kv: Split = Split(what="KV cache")
    act: Split = Split(what="activations")
    gpu_batch_size: int = 1
    num_gpu_batches: int = 1
    schedule: str = "block"
    overlap: bool = True  # load the next unit while this one computes (pinned memory, streams)
    cpu_attention: bool = False  # attend on the CPU where the KV cache lives (cpu/disk tiers)
    compress_weights: bool = False  # 4-bit group-wise weights on the cpu/disk tiers
    compress_kv: bool = False  # 4-bit group-wise keys/values on the cpu/disk tiers

    def __post_init__(self) -> None:
        for name in ("gpu_batch_size", "num_gpu_batches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise WorkbenchError(f"policy: {name} must be an integer >= 1, got {value!r}")
        if self.schedule not in SCHEDULES:
            raise WorkbenchError(f"policy: schedule must be one of {SCHEDULES}, "
                                 f"got {self.schedule!r}")

    @classmethod
    def from_percentages(cls, wg: float, wc: float, cg: float = 100, cc: float = 0,
                         hg: float = 100, hc: float = 0, **kwargs) -> Policy:
        """FlexGen's six numbers; each kind's disk share is ``100 - gpu - cpu``."""
        splits = {}
        for key, what, g, c in (("weights", "weights", wg, wc), ("kv", "KV cache", cg, cc),
                                ("act", "activations", hg, hc)):
            if g + c > 100 + 1e-6:
                raise WorkbenchError(f"{what}: percentages gpu {g:g} + cpu {c:g} = {g + c:g} "
                                     f"exceed 100 (the disk share would be negative)")
            splits[key] = Split(g, c, max(0.0, 100 - g - c), what=what)
        return cls(**splits, **kwargs)

    @property
    def effective_batch(self) -> int:
        return self.gpu_batch_size * self.num_gpu_batches

    @property
    def uses_disk(self) -> bool:
        return any(s.disk > 0 for s in (self.weights, self.kv, self.act))

    @property
    def label(self) -> str:
        extra = "".join((" cpu-attn" if self.cpu_attention else "",
                         " w4" if self.compress_weights else "", " kv4" if self.compress_kv else ""))
        return (f"{self.schedule} {self.gpu_batch_size}x{self.num_gpu_batches} w {self.weights.label}"
                f" kv {self.kv.label}{extra}")


@dataclass(frozen=True)
class Budget:
    """The fast-memory budget (bytes the gpu tier may hold) and the folder of the disk tier."""

    fast_bytes: int
    disk_dir: str | Path | None = None

    def __post_init__(self) -> None:
        if isinstance(self.fast_bytes, bool) or not isinstance(self.fast_bytes, int) \
                or self.fast_bytes <= 0:
            raise WorkbenchError(f"budget: fast_bytes must be a positive integer, "
                                 f"got {self.fast_bytes!r}")


def param_tiers(policy: Policy, units: tuple[Unit, ...]) -> dict[str, str]:
    """Tier of every weight tensor: within each unit, by the weights split (FlexGen's rule)."""
    tiers = {}
    for unit in units:
        sizes = [p.numel for p in unit.params]
        tiers.update(zip((p.name for p in unit.params), policy.weights.assign(sizes)))
    return tiers


def kv_tiers(policy: Policy, num_layers: int) -> list[str]:
    """Tier of each layer's KV cache: the first ``gpu%`` of the layers on gpu, then cpu, disk."""
    return policy.kv.assign([1] * num_layers)


def act_tiers(policy: Policy) -> list[str]:
    """Tier of each batch's hidden states between units (block schedule)."""
    return policy.act.assign([1] * policy.num_gpu_batches)


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes a policy keeps on each tier, and the fast-tier total that the budget must cover."""

    resident_weights: int  # weight tensors kept on the fast tier
    staging: int  # buffers that streamed units are loaded into (2 when loads overlap compute)
    kv: int  # KV cache kept on the fast tier
    activations: int  # hidden states kept on the fast tier between units
    workspace: int  # an estimate of the temporaries of one unit's forward
    host_bytes: int  # weights + KV on the cpu tier
    disk_bytes: int  # weights + KV on the disk tier
    layer_bytes: int  # one decoder layer's weights (the smallest budget that can work)

    @property
    def fast_total(self) -> int:
        return self.resident_weights + self.staging + self.kv + self.activations + self.workspace

    def rows(self) -> dict[str, int]:
        return {"resident weights": self.resident_weights, "staging buffers": self.staging,
                "KV cache": self.kv, "activations": self.activations,
                "workspace": self.workspace}


def _align(n: int, to: int = 4096) -> int:
    return (n + to - 1) // to * to


def _stored_bytes(param_numel: int, dtype: torch.dtype, compressed: bool) -> int:
    """Bytes of one tensor as stored: 4-bit codes + an fp16 scale per 64 values when compressed."""
    return param_numel // 2 + param_numel // 64 * 2 if compressed else param_numel * _itemsize(dtype)


def plan_memory(policy: Policy, config: ModelConfig, dtype: torch.dtype, device_type: str,
                prompt_len: int, gen_len: int) -> MemoryPlan:
    """Add up the fast-tier bytes of ``policy`` for prompts of ``prompt_len`` + ``gen_len`` tokens.

    On a CPU (``device_type == "cpu"``) the cpu tier is the same RAM as the gpu tier, so both count
    against the budget, and only disk-tier weights are staged.
    """
    units, size = weight_units(config), _itemsize(dtype)
    tiers = param_tiers(policy, units)
    fast = ("gpu", "cpu") if device_type == "cpu" else ("gpu",)
    staged_tiers = ("disk",) if device_type == "cpu" else ("cpu", "disk")
    resident = host = disk = biggest_dense = 0
    loads = []
    for unit in units:
        streamed = dense = 0
        for p in unit.params:
            tier = tiers[p.name]
            offloaded = tier != "gpu" and policy.compress_weights and _compressible(p.shape)
            stored = _stored_bytes(p.numel, dtype, offloaded)
            resident += p.numel * size if tier in fast else 0
            host += stored if tier == "cpu" else 0
            disk += stored if tier == "disk" else 0
            if tier in staged_tiers and unit.kind != "embed":  # embeddings are gathered, not staged
                streamed += _align(stored)
                dense += p.numel * size if offloaded else 0
        loads.append(_align(streamed))
        biggest_dense = max(biggest_dense, dense)  # dequantized weights of the unit computing
    staging = staging_bytes(loads, policy.overlap) + biggest_dense
    max_len = prompt_len + gen_len
    h, L = config.hidden_size, config.num_hidden_layers
    kv_layer = 2 * config.num_key_value_heads * config.head_dim * size * max_len \
        * policy.effective_batch  # one layer, all batches
    per_layer = kv_tiers(policy, L)
    kv_fast = sum(kv_layer for t in per_layer if t in fast)
    kv_host = sum(kv_layer for t in per_layer if t == "cpu")
    kv_disk = sum(kv_layer for t in per_layer if t == "disk")
    if any(t not in fast for t in per_layer) and not policy.cpu_attention:
        kv_fast += kv_layer // policy.num_gpu_batches  # one batch's keys/values brought in to attend
    b, T = policy.gpu_batch_size, prompt_len
    act = sum(b * T * h * size for t in act_tiers(policy) if t in fast)
    i, q = config.intermediate_size, config.num_attention_heads * config.head_dim
    workspace = b * T * (3 * i + 4 * h + 2 * q) * size \
        + b * config.num_attention_heads * T * max_len * 4 + b * config.vocab_size * 4
    layer_bytes = units[1].nbytes(dtype) if L else 0
    return MemoryPlan(resident, staging, kv_fast, act, workspace, host + kv_host, disk + kv_disk,
                      layer_bytes)


def staging_bytes(sizes: list[int], overlap: bool) -> int:
    """Fast memory that loads need: the largest unit, or with overlap (double buffering from both
    ends of one buffer) the largest sum of two units loaded one after the other, cyclically."""
    sizes = [s for s in sizes if s]
    if not sizes:
        return 0
    if not overlap:
        return max(sizes)
    if len(sizes) == 1:
        return 2 * sizes[0]
    return max(a + b for a, b in zip(sizes, sizes[1:] + sizes[:1]))


def _compressible(shape: tuple[int, ...]) -> bool:
    """Matrices whose rows split into groups of 64 are stored 4-bit; norms stay dense."""
    return len(shape) == 2 and shape[-1] % 64 == 0


def check_policy(policy: Policy, config: ModelConfig, dtype: torch.dtype, budget: Budget,
                 device_type: str, prompt_len: int, gen_len: int) -> MemoryPlan:
    """The memory plan of ``policy``, or a WorkbenchError saying why it cannot run in ``budget``."""
    plan = plan_memory(policy, config, dtype, device_type, prompt_len, gen_len)
    if budget.fast_bytes < plan.layer_bytes:
        raise WorkbenchError(
            f"fast-memory budget {format_bytes(budget.fast_bytes)} is below one decoder layer "
            f"({format_bytes(plan.layer_bytes)}): a layer's weights must fit to compute it")
    if plan.fast_total > budget.fast_bytes:
        parts = ", ".join(f"{k} {format_bytes(v)}" for k, v in plan.rows().items() if v)
        raise WorkbenchError(
            f"policy '{policy.label}' needs {format_bytes(plan.fast_total)} of fast memory ({parts})"
            f" but the budget is {format_bytes(budget.fast_bytes)}: lower the gpu percentages or "
            f"the batch size")
    if policy.uses_disk:
        check_disk_dir(budget.disk_dir)
    return plan


def check_disk_dir(path: str | Path | None) -> Path:
    """Create ``path`` if needed and prove a file can be written there, or raise WorkbenchError."""
    if path is None:
        raise WorkbenchError("the policy puts data on the disk tier but no disk folder was given")
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe-"):
            pass
    except OSError as err:
        raise WorkbenchError(f"disk folder {path} is not writable: "
                             f"{err.strerror or err}") from None
    if not os.access(path, os.W_OK):
        raise WorkbenchError(f"disk folder {path} is not writable")
    return path
