"""``workbench bench paged``: contiguous vs paged KV storage, eager vs CUDA graphs, one process.

Three parts, all on the same model, device and dtype:

1. **throughput** - the workload served by each system (ours: paged with CUDA graphs, paged
   eager, contiguous slots; transformers' continuous batching), with the KV accounting of ours
   and the *workload floor*: per step, weights plus the keys/values attention reads over the
   measured bandwidth (decode) or the step's FLOPs over the measured peak (prefill), summed;
   ``fraction_of_floor`` = floor / measured time, and ``time_split`` says where the time went;
2. **batch-1 decode** - one request decoding alone: tok/s against its bandwidth limit
   (``bandwidth / (weight bytes + KV bytes read)`` per token), ours vs transformers ``generate``,
   and the GPU time of one replayed graph step measured with CUDA events;
3. **KV budget sweep** - for each KV memory budget, the batch the max-length reservation allows
   vs what paged blocks allow, real-token fraction and throughput of both.
"""

from __future__ import annotations

import functools
import statistics
import time
from dataclasses import dataclass, replace


from workbench.bench.batching import _sync as sync
from workbench.bench.batching import weight_bytes
from workbench.bench.run import fastest_in_turns
from workbench.engine import ContinuousEngine, EngineConfig, Request, run_continuous
from workbench.errors import WorkbenchError
from workbench.kv.accounting import capacity_for_budget, kv_summary
from workbench.kv.paged import kv_bytes_per_token
from workbench.metrics import summarize

SYSTEMS = ("workbench/paged+graphs+compile", "workbench/paged+graphs", "workbench/paged",
           "workbench/contiguous", "transformers/continuous")
FAST = "workbench/paged+graphs+compile"


@dataclass(frozen=True)
class PagedBench:
    """Engine limits shared by our systems (vLLM names)."""

    systems: tuple[str, ...] = SYSTEMS
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    block_size: int = 16

    def __post_init__(self) -> None:
        unknown = set(self.systems) - set(SYSTEMS)
        if unknown:
            raise WorkbenchError(f"unknown systems {sorted(unknown)}; known: {', '.join(SYSTEMS)}")

    def config(self, system: str, max_len: int, **overrides) -> EngineConfig:
        paged = system.startswith("workbench/paged")
        fields = dict(max_num_seqs=self.max_num_seqs,
                      max_num_batched_tokens=self.max_num_batched_tokens, max_model_len=max_len,
                      chunked_prefill=True, kv="paged" if paged else "contiguous")
        if paged:
            fields.update(block_size=self.block_size, cuda_graphs="+graphs" in system,
                          compile=system.endswith("+compile"))
        return EngineConfig(**(fields | overrides))


def longest(requests: list[Request]) -> int:
    return max(len(r.prompt_ids) + r.max_new_tokens for r in requests)


def serve(model, requests: list[Request], config: EngineConfig, progress: bool = False):
    """Warm up (CUDA graphs captured, kernels loaded), then serve ``requests``: (run, engine)."""
    engine = ContinuousEngine(model, config)
    if engine.graphs is not None:
        engine.graphs.capture()
    # warm-up: the same requests cut to 4 output tokens (every prefill shape of the real run,
    # every kernel loaded; a first run in a process was measured 1-2 s slower without it)
    warm = [replace(r, max_new_tokens=min(4, r.max_new_tokens), id=-1 - i)
            for i, r in enumerate(requests)]
    run_continuous(model, warm, config, engine=engine)
    engine.kv_history.clear()
    engine.timeline.clear()
    sync(model.device)
    run = run_continuous(model, requests, config, progress=progress, engine=engine)
    sync(model.device)
    return run, engine


def step_floors(model, history: list[dict], roofline) -> dict:
    """The workload floor from the engine's step records, and where the measured time went."""
    weights = weight_bytes(model)
    per_token = kv_bytes_per_token(model.config, model.dtype)
    flops_per_token = 2 * sum(p.numel() for p in model.parameters())
    split = {"decode_s": 0.0, "prefill_s": 0.0, "decode_floor_s": 0.0, "prefill_floor_s": 0.0,
             "decode_host_s": 0.0, "prefill_host_s": 0.0}
    prev = 0.0  # the run's clock starts with the first step
    for h in history:
        seconds, prev = h["t"] - prev, h["t"]
        bytes_read = weights + h["context"] * per_token
        tokens = h["decodes"] + h["prefill_tokens"]
        floor = max(bytes_read / roofline.bandwidth, tokens * flops_per_token / roofline.peak_flops)
        kind = "prefill" if h["prefill_tokens"] else "decode"
        split[f"{kind}_s"] += seconds
        split[f"{kind}_floor_s"] += floor
        split[f"{kind}_host_s"] += h["host_s"]  # not overlapped with the device
    total = split["decode_s"] + split["prefill_s"]
    floor = split["decode_floor_s"] + split["prefill_floor_s"]
    return {"floor_s": floor, "fraction_of_floor": floor / max(total, 1e-9), "time_split": split}


