"""Issue 5's bars, judged from benchmark files: one verdict per bar, with the file and hardware.

    python tools/parallel_bars.py bench/results/tp-graphs-*.json bench/results/pp-*.json ... [--json OUT]

``tools/gpu/parallel.sh`` prints it after its stages. How each bar is read (the decisions are here
so that every session judges a run the same way):

* **Within 1.25x of the floor** (the 8B shape, every TP size and batch): each ``bench tp`` row's
  *best* step against the floor of that step's own all-reduce - the eager step against ``floor_ms``
  (the all-reduce at its eager latency), a step replayed with NCCL against ``floor_graph_ar_ms``
  (NCCL's latency replayed), with the one-shot - alone or fused into the next norm - against
  ``floor_symm_ms``. The same replayed step
  against the eager all-reduce's floor (easier) is shown in the note, not counted. A rank alone
  (``bench tp --alone``) has no all-reduce: it is no TP step and is skipped.
* **TP 4 >= 1.8x and TP 2 >= 1.3x TP 1 at batch 32**: the best step of each TP size (any variant),
  from one file, that is one run.
* **The PP bubble within 10 % of the formula**: every ``bench pp`` row with p > 1, the measured idle
  share against ``(p - 1) / (m + p - 1)``, counted as met when they differ by at most 0.10 (ten
  points of the idle share, as the notes have read it since 2026-11-27); the relative gap is shown
  too. Where a stage was also replayed from CUDA graphs the better of the two bubbles counts.
* **bf16 agreement on GPUs**: a ``bench agree`` file run on CUDA over NCCL, every grid within its
  tolerance (twice one device's own bf16 error). Ranks sharing one GPU over gloo check the GPU
  kernels, not NCCL's sums: shown, not counted.
* **The hardware**: the bar asks for 1, 2 and 4 H100s in one run: a TP file whose device is an H100
  and whose rows cover TP 1, 2 and 4.

A bar no file measures is reported as not measured (``met`` None), never as met.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["Bar", "bars_table", "judge"]

FLOOR_RATIO = 1.25
SPEEDUP_B32 = {2: 1.3, 4: 1.8}
BUBBLE_POINTS = 0.10

# (step key, the floor of its own all-reduce): the eager step, NCCL replayed, the one-shot
# replayed (alone, and fused into the next norm)
_STEPS = (("step_ms", "floor_ms"), ("graph_step_ms", "floor_graph_ar_ms"),
          ("fast_step_ms", "floor_graph_ar_ms"), ("fast_symm_step_ms", "floor_symm_ms"),
          ("fast_fused_step_ms", "floor_symm_ms"))


@dataclass(frozen=True)
class Bar:
    """One bar's verdict: ``met`` True / False, or None where no file measured it."""

    bar: str
    value: float | None
    target: str
    met: bool | None
    source: str = ""
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _where(name: str, report: dict) -> str:
    hw = report.get("hardware", {})
    n = hw.get("num_devices_used") or hw.get("num_devices") or 1
    return (f"{name} ({report.get('model', '?')}, {n} x {hw.get('device', '?')}, "
            f"{hw.get('backend', '?')}, {report.get('date', '?')})")


def _best_step(row: dict) -> tuple[float, str]:
    """The fastest step a row timed: (ms, variant)."""
    return min((row[k], k.removesuffix("_step_ms").removesuffix("_ms") or "eager")
               for k, _ in _STEPS if k in row)


def _floor_bars(name: str, report: dict) -> list[Bar]:
    out = []
    for row in report["results"]:
        if row.get("alone") or row.get("pp", 1) != 1:
            continue
        # a step's own floor; TP 1 has no all-reduce (one floor), and files before 2026-12-04
        # have no replayed latency: then the eager all-reduce's floor, said in the note
        floors = {k: row.get(f, row["floor_ms"]) for k, f in _STEPS if k in row}
        ratios = {k: row[k] / floors[k] for k in floors}
        key = min(ratios, key=ratios.get)
        note = f"{key.removesuffix('_step_ms').removesuffix('_ms')} {row[key]:.2f} ms"
        if key != "step_ms" and row["tp"] > 1:
            note += (f"; against the eager all-reduce's floor {row[key] / row['floor_ms']:.2f}x"
                     if floors[key] != row["floor_ms"] else
                     "; the file has no replayed all-reduce latency: the eager one's floor")
        out.append(Bar(f"TP {row['tp']} batch {row['batch']}: step / floor", ratios[key],
                       f"<= {FLOOR_RATIO}", ratios[key] <= FLOOR_RATIO, _where(name, report), note))
    return out


