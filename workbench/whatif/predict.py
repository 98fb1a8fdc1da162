"""What-if: throughput and latency of serving a model shape on a device, from the roofline.

One step of the engine, on each of ``tp`` devices (every rank does the same work at once):

    compute_s = FLOPs of one rank's shard / peak FLOP/s      (anatomy.forward_cost on shard_config)
    memory_s  = (weight bytes read + KV bytes read and written) / bandwidth       (footprint)
    comm_s    = 2 x layers x all-reduce(tokens x hidden x activation bytes)        (tp > 1)
    step_s    = max(compute_s, memory_s) + comm_s

``max``: arithmetic and memory traffic overlap (the roofline); the all-reduces do not overlap with
either (each layer waits for its sum). Serving ``batch`` requests of ``context`` prompt tokens and
``output`` generated tokens, all arrived at t = 0 (a burst, as notebook 02's workloads):

    TTFT = one prefill step over batch x context tokens (every first token comes out of it)
    TPOT = mean decode step over the contexts context .. context + output - 2
    decode tok/s = batch / TPOT;   throughput = batch x output / (TTFT + (output - 1) x TPOT)

Every number is a *floor*: real kernels reach a fraction of the peaks (launches, skinny matmuls,
host work between steps). The memory check counts weights plus the KV cache of batch x (context +
output) tokens per device; activations, workspaces and fragmentation are not counted, so a real
engine needs some more. Taught in notebook ``09_serving_capstone``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from workbench.anatomy import forward_cost
from workbench.errors import WorkbenchError
from workbench.model.config import ModelConfig
from workbench.parallel.plan import check_tp, shard_config
from workbench.whatif.devices import Device
from workbench.whatif.footprint import DTYPES, Footprint, footprint, kv_format, weight_format

__all__ = ["MemoryFit", "Prediction", "Scenario", "StepCost", "check_fit", "decode_step",
           "memory_fit", "predict", "prefill_step", "step_cost"]

_DECODE_SAMPLES = 33  # decode steps evaluated along the generation (~linear in the context)


def _positive_int(name: str, value: object, lo: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise WorkbenchError(f"{name} must be an integer >= {lo}, got {value!r}")


@dataclass(frozen=True)
class Scenario:
    """A model shape served on ``tp`` devices at a batch, context, output length and precision.

    ``weights``: "fp32", "bf16", "fp16" or a quantization ("int8", "int4", "int4-g128-asym"...);
    ``compute``: the activation dtype (None: the weights' dtype when dense, else bf16, fp16 or fp32,
    the first the device has); ``kv``: the KV cache format (None: ``compute``).
    """

    config: ModelConfig
    device: Device
    batch: int = 1
    context: int = 512  # prompt tokens per request
    output: int = 128  # generated tokens per request
    weights: str = "bf16"
    kv: str | None = None
    compute: str | None = None
    tp: int = 1
    quantize_embeddings: bool = False
    model_name: str = "model"

    def __post_init__(self) -> None:
        if not isinstance(self.config, ModelConfig) or not isinstance(self.device, Device):
            raise WorkbenchError(f"a Scenario needs a ModelConfig and a Device, got "
                                 f"{type(self.config).__name__} and {type(self.device).__name__}")
        for name in ("batch", "context", "output", "tp"):
            _positive_int(name, getattr(self, name))
        dense = self.weights in DTYPES
        weight_format(self.weights)  # a clear error for an unknown name
        compute = self.compute or (self.weights if dense else next(
            (d for d in ("bf16", "fp16", "fp32") if getattr(self.device, f"{d}_flops")), "fp32"))
        object.__setattr__(self, "compute", compute)
        object.__setattr__(self, "kv", self.kv or compute)
        kv_format(self.kv)
        self.device.peak_flops(compute)  # the device must have a figure for it
        if self.tp > self.device.max_devices:
            raise WorkbenchError(f"tp={self.tp} needs {self.tp} devices; one {self.device.name} "
                                 f"host holds at most {self.device.max_devices}")
        check_tp(self.config, self.tp)
        if self.context + self.output > self.config.max_position_embeddings:
            raise WorkbenchError(f"context + output = {self.context + self.output} tokens exceeds "
                                 f"{self.model_name}'s context of "
                                 f"{self.config.max_position_embeddings}")
        self.footprint  # checks the formats together (dense weights compute in their dtype)

    @property
    def footprint(self) -> Footprint:
        return _footprint(self.config, self.weights, self.compute, self.kv, self.tp,
                          self.quantize_embeddings)

    @property
    def label(self) -> str:
        tp = f" x{self.tp}" if self.tp > 1 else ""
        return (f"{self.model_name}, {self.weights} weights, {self.kv} KV, on {self.device.name}"
                f"{tp}")


@lru_cache(maxsize=256)
def _footprint(config: ModelConfig, weights: str, compute: str, kv: str, tp: int,
               quantize_embeddings: bool) -> Footprint:
    return footprint(config, weights, compute, kv, tp, quantize_embeddings)


@dataclass(frozen=True)
class StepCost:
    """One step's work on one device and its floors (seconds)."""

    flops: float
    weight_bytes: float
    kv_bytes: float
    compute_s: float
    memory_s: float
    comm_s: float

    @property
    def bytes(self) -> float:
        return self.weight_bytes + self.kv_bytes

    @property
    def seconds(self) -> float:
        """The floor of the step: ``max(compute, memory) + communication``."""
        return max(self.compute_s, self.memory_s) + self.comm_s

    @property
    def bound(self) -> str:
        """What sets the floor: ``"memory"`` or ``"compute"`` (communication is added on top)."""
        return "compute" if self.compute_s > self.memory_s else "memory"

    @property
    def intensity(self) -> float:
        """Arithmetic intensity, FLOP per byte moved."""
        return self.flops / self.bytes


