"""Offloading extras (notebook 06): compression, flash loading, cost model, Accelerate, bench CLI."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import tiny_config, torch_threads
from workbench.engine import run_static
from workbench.engine.requests import Request
from workbench.model.presets import random_model
from workbench.offload import Budget, OffloadedModel, Policy
from workbench.offload.compression import compressed_bytes_ratio, compressed_copy
from workbench.offload.cost import Calibration, SearchSpace, predict, search
from workbench.offload.memory import RUNTIME_CUDA, plan_memory
from workbench.offload.flash import (LowRankPredictor, _runs, io_per_token, top_k_mask,
                                     true_scores, window_loads)

GIB = 1 << 30


def _greedy(model, prompts, steps, b):
    reqs = [Request(tuple(p), steps, ignore_eos=True, id=i) for i, p in enumerate(prompts)]
    return [t.output_ids for t in run_static(model, reqs, batch_size=b).traces]


def test_compressed_weights_compute_what_the_4bit_store_holds(tmp_path):
    config = tiny_config(hidden_size=64, head_dim=16, intermediate_size=128, num_hidden_layers=3)
    policy = Policy.from_percentages(30, 30, gpu_batch_size=2, compress_weights=True)
    with torch_threads(1):
        model = random_model(config, seed=2, std=0.1)
        om = OffloadedModel.build(model, policy, Budget(GIB, tmp_path), "cpu", 5, 6,
                                  cold_disk=False)
        prompts = [[3, 4, 5, 6, 7], [9, 8, 7, 6, 5]]
        try:
            ours = om.generate(prompts, 6).output_ids
            stored = om.store.tier_bytes()
        finally:
            om.close()
        assert ours == _greedy(compressed_copy(model, policy), prompts, 6, 2)
    ratio = compressed_bytes_ratio(model, policy)
    assert 4 / 32 < ratio < 5 / 32  # 4 bits + an fp16 scale per 64 values, against fp32
    dense = sum(p.numel() * 4 for p in model.parameters())
    assert stored["cpu"] + stored["disk"] < 0.25 * dense


def test_compressed_kv_runs_and_stays_close(tmp_path):
    config = tiny_config(hidden_size=64, head_dim=16, intermediate_size=128)
    policy = Policy.from_percentages(100, 0, 0, 100, gpu_batch_size=2, compress_kv=True)
    with torch_threads(1):
        model = random_model(config, seed=2, std=0.1)
        om = OffloadedModel.build(model, policy, Budget(GIB, tmp_path), "cpu", 5, 4)
        try:
            run = om.generate([[3, 4, 5, 6, 7], [9, 8, 7, 6, 5]], 4)
        finally:
            om.close()
    assert all(len(o) == 4 for o in run.output_ids)


def test_flash_window_bundling_and_predictor():
    active = torch.tensor([[1, 1, 0, 0, 1], [1, 1, 0, 0, 1], [0, 0, 1, 1, 0]], dtype=torch.bool)
    assert window_loads(active, 0) == [[0, 1, 4], [0, 1, 4], [2, 3]]
    assert window_loads(active, 1) == [[0, 1, 4], [], [2, 3]]
    assert _runs([0, 1, 4, 5, 6, 9]) == [(0, 2), (4, 3), (9, 1)]
    config = tiny_config(hidden_size=32, intermediate_size=64)
    with torch_threads(1):
        mlp = random_model(config, seed=1, std=0.2).layers[0].mlp
        x = torch.randn(20, 32, generator=torch.Generator().manual_seed(0))
        truth = top_k_mask(true_scores(mlp, x), 16)
        full = top_k_mask(LowRankPredictor(mlp, 32)(x), 16)  # full rank: exact scores
    assert torch.equal(full, truth)


def test_flash_bundled_reads_are_fewer_and_the_bytes_match(tmp_path):
    config = tiny_config(hidden_size=32, intermediate_size=64)
    mlp = random_model(config, seed=1).layers[0].mlp
    active = torch.zeros(4, 64, dtype=torch.bool)
    active[:, 10:20] = True  # one run of 10 neurons, the same every token
    plans = {p.strategy: p for p in io_per_token(mlp, active, 0, tmp_path, timed=False)}
    row = 32 * 4
    assert plans["dense"].bytes_per_token == 3 * 64 * row
    assert plans["bundled"].bytes_per_token == plans["separate"].bytes_per_token == 3 * 10 * row
    assert plans["bundled"].reads_per_token == 1 and plans["separate"].reads_per_token == 3
    windowed = {p.strategy: p for p in io_per_token(mlp, active, 2, tmp_path, timed=True)}
    assert windowed["bundled"].bytes_per_token == 3 * 10 * row / 4  # loaded once, then held
    assert windowed["bundled"].seconds_per_token is not None


def _calibration(device_type="cuda"):
    return Calibration(device_type, disk_Bps=1e6, h2d_Bps=1e7, host_Bps=1e8, layer_fixed_s=1e-4,
                       layer_token_s=1e-6, head_fixed_s=1e-4, head_token_s=1e-6, dequant_Bps=1e11)


def test_cost_model_and_search():
    config = random_model(tiny_config(), seed=0).config
    cal = _calibration()
    block = Policy.from_percentages(0, 100, gpu_batch_size=4, num_gpu_batches=4)
    row = Policy.from_percentages(0, 100, gpu_batch_size=4, num_gpu_batches=4, schedule="row")
    p_block = predict(block, config, torch.float32, cal, 8, 8)
    p_row = predict(row, config, torch.float32, cal, 8, 8)
    assert p_row.decode_step_s > 3 * p_block.decode_step_s  # row reloads the weights per batch
    resident = predict(Policy(gpu_batch_size=4), config, torch.float32, cal, 8, 8)
    assert resident.decode_step_s < p_block.decode_step_s
    space = SearchSpace(step=25, gpu_batch_sizes=(1, 4), num_gpu_batches=(1, 4))
    budget = RUNTIME_CUDA + 240_000  # cuBLAS workspaces + a tiny model's buffers
    ranked = search(config, torch.float32, cal, Budget(budget), 8, 8, space)
    assert all(a.decode_tok_s >= b.decode_tok_s for a, b in zip(ranked, ranked[1:]))
    assert all(plan_memory(r.policy, config, torch.float32, "cuda", 8, 8).fast_total <= budget
               for r in ranked)
    offloaded = [r.policy for r in ranked if r.policy.weights.gpu < 100]
    assert offloaded[0].schedule == "block" and offloaded[0].num_gpu_batches == 4  # amortized
    assert ranked[-1].policy.schedule == "row" or ranked[-1].policy.effective_batch == 1


def test_accelerate_baseline_gives_our_tokens(tmp_path):
    pytest.importorskip("accelerate")
    from workbench.baselines.accelerate import (cpu_state, dispatch, hf_from_state, hf_from_store,
                                                placement_summary, release, run_accelerate)

    config = tiny_config(num_hidden_layers=4)
    with torch_threads(1):
        om = OffloadedModel.build(config, Policy.from_percentages(20, 30, gpu_batch_size=2),
                                  Budget(GIB, tmp_path), "cpu", 6, 4, seed=1, cold_disk=False)
        prompts = [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]]
        try:
            ours = om.generate(prompts, 4).output_ids
            hf = hf_from_store(om.store)
        finally:
            om.close()
        state = cpu_state(hf)
        hf, device_map = dispatch(hf, "cpu", om.weight_bytes // 2, tmp_path / "acc")
        run = run_accelerate(hf, prompts, 4, "cpu", evict=tmp_path / "acc")
        release(hf)  # as bench offload does before dispatching again with less max_memory
        again, _ = dispatch(hf_from_state(config, state, torch.float32), "cpu",
                            om.weight_bytes // 3, tmp_path / "acc2")
        rerun = run_accelerate(again, prompts, 4, "cpu")
    assert run.output_ids == ours == rerun.output_ids
    assert len(run.step_s) == 3 and run.peak_fast_bytes is None  # no device memory to measure
    layers = placement_summary(device_map, 4)
    assert layers.get("disk", 0) > 0 and sum(layers.values()) == 4


def test_bench_offload_cli_smoke_and_bad_input(tmp_path, capsys):
    pytest.importorskip("accelerate")
    from workbench.cli import main

    out = tmp_path / "offload.json"
    with torch_threads(1):
        rc = main(["bench", "offload", "--budget", "20MiB", "--batchings", "2x1,2x2",
                   "--kv-cpu-batchings", "2x2",
                   "--prompt-len", "6", "--gen-len", "3", "--accelerate-batches", "2",
                   "--smoke", "--disk-dir", str(tmp_path / "disk"), "--json", str(out),
                   "--no-progress"])
    assert rc == 0
    report = json.loads(out.read_text())
    systems = [r["system"] for r in report["results"]]
    assert systems == ["workbench/block", "workbench/block", "workbench/row", "workbench/block",
                       "workbench/row", "accelerate/row"]
    assert [r["kv"] for r in report["results"][:5]] == [[100, 0, 0]] * 3 + [[0, 100, 0]] * 2
    assert report["hardware"]["device"] and "bar_10x_accelerate" in report["bars"]
    assert all(r["output_tok_s"] > 0 for r in report["results"])
    ours = [r for r in report["results"] if r["system"].startswith("workbench/")]
    assert all(len(r["step_s"]) == 3 and r["planned_fast_bytes"] > 0 for r in ours)
    assert Calibration.from_dict({k: v for k, v in report["calibration"].items()
                                  if k in Calibration.__dataclass_fields__}).source == "probes"
    details = report["calibration_details"]
    assert len(details["probes"]) == 6 and details["microbenchmarks"]["source"] == "measured"
    assert report["cost_model_refit"]["free"] and report["accelerate"]["attempts"]
    capsys.readouterr()
    assert main(["bench", "offload", "--budget", "1MiB", "--weights", "0,0,100",
                 "--disk-dir", str(tmp_path / "d2"), "--json", str(out)]) == 2
    assert "below one decoder layer" in capsys.readouterr().err
    assert main(["bench", "offload", "--weights", "50,30,30", "--json", str(out)]) == 2
    assert "add up to 100" in capsys.readouterr().err
