"""Fit the cost model's few parameters to measured runs, and judge it on them (notebook ``06``).

:func:`~workbench.offload.calibrate.calibrate` measures every parameter with micro-benchmarks;
this module instead asks which values of some of them (by default the layer call ``a``, its
per-row cost ``c`` and the step overhead ``s0``; the bandwidths stay as measured) make
:func:`~workbench.offload.cost.predict` agree best with whole runs: it minimises the sum of
``|log(predicted / measured)|`` (a robust fit: one stalled run cannot drag the others) with
Nelder-Mead on the parameters' logarithms. The head's call is tied to the layer's (same fixed
cost, per-row cost scaled by its parameter count) so that the fit has few unknowns.

:func:`stalled_rows` flags runs that contradict another run of the same work: a block-schedule
run with one batch does per step exactly what one pass of the row schedule does at the same GPU
batch, so their step times must agree (within 1.5x); when they do not, the slower one must have
stalled (a one-off cost such as the first calls at a new batch size: nothing makes a run faster
than its work) and no model of the steady state can predict it. :func:`leave_one_out` refits
without each row in turn and predicts it, which is what "predicts" means for a fitted model.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, replace

import numpy as np
import torch

from workbench.model.config import ModelConfig
from workbench.offload.cost import Calibration, _layer_params, predict
from workbench.offload.layout import weight_units
from workbench.offload.policy import Policy, Split

FREE = ("layer_fixed_s", "layer_token_s", "step_fixed_s")
STALL_RATIO = 1.5


def policy_of(row: dict) -> Policy:
    """The policy of a ``bench offload`` result row (explicit fields, or its label)."""
    def split(key: str, what: str) -> Split:
        if key in row:
            return Split(*row[key], what=what)
        m = re.search(rf"\b{'w' if key == 'weights' else 'kv'} ([\d.]+)/([\d.]+)/([\d.]+)",
                      row["policy"])
        return Split(*(float(x) for x in m.groups()), what=what)

    return Policy(weights=split("weights", "weights"), kv=split("kv", "KV cache"),
                  gpu_batch_size=row["gpu_batch_size"], num_gpu_batches=row["num_gpu_batches"],
                  schedule=row["schedule"], overlap=row.get("overlap", True),
                  cpu_attention=row.get("cpu_attention", False),
                  compress_weights=row.get("compress_weights", False),
                  compress_kv=row.get("compress_kv", False))


def measured_step(row: dict) -> float:
    """The steady-state decode step of a row: the median step when recorded, else the mean."""
    return row.get("decode_step_median_s") or row["decode_step_s"]


def stalled_rows(rows: list[dict]) -> dict[int, str]:
    """Rows (by index) slower than another run of the same work by more than ``STALL_RATIO``."""
    out = {}
    for i, r in enumerate(rows):
        if r["schedule"] != "block" or r["num_gpu_batches"] != 1:
            continue
        for j, other in enumerate(rows):
            if other["schedule"] != "row" or other["gpu_batch_size"] != r["gpu_batch_size"] \
                    or policy_of(other).weights != policy_of(r).weights:
                continue
            one, per_pass = measured_step(r), measured_step(other) / other["num_gpu_batches"]
            if one > STALL_RATIO * per_pass:
                out[i] = (f"{one:.3f} s per step, but one pass of '{other['policy']}' (the same "
                          f"work) took {per_pass:.3f} s in the same run: a stall")
            elif per_pass > STALL_RATIO * one:
                out[j] = (f"{per_pass:.3f} s per pass, but '{r['policy']}' (the same work) took "
                          f"{one:.3f} s per step in the same run: a stall")
    return out


def tie_head(cal: Calibration, config: ModelConfig) -> Calibration:
    """The head's call priced like a layer's: same fixed cost, per-row cost scaled by size."""
    head = sum(p.numel for p in weight_units(config)[-1].params)
    return replace(cal, head_fixed_s=cal.layer_fixed_s,
                   head_token_s=cal.layer_token_s * head / _layer_params(config))


@dataclass(frozen=True)
class Fit:
    calibration: Calibration
    errors: list[float]  # predicted / measured - 1 for every row given
    excluded: dict[int, str]  # rows left out of the fit, and why
    objective: float  # mean |log(predicted / measured)| over the rows fitted


def _errors(cal, rows, policies, config, dtype, prompt_len, gen_len) -> list[float]:
    return [predict(p, config, dtype, cal, prompt_len, gen_len).decode_step_s / measured_step(r) - 1
            for r, p in zip(rows, policies)]


def fit_calibration(rows: list[dict], base: Calibration, config: ModelConfig, dtype: torch.dtype,
                    prompt_len: int, gen_len: int, free: tuple[str, ...] = FREE,
                    exclude: dict[int, str] | None = None) -> Fit:
    """``base`` with the ``free`` parameters fitted to the measured steps of ``rows`` (minus
    ``exclude``, by default :func:`stalled_rows`); the head tied to the layer."""
    excluded = stalled_rows(rows) if exclude is None else dict(exclude)
    policies = [policy_of(r) for r in rows]
    used = [i for i in range(len(rows)) if i not in excluded]
    if len(used) < 1:
        raise ValueError("no row left to fit")

    def make(x) -> Calibration:
        # log-seconds clipped to [1e-13 s, 1e3 s]: the simplex may wander far out where a term
        # hides behind the loads and the loss is flat (exp overflowed there on an H200)
        values = {k: float(math.exp(min(max(v, -30.0), 7.0))) for k, v in zip(free, x)}
        if "overlap" in values:
            values["overlap"] = min(1.0, values["overlap"])
        return tie_head(replace(base, **values, source="fitted"), config)

    def loss(x) -> float:
        cal = make(x)
        errs = _errors(cal, [rows[i] for i in used], [policies[i] for i in used], config, dtype,
                       prompt_len, gen_len)
        return float(np.mean([abs(math.log1p(e)) for e in errs]))

    # the loss is flat wherever a term hides behind the loads: start from the best points of a
    # coarse grid (every decade of seconds), then polish the best simplex once more
    grid = [(0.1, 0.5, 1.0) if k == "overlap" else tuple(10.0 ** e for e in range(-7, 0))
            for k in free]
    starts = sorted(itertools.product(*grid), key=lambda p: loss([math.log(v) for v in p]))[:3]
    best = min((nelder_mead(loss, [math.log(v) for v in p], 1.0) for p in starts),
               key=lambda res: res[1])
    best = nelder_mead(loss, best[0], 0.3)
    cal = make(best[0])
    return Fit(cal, _errors(cal, rows, policies, config, dtype, prompt_len, gen_len), excluded,
               best[1])


def leave_one_out(rows: list[dict], base: Calibration, config: ModelConfig, dtype: torch.dtype,
                  prompt_len: int, gen_len: int, free: tuple[str, ...] = FREE) -> list[float | None]:
    """For each row not flagged as stalled: its error when the model is fitted to the others."""
    stalled = stalled_rows(rows)
    out: list[float | None] = []
    for i in range(len(rows)):
        if i in stalled:
            out.append(None)
            continue
        fit = fit_calibration(rows, base, config, dtype, prompt_len, gen_len, free,
                              exclude={**stalled, i: "held out"})
        out.append(fit.errors[i])
    return out


def nelder_mead(f, x0: list[float], scale: float, iters: int = 300,
                tol: float = 1e-7) -> tuple[list[float], float]:
    """Minimise ``f`` from ``x0`` (a simplex of edge ``scale``): the textbook reflect / expand /
    contract / shrink steps. Returns the best point and its value."""
    n = len(x0)
    pts = [np.array(x0, float)] + [np.array(x0, float) + scale * np.eye(n)[i] for i in range(n)]
    vals = [f(p) for p in pts]
    for _ in range(iters):
        order = np.argsort(vals)
        pts, vals = [pts[i] for i in order], [vals[i] for i in order]
        if abs(vals[-1] - vals[0]) < tol:
            break
        centre = np.mean(pts[:-1], axis=0)
        refl = centre + (centre - pts[-1])
        fr = f(refl)
        if fr < vals[0]:
            exp = centre + 2 * (centre - pts[-1])
            fe = f(exp)
            pts[-1], vals[-1] = (exp, fe) if fe < fr else (refl, fr)
        elif fr < vals[-2]:
            pts[-1], vals[-1] = refl, fr
        else:
            con = centre + 0.5 * (pts[-1] - centre)
            fc = f(con)
            if fc < vals[-1]:
                pts[-1], vals[-1] = con, fc
            else:
                pts = [pts[0] + 0.5 * (p - pts[0]) for p in pts]
                vals = [vals[0]] + [f(p) for p in pts[1:]]
    i = int(np.argmin(vals))
    return list(pts[i]), float(vals[i])
