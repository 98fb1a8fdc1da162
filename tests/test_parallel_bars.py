"""Issue 5's bars judged from benchmark files (workbench.parallel.bars): each rule on small
hand-made reports, then the committed 4 x H200 run of 2026-11-27 read as the notes read it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from workbench.parallel.bars import bars_table, judge

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
H100 = {"device": "NVIDIA H100 80GB HBM3", "device_type": "cuda", "backend": "nccl",
        "num_devices_used": 4}


def _tp_row(tp: int, batch: int, **kw) -> dict:
    return {"tp": tp, "pp": 1, "micro_batches": 1, "batch": batch, **kw}


def _by_bar(bars) -> dict:
    return {b.bar: b for b in bars}


def test_a_step_is_set_against_the_floor_of_its_own_all_reduce():
    rows = [_tp_row(1, 32, step_ms=20.0, floor_ms=5.0, fast_step_ms=6.0),  # TP 1: one floor
            _tp_row(4, 32, step_ms=30.0, floor_ms=4.0, floor_graph_ar_ms=2.0, floor_symm_ms=1.8,
                    fast_step_ms=2.6, fast_symm_step_ms=2.2),
            _tp_row(2, 32, step_ms=9.0, floor_ms=3.0, alone=True)]  # a rank alone: no TP step
    bars = _by_bar(judge({"tp.json": {"benchmark": "tp", "hardware": H100, "results": rows}}))
    assert bars["TP 1 batch 32: step / floor"].value == pytest.approx(1.2)
    four = bars["TP 4 batch 32: step / floor"]
    assert four.value == pytest.approx(2.2 / 1.8) and four.met  # the one-shot against its floor
    assert "fast_symm 2.20 ms" in four.note and "eager all-reduce's floor 0.55x" in four.note
    assert not any(b.startswith("TP 2") for b in bars)
    speedup = bars["TP 4 / TP 1 at batch 32"]
    assert speedup.value == pytest.approx(6.0 / 2.2) and speedup.met  # best step vs best step
    assert bars["TP 1, 2 and 4 on H100s in one run"].met is None  # no TP 2 row in the file


def test_the_fused_all_reduce_is_set_against_the_one_shots_floor():
    rows = [_tp_row(2, 1, step_ms=9.0, floor_ms=3.0, floor_graph_ar_ms=2.8, floor_symm_ms=2.5,
                    fast_step_ms=3.6, fast_symm_step_ms=3.4, fast_fused_step_ms=3.0)]
    bar = judge({"tp.json": {"benchmark": "tp", "hardware": H100, "results": rows}})[0]
    assert bar.value == pytest.approx(3.0 / 2.5) and bar.met and "fast_fused 3.00 ms" in bar.note


def test_an_older_file_falls_back_to_the_eager_floor_and_says_so():
    rows = [_tp_row(2, 1, step_ms=50.0, floor_ms=4.0, graph_step_ms=4.8)]
    bar = judge({"old.json": {"benchmark": "tp", "hardware": H100, "results": rows}})[0]
    assert bar.value == pytest.approx(1.2) and bar.met
    assert "no replayed all-reduce latency" in bar.note


def test_the_better_bubble_counts_within_ten_points():
    rows = [{"tp": 1, "pp": 4, "micro_batches": 8, "batch": 32, "bubble_formula": 0.273,
             "bubble_measured": 0.39, "graph_bubble_measured": 0.31},
            {"tp": 1, "pp": 2, "micro_batches": 8, "batch": 32, "bubble_formula": 0.111,
             "bubble_measured": 0.253},
            {"tp": 1, "pp": 1, "micro_batches": 1, "batch": 32}]  # PP 1 has no bubble
    bars = judge({"pp.json": {"benchmark": "pp", "hardware": H100, "results": rows}})
    four, two = bars[:2]
    assert four.value == pytest.approx(0.037) and four.met and "graphs 0.310" in four.note
    assert two.value == pytest.approx(0.142) and two.met is False
    assert len([b for b in bars if "bubble" in b.bar]) == 2


def test_agreement_counts_only_over_nccl_and_unmeasured_bars_are_said():
    row = {"grid": "TP2xPP1", "max_abs_diff_vs_one_device": 0.14, "tolerance": 0.28,
           "top1_agreement": 1.0}
    gloo = dict(H100, backend="gloo")
    shared = judge({"a.json": {"benchmark": "agree", "hardware": gloo, "results": [row]}})
    assert shared[0].value == pytest.approx(0.5) and shared[0].met is None
    assert "not counted: gloo" in shared[0].note
    nccl = judge({"a.json": {"benchmark": "agree", "hardware": H100, "results": [row]}})
    assert nccl[0].met is True
    missing = {b.bar for b in nccl if b.met is None and b.value is None}
    assert {"step within 1.25x of its floor", "TP 4 / TP 2 over TP 1 at batch 32",
            "PP bubble vs formula"} <= missing
    assert "from a.json (?, 4 x NVIDIA H100 80GB HBM3, nccl" in bars_table(nccl)


def test_the_committed_4xh200_run_reads_as_the_notes_say(tmp_path):
    """2026-11-27, 4 H200s (notes: TP 4 over TP 1 at batch 32 1.26x with graphs, TP 2 1.14x; TP 2
    at batch 1 1.26x its floor; the PP bubble within 10 points for m <= 4 but PP 4 m=4 at 9)."""
    files = [RESULTS / "tp-graphs-llama-3.1-8b_4xh200_2026-11-27.json",
             RESULTS / "pp-llama-3.1-8b_4xh200_2026-11-27.json"]
    out = tmp_path / "bars.json"
    done = subprocess.run([sys.executable, "tools/parallel_bars.py", *map(str, files), "--json",
                           str(out)], capture_output=True, text=True, timeout=120,
                          cwd=RESULTS.parents[1])
    assert done.returncode == 0, done.stderr
    bars = {b["bar"]: b for b in json.loads(out.read_text())}
    assert bars["TP 4 / TP 1 at batch 32"]["value"] == pytest.approx(1.26, abs=0.005)
    assert bars["TP 2 / TP 1 at batch 32"]["value"] == pytest.approx(1.14, abs=0.005)
    assert bars["TP 2 batch 1: step / floor"]["value"] == pytest.approx(1.26, abs=0.005)
    assert not any(b["met"] for name, b in bars.items() if "TP" in name and "PP" not in name)
    pp = {name: b for name, b in bars.items() if name.startswith("PP")}
    assert [b["met"] for name, b in sorted(pp.items()) if "m=8" in name] == [False, False]
    assert all(b["met"] for name, b in pp.items() if "m=8" not in name)
    assert bars["TP 1, 2 and 4 on H100s in one run"]["met"] is None  # H200s
    assert "4 x NVIDIA H200, nccl, 2026-11-27" in done.stdout and "llama-3.1-8b" in done.stdout
