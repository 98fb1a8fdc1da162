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

:func:`~workbench.offload.memory.plan_memory` adds up what a policy keeps in fast memory;
:func:`~workbench.offload.memory.check_policy` compares it with a :class:`Budget` ("pretend the GPU
has 4 GiB") and raises :class:`WorkbenchError` *before any work* when the percentages do not add up,
the budget is below one layer, the policy does not fit, or the disk folder cannot be written (here:
:func:`check_disk_dir`). Taught in notebook ``06_offloading``.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from workbench.errors import WorkbenchError
from workbench.offload.layout import Unit

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
    return list(_even_tiers(policy.kv, num_layers))


@lru_cache(maxsize=256)
def _even_tiers(split: Split, count: int) -> tuple[str, ...]:
    return tuple(split.assign([1] * count))


def act_tiers(policy: Policy) -> list[str]:
    """Tier of each batch's hidden states between units (block schedule)."""
    return policy.act.assign([1] * policy.num_gpu_batches)


def _compressible(shape: tuple[int, ...]) -> bool:
    """Matrices whose rows split into groups of 64 are stored 4-bit; norms stay dense."""
    return len(shape) == 2 and shape[-1] % 64 == 0


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
