"""The what-if predictor (workbench.whatif, notebook 09): the device table, byte accounting against
the library's own counts, the physics of the predictions, the memory check, a measured run's steps
against their floors, and the explorer."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.helpers import tiny_config, torch_threads
from workbench.anatomy import forward_cost
from workbench.engine import EngineConfig, Request, run_static
from workbench.errors import WorkbenchError
from workbench.kv.paged import kv_bytes_per_token
from workbench.model.llama import LlamaModel
from workbench.model.loading import load_model
from workbench.model.presets import PRESETS, random_model
from workbench.parallel.plan import shard_config
from workbench.quant.groupwise import parse_quant_config
from workbench.quant.kv import KV_INT4, KV_INT8, QuantizedKVCache
from workbench.quant.linear import quantize_model, weight_bytes
from workbench.roofline import Roofline
from workbench.whatif import (DEVICES, Device, Scenario, check_fit, decode_step, footprint,
                              match_device, memory_fit, predict, prefill_step, this_machine)
from workbench.whatif.compare import by_batch, compare_steps, step_records
from workbench.whatif.serve import build_model, serve

H100 = DEVICES["H100 SXM 80GB"]
LLAMA8B = PRESETS["llama-3.1-8b"]


# ---------------------------------------------------------------------------- the device table

def test_device_table_is_valid_and_plausible():
    assert len(DEVICES) >= 7
    for name, d in DEVICES.items():
        assert d.name == name and d.source
        assert 50e9 <= d.bandwidth <= 10e12, name  # LPDDR laptops .. HBM3e
        assert 8 * 2**30 <= d.memory_bytes <= 200 * 2**30, name
        half = d.bf16_flops or d.fp16_flops
        assert half is not None and d.fp32_flops is not None, name
        assert half >= d.fp32_flops, name  # tensor cores (or equal rate on Apple's GPU)
        assert 1 < d.roofline("fp16" if d.bf16_flops is None else "bf16").ridge_point < 1000
        if d.max_devices > 1:
            assert d.link_bandwidth and d.link_latency_s
    # newer parts of one family are faster where the datasheets say so
    assert DEVICES["H200 SXM 141GB"].bandwidth > H100.bandwidth > DEVICES["A100 SXM 80GB"].bandwidth
    assert DEVICES["T4"].bf16_flops is None  # Turing has no bfloat16 tensor cores


def test_device_rejects_bad_records():
    good = dict(name="x", bandwidth=1e11, memory_bytes=2**30, fp32_flops=1e12, bf16_flops=None,
                fp16_flops=None)
    Device(**good)
    for bad in ({"bandwidth": -1.0}, {"bandwidth": float("inf")}, {"fp32_flops": None},
                {"max_devices": 2}, {"max_devices": 0}, {"memory_bytes": 0}):
        with pytest.raises(WorkbenchError):
            Device(**(good | bad))
    with pytest.raises(WorkbenchError, match="no bf16"):
        Device(**good).peak_flops("bf16")
    with pytest.raises(WorkbenchError, match="compute dtype"):
        Device(**good).peak_flops("int8")


def test_allreduce_and_match_device():
    assert H100.allreduce_s(1e6, 1) == 0.0
    two, eight = H100.allreduce_s(1e6, 2), H100.allreduce_s(1e6, 8)
    assert H100.link_latency_s < two < eight  # ring: 2 (tp - 1) / tp of the message on the link
    with pytest.raises(WorkbenchError, match="at most 1"):
        DEVICES["Apple M2 (10-core GPU)"].allreduce_s(1e6, 2)
    names = {"NVIDIA H100 80GB HBM3": "H100 SXM 80GB", "NVIDIA H100 PCIe": None,
             "NVIDIA A100-SXM4-80GB": "A100 SXM 80GB", "NVIDIA A100-SXM4-40GB": None,
             "Tesla T4": "T4", "NVIDIA L4": "L4", "NVIDIA L40S": None,
             "NVIDIA GeForce RTX 4090": "RTX 4090", "AMD EPYC": None}
    for torch_name, entry in names.items():
        found = match_device(torch_name)
        assert (found and found.name) == entry, torch_name


def test_this_machine_from_a_roofline():
    here = this_machine(Roofline(10e9, 40e9, "cpu here"), 24 * 2**30, "fp32")
    assert here.peak_flops("fp32") == 40e9 and here.bandwidth == 10e9 and here.max_devices == 1
    with pytest.raises(WorkbenchError, match="no bf16"):
        Scenario(LLAMA8B, here, weights="bf16")
    s = Scenario(PRESETS["smollm2-135m"], here, weights="int8")  # quantized: computes in fp32
    assert s.compute == "fp32" and s.kv == "fp32"


# ---------------------------------------------------------------------------- byte accounting

@pytest.mark.parametrize("weights,compute,embeddings", [
    ("fp32", "fp32", False), ("bf16", "bf16", False), ("int8", "fp32", False),
    ("int4", "bf16", False), ("int4-g64-asym", "bf16", True), ("int8-g32-asym", "fp32", True)])
def test_weight_bytes_equal_the_quantized_model(weights, compute, embeddings):
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[compute]
    configs = {"bundled": None, "untied+bias": tiny_config(tie_word_embeddings=False, qkv_bias=True,
                                                          hidden_size=64, head_dim=16)}
    with torch_threads(1):
        for name, config in configs.items():
            model = (load_model("bundled", "cpu", dtype) if config is None
                     else LlamaModel(config).to(dtype))
            if weights not in ("fp32", "bf16"):
                quantize_model(model, parse_quant_config(weights), embeddings=embeddings)
            fp = footprint(model.config, weights, compute, quantize_embeddings=embeddings)
            assert fp.weights == weight_bytes(model), (name, weights)


def test_weight_bytes_of_a_preset_shape():
    with torch_threads(1):
        model = random_model("smollm2-135m", "cpu", torch.bfloat16)
        assert footprint(model.config, "bf16", "bf16").weights == weight_bytes(model)
        quantize_model(model, parse_quant_config("int4"))
        assert footprint(model.config, "int4", "bf16").weights == weight_bytes(model)


@pytest.mark.parametrize("preset", ["smollm2-135m", "qwen2.5-0.5b", "llama-3.2-1b", "llama-3.1-8b"])
def test_kv_bytes_equal_the_library(preset):
    config = PRESETS[preset]
    for kv, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        per_token = footprint(config, "bf16", "bf16", kv).kv_per_token
        assert per_token == kv_bytes_per_token(config, dtype)
    for kv, quant in (("int8", KV_INT8), ("int4", KV_INT4)):
        cache = QuantizedKVCache(config, 2, 64, "meta", quant=quant)
        assert footprint(config, "bf16", "bf16", kv).kv_per_token * 2 * 64 == cache.nbytes()


def test_tensor_parallel_footprint_is_one_rank_shard():
    for tp in (2, 4, 8):
        shard = shard_config(LLAMA8B, tp)
        with torch.device("meta"):
            rank = LlamaModel(shard)  # a rank is our model built with the shard's shape
        params = sum(p.numel() for p in rank.parameters())
        fp = footprint(LLAMA8B, "bf16", "bf16", tp=tp)
        assert fp.weights == 2 * params
        assert fp.kv_per_token == kv_bytes_per_token(LLAMA8B, torch.bfloat16) // tp
    with pytest.raises(WorkbenchError, match="divisible"):
        footprint(PRESETS["qwen2.5-0.5b"], "bf16", "bf16", tp=4)  # 2 KV heads


def test_footprint_rejects_mixed_dense_dtypes():
    with pytest.raises(WorkbenchError, match="one dtype"):
        footprint(LLAMA8B, "bf16", "fp32")
    with pytest.raises(WorkbenchError, match="unknown weight format"):
        footprint(LLAMA8B, "int3", "bf16")
    with pytest.raises(WorkbenchError, match="needs quantized weights"):
        footprint(LLAMA8B, "bf16", "bf16", quantize_embeddings=True)


# ---------------------------------------------------------------------------- physics

def _scenario(**kw) -> Scenario:
    fields = dict(config=LLAMA8B, device=H100, batch=16, context=1024, output=256,
                  weights="bf16", model_name="llama-3.1-8b")
    return Scenario(**(fields | kw))


def test_step_cost_agrees_with_the_roofline_and_forward_cost():
    s = _scenario(batch=1)
    step = decode_step(s, cached=1024)
    cost = forward_cost(LLAMA8B, 1, 1, 1024, 2)
    assert step.flops == cost["flops"]
    # batch 1 is memory-bound: the floor is the roofline's decode floor of the same bytes
    assert step.bound == "memory"
    assert step.seconds == pytest.approx(H100.roofline("bf16").decode_step_floor(
        step.weight_bytes, step.kv_bytes))
    assert step.kv_bytes == 1025 * LLAMA8B.kv_bytes_per_token(2)
    assert prefill_step(s, 1, 4096).bound == "compute"


def test_prediction_monotonic_in_batch():
    preds = [predict(_scenario(batch=b)) for b in (1, 2, 4, 8, 16, 32, 64, 128)]
    tok_s = [p.decode_tok_s for p in preds]
    assert tok_s == sorted(tok_s) and len(set(tok_s)) == len(tok_s)
    tpot = [p.tpot_s for p in preds]
    assert tpot == sorted(tpot)  # a bigger batch never makes a step faster...
    assert tpot[-1] < 4 * tpot[0]  # ...but 128x the rows cost far less than 128x the time
    assert [p.ttft_s for p in preds] == sorted(p.ttft_s for p in preds)


def test_prediction_monotonic_in_precision():
    preds = {w: predict(_scenario(weights=w)) for w in ("bf16", "int8", "int4")}
    weights = [preds[w].memory.weights for w in ("bf16", "int8", "int4")]
    assert weights[0] > weights[1] > weights[2]
    assert preds["bf16"].tpot_s > preds["int8"].tpot_s > preds["int4"].tpot_s  # memory-bound
    assert len({p.ttft_s for p in preds.values()}) == 1  # weight-only: prefill FLOPs unchanged
    kv = {k: predict(_scenario(kv=k, batch=64, context=8192, output=128))
          for k in ("bf16", "int8", "int4")}
    assert kv["bf16"].memory.kv > kv["int8"].memory.kv > kv["int4"].memory.kv
    assert kv["bf16"].tpot_s > kv["int8"].tpot_s > kv["int4"].tpot_s  # long contexts: KV reads
    fp32 = predict(Scenario(LLAMA8B, DEVICES["H200 SXM 141GB"], batch=4, weights="fp32"))
    bf16 = predict(Scenario(LLAMA8B, DEVICES["H200 SXM 141GB"], batch=4, weights="bf16"))
    assert fp32.memory.weights == 2 * bf16.memory.weights and fp32.tpot_s > bf16.tpot_s


def test_prediction_with_tensor_parallelism():
    preds = {tp: predict(_scenario(tp=tp)) for tp in (1, 2, 4, 8)}
    for a, b in zip((1, 2, 4), (2, 4, 8)):
        pa, pb = preds[a], preds[b]
        assert pb.memory.weights < pa.memory.weights  # each device holds less...
        assert pb.decode.memory_s < pa.decode.memory_s and pb.decode.compute_s < pa.decode.compute_s
        assert pb.decode.comm_s > pa.decode.comm_s  # ...but all-reduces more, at a fixed latency
        assert pb.ttft_s < pa.ttft_s  # the compute-bound prefill splits well
    assert preds[1].decode.comm_s == 0
    # the embedding table and head stay whole on each rank: weights shrink by less than tp
    assert preds[1].memory.weights / preds[8].memory.weights < 8
    # a small model at batch 1 decodes *slower* on 8 devices: latency, not bandwidth, dominates
    small = [predict(Scenario(PRESETS["llama-3.2-1b"], H100, batch=1, tp=tp)) for tp in (1, 8)]
    assert small[1].tpot_s > small[0].tpot_s


def test_memory_fit_and_its_error():
    s = _scenario(device=DEVICES["L4"], batch=64, context=8192, output=256)
    fit = memory_fit(s)
    assert not fit.fits and fit.kv > fit.capacity
    with pytest.raises(WorkbenchError, match="does not fit") as err:
        check_fit(s)
    assert "L4" in str(err.value) and "KV cache" in str(err.value) and "batch" in str(err.value)
    with pytest.raises(WorkbenchError):
        predict(s)
    assert not predict(s, strict=False).memory.fits
    # the largest batch that fits is exactly the boundary
    best = dataclasses.replace(s, batch=fit.max_batch)
    assert memory_fit(best).fits
    assert not memory_fit(dataclasses.replace(s, batch=fit.max_batch + 1)).fits
    # weights alone too big: the message says to quantize or split them
    huge = _scenario(device=DEVICES["T4"], weights="fp32", batch=1)
    with pytest.raises(WorkbenchError, match="weights alone"):
        check_fit(huge)
    assert memory_fit(dataclasses.replace(huge, weights="int4")).fits


def test_scenario_rejects_what_cannot_run():
    for bad, match in (({"batch": 0}, "batch"), ({"weights": "int3"}, "weight format"),
                       ({"kv": "int5"}, "KV format"), ({"device": DEVICES["T4"]}, "no bf16"),
                       ({"tp": 16}, "at most 8"), ({"context": 131000}, "exceeds"),
                       ({"config": PRESETS["qwen2.5-0.5b"], "tp": 4}, "divisible"),
                       ({"device": "H100"}, "needs a ModelConfig and a Device")):
        with pytest.raises(WorkbenchError, match=match):
            _scenario(**bad)
    assert _scenario(device=DEVICES["T4"], weights="fp16").compute == "fp16"
    assert _scenario(device=DEVICES["T4"], weights="int4").compute == "fp16"


# ---------------------------------------------------------------------------- a measured run

def _tiny_requests(n: int = 6, prompt: int = 8) -> list[Request]:
    gen = torch.Generator().manual_seed(0)
    return [Request(tuple(torch.randint(1, 64, (prompt,), generator=gen).tolist()), 5 + i % 4,
                    ignore_eos=True, id=i) for i in range(n)]


def test_served_quantized_engine_equals_its_plain_path_and_steps_compare():
    config = tiny_config(hidden_size=64, intermediate_size=128, head_dim=16,
                         max_position_embeddings=128)
    requests = _tiny_requests()
    engine = EngineConfig(max_num_seqs=4, max_num_batched_tokens=64, kv="paged", block_size=4)
    with torch_threads(1):
        torch.manual_seed(0)
        model = quantize_model(LlamaModel(config).eval(), parse_quant_config("int8"))
        served = serve("int8", model, requests, engine)
        plain = run_static(model, requests, batch_size=len(requests))
    assert served.tokens == [list(t.output_ids) for t in plain.traces]
    assert served.metrics["completed"] == len(requests) and served.kv["preemptions"] == 0
    assert served.weight_bytes == footprint(config, "int8", "fp32").weights

    records = step_records(served.history)
    assert len(records) == len(served.history)
    assert sum(r["prefill_tokens"] for r in records) == 8 * len(requests)
    first_decode = next(r for r in records if r["kind"] == "decode")
    assert first_decode["cached"] >= 8  # every decoding row has at least its prompt cached
    here = this_machine(Roofline(10e9, 40e9, "test"), 2**34, "fp32")
    rows = compare_steps(Scenario(config, here, batch=4, context=8, output=6, weights="int8"),
                         served.history, prompt_len=8)
    assert all(r["predicted_s"] > 0 and r["ratio"] > 0 for r in rows)
    groups = by_batch(rows)
    assert sum(g["steps"] for g in groups) == sum(r["kind"] == "decode" for r in rows)
    with pytest.raises(WorkbenchError):
        step_records([])


def test_build_model_formats():
    with torch_threads(1):
        q = build_model("bundled", "cpu", "int4", "fp32")
        assert weight_bytes(q) == footprint(q.config, "int4", "fp32").weights
    with pytest.raises(WorkbenchError, match="compute in"):
        build_model("bundled", "cpu", "bf16", "fp32")
    with pytest.raises(WorkbenchError, match="needs quantized"):
        build_model("bundled", "cpu", "fp32", "fp32", kernel="int8mm")


# ---------------------------------------------------------------------------- the explorer

def test_explorer_builds_and_updates_without_a_display():
    pytest.importorskip("ipywidgets")
    import matplotlib

    matplotlib.use("Agg")
    from workbench.whatif.explorer import whatif_explorer

    ex = whatif_explorer(plot=True)
    first = ex.prediction
    assert first is not None and "TTFT" in ex.text.value and "fits" in ex.text.value
    ex.batch.value = 64
    assert ex.prediction.decode_tok_s > first.decode_tok_s
    ex.weights.value = "int4"
    assert ex.prediction.memory.weights < first.memory.weights
    ex.device.value = "T4"  # bf16 on a T4: explained, not raised
    ex.weights.value = "bf16"
    assert ex.prediction is None and "cannot run" in ex.text.value
    ex.weights.value = "fp16"
    ex.batch.value, ex.context.value = 512, 32768
    assert "does not fit" in ex.text.value
    with pytest.raises(WorkbenchError):
        whatif_explorer(model="no-such-model", plot=False)
