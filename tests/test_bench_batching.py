"""``bench batching``: repeated runs, the systems taking turns, that keep a shared machine's slow
spells out of the comparison."""

from __future__ import annotations

import json

import pytest

from helpers import torch_threads
from workbench.bench import batching
from workbench.bench.batching import BatchingBench, bench_batching, run_systems
from workbench.engine import Request
from workbench.engine.requests import RequestTrace
from workbench.errors import WorkbenchError


def test_repeats_run_in_rounds_and_keep_each_systems_fastest_run(monkeypatch):
    requests = [Request((1, 2, 3), 4, ignore_eos=True, id=i) for i in range(3)]
    seconds = {"workbench/static": [3.0, 2.0, 2.5], "workbench/continuous": [1.0, 4.0, 1.5]}
    calls = []

    def fake_run(system, reqs, bench, model, hf_model, progress=False):
        warm = reqs is not requests  # bench_batching builds the warm-up list itself
        calls.append((system, "warm-up" if warm else "timed"))
        if warm:
            return [], 99.0, None
        took = seconds[system][sum(1 for s, kind in calls if s == system and kind == "timed") - 1]
        traces = [RequestTrace(r.id, 0.0, len(r.prompt_ids), [7] * 4, [0.1, 0.2, 0.3, took],
                               scheduled_s=0.0, finish_s=took, finish_reason="length")
                  for r in reqs]
        return traces, took, 0.5

    monkeypatch.setattr(batching, "run_system", fake_run)
    monkeypatch.setattr(batching, "_sync", lambda device: None)
    bench = BatchingBench(systems=tuple(seconds), batch_size=2, max_num_seqs=2)
    model = type("M", (), {"device": "cpu"})()
    rows = bench_batching(model, None, requests, bench, progress=False, repeats=3)
    # warm-ups only in the first round, then static and continuous take turns
    assert calls == [("workbench/static", "warm-up"), ("workbench/static", "timed"),
                     ("workbench/continuous", "warm-up"), ("workbench/continuous", "timed"),
                     ("workbench/static", "timed"), ("workbench/continuous", "timed"),
                     ("workbench/static", "timed"), ("workbench/continuous", "timed")]
    static, continuous = rows
    assert static["runs_s"] == [3.0, 2.0, 2.5] and continuous["runs_s"] == [1.0, 4.0, 1.5]
    assert static["output_tok_s"] == pytest.approx(12 / 2.0)  # the fastest run of each
    assert continuous["output_tok_s"] == pytest.approx(12 / 1.0)
    assert continuous["speedup_vs_static"] == pytest.approx(2.0)
    calls.clear()
    runs = run_systems(model, None, requests, bench, repeats=2)  # the traces are the fastest run's
    assert [t.finish_s for t in runs["workbench/static"].traces] == [2.0] * 3
    continuous_run = runs["workbench/continuous"]
    assert continuous_run.seconds == 1.0 and continuous_run.utilization == 0.5
    with pytest.raises(WorkbenchError, match="repeats must be >= 1"):
        bench_batching(model, None, requests, bench, repeats=0)


def test_cli_repeats_on_the_bundled_model(tmp_path, capsys):
    from workbench.cli import main

    out = tmp_path / "batching.json"
    with torch_threads(1):
        rc = main(["bench", "batching", "--caps", "8", "--num-requests", "3", "--batch-size", "2",
                   "--max-num-seqs", "2", "--repeats", "2", "--threads", "1", "--no-progress",
                   "--systems", "workbench/static,workbench/continuous", "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["repeats"] == 2 and [r["system"] for r in report["results"]] == \
        ["workbench/static", "workbench/continuous"]
    for row in report["results"]:
        assert len(row["runs_s"]) == 2 and row["completed"] == 3 and row["cap"] == 8
        # the row describes the fastest of the two runs
        assert row["output_tok_s"] == pytest.approx(row["total_output_tokens"] / min(row["runs_s"]))
    static, continuous = report["results"]
    assert static["total_output_tokens"] == continuous["total_output_tokens"]
    assert continuous["speedup_vs_static"] == pytest.approx(
        continuous["output_tok_s"] / static["output_tok_s"])
    assert main(["bench", "batching", "--repeats", "0", "--json", str(out)]) == 2
    assert "--repeats must be >= 1" in capsys.readouterr().err


def test_fastest_in_turns_without_warm_up_keeps_the_first_of_equal_runs():
    """The helper ``bench paged`` (KV budgets) and ``bench batching`` share."""
    from workbench.bench.run import fastest_in_turns

    times = {"a": iter([2.0, 1.0, 1.0]), "b": iter([5.0, 5.0, 4.0])}
    order = []

    def run(name):
        order.append(name)
        return (name, len(order), next(times[name]))  # (name, call number, seconds)

    best = fastest_in_turns({n: (lambda n=n: run(n)) for n in times}, seconds=lambda r: r[2],
                            repeats=3)
    assert order == ["a", "b"] * 3
    assert best["a"] == (("a", 3, 1.0), [2.0, 1.0, 1.0])  # the earlier of the two 1.0 s runs
    assert best["b"] == (("b", 6, 4.0), [5.0, 5.0, 4.0])
    with pytest.raises(WorkbenchError, match="repeats must be >= 1"):
        fastest_in_turns({"a": lambda: 1.0}, seconds=float, repeats=0)