def _speedup_bars(name: str, report: dict) -> list[Bar]:
    rows = [r for r in report["results"] if not r.get("alone") and r.get("pp", 1) == 1
            and r["batch"] == 32]
    best = {r["tp"]: _best_step(r) for r in rows}
    out = []
    for tp, target in SPEEDUP_B32.items():
        if 1 in best and tp in best:
            value = best[1][0] / best[tp][0]
            out.append(Bar(f"TP {tp} / TP 1 at batch 32", value, f">= {target}", value >= target,
                           _where(name, report),
                           f"TP 1 {best[1][0]:.2f} ms ({best[1][1]}), TP {tp} {best[tp][0]:.2f} ms "
                           f"({best[tp][1]})"))
    return out


def _bubble_bars(name: str, report: dict) -> list[Bar]:
    out = []
    for row in report["results"]:
        if row.get("pp", 1) < 2 or "bubble_measured" not in row:
            continue
        formula = row["bubble_formula"]
        measured = {"eager": row["bubble_measured"]}
        if "graph_bubble_measured" in row:
            measured["graphs"] = row["graph_bubble_measured"]
        kind = min(measured, key=lambda k: abs(measured[k] - formula))
        gap = abs(measured[kind] - formula)
        out.append(Bar(f"PP {row['pp']} m={row['micro_batches']} batch {row['batch']}: |bubble - formula|",
                       gap, f"<= {BUBBLE_POINTS}", gap <= BUBBLE_POINTS + 1e-12, _where(name, report),
                       f"{kind} {measured[kind]:.3f} vs {formula:.3f} ({gap / formula:.0%} of it)"))
    return out


def _agree_bars(name: str, report: dict) -> list[Bar]:
    hw = report.get("hardware", {})
    on_nccl = hw.get("device_type") == "cuda" and hw.get("backend") == "nccl"
    out = []
    for row in report["results"]:
        value = row["max_abs_diff_vs_one_device"] / row["tolerance"]
        why = "" if on_nccl else f"not counted: {hw.get('backend', '?')} on {hw.get('device_type', '?')}"
        out.append(Bar(f"bf16 {row['grid']}: |grid - one device| / bound", value, "<= 1",
                       (value <= 1) if on_nccl else None, _where(name, report),
                       "; ".join(x for x in (why, f"top-1 same at {row['top1_agreement']:.1%}") if x)))
    return out


def judge(reports: dict[str, dict]) -> list[Bar]:
    """Every bar the files in ``reports`` (name -> the JSON a ``bench tp`` / ``pp`` / ``agree``
    wrote) measure, then one line for each bar none of them measured."""
    found: dict[str, list[Bar]] = {"step within 1.25x of its floor": [],
                                   "TP 4 / TP 2 over TP 1 at batch 32": [],
                                   "PP bubble vs formula": [], "bf16 agreement": []}
    floor, speedup, bubble, agree = found.values()
    on_h100 = []
    for name, report in reports.items():
        kind = report.get("benchmark")
        if kind == "tp":
            floor += _floor_bars(name, report)
            speedup += _speedup_bars(name, report)
            tps = {r["tp"] for r in report["results"] if not r.get("alone")}
            if "H100" in report.get("hardware", {}).get("device", "") and {1, 2, 4} <= tps:
                on_h100.append(name)
        elif kind == "pp":
            bubble += _bubble_bars(name, report)
        elif kind == "agree":
            agree += _agree_bars(name, report)
    bars = [b for measured in found.values() for b in measured]
    bars += [Bar(label, None, "", None, "", "no file measured it")
             for label, measured in found.items() if not measured]
    bars.append(Bar("TP 1, 2 and 4 on H100s in one run", None, "one tp file", bool(on_h100) or None,
                    ", ".join(on_h100), "" if on_h100 else "no such file"))
    return bars


def bars_table(bars: list[Bar]) -> str:
    """The verdicts as a plain-text table (``met``: yes / NO / not measured)."""
    from workbench.anatomy import rows_text

    rows = [{"bar": b.bar, "value": b.value, "target": b.target,
             "met": {True: "yes", False: "NO", None: "-"}[b.met], "note": b.note} for b in bars]
    sources = sorted({b.source for b in bars if b.source})
    return rows_text(rows, ["bar", "value", "target", "met", "note"]) + "\n" + "\n".join(
        f"from {s}" for s in sources)
