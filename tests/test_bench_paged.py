"""``bench paged`` on the bundled model, small: every part of the report is there and consistent
(no speed is asserted: benchmarks measure, tests check)."""

from __future__ import annotations

import json
import statistics

import pytest

from helpers import torch_threads
from workbench.cli import main


def test_cli_writes_throughput_batch1_and_budget_sweep(tmp_path, capsys):
    out = tmp_path / "paged.json"
    with torch_threads(1):
        rc = main(["bench", "paged", "--workload", "natural", "--num-requests", "4",
                   "--systems", "workbench/paged,workbench/contiguous", "--max-num-seqs", "4",
                   "--batch1-tokens", "8", "--budgets", "0.002", "--repeats", "2", "--threads", "1",
                   "--no-progress", "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["benchmark"] == "paged" and report["hardware"]["device_type"] == "cpu"
    paged, contiguous = report["results"]
    assert (paged["system"], contiguous["system"]) == ("workbench/paged", "workbench/contiguous")
    # both KV layouts serve every request, with the same number of useful tokens
    assert paged["completed"] == contiguous["completed"] == 4
    assert paged["total_output_tokens"] == contiguous["total_output_tokens"] > 0
    assert all(r["floor_s"] > 0 and r["fraction_of_floor"] > 0 for r in report["results"])
    assert [r["system"] for r in report["batch1"]] == ["workbench/paged", "transformers/generate"]
    for row in report["batch1"]:
        assert row["decode_tok_s"] == statistics.median(row["runs_tok_s"])  # of 3 runs
        assert len(row["runs_tok_s"]) == 3
        assert row["fraction_of_limit"] == row["decode_tok_s"] / row["limit_tok_s"]
    # a 2 MiB KV budget: max-length reservation fits one sequence; paged blocks fit more at once,
    # nearly all of the memory they hold storing real tokens
    by = {r["policy"]: r for r in report["budgets"]}
    reserved, paged_kv = by["max-length reservation"], by["paged"]
    assert reserved["tokens"] == paged_kv["tokens"] and reserved["peak_running"] == 1
    assert paged_kv["peak_running"] > reserved["peak_running"]
    assert paged_kv["real_fraction"] > 0.9 > reserved["real_fraction"]
    # two runs of each policy; the throughput reported is the fastest run's (all the workload's
    # useful tokens over its seconds)
    assert report["repeats"] == 2
    for row in (reserved, paged_kv):
        assert len(row["runs_s"]) == 2
        assert row["output_tok_s"] * min(row["runs_s"]) == pytest.approx(paged["total_output_tokens"])
    capsys.readouterr()
    assert main(["bench", "paged", "--budgets", "x", "--json", str(out)]) == 2
    assert "--budgets must be numbers in GiB" in capsys.readouterr().err
    assert main(["bench", "paged", "--systems", "foo", "--json", str(out)]) == 2
    assert "unknown systems ['foo']" in capsys.readouterr().err
    assert main(["bench", "paged", "--repeats", "0", "--json", str(out)]) == 2
    assert "--repeats must be >= 1" in capsys.readouterr().err
