"""Notebook 09's serving runs: one workload through the engine with the techniques combined.

:func:`build_model` loads a model in its compute dtype and, for a quantized format, swaps its
linear layers for :class:`~workbench.quant.linear.QuantLinear` (optionally with a fused kernel of
:mod:`workbench.quant.kernels`); :func:`serve` runs requests through the continuous engine (paged
KV cache when the :class:`~workbench.engine.EngineConfig` says so) and keeps what notebook
``09_serving_capstone`` compares: tokens, the vLLM metrics, the KV accounting and the per-step
records that :mod:`workbench.whatif.compare` sets against the predictor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.engine import ContinuousEngine, EngineConfig, EngineRun, Request, run_continuous
from workbench.errors import WorkbenchError
from workbench.kv.accounting import kv_summary
from workbench.metrics import summarize
from workbench.model.llama import LlamaModel
from workbench.model.loading import load_model
from workbench.quant.kernels import use_kernel
from workbench.quant.linear import quantize_model, weight_bytes
from workbench.whatif.footprint import DTYPES, weight_format

__all__ = ["Served", "build_model", "serve"]


def build_model(model: str, device: torch.device | str, weights: str, compute: str,
                kernel: str | None = None) -> LlamaModel:
    """``model`` (bundled, a checkpoint directory or ``preset:NAME``) in ``compute`` with its
    weights stored as ``weights`` ("fp32", "bf16", "fp16" or a quantization name such as "int8",
    "int4", "int4-g64-asym"); ``kernel``: a fused matmul for the quantized layers (checked against
    dequantization by :func:`~workbench.quant.kernels.use_kernel`)."""
    if compute not in DTYPES:
        raise WorkbenchError(f"compute must be one of {', '.join(DTYPES)}, got {compute!r}")
    fmt = weight_format(weights)
    if isinstance(fmt, torch.dtype) and weights != compute:
        raise WorkbenchError(f"{weights} weights compute in {weights}, not {compute}")
    if kernel is not None and isinstance(fmt, torch.dtype):
        raise WorkbenchError(f"kernel {kernel!r} needs quantized weights, got {weights}")
    net = load_model(model, device, DTYPES[compute])
    if not isinstance(fmt, torch.dtype):
        quantize_model(net, fmt)
        if kernel is not None:
            use_kernel(net, kernel)
    return net


@dataclass
class Served:
    """One run of the continuous engine and what it recorded."""

    name: str
    run: EngineRun
    history: list[dict]  # ContinuousEngine.kv_history: one record per step
    weight_bytes: int

    @property
    def tokens(self) -> list[list[int]]:
        """Generated token ids of each request, in request order."""
        return [list(t.output_ids) for t in self.run.traces]

    @property
    def metrics(self) -> dict:
        """vLLM's serving metrics (throughput, TTFT, TPOT, ITL, E2E) of the run."""
        return summarize(self.run.traces, self.run.seconds)

    @property
    def kv(self) -> dict:
        """KV accounting: real-token fraction of the reserved memory, batch sizes, preemptions."""
        return kv_summary(self.history)


def serve(name: str, model: LlamaModel, requests: list[Request], config: EngineConfig,
          progress: bool = False) -> Served:
    """Serve ``requests`` with the continuous engine under ``config``; keep its step records."""
    engine = ContinuousEngine(model, config)
    run = run_continuous(model, requests, config, engine=engine, progress=progress)
    if any(t.finish_reason == "rejected" for t in run.traces):
        first = next(t for t in run.traces if t.finish_reason == "rejected")
        raise WorkbenchError(f"{name}: a request was rejected: {first.error}")
    return Served(name, run, engine.kv_history, weight_bytes(model))
