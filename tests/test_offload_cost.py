"""The offloading cost model (notebook 06): automatic calibration, fitting, the committed H100 run."""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from tests.helpers import tiny_config, torch_threads
from workbench.model.loading import load_model
from workbench.offload import Policy, Split
from workbench.offload.calibrate import calibrate
from workbench.offload.cost import Calibration, predict
from workbench.offload.fit import fit_calibration, policy_of, stalled_rows
from workbench.offload.bench import bars
from workbench.offload.report import FIRST_RUN, load_report, our_rows, refit, run_checks


def test_calibrate_measures_every_parameter_on_cpu(tmp_path):
    with torch_threads(1):
        config = load_model("bundled").config
        cal = calibrate(config, torch.float32, torch.device("cpu"), tmp_path, rows=4, quick=True)
    assert cal.source == "measured" and cal.device_type == "cpu" and cal.h2d_Bps == math.inf
    for name in ("disk_Bps", "host_Bps", "layer_fixed_s", "layer_token_s", "head_fixed_s",
                 "head_token_s", "dequant_Bps"):
        value = getattr(cal, name)
        assert 0 < value < math.inf, name
    assert 0 <= cal.overlap <= 1 and cal.step_fixed_s >= 0
    assert 1e-6 < cal.layer_fixed_s < 1.0  # a layer call of a 256-wide model: micro- to milliseconds
    assert Calibration.from_dict(cal.to_dict()) == cal
    assert not list(tmp_path.iterdir())  # the calibration files are gone


def _rows(cal: Calibration, config, policies, P=16, G=8) -> list[dict]:
    return [{"policy": p.label, "schedule": p.schedule, "gpu_batch_size": p.gpu_batch_size,
             "num_gpu_batches": p.num_gpu_batches,
             "decode_step_s": predict(p, config, torch.float32, cal, P, G).decode_step_s}
            for p in policies]


def test_fit_recovers_the_predictions_of_known_parameters():
    config = tiny_config(hidden_size=128, intermediate_size=256, head_dim=32, num_hidden_layers=4)
    truth = Calibration("cuda", disk_Bps=1e9, h2d_Bps=2e8, host_Bps=1e10, layer_fixed_s=4e-4,
                        layer_token_s=2e-5, head_fixed_s=0, head_token_s=0, dequant_Bps=1e12,
                        overlap=1.0, step_fixed_s=3e-3)
    from workbench.offload.fit import tie_head

    truth = tie_head(truth, config)
    w = Split(0, 100, 0, what="weights")
    policies = [Policy(weights=w, gpu_batch_size=b, num_gpu_batches=n, schedule=s)
                for b, n, s in ((1, 1, "block"), (8, 1, "block"), (8, 4, "block"), (8, 4, "row"),
                                (32, 8, "block"), (64, 8, "block"))]
    rows = _rows(truth, config, policies)
    assert all(policy_of(r) == p for r, p in zip(rows, policies))
    wrong = replace(truth, layer_fixed_s=1e-7, layer_token_s=1e-9, step_fixed_s=0.0)
    fit = fit_calibration(rows, wrong, config, torch.float32, 16, 8)
    assert not fit.excluded and max(abs(e) for e in fit.errors) < 0.01
    rows[1]["decode_step_s"] *= 2.5  # a stall in the one-batch block run
    assert list(stalled_rows(rows)) == [1]
    fit = fit_calibration(rows, wrong, config, torch.float32, 16, 8)
    assert list(fit.excluded) == [1]
    assert max(abs(e) for i, e in enumerate(fit.errors) if i != 1) < 0.01


def test_committed_h100_run_is_explained_by_the_refitted_model():
    """The first H100 run (Llama-3.1-8B shape, 4 GiB): its a-priori calibration had failed (a
    layer's cost came out as 0), so predictions were off by up to 113 %. Fitted to the run's own
    rows, the model (a layer call a + c b, step overhead s0, pinned copies at the measured 54.9
    GB/s, full overlap) explains every row within 25 %, except the one run that contradicts another
    run of the same work in that JSON: block 16x1 took 0.53 s per step where one pass of the row
    schedule at the same GPU batch took 0.25 s."""
    report = load_report(FIRST_RUN)  # the first run: its diagnosis
    assert max(abs(r["cost_model_error"]) for r in our_rows(report)) > 1.0  # as committed
    out = refit(report, loo=False)
    assert out["stalled"] == ["block 16x1 w 5/95/0 kv 100/0/0"]
    assert out["max_abs_fitted_error"] <= 0.25
    assert all(abs(r["fitted_error"]) <= 0.25 for r in out["rows"] if not r["stalled"])
    cal = Calibration.from_dict(out["calibration"])
    call_32 = cal.layer_fixed_s + 32 * cal.layer_token_s
    assert 0.5e-3 < call_32 < 5e-3  # a layer call at 32 rows: about 1.6 ms (launch-bound)
    assert 0 <= cal.step_fixed_s < 0.05 and cal.overlap == 1.0
    assert abs(cal.h2d_Bps - report["calibration"]["h2d_pinned_GB_s"] * 1e9) < 1  # as measured


def test_second_h100_run_meets_the_memory_and_cost_model_checks():
    """The second H100 run (after the leak fix, the full memory plan, Accelerate's max_memory probe
    and the probe calibration): every check passes except the 10x-Accelerate bar, recomputed here
    from the committed rows, not read from the JSON's own verdicts."""
    report = load_report()
    failed = [msg for ok, msg in run_checks(report) if not ok]
    assert failed == ["bar_10x_accelerate"]
    now = bars(report["results"])
    assert now["bar_block_80pct_of_bound"] and now["bar_cost_model_25pct"] and not now["over_budget"]
    assert 0.8 <= now["block_best_within_budget"]["fraction_of_bound"]
    assert 5 < now["block_over_accelerate_best_within_budget"] < 10
    assert max(abs(r["cost_model_error"]) for r in our_rows(report)) <= 0.25  # a priori


def test_kv_in_ram_shares_the_link_with_the_weights():
    """With free compute and perfect overlap, a block step whose KV cache lives in RAM costs the
    weights' load plus every batch's keys/values over the same link: the two add, not overlap."""
    config = tiny_config(hidden_size=128, intermediate_size=256, head_dim=32, num_hidden_layers=4)
    free = Calibration("cuda", disk_Bps=1e9, h2d_Bps=2e8, host_Bps=1e10, layer_fixed_s=0.0,
                       layer_token_s=0.0, head_fixed_s=0.0, head_token_s=0.0,
                       dequant_Bps=math.inf, overlap=1.0)
    w = Split(0, 100, 0, what="weights")
    b, n, P, G = 4, 3, 16, 8
    on_gpu, in_ram = (predict(Policy(weights=w, kv=kv, gpu_batch_size=b, num_gpu_batches=n),
                              config, torch.float32, free, P, G).decode_step_s
                      for kv in (Split(100, 0, 0, what="kv"), Split(0, 100, 0, what="kv")))
    context = P + G // 2  # the decode step the model prices
    kv_bytes = (2 * config.num_key_value_heads * config.head_dim * 4 * context * b * n
                * config.num_hidden_layers)
    assert math.isclose(in_ram - on_gpu, kv_bytes / free.h2d_Bps, rel_tol=1e-9)
