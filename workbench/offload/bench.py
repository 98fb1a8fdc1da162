"""The offloading benchmark: our schedules and Accelerate on one model, budget and workload.

For each batching (``gpu_batch_size x num_gpu_batches``) and schedule it runs greedy generation and
records decode throughput, every step's time, the bytes moved, the planned and the measured peak of
fast memory, the cost model's prediction and the *bound* set by the weight stream:

    bound (tok/s) = effective batch x BW / weight bytes

with BW the measured pinned host-to-device bandwidth on a GPU (the disk bandwidth on a CPU, where
the disk tier is what streams). Each GPU batch size is warmed up with the whole workload before it
is timed (the first calls at new shapes can be much slower). :func:`bars` turns the rows into the
issue's three bars, counting only runs whose measured peak stayed within the budget.
``bench offload`` (:mod:`workbench.bench.offload_cli`) and notebook ``06_offloading`` use it.
"""

from __future__ import annotations

import shutil
import statistics
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from workbench.offload.cost import Calibration, predict
from workbench.offload.policy import Policy
from workbench.offload.schedule import OffloadedModel


@dataclass(frozen=True)
class Batching:
    """``B x N``: N batches of B rows; ``N = 0`` stands for "as many as the budget allows"."""

    gpu_batch_size: int
    num_gpu_batches: int

    @classmethod
    def parse(cls, text: str) -> Batching:
        from workbench.errors import WorkbenchError

        try:
            b, n = text.strip().lower().split("x", 1)
            out = cls(int(b), 0 if n == "max" else int(n))
        except ValueError:
            raise WorkbenchError(f"cannot read batching {text!r}: write BxN, e.g. 16x4 (N batches "
                                 f"of B rows), or Bxmax (as many batches as fit)") from None
        if out.gpu_batch_size < 1 or (out.num_gpu_batches < 1 and n != "max"):
            raise WorkbenchError(f"batching {text!r}: sizes must be >= 1")
        return out

    @property
    def label(self) -> str:
        return f"{self.gpu_batch_size}x{self.num_gpu_batches or 'max'}"


def random_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (n, length), generator=gen).tolist()


def stream_bandwidth(cal: Calibration) -> float:
    """Bytes/s of the tier the weights stream from: host->device on a GPU, disk on a CPU."""
    return cal.h2d_Bps if cal.device_type == "cuda" else cal.disk_Bps


def _memory(peak: int | None, start: int | None, reserved: int | None, budget: int) -> dict:
    return {"peak_fast_bytes": peak, "fast_bytes_at_start": start, "peak_reserved_bytes": reserved,
            "within_budget": None if peak is None else peak <= budget}


def run_policies(om: OffloadedModel, policies: list[Policy], cal: Calibration, prompt_len: int,
                 gen_len: int, streamed_bytes: int | None = None,
                 progress: bool = True) -> list[dict]:
    """One result row per policy (same prompts for every policy with the same effective batch)."""
    rows, warm = [], set()
    weight_bytes, budget = om.weight_bytes, om.budget.fast_bytes
    bw = stream_bandwidth(cal)
    for policy in tqdm(policies, disable=not progress, desc="offload policies"):
        b = policy.gpu_batch_size
        if b not in warm:  # every shape of this GPU batch once, untimed
            om.generate(random_prompts(b, prompt_len, om.config.vocab_size, seed=99), gen_len,
                        replace(policy, num_gpu_batches=1, schedule="block"))
            warm.add(b)
        prompts = random_prompts(policy.effective_batch, prompt_len, om.config.vocab_size)
        run = om.generate(prompts, gen_len, policy)
        pred = predict(policy, om.config, om.store.dtype, cal, prompt_len, gen_len)
        measured_step = run.decode_s / max(1, gen_len - 1)
        median_step = statistics.median(run.step_s[1:]) if gen_len > 1 else measured_step
        bound = policy.effective_batch * bw / weight_bytes
        row = {"system": f"workbench/{policy.schedule}", "policy": policy.label,
               "gpu_batch_size": b, "num_gpu_batches": policy.num_gpu_batches,
               "effective_batch": policy.effective_batch, "schedule": policy.schedule,
               "weights": [policy.weights.gpu, policy.weights.cpu, policy.weights.disk],
               "kv": [policy.kv.gpu, policy.kv.cpu, policy.kv.disk], "overlap": policy.overlap,
               "cpu_attention": policy.cpu_attention, "compress_weights": policy.compress_weights,
               "compress_kv": policy.compress_kv,
               "output_tok_s": run.output_tok_s, "decode_tok_s": run.decode_tok_s,
               "prefill_s": run.prefill_s, "decode_step_s": measured_step,
               "decode_step_median_s": median_step, "step_s": run.step_s,
               "predicted_decode_step_s": pred.decode_step_s,
               "cost_model_error": pred.decode_step_s / median_step - 1,
               "bound_tok_s": bound, "fraction_of_bound": run.decode_tok_s / bound,
               "bytes_per_step": {k: v / gen_len for k, v in run.bytes.items()},
               "planned_fast_bytes": run.plan.fast_total, "planned_fast": run.plan.rows(),
               "store_fast_bytes": run.store_fast_bytes,  # == fast_bytes_at_start if clean
               **_memory(run.peak_fast_bytes, run.fast_bytes_at_start, run.peak_reserved_bytes,
                         budget)}
        if streamed_bytes:
            row["streamed_bound_tok_s"] = policy.effective_batch * bw / streamed_bytes
        link = sum(run.bytes.get(k, 0) for k in ("h2d", "kv_h2d", "attn_h2d")) / gen_len
        if link and cal.device_type == "cuda":  # all a step sends over the link, KV included
            row["link_bound_tok_s"] = policy.effective_batch * bw / link
            row["fraction_of_link_bound"] = run.decode_tok_s / row["link_bound_tok_s"]
        rows.append(row)
    return rows