def step_cost(s: Scenario, parts: list[tuple[int, float, float]]) -> StepCost:
    """The floor of one step that runs ``parts``: ``(rows, new tokens per row, cached tokens per
    row)`` each (a decode batch is ``(B, 1, c)``, a prompt ``(1, P, 0)``); the weights are read
    once for all of them."""
    if not parts:
        raise WorkbenchError("a step needs at least one part (rows, new tokens, cached tokens)")
    shard, fp = shard_config(s.config, s.tp), s.footprint
    act_bytes = DTYPES[s.compute].itemsize
    flops = kv_bytes = tokens = 0.0
    for rows, new, cached in parts:
        if rows < 1 or new <= 0 or cached < 0:
            raise WorkbenchError(f"bad step part (rows={rows}, new={new}, cached={cached})")
        flops += forward_cost(shard, rows, new, cached, act_bytes)["flops"]
        kv_bytes += rows * (cached + new) * fp.kv_per_token  # read the cache, write the new keys
        tokens += rows * new
    weight_bytes = fp.step_weight_bytes(tokens, s.config.vocab_size)
    roofline = s.device.roofline(s.compute)
    message = tokens * s.config.hidden_size * act_bytes  # each all-reduce sums [tokens, hidden]
    comm = 2 * s.config.num_hidden_layers * s.device.allreduce_s(message, s.tp)
    return StepCost(flops, weight_bytes, kv_bytes, flops / roofline.peak_flops,
                    (weight_bytes + kv_bytes) / roofline.bandwidth, comm)


def decode_step(s: Scenario, batch: int | None = None, cached: float | None = None) -> StepCost:
    """One decode step of ``batch`` rows (default: the scenario's) after ``cached`` tokens each
    (default: the prompt)."""
    return step_cost(s, [(batch or s.batch, 1, s.context if cached is None else cached)])


def prefill_step(s: Scenario, batch: int | None = None, prompt: int | None = None) -> StepCost:
    """One prefill step over ``batch`` prompts of ``prompt`` tokens (defaults: the scenario's)."""
    return step_cost(s, [(batch or s.batch, prompt or s.context, 0)])


@dataclass(frozen=True)
class MemoryFit:
    """Bytes one device must hold, against its memory."""

    weights: int
    kv: int  # the KV cache at its fullest: batch x (context + output) tokens
    capacity: int
    max_batch: int  # the largest batch whose KV cache fits beside the weights
    message: str

    @property
    def total(self) -> int:
        return self.weights + self.kv

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity


