"""Reading a ``bench offload`` JSON back: its bars, its memory, its cost model refitted.

Notebook ``06_offloading`` shows the committed H100 run with these, and the tests check the refit
on it. Reports written before the calibration grew (the first H100 run) carry fewer calibration
fields: :func:`calibration_of` fills the missing ones with values that do not matter for those runs
(KV cache resident, no compression) and with ``overlap = 1`` (measured 1.00 on that machine by the
notebook run of the same day).
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import torch

from workbench.bench.run import RESULTS_DIR as RESULTS
from workbench.model.config import ModelConfig
from workbench.offload.cost import Calibration, _layer_params
from workbench.offload.fit import FREE, fit_calibration, leave_one_out, measured_step, policy_of
from workbench.offload.memory import RUNTIME_CUDA, plan_memory

# The first H100 run (its peaks broke the budget; notebook 06 diagnoses it) and the second, after the fixes.
FIRST_RUN = RESULTS / "offload-llama-3.1-8b_h100_2026-11-27-run1.json"
GPU_REPORT = RESULTS / "offload-llama-3.1-8b_h100_2026-11-27-run2.json"
# One H200, a week later: the same study plus the KV cache in RAM (2,048 sequences per weight load).
KV_RAM_RUN = RESULTS / "offload-llama-3.1-8b_h200_2026-12-04-run5.json"


def load_report(path: str | Path = GPU_REPORT) -> dict:
    return json.loads(Path(path).read_text())


def config_of(report: dict) -> ModelConfig:
    from workbench.model.loading import PRESET_PREFIX, resolve_model_dir
    from workbench.model.presets import preset_config

    name = str(report["model"])
    if name.startswith(PRESET_PREFIX):
        return preset_config(name.removeprefix(PRESET_PREFIX))
    raw = json.loads((resolve_model_dir(name) / "config.json").read_text())
    return ModelConfig.from_hf_dict(raw)


def dtype_of(report: dict) -> torch.dtype:
    return getattr(torch, report["dtype"])


def calibration_of(report: dict) -> Calibration:
    """The calibration the report's predictions were made with (see the module docstring)."""
    cal = report["calibration"]
    names = {f.name for f in fields(Calibration)}
    if "device_type" in cal:
        return Calibration.from_dict({k: v for k, v in cal.items() if k in names})
    config = config_of(report)
    token = 2 * _layer_params(config) / (cal["layer_TFLOP_s"] * 1e12)
    h2d = cal["h2d_pinned_GB_s"] * 1e9 if cal.get("h2d_pinned_GB_s") else float("inf")
    return Calibration(report["hardware"]["device_type"], cal["disk_GB_s"] * 1e9, h2d,
                       float("inf"), cal["layer_fixed_ms"] / 1e3, token, cal["layer_fixed_ms"] / 1e3,
                       token, float("inf"), overlap=1.0, source="given")


def our_rows(report: dict) -> list[dict]:
    return [r for r in report["results"] if r["system"].startswith("workbench/")]


def refit(report: dict, free: tuple[str, ...] = FREE, loo: bool = True) -> dict:
    """The cost model fitted to the report's own rows: parameters, in-sample and leave-one-out
    errors, rows flagged as stalls; the a-priori errors (the report's predictions) beside them."""
    rows, config, dtype = our_rows(report), config_of(report), dtype_of(report)
    P, G = report["workload"]["prompt_len"], report["workload"]["gen_len"]
    fit = fit_calibration(rows, calibration_of(report), config, dtype, P, G, free)
    held = leave_one_out(rows, calibration_of(report), config, dtype, P, G, free) if loo else None
    table = []
    for i, r in enumerate(rows):
        table.append({"policy": r["policy"], "measured_step_s": measured_step(r),
                      "a_priori_error": r.get("cost_model_error"),
                      "fitted_error": fit.errors[i],
                      "leave_one_out_error": held[i] if held else None,
                      "stalled": fit.excluded.get(i)})
    fitted = [abs(e) for i, e in enumerate(fit.errors) if i not in fit.excluded]
    return {"free": list(free), "calibration": fit.calibration.to_dict(), "rows": table,
            "max_abs_fitted_error": max(fitted, default=None), "stalled": [rows[i]["policy"] for i in fit.excluded],
            "mean_abs_log_error": fit.objective}


def memory_table(report: dict) -> list[dict]:
    """Each row's measured peak beside the plan it ran with and the current planner's plan."""
    config, dtype = config_of(report), dtype_of(report)
    P, G = report["workload"]["prompt_len"], report["workload"]["gen_len"]
    device_type = report["hardware"]["device_type"]
    out = []
    for r in report["results"]:
        entry = {"system": r["system"], "policy": r.get("policy", f"batch {r['effective_batch']}"),
                 "peak_fast_bytes": r.get("peak_fast_bytes"),
                 "fast_bytes_at_start": r.get("fast_bytes_at_start"),
                 "planned_then": r.get("planned_fast_bytes"), "plan_now": None,
                 "staging_now": None, "within_budget": r.get("within_budget")}
        if r["system"].startswith("workbench/"):
            plan = plan_memory(policy_of(r), config, dtype, device_type, P, G)
            entry["plan_now"], entry["staging_now"] = plan.fast_total, plan.staging
        out.append(entry)
    return out


def run_checks(report: dict, tolerance: int = RUNTIME_CUDA) -> list[tuple[bool, str]]:
    """What a new run must show (notebook 06, section 8): ``(passed, message)`` for each check.
    ``tolerance``: bytes allowed at a run's start besides the model's weights (cuBLAS workspaces,
    allocated once and kept, which the plan's ``runtime`` item counts)."""
    out = []
    budget = report["budget_bytes"]
    for r in report["results"]:
        name = r.get("policy", f"{r['system']} batch {r['effective_batch']}")
        peak = r.get("peak_fast_bytes")
        if peak is None:
            continue
        if r["system"].startswith("workbench/"):
            left = r["fast_bytes_at_start"] - r["store_fast_bytes"]
            out.append((abs(left) <= tolerance, f"{name}: {left} bytes allocated at start besides "
                                                f"the model's own weights"))
            out.append((peak <= r["planned_fast_bytes"], f"{name}: peak {peak} <= plan "
                                                        f"{r['planned_fast_bytes']}"))
        out.append((peak <= budget, f"{name}: peak {peak} <= budget {budget}"))
    for r in our_rows(report):
        err = r.get("cost_model_error")
        if err is not None:
            out.append((abs(err) <= 0.25, f"{r['policy']}: a-priori cost model error {err:+.1%}"))
    if (report.get("cost_model_refit") or {}).get("stalled") is not None:
        stalled = report["cost_model_refit"]["stalled"]
        out.append((not stalled, f"runs contradicting a run of the same work: {stalled}"))
    for key in ("bar_block_80pct_of_bound", "bar_10x_accelerate", "bar_cost_model_25pct"):
        out.append((bool(report["bars"][key]), f"{key}"))
    return out


def print_checks(path: str | Path) -> int:
    """Print :func:`run_checks` of the JSON at ``path``; returns the number that failed."""
    checks = run_checks(load_report(path))
    for ok, message in checks:
        print(("ok    " if ok else "FAIL  ") + message)
    return sum(not ok for ok, _ in checks)