def accelerate_rows(hf_model, batch_sizes: list[int], prompt_len: int, gen_len: int, vocab: int,
                    device: torch.device, budget_bytes: int, weight_bytes: int,
                    cal: Calibration, progress: bool = True, evict=None,
                    warmed: tuple[int, ...] = ()) -> list[dict]:
    """Accelerate ``generate`` at each batch size, on the already dispatched ``hf_model`` (each
    batch size not in ``warmed`` first runs two untimed tokens)."""
    from workbench.baselines.accelerate import run_accelerate

    rows = []
    bw = stream_bandwidth(cal)
    for b in tqdm(batch_sizes, disable=not progress, desc="accelerate"):
        prompts = random_prompts(b, prompt_len, vocab)
        if b not in warmed:
            run_accelerate(hf_model, prompts, 2, device, evict=evict)
        run = run_accelerate(hf_model, prompts, gen_len, device, evict=evict)
        bound = b * bw / weight_bytes
        rows.append({"system": "accelerate/row", "effective_batch": b, "gpu_batch_size": b,
                     "num_gpu_batches": 1, "output_tok_s": run.output_tok_s,
                     "decode_tok_s": run.decode_tok_s, "prefill_s": run.prefill_s,
                     "decode_step_s": run.decode_s / max(1, gen_len - 1), "step_s": run.step_s,
                     "bound_tok_s": bound, "fraction_of_bound": run.decode_tok_s / bound,
                     "non_weight_bytes": (None if run.peak_fast_bytes is None
                                          else run.peak_fast_bytes - run.fast_bytes_at_start),
                     **_memory(run.peak_fast_bytes, run.fast_bytes_at_start,
                               run.peak_reserved_bytes, budget_bytes)})
    return rows


def _best(rows: list[dict]) -> dict | None:
    return max(rows, key=lambda r: r["decode_tok_s"], default=None)


def _brief(row: dict | None) -> dict | None:
    if row is None:
        return None
    return {"policy": row.get("policy", f"batch {row['effective_batch']}"),
            "effective_batch": row["effective_batch"], "decode_tok_s": row["decode_tok_s"],
            "fraction_of_bound": row["fraction_of_bound"], "peak_fast_bytes": row["peak_fast_bytes"]}


def bars(rows: list[dict]) -> dict:
    """The issue's three bars from the result rows.

    Only runs whose measured peak stayed within the budget count for the bars (a run whose peak was
    not measured, ``within_budget`` None, counts and is listed); the ratios regardless of budget
    and at equal effective batch are reported beside them, labelled, for context."""
    def within(r: dict) -> bool:
        return r.get("within_budget") is not False

    block = [r for r in rows if r["system"] == "workbench/block"]
    acc = [r for r in rows if r["system"] == "accelerate/row"]
    ours, theirs = _best([r for r in block if within(r)]), _best([r for r in acc if within(r)])
    same = {}
    for r in filter(within, block):
        for a in filter(within, acc):
            if a["effective_batch"] == r["effective_batch"]:
                ratio = r["decode_tok_s"] / a["decode_tok_s"]
                same[str(r["effective_batch"])] = max(ratio, same.get(str(r["effective_batch"]), 0))
    priced = [r for r in rows if r.get("cost_model_error") is not None]
    any_ours, any_theirs = _best(block), _best(acc)
    out = {
        "block_best_within_budget": _brief(ours),
        "block_max_fraction_of_bound_within_budget": max(
            (r["fraction_of_bound"] for r in block if within(r)), default=None),
        "accelerate_best_within_budget": _brief(theirs),
        "block_over_accelerate_best_within_budget": (ours["decode_tok_s"] / theirs["decode_tok_s"]
                                                     if ours and theirs else None),
        "block_over_accelerate_same_batch_within_budget": dict(sorted(same.items())) or None,
        "block_over_accelerate_best_regardless_of_budget": (
            any_ours["decode_tok_s"] / any_theirs["decode_tok_s"] if any_ours and any_theirs
            else None),
        "over_budget": [r.get("policy", f"{r['system']} batch {r['effective_batch']}")
                        for r in rows if r.get("within_budget") is False],
        "peak_not_measured": [r.get("policy", f"{r['system']} batch {r['effective_batch']}")
                              for r in rows if r.get("within_budget") is None],
        "cost_model_max_abs_error": max((abs(r["cost_model_error"]) for r in priced),
                                        default=None),
        # context for the first bar: every block run at >= 80 % of its own bound (the fastest
        # one may not be: a KV cache in RAM adds its bytes to the link the weights stream over)
        "block_runs_at_80pct_of_bound": [r["policy"] for r in block
                                         if within(r) and r["fraction_of_bound"] >= 0.8],
    }
    out["bar_block_80pct_of_bound"] = bool(ours) and ours["fraction_of_bound"] >= 0.8
    out["bar_10x_accelerate"] = (out["block_over_accelerate_best_within_budget"] or 0) >= 10
    out["bar_cost_model_25pct"] = (out["cost_model_max_abs_error"] is not None
                                   and out["cost_model_max_abs_error"] <= 0.25)
    return out