def bench_throughput(model, hf_model, requests, bench: PagedBench, roofline,
                     progress: bool = True) -> list[dict]:
    rows, max_len = [], longest(requests)
    for system in bench.systems:
        if "+graphs" in system and model.device.type != "cuda":
            continue  # CUDA graphs need a GPU
        if system.startswith("transformers/"):
            from workbench.baselines.hf import hf_continuous

            eos = list(model.config.eos_token_ids) or None
            sync(model.device)
            start = time.perf_counter()
            traces = hf_continuous(hf_model, requests, model.device, eos_token_id=eos,
                                   progress=progress, warmup=True, t0=None)
            sync(model.device)
            rows.append({"system": system, **summarize(traces, time.perf_counter() - start)})
            continue
        run, engine = serve(model, requests, bench.config(system, max_len), progress)
        row = {"system": system, **summarize(run.traces, run.seconds),
               "kv": kv_summary(engine.kv_history), "kv_bytes": engine.kv.nbytes()}
        if roofline is not None:
            row.update(step_floors(model, engine.kv_history, roofline))
        if engine.graphs is not None:
            row["graphs"] = len(engine.graphs.graphs)
            row["capture_s"] = engine.graphs.capture_s
        rows.append(row)
    by_name = {r["system"]: r["output_tok_s"] for r in rows}
    for row in rows:
        for other in ("workbench/contiguous", "transformers/continuous"):
            if other in by_name and row["system"] != other:
                row[f"speedup_vs_{other.replace('/', '_')}"] = row["output_tok_s"] / by_name[other]
    return rows


def bench_batch1(model, hf_model, prompt: tuple[int, ...], new_tokens: int, bench: PagedBench,
                 roofline, repeats: int = 3) -> list[dict]:
    """Decode tok/s of one request alone (median of ``repeats``), against its bandwidth limit."""
    weights = weight_bytes(model)
    per_token = kv_bytes_per_token(model.config, model.dtype)
    mean_context = len(prompt) + new_tokens / 2
    limit = roofline.bandwidth / (weights + mean_context * per_token)
    request = Request(prompt, new_tokens, ignore_eos=True, id=0)
    max_len = len(prompt) + new_tokens
    rows = []
    systems = [s for s in (FAST, "workbench/paged+graphs", "workbench/paged")
               if s.endswith("paged") or model.device.type == "cuda"]
    for system in systems:
        config = bench.config(system, max_len, max_num_seqs=1)
        speeds, engine = [], None
        for _ in range(repeats):
            run, engine = serve(model, [request], config)
            times = run.traces[0].token_times
            speeds.append((len(times) - 1) / (times[-1] - times[0]))
        tok_s = statistics.median(speeds)
        row = {"system": system, "decode_tok_s": tok_s, "runs_tok_s": speeds,
               "limit_tok_s": limit, "fraction_of_limit": tok_s / limit}
        if engine.graphs is not None:
            row["graph_step_ms"] = graph_step_ms(engine, request)
            row["graph_fraction_of_limit"] = 1e3 / row["graph_step_ms"] / limit
        rows.append(row)
    if hf_model is not None:
        from workbench.baselines.hf import hf_generate_timed

        speeds = [hf_generate_timed(hf_model, prompt, new_tokens, model.device)
                  for _ in range(repeats)]
        tok_s = statistics.median(speeds)
        rows.append({"system": "transformers/generate", "decode_tok_s": tok_s,
                     "runs_tok_s": speeds, "limit_tok_s": limit, "fraction_of_limit": tok_s / limit})
    return rows


def graph_step_ms(engine: ContinuousEngine, request: Request, replays: int = 50) -> float:
    """Median GPU time of one batch-1 decode graph replay (CUDA events), mid-sequence context."""
    from workbench.engine.cudagraph import replay_ms

    graphs = engine.graphs
    nb = next(x for x in graphs.block_buckets
              if x * engine.config.block_size >= len(request.prompt_ids) + request.max_new_tokens // 2)
    graph, _ = graphs.graphs[graphs.batch_buckets[0], nb]
    return replay_ms(graph, replays)


def bench_budgets(model, requests, bench: PagedBench, budgets_gib: list[float],
                  progress: bool = False, repeats: int = 1) -> list[dict]:
    """Per KV budget: max-length slots vs paged blocks - batch that fits, real fraction, tok/s.

    Both run on the same engine code (paged, CUDA graphs on a GPU) so that only the memory
    policy differs: the max-length reservation is the batch cap ``budget // (max_len x bytes)``.
    ``repeats > 1`` serves the requests that many times per policy, the two taking turns, and keeps
    each policy's fastest run (:func:`workbench.bench.run.fastest_in_turns`).
    """
    fast = FAST if model.device.type == "cuda" else "workbench/paged"
    max_len, rows = longest(requests), []
    for gib in budgets_gib:
        cap = capacity_for_budget(model.config, model.dtype, int(gib * 2**30), max_len,
                                  bench.block_size)
        configs = {  # a slot per sequence: as many sequences as max-length slots fit
            "max-length reservation": bench.config(fast, max_len, max_num_seqs=min(
                cap["slots"], bench.max_num_seqs)),
            "paged": bench.config(fast, max_len, num_blocks=max(cap["blocks"], 1))}
        fastest = fastest_in_turns(
            {policy: functools.partial(serve, model, requests, config, progress)
             for policy, config in configs.items()},
            seconds=lambda served: served[0].seconds, repeats=repeats)
        for policy, ((run, engine), runs_s) in fastest.items():
            kv = kv_summary(engine.kv_history)
            if policy != "paged":  # what slots would reserve: max_len per running sequence
                kv["real_fraction"] = sum(h["tokens"] for h in engine.kv_history) / max(
                    1, sum(h["running"] * max_len for h in engine.kv_history))
            rows.append({"budget_gib": gib, "policy": policy, **cap,
                         "output_tok_s": summarize(run.traces, run.seconds)["output_tok_s"],
                         "real_fraction": kv["real_fraction"], "peak_running": kv["peak_running"],
                         "mean_running": kv["mean_running"], "preemptions": kv["preemptions"],
                         "steps": kv["steps"], **({"runs_s": runs_s} if repeats > 1 else {})})
    return rows
