"""Model parallelism in one process: the plan (grid, shards, stages), the illustrations, the
bubble arithmetic, the figures, and the CLI's parallel flags (one small spawn)."""

from __future__ import annotations

import itertools
import json

import matplotlib
import pytest
import torch

from tests.helpers import tiny_config, torch_threads
from workbench.cli import main
from workbench.errors import WorkbenchError
from workbench.model.batch import ForwardBatch
from workbench.model.loading import load_model
from workbench.model.presets import preset_config
from workbench.parallel import ParallelConfig, balanced_stages, shard_config
from workbench.parallel.illustrate import pipeline_stages, split_matmul, tensor_parallel_layer
from workbench.parallel.pipeline import (StageEvent, bubble_formula, measured_bubble, run_bubble,
                                         schedule_bubble, split_rows)
from workbench.parallel.plan import stage_costs

matplotlib.use("Agg")


def test_parallel_config_and_shard_shapes():
    with pytest.raises(WorkbenchError, match="tp must be"):
        ParallelConfig(tp=0)
    assert ParallelConfig(tp=2, pp=3).world_size == 6
    local = shard_config(preset_config("llama-3.1-8b"), 4)
    assert (local.num_attention_heads, local.num_key_value_heads, local.intermediate_size) == (8, 2, 3584)
    with pytest.raises(WorkbenchError, match=r"num_key_value_heads \(2\) divisible by 4"):
        shard_config(tiny_config(num_attention_heads=8, num_key_value_heads=2), 4)
    with pytest.raises(WorkbenchError, match="num_attention_heads"):
        shard_config(tiny_config(), 3)


@pytest.mark.parametrize("layers, pp", [(6, 2), (5, 4), (32, 4), (4, 4), (7, 3)])
def test_balanced_stages_cover_every_layer_once(layers, pp):
    config = tiny_config(num_hidden_layers=layers, vocab_size=512)
    stages = balanced_stages(config, pp)
    assert len(stages) == pp and all(len(s) >= 1 for s in stages)
    assert [i for s in stages for i in s] == list(range(layers))


def test_balanced_stages_give_the_head_stage_fewer_layers():
    stages = balanced_stages(preset_config("llama-3.1-8b"), 4)
    assert [len(s) for s in stages] in ([9, 9, 8, 6], [8, 9, 9, 6], [9, 8, 9, 6])
    with pytest.raises(WorkbenchError, match="at least 5 layers"):
        balanced_stages(tiny_config(num_hidden_layers=4), 5)


@pytest.mark.parametrize("layers, pp, vocab",
                         [(6, 2, 512), (7, 3, 4096), (12, 4, 64), (32, 4, 128256)])
def test_balanced_stages_have_the_fastest_slowest_stage(layers, pp, vocab):
    """No split of the layers into pp runs has a cheaper slowest stage (every split tried); of the
    splits that tie, the one with the earlier stages shortest."""
    config = (preset_config("llama-3.1-8b") if layers == 32 else
              tiny_config(num_hidden_layers=layers, vocab_size=vocab))
    splits = [[range(a, b) for a, b in zip((0, *cuts), (*cuts, layers))]
              for cuts in itertools.combinations(range(1, layers), pp - 1)]
    best = min(max(stage_costs(config, split)) for split in splits)
    tied = [split for split in splits if max(stage_costs(config, split)) == best]
    assert balanced_stages(config, pp) == min(tied, key=lambda split: [len(r) for r in split])
    # every weight counted once, the head on the last stage, whatever the split
    assert {sum(stage_costs(config, split)) for split in splits} == {
        sum(stage_costs(config, [range(layers)]))}


@pytest.mark.parametrize("how", ["columns", "rows"])
def test_split_matmul_equals_the_product(how):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 8, generator=g), torch.randn(8, 12, generator=g)
    for n in (2, 4):
        split = split_matmul(a, b, n, how)
        assert len(split.partials) == n and split.max_error < 1e-5


@pytest.fixture(scope="module")
def bundled():
    with torch_threads(1):
        yield load_model("bundled")


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_layer_sums_to_the_layer(bundled, tp):
    ids = torch.randint(1, 8000, (2, 7), generator=torch.Generator().manual_seed(tp))
    with torch_threads(1):
        out = tensor_parallel_layer(bundled, ids, layer=tp, tp=tp)
    assert out["max_error"] < 1e-4 and out["attention_error"] < 1e-4
    assert out["kv_heads_per_rank"] == 4 // tp and len(out["mlp_partials"]) == tp


@pytest.mark.parametrize("pp", [2, 3, 6])
def test_pipeline_stages_hand_over_to_the_same_logits(bundled, pp):
    ids = torch.randint(1, 8000, (2, 5), generator=torch.Generator().manual_seed(pp))
    with torch_threads(1):
        out = pipeline_stages(bundled, ids, pp)
    assert out["max_error"] < 1e-5 and len(out["handoffs"]) == pp - 1


@pytest.mark.parametrize("p, m", [(2, 1), (2, 4), (4, 8), (3, 3)])
def test_ideal_fill_drain_has_the_formula_bubble(p, m):
    """Equal stages, one slot each per micro-batch: the measure reproduces (p-1)/(m+p-1)."""
    events = [StageEvent(s, 0, j, float(s + j), float(s + j + 1)) for s in range(p) for j in range(m)]
    assert measured_bubble(events, p) == pytest.approx(bubble_formula(p, m))
    assert schedule_bubble(events, p) == pytest.approx(bubble_formula(p, m))