def accelerate_baseline(hf, config, dtype, batches: list[int], P: int, G: int, device, budget,
                        cal: Calibration, weight_bytes: int) -> tuple[list[dict], dict]:
    """``bench offload``'s peer: Accelerate at each batch size (rows as :func:`accelerate_rows`
    gives them, and what was tried), each dispatched with the most weights on the device that
    leave room for that batch: ``max_memory`` = budget - estimate of what it does not cover (KV
    cache, activations, logits, library workspaces), lowered by the excess while a probe run's
    measured peak is over the budget (at most 3 dispatches per batch size)."""
    from workbench.baselines.accelerate import cpu_state

    state, folder = cpu_state(hf), Path(budget.disk_dir) / "accelerate"
    rows, info = [], {"note": "one dispatch per batch size; see attempts", "attempts": []}
    for b in batches:
        try:  # the first batch size dispatches the model given, the others rebuild it from state
            rows.append(_accelerate_batch(hf, b, state, folder, info, config, dtype, P, G, device,
                                          budget, cal, weight_bytes))
        except Exception as err:  # a failed baseline run must not cost our rows: record it
            info.setdefault("errors", {})[str(b)] = f"{type(err).__name__}: {err}"
        hf = None
    return rows, info


def _accelerate_batch(hf, b, state, folder, info, config, dtype, P, G, device, budget, cal,
                      weight_bytes) -> dict:
    """One batch size of :func:`accelerate_baseline`: its row; every model it dispatched is released."""
    from workbench.baselines.accelerate import (dispatch, hf_from_state, placement_summary,
                                                release, run_accelerate)
    from workbench.offload.memory import plan_memory
    from workbench.offload.policy import Policy, Split

    plan = plan_memory(Policy(weights=Split(0, 100, 0), gpu_batch_size=b), config, dtype,
                       device.type, P, G)
    estimate = plan.kv + plan.activations + plan.workspace + plan.logits + plan.runtime
    max_memory = budget.fast_bytes - estimate
    probe_prompts = random_prompts(b, P, config.vocab_size, seed=98)
    model = None
    try:
        for attempt in range(3):
            model = hf if attempt == 0 and hf is not None else hf_from_state(config, state, dtype)
            where = folder / f"batch{b}-{attempt}"  # a fresh offload folder for each dispatch
            given = max(max_memory, 0)  # what Accelerate is told; the estimate can exceed the budget
            model, device_map = dispatch(model, device, given, where)
            evict = where if "disk" in device_map.values() else None  # cold disk reads, as ours
            probe = run_accelerate(model, probe_prompts, 2, device, evict=evict)  # + warm-up
            info["attempts"].append({
                "batch": b, "max_memory_bytes": given, "overhead_estimate_bytes": estimate,
                "probe_peak_fast_bytes": probe.peak_fast_bytes,
                "weights_on_device_bytes": probe.fast_bytes_at_start,
                "layers": placement_summary(device_map, config.num_hidden_layers)})
            if probe.peak_fast_bytes is None or probe.peak_fast_bytes <= budget.fast_bytes \
                    or attempt == 2:
                break
            release(model)
            model = None
            shutil.rmtree(where, ignore_errors=True)
            max_memory -= probe.peak_fast_bytes - budget.fast_bytes + budget.fast_bytes // 50
        row = accelerate_rows(model, [b], P, G, config.vocab_size, device, budget.fast_bytes,
                              weight_bytes, cal, progress=False, evict=evict, warmed=(b,))[0]
        return {**row, "max_memory_bytes": info["attempts"][-1]["max_memory_bytes"],
                "layers": info["attempts"][-1]["layers"]}
    finally:
        if model is not None:
            release(model)
        shutil.rmtree(folder, ignore_errors=True)
