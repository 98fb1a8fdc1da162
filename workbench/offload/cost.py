"""A cost model of offloaded generation, and a search of the policy space with it.

Per step, every unit ``j`` (decoder layer or head) has a load time and, for a batch of ``b`` rows of
``T`` new tokens, a compute time (FlexGen, section 4.2):

    load_j      = disk_j / BW_disk + h2d_j / BW_h2d       (the bytes the unit's slot moves)
    comp_j(b)   = a_j + c_j * b * T  (+ KV traffic, + dequantization)

A KV cache in host RAM attended on the GPU copies each batch's keys/values in per layer: the batch
waits for them (compute) and they share the host-to-device link with the weights (load; for the
block schedule, all ``n`` batches' worth within the unit's slot).

``a_j`` is the fixed cost of one call of the unit (kernel launches, Python, the head's sampling
sync) and ``c_j`` its cost per row-token: a GPU running a small batch is bound by ``a``, not by its
FLOP rate. The schedule composes the units, overlapping each load with the compute it hides behind:

    block:  step = s0 + sum_j o(load_j, n * comp_j(b))     row:  step = s0 + n * sum_j o(load_j, comp_j(b))
    o(l, c) = max(l, c) + (1 - f) min(l, c)                (f = 1: perfect overlap; no overlap: l + c)

with ``s0`` the fixed cost of a step (embedding gather, end-of-step synchronization). The
parameters come from measurements on this machine (:mod:`workbench.offload.calibrate`) or are
fitted to measured runs (:mod:`workbench.offload.fit`). :func:`search` ranks every policy of a
grid that fits the budget by predicted throughput (exhaustive search, FlexGen solves an LP over
the same terms). :func:`step_time` composes a step. Notebook ``06_offloading`` plots predicted
against measured; lab 06 (``labs/solutions/lab06_offloading.ipynb``) has the student write
:func:`step_time`.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, replace
from functools import lru_cache

import torch

from workbench.errors import WorkbenchError
from workbench.model.config import ModelConfig
from workbench.offload.layout import _itemsize, weight_units
from workbench.offload.memory import plan_memory
from workbench.offload.policy import Budget, Policy, Split, kv_tiers
from workbench.offload.store import unit_layout
from workbench.plug import pluggable


@dataclass(frozen=True)
class Calibration:
    """Speeds of one machine for one model shape and dtype (measured, or fitted to runs)."""

    device_type: str
    disk_Bps: float  # cold reads of a memory-mapped file into RAM
    h2d_Bps: float  # pinned host -> device copies (inf on a CPU: nothing is copied)
    host_Bps: float  # RAM copy bandwidth (KV cache read by CPU attention)
    layer_fixed_s: float  # a: one decoder-layer call, weights in place
    layer_token_s: float  # c: ... plus this per row-token
    head_fixed_s: float  # the head's call (norm, LM head, argmax and its sync)
    head_token_s: float
    dequant_Bps: float  # dense bytes per second out of 4-bit dequantization
    overlap: float = 1.0  # f: share of min(load, compute) hidden behind the other when overlapping
    step_fixed_s: float = 0.0  # s0: per step (embedding gather, end-of-step synchronization)
    source: str = "measured"  # "measured" (calibrate), "fitted" (fit_calibration) or "given"

    def layer_flop_rate(self, config: ModelConfig) -> float:
        """Achieved FLOP/s of a decoder layer: 2 * layer params per token / c."""
        return 2 * _layer_params(config) / self.layer_token_s

    def to_dict(self) -> dict:
        """JSON-ready (infinite bandwidths as None), the inverse of :meth:`from_dict`."""
        return {k: (None if isinstance(v, float) and v == float("inf") else v)
                for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> Calibration:
        return cls(**{k: (float("inf") if v is None and k.endswith("Bps") else v)
                      for k, v in d.items()})


def _layer_params(config: ModelConfig) -> int:
    return sum(p.numel for p in weight_units(config)[1].params)


@dataclass(frozen=True)
class Prediction:
    policy: Policy
    prefill_s: float
    decode_step_s: float  # one decode step, all batches
    gen_len: int

    @property
    def total_s(self) -> float:
        return self.prefill_s + (self.gen_len - 1) * self.decode_step_s

    @property
    def decode_tok_s(self) -> float:
        return self.policy.effective_batch / self.decode_step_s

    @property
    def per_token_s(self) -> float:
        """Decode time per generated token (the number compared with the measured one)."""
        return self.decode_step_s / self.policy.effective_batch


@lru_cache(maxsize=64)
def _unit_bytes(config: ModelConfig, dtype: torch.dtype, weights: Split, compress: bool
                ) -> tuple[tuple[str, int, int, int, int], ...]:
    """(kind, layer index, disk bytes, slot bytes, dense bytes of 4-bit arrays) of every streamed
    unit (the embedding is gathered, never loaded)."""
    items, disk_len, slot_len = unit_layout(config, dtype, weights, compress)
    size = _itemsize(dtype)
    return tuple((unit.kind, unit.index, disk_len[j], slot_len[j],
                  sum(it.param.numel * size for it in items[j] if it.part == "codes"))
                 for j, unit in enumerate(weight_units(config)) if unit.kind != "embed")


@pluggable("offload.step_time")
def step_time(loads: list[float], comps: list[float], num_batches: int, schedule: str,
              overlap: float) -> float:
    """Seconds of one step over the units: unit j loads in ``loads[j]`` and computes one batch in
    ``comps[j]``; a load overlaps the compute beside it, a share ``overlap`` (f) of the shorter one
    hidden: ``o(l, c) = max(l, c) + (1 - f) min(l, c)``.

        block: sum_j o(load_j, n comp_j)        row: n sum_j o(load_j, comp_j)
    """
    if schedule not in ("block", "row"):
        raise WorkbenchError(f"schedule must be 'block' or 'row', got {schedule!r}")
    n, f = num_batches, overlap
    o = lambda load, comp: max(load, comp) + (1 - f) * min(load, comp)  # noqa: E731
    if schedule == "block":
        return sum(o(load, n * comp) for load, comp in zip(loads, comps))
    return n * sum(o(load, comp) for load, comp in zip(loads, comps))


def predict(policy: Policy, config: ModelConfig, dtype: torch.dtype, cal: Calibration,
            prompt_len: int, gen_len: int) -> Prediction:
    """Predicted prefill and decode-step times of ``policy`` for prompts of ``prompt_len``."""
    cuda = cal.device_type == "cuda"
    kv_layer_token = 2 * config.num_key_value_heads * config.head_dim * _itemsize(dtype)
    kv_tier = kv_tiers(policy, config.num_hidden_layers)
    b, n = policy.gpu_batch_size, policy.num_gpu_batches
    units = _unit_bytes(config, dtype, policy.weights, policy.compress_weights)

    def step(tokens: int, context: int) -> float:
        loads, comps = [], []
        for kind, index, disk, slot, dense in units:
            load = disk / cal.disk_Bps + (slot / cal.h2d_Bps if cuda else 0.0)
            dequant = dense / cal.dequant_Bps
            if kind == "head":
                comp = cal.head_fixed_s + cal.head_token_s * b + dequant
            else:
                comp = cal.layer_fixed_s + cal.layer_token_s * b * tokens + dequant
                kv_bytes = kv_layer_token * b * context
                if kv_tier[index] != "gpu" and cuda:
                    if policy.cpu_attention:
                        comp += kv_bytes / cal.host_Bps
                    else:  # the batch waits for its keys/values, which also take the link
                        kv_in = kv_bytes / cal.h2d_Bps  # the weights stream through
                        comp += kv_in
                        load += kv_in * (n if policy.schedule == "block" else 1)
            loads.append(load)
            comps.append(comp)
        f = cal.overlap if policy.overlap else 0.0
        return cal.step_fixed_s + step_time(loads, comps, n, policy.schedule, f)

    return Prediction(policy, step(prompt_len, prompt_len), step(1, prompt_len + gen_len // 2),
                      gen_len)


@dataclass(frozen=True)
class SearchSpace:
    """The grid :func:`search` walks: percentages in steps of ``step``, and these batchings."""

    step: int = 10
    gpu_batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    num_gpu_batches: tuple[int, ...] = (1, 2, 4, 8)
    schedules: tuple[str, ...] = ("block", "row")
    kv: tuple[Split, ...] = (Split(what="KV cache"), Split(0, 100, 0, what="KV cache"))
    cpu_attention: tuple[bool, ...] = (False, True)
    use_disk: bool = True  # also consider weights on disk

    def policies(self, device_type: str):
        shares = range(0, 101, self.step)
        for g in shares:
            for c in (shares if device_type == "cuda" else (0,)):  # on a CPU, cpu tier == RAM
                if g + c > 100 or (not self.use_disk and g + c < 100):
                    continue
                weights = Split(g, c, 100 - g - c, what="weights")
                for b, n, sched, kv, attn in itertools.product(
                        self.gpu_batch_sizes, self.num_gpu_batches, self.schedules, self.kv,
                        self.cpu_attention):
                    if attn and (kv.gpu == 100 or device_type != "cuda"):
                        continue
                    if sched == "row" and n == 1:
                        continue  # with one batch the two schedules are the same
                    yield Policy(weights=weights, kv=kv, gpu_batch_size=b, num_gpu_batches=n,
                                 schedule=sched, cpu_attention=attn)


def search(config: ModelConfig, dtype: torch.dtype, cal: Calibration, budget: Budget,
           prompt_len: int, gen_len: int, space: SearchSpace = SearchSpace()) -> list[Prediction]:
    """Every policy of ``space`` that fits ``budget``, best predicted decode throughput first."""
    out = []
    for policy in space.policies(cal.device_type):
        plan = plan_memory(policy, config, dtype, cal.device_type, prompt_len, gen_len)
        if plan.fast_total <= budget.fast_bytes:
            out.append(predict(policy, config, dtype, cal, prompt_len, gen_len))
    if not out:
        raise WorkbenchError(f"no policy of the grid fits a budget of {budget.fast_bytes} bytes")
    return sorted(out, key=lambda p: -p.decode_tok_s)


def with_bandwidths(cal: Calibration, **changes: float) -> Calibration:
    """A copy with some speeds replaced (what-if questions in the notebook)."""
    return replace(cal, **changes)
