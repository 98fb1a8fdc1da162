"""The offloading benchmark: our schedules and Accelerate on one model, budget and workload.

For each batching (``gpu_batch_size x num_gpu_batches``) and schedule it runs greedy generation and
records decode throughput, the bytes moved, the peak fast memory, the cost model's prediction and
the *bound* set by the weight stream:

    bound (tok/s) = effective batch x BW / weight bytes

with BW the measured pinned host-to-device bandwidth on a GPU (the disk bandwidth on a CPU, where
the disk tier is what streams). ``bench offload`` (:mod:`workbench.bench.offload_cli`) and notebook
``06_offloading`` use it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from workbench.offload.cost import Calibration, predict
from workbench.offload.policy import Policy
from workbench.offload.schedule import OffloadedModel


@dataclass(frozen=True)
class Batching:
    gpu_batch_size: int
    num_gpu_batches: int

    @classmethod
    def parse(cls, text: str) -> Batching:
        from workbench.errors import WorkbenchError

        try:
            b, n = (int(x) for x in text.lower().split("x"))
            return cls(b, n)
        except ValueError:
            raise WorkbenchError(f"cannot read batching {text!r}: write BxN, e.g. 16x4 "
                                 f"(N batches of B rows)") from None


def random_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (n, length), generator=gen).tolist()


def stream_bandwidth(cal: Calibration) -> float:
    """Bytes/s of the tier the weights stream from: host->device on a GPU, disk on a CPU."""
    return cal.h2d_Bps if cal.device_type == "cuda" else cal.disk_Bps


def run_policies(om: OffloadedModel, policies: list[Policy], cal: Calibration, prompt_len: int,
                 gen_len: int, streamed_bytes: int | None = None,
                 progress: bool = True) -> list[dict]:
    """One result row per policy (same prompts for every policy with the same effective batch)."""
    rows = []
    weight_bytes = om.weight_bytes
    bw = stream_bandwidth(cal)
    for policy in tqdm(policies, disable=not progress, desc="offload policies"):
        prompts = random_prompts(policy.effective_batch, prompt_len, om.config.vocab_size)
        run = om.generate(prompts, gen_len, policy)
        pred = predict(policy, om.config, om.store.dtype, cal, prompt_len, gen_len)
        measured_step = run.decode_s / max(1, gen_len - 1)
        bound = policy.effective_batch * bw / weight_bytes
        row = {"system": f"workbench/{policy.schedule}", "policy": policy.label,
               "gpu_batch_size": policy.gpu_batch_size, "num_gpu_batches": policy.num_gpu_batches,
               "effective_batch": policy.effective_batch, "schedule": policy.schedule,
               "output_tok_s": run.output_tok_s, "decode_tok_s": run.decode_tok_s,
               "prefill_s": run.prefill_s, "decode_step_s": measured_step,
               "predicted_decode_step_s": pred.decode_step_s,
               "cost_model_error": pred.decode_step_s / measured_step - 1,
               "bound_tok_s": bound, "fraction_of_bound": run.decode_tok_s / bound,
               "bytes_per_step": {k: v / gen_len for k, v in run.bytes.items()},
               "peak_fast_bytes": run.peak_fast_bytes, "planned_fast_bytes": run.plan.fast_total,
               "within_budget": (run.peak_fast_bytes or run.plan.fast_total) <= om.budget.fast_bytes}
        if streamed_bytes:
            row["streamed_bound_tok_s"] = policy.effective_batch * bw / streamed_bytes
        rows.append(row)
    return rows


def accelerate_rows(hf_model, batch_sizes: list[int], prompt_len: int, gen_len: int, vocab: int,
                    device: torch.device, budget_bytes: int, weight_bytes: int,
                    cal: Calibration, progress: bool = True, evict=None) -> list[dict]:
    """Accelerate ``generate`` at each batch size, on the already dispatched ``hf_model``."""
    from workbench.baselines.accelerate import run_accelerate

    rows = []
    bw = stream_bandwidth(cal)
    for b in tqdm(batch_sizes, disable=not progress, desc="accelerate"):
        run = run_accelerate(hf_model, random_prompts(b, prompt_len, vocab), gen_len, device,
                             evict=evict)
        bound = b * bw / weight_bytes
        rows.append({"system": "accelerate/row", "effective_batch": b, "gpu_batch_size": b,
                     "num_gpu_batches": 1, "output_tok_s": run.output_tok_s,
                     "decode_tok_s": run.decode_tok_s, "prefill_s": run.prefill_s,
                     "decode_step_s": run.decode_s / max(1, gen_len - 1),
                     "bound_tok_s": bound, "fraction_of_bound": run.decode_tok_s / bound,
                     "peak_fast_bytes": run.peak_fast_bytes,
                     "within_budget": run.peak_fast_bytes is None
                     or run.peak_fast_bytes <= budget_bytes})
    return rows


def bars(rows: list[dict]) -> dict:
    """The issue's three bars, computed from the result rows (None where a row is missing)."""
    ours = [r for r in rows if r["system"] == "workbench/block" and r.get("within_budget", True)]
    theirs = [r for r in rows if r["system"] == "accelerate/row" and r["within_budget"]]
    best = max(ours, key=lambda r: r["decode_tok_s"], default=None)
    acc = max(theirs, key=lambda r: r["decode_tok_s"], default=None)
    same = {r["effective_batch"]: r for r in theirs}
    model_rows = [r for r in rows if "cost_model_error" in r]
    out = {
        "block_best_decode_tok_s": best and best["decode_tok_s"],
        "block_best_fraction_of_bound": best and best["fraction_of_bound"],
        "block_min_fraction_of_bound": min((r["fraction_of_bound"] for r in ours), default=None),
        "accelerate_best_decode_tok_s": acc and acc["decode_tok_s"],
        "block_over_accelerate_best": (best["decode_tok_s"] / acc["decode_tok_s"]
                                       if best and acc else None),
        "block_over_accelerate_same_batch": {
            str(b): max(r["decode_tok_s"] for r in ours if r["effective_batch"] == b)
            / same[b]["decode_tok_s"]
            for b in sorted({r["effective_batch"] for r in ours} & set(same))} or None,
        "cost_model_max_abs_error": max((abs(r["cost_model_error"]) for r in model_rows),
                                        default=None),
    }
    out["bar_block_80pct_of_bound"] = (out["block_best_fraction_of_bound"] or 0) >= 0.8
    out["bar_10x_accelerate"] = (out["block_over_accelerate_best"] or 0) >= 10
    out["bar_cost_model_25pct"] = (out["cost_model_max_abs_error"] is not None
                                   and out["cost_model_max_abs_error"] <= 0.25)
    return out