def _gb(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def memory_fit(s: Scenario) -> MemoryFit:
    """Weights + KV cache per device against the device's memory, with a message that says what
    to change when it does not fit."""
    fp, tokens = s.footprint, s.context + s.output
    kv, capacity = s.batch * tokens * fp.kv_per_token, s.device.memory_bytes
    room = capacity - fp.weights
    max_batch = max(0, room // (tokens * fp.kv_per_token))
    where = f"one {s.device.name}" + (f" (of {s.tp}, TP)" if s.tp > 1 else "")
    need = (f"{s.model_name} needs {_gb(fp.weights)} of {s.weights} weights + {_gb(kv)} of "
            f"{s.kv} KV cache for {s.batch} x {tokens:,} tokens = {_gb(fp.weights + kv)} on "
            f"{where}, which has {_gb(capacity)}")
    if fp.weights + kv <= capacity:
        message = f"fits: {need}; up to batch {max_batch:,} at this length"
    elif room <= 0:
        message = (f"does not fit: {need}; the weights alone do not fit: quantize them "
                   f"(int8, int4) or split them over more devices (tensor parallelism)")
    else:
        message = (f"does not fit: {need}; at most batch {max_batch:,} fits at this length: "
                   f"lower the batch or context, store the KV cache in int8/int4, quantize "
                   f"the weights, or add devices (tensor parallelism)")
    return MemoryFit(fp.weights, kv, capacity, int(max_batch), message)


def check_fit(s: Scenario) -> MemoryFit:
    """:func:`memory_fit`, raising :class:`WorkbenchError` with its message when it does not fit."""
    fit = memory_fit(s)
    if not fit.fits:
        raise WorkbenchError(fit.message)
    return fit


@dataclass(frozen=True)
class Prediction:
    """The floors of a :class:`Scenario`: latencies, throughputs and the steps behind them."""

    scenario: Scenario
    memory: MemoryFit
    prefill: StepCost  # the batch's prompts in one step
    decode: StepCost  # one decode step at the mean context of the generation
    ttft_s: float
    tpot_s: float

    @property
    def decode_tok_s(self) -> float:
        """Tokens/s while the batch decodes: ``batch / TPOT``."""
        return self.scenario.batch / self.tpot_s

    @property
    def e2e_s(self) -> float:
        """Seconds until every request has its ``output`` tokens."""
        return self.ttft_s + (self.scenario.output - 1) * self.tpot_s

    @property
    def throughput_tok_s(self) -> float:
        """Generated tokens/s over the whole run, prefill included."""
        return self.scenario.batch * self.scenario.output / self.e2e_s

    def row(self) -> dict:
        """The prediction as one flat dict (a table row)."""
        s = self.scenario
        return {"scenario": s.label, "device": s.device.name, "weights": s.weights, "kv": s.kv,
                "compute": s.compute, "tp": s.tp, "batch": s.batch, "context": s.context,
                "output": s.output, "weight_GiB": self.memory.weights / 2**30,
                "kv_GiB": self.memory.kv / 2**30, "fits": self.memory.fits,
                "ttft_ms": self.ttft_s * 1e3, "tpot_ms": self.tpot_s * 1e3,
                "decode_tok_s": self.decode_tok_s, "throughput_tok_s": self.throughput_tok_s,
                "decode_bound": self.decode.bound, "prefill_bound": self.prefill.bound,
                "comm_share": self.decode.comm_s / self.decode.seconds}


def predict(s: Scenario, strict: bool = True) -> Prediction:
    """The :class:`Prediction` of ``s``; ``strict`` raises (the :func:`memory_fit` message) when
    weights and KV cache do not fit the device's memory."""
    fit = check_fit(s) if strict else memory_fit(s)
    prefill = prefill_step(s)
    steps = s.output - 1  # the first token comes out of the prefill
    if steps:
        cached = np.unique(np.linspace(s.context, s.context + steps - 1, _DECODE_SAMPLES).round())
        tpot = float(np.mean([decode_step(s, cached=float(c)).seconds for c in cached]))
    else:
        tpot = decode_step(s).seconds
    middle = decode_step(s, cached=s.context + max(steps - 1, 0) / 2)
    return Prediction(s, fit, prefill, middle, prefill.seconds, tpot)