def test_run_bubble_counts_the_time_between_passes():
    """Two ideal fill-drain passes (p = 2, m = 2: 3 slots each) with 1 s between them (the tokens'
    way back): each pass idles 1/3 as the formula says; the run idles 2 of its 7 x 2 stage-seconds
    more."""
    events = [StageEvent(s, t, j, 4.0 * t + s + j, 4.0 * t + s + j + 1) for t in range(2)
              for s in range(2) for j in range(2)]
    assert measured_bubble(events, 2) == pytest.approx(1 / 3)
    assert run_bubble(events, 2) == pytest.approx(1 - 8 / (2 * 7))
    assert run_bubble([], 2) == 0.0


def test_schedule_bubble_splits_unequal_stages_from_hand_overs():
    """Stage 1 takes 2 s a micro-batch, stage 0 1 s, and each hand-over 0.5 s: the replayed
    timetable (free hand-overs) has span 1 + 3 x 2 = 7 s, the measured one 7.5 s."""
    p, m, handover = 2, 3, 0.5
    events = [StageEvent(0, 0, j, float(j), float(j + 1)) for j in range(m)]
    t = 0.0
    for j in range(m):  # stage 1: starts when micro-batch j arrived and it finished j - 1
        t = max(t, j + 1 + handover)
        events.append(StageEvent(1, 0, j, t, t + 2.0))
        t += 2.0
    busy = m * 3.0
    assert schedule_bubble(events, p) == pytest.approx(1 - busy / (p * 7.0))
    assert measured_bubble(events, p) == pytest.approx(1 - busy / (p * 7.5))
    assert bubble_formula(p, m) < schedule_bubble(events, p) < measured_bubble(events, p)


def test_split_rows_into_micro_batches():
    batch = ForwardBatch.prefill(torch.arange(21).view(7, 3))
    parts = split_rows(batch, 3)
    assert [rows.stop - rows.start for rows, _ in parts] == [2, 3, 2]
    assert torch.equal(torch.cat([mb.input_ids for _, mb in parts]), batch.input_ids)
    assert len(split_rows(batch, 1)) == 1 and len(split_rows(batch, 10)) == 7


def test_figures_draw():
    from workbench.viz.parallel import (plot_bubble, plot_matrix_split, plot_pipeline_timeline,
                                        plot_stages, plot_step_times)

    a, b = torch.ones(4, 6), torch.ones(6, 8)
    for how in ("columns", "rows"):
        plot_matrix_split(split_matmul(a, b, 2, how))
    plot_stages([range(0, 4), range(4, 6)], [{"from": 0, "to": 1, "bytes": 4096}])
    events = [StageEvent(s, 0, j, s + j, s + j + 1.0) for s in range(2) for j in range(3)]
    ax = plot_pipeline_timeline(events, 2, 3, step=0)
    assert "0.25" in ax.get_title()  # (2-1)/(3+2-1)
    flight = [StageEvent(s, 0, k, s + k, s + k + 1.0) for s in range(2) for k in range(6)]
    ax = plot_pipeline_timeline(flight, 2, step=0, cycle=3)  # items t m + j: 2 steps of 3
    assert sorted(t.get_text() for t in ax.texts) == sorted(["1", "2", "3"] * 4)
    plot_bubble([{"p": 2, "m": 1, "measured": 0.5, "schedule": 0.5},
                 {"p": 2, "m": 4, "measured": 0.25, "schedule": 0.22}])
    plot_step_times([{"label": "TP1", "step_ms": 2.0, "floor_ms": 1.0}])


def test_cli_parallel_flags(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "def f(x):"}\n{"prompt_ids": [5, 6, 7], "max_new_tokens": 3}\n')
    assert main(["generate", "--prompts", str(prompts), "--output", str(tmp_path / "x"),
                 "--tp", "0"]) == 2
    assert "--tp must be >= 1" in capsys.readouterr().err
    assert main(["generate", "--prompts", str(prompts), "--output", str(tmp_path / "x"),
                 "--tp", "3"]) == 2
    assert "divisible by 3" in capsys.readouterr().err
    out1, out2 = tmp_path / "one.jsonl", tmp_path / "pp.jsonl"
    common = ["generate", "--prompts", str(prompts), "--max-new-tokens", "6", "--no-progress",
              "--device", "cpu"]
    with torch_threads(1):
        assert main([*common, "--output", str(out1)]) == 0
    assert main([*common, "--output", str(out2), "--tp", "2", "--micro-batches", "2"]) == 0
    one = [json.loads(x)["output_ids"] for x in out1.read_text().splitlines()]
    assert [json.loads(x)["output_ids"] for x in out2.read_text().splitlines()] == one
    out3 = tmp_path / "tp-paged.jsonl"  # the continuous engine's paged pool on every rank
    assert main([*common, "--output", str(out3), "--tp", "2", "--strategy", "continuous",
                 "--kv", "paged", "--block-size", "4", "--prefix-caching"]) == 0
    assert [json.loads(x)["output_ids"] for x in out3.read_text().splitlines()] == one
    assert main([*common, "--output", str(out3), "--tp", "2", "--strategy", "continuous",
                 "--kv", "paged", "--fast"]) == 2
    assert "cannot be combined with --tp/--pp" in capsys.readouterr().err
