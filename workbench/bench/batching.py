"""``workbench bench batching``: static vs continuous batching, ours and transformers', one run.

Every system serves the same requests on the same model, device and dtype, one after the other in
one process, each after a short warm-up. Reported per system: useful output tok/s (tokens a
request asked for, up to its EOS), the vLLM latency metrics, and for ours the slot utilization;
then the ratios and the fraction of the decode roofline bound reached (at the engine's batch, a
decode step must read every weight once: ``batch x bandwidth / weight bytes`` tok/s at most).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch

from workbench.bench.run import fastest_in_turns
from workbench.engine import EngineConfig, Request, SamplingParams, run_continuous, run_static
from workbench.errors import WorkbenchError
from workbench.metrics import summarize

SYSTEMS = ("workbench/static", "workbench/continuous", "transformers/static",
           "transformers/continuous")


@dataclass(frozen=True)
class BatchingBench:
    """What to run: systems, the static batch size and the continuous engine's limits."""

    systems: tuple[str, ...] = SYSTEMS
    batch_size: int = 32
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 2048
    chunked_prefill: bool = False
    hf_max_batch_tokens: int | None = None

    def __post_init__(self) -> None:
        unknown = set(self.systems) - set(SYSTEMS)
        if unknown:
            raise WorkbenchError(f"unknown systems {sorted(unknown)}; known: {', '.join(SYSTEMS)}")
        if self.batch_size < 1:
            raise WorkbenchError(f"batch_size must be >= 1, got {self.batch_size}")

    def engine_config(self, requests: list[Request]) -> EngineConfig:
        """Slots sized to the longest request (not the model's whole context, which for
        Llama 3 would reserve 131,072 tokens per slot)."""
        longest = max((len(r.prompt_ids) + r.max_new_tokens for r in requests), default=1)
        return EngineConfig(self.max_num_seqs, self.max_num_batched_tokens,
                            max_model_len=longest, chunked_prefill=self.chunked_prefill)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_system(system: str, requests: list[Request], bench: BatchingBench, model, hf_model,
               progress: bool = False):
    """Serve ``requests`` with one system; (traces, seconds, slot utilization or None)."""
    if system.startswith("workbench/"):
        run = (run_static(model, requests, bench.batch_size, SamplingParams(), progress=progress)
               if system == "workbench/static" else
               run_continuous(model, requests, bench.engine_config(requests), progress=progress))
        return run.traces, run.seconds, run.utilization
    from workbench.baselines.hf import hf_continuous, hf_static

    eos = list(model.config.eos_token_ids) or None
    start = time.perf_counter()
    if system == "transformers/static":
        traces = hf_static(hf_model, requests, bench.batch_size, model.device, eos_token_id=eos,
                           pad_token_id=(eos or [0])[0], progress=progress, warmup=False, t0=start)
    else:
        traces = hf_continuous(hf_model, requests, model.device, eos_token_id=eos,
                               max_batch_tokens=bench.hf_max_batch_tokens, progress=progress,
                               warmup=True, t0=None)
    return traces, time.perf_counter() - start, None


@dataclass
class SystemRun:
    """One system's fastest run of a workload, and the seconds of all its runs."""

    traces: list
    seconds: float
    utilization: float | None  # our engines' slot utilization; None for transformers'
    runs_s: list[float]


def run_systems(model, hf_model, requests: list[Request], bench: BatchingBench,
                repeats: int = 1, progress: bool = False,
                warmup_requests: int = 4) -> dict[str, SystemRun]:
    """Serve ``requests`` with every system of ``bench``, each after a short warm-up.

    ``repeats > 1`` serves them that many times with every system, the systems taking turns, and
    keeps each system's fastest run (:func:`workbench.bench.run.fastest_in_turns` says why).
    """
    warm = [Request(r.prompt_ids, min(r.max_new_tokens, 4), ignore_eos=r.ignore_eos, id=r.id)
            for r in requests[:warmup_requests]]

    def warm_up(system):  # one-time costs (first kernels, allocations) out of the timing
        if warm:
            run_system(system, warm, bench, model, hf_model)

    def timed(system):
        _sync(model.device)
        run = run_system(system, requests, bench, model, hf_model, progress)
        _sync(model.device)
        return run  # (traces, seconds, utilization)

    runs = fastest_in_turns({s: functools.partial(timed, s) for s in bench.systems},
                            seconds=lambda run: run[1], repeats=repeats, before_first=warm_up)
    return {system: SystemRun(*run, runs_s) for system, (run, runs_s) in runs.items()}


def bench_batching(model, hf_model, requests: list[Request], bench: BatchingBench,
                   roofline=None, progress: bool = True, warmup_requests: int = 4,
                   repeats: int = 1) -> list[dict]:
    """One result dict per system (and the ratios on the continuous rows), from
    :func:`run_systems`; with ``repeats > 1`` each row describes the system's fastest run and
    lists every run's seconds under ``"runs_s"``."""
    results = []
    runs = run_systems(model, hf_model, requests, bench, repeats, progress, warmup_requests)
    for system, run in runs.items():
        row = {"system": system, **summarize(run.traces, run.seconds)}
        if run.utilization is not None:
            row["slot_utilization"] = run.utilization
        if repeats > 1:
            row["runs_s"] = run.runs_s
        if roofline is not None:
            batch = bench.batch_size if "static" in system else bench.max_num_seqs
            bound = roofline.max_decode_tokens_per_s(weight_bytes(model), batch=batch)
            row["decode_roofline_tok_s"] = bound
            row["fraction_of_roofline"] = row["output_tok_s"] / bound
        results.append(row)
    by_name = {r["system"]: r["output_tok_s"] for r in results}
    for row in results:
        if row["system"].endswith("/continuous"):
            static = by_name.get(row["system"].replace("continuous", "static"))
            if static:
                row["speedup_vs_static"] = row["output_tok_s"] / static
            peer = by_name.get("transformers/continuous")
            if peer and row["system"] == "workbench/continuous":
                row["speedup_vs_transformers_continuous"] = row["output_tok_s"] / peer
    return results


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())
