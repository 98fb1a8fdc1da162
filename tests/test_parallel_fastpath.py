"""The decode steps that ``bench tp`` / ``bench pp`` replay from CUDA graphs on GPUs, run on 2
gloo ranks (CPU) without the capture.

* The engine's fast decode step on tensor-parallel ranks (``bench tp --fast``): fused weights,
  the two all-reduces of each layer between its pieces, biases added once after the sum. Without
  torch.compile and with gathered attention it gives the logits of the plain TP step.
* The all-reduce back ends (``bench tp --symm-mem``): ``dist`` sums on gloo; the one-shot through
  symmetric memory is a clear error off CUDA.
* A pipeline's per-micro-batch stage programs (``bench pp --cuda-graphs``), run eagerly: the same
  logits as the plain pipelined step, greedy tokens handed back to the first stage, a timeline.
* A replayed variant that fails (``optional``): every rank drops it together, the row says why, and
  ``bench pp`` on the CPU writes its JSON and prints its rows."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.helpers import BUNDLED_DIR, tiny_config, write_tiny_checkpoint
from workbench.errors import WorkbenchError
from workbench.parallel.allreduce import make_reduce, reduce_latency_s
from workbench.parallel.engine import RankWorker, config_of
from workbench.parallel.launch import launch
from workbench.parallel.floors import decode_row
from workbench.parallel.measure import DecodeBench, _Decoder
from workbench.parallel.replay import fused_step, optional, pipeline_graph_step
from workbench.parallel.plan import ParallelConfig


def tp_decoder(ctx, path: str, batch: int, vocab_parallel: bool = False) -> _Decoder:
    """This rank's decoder of a TP job over every rank, fp32, after a 13-token prompt (call it
    under inference mode); ``vocab_parallel``: the embedding and LM head split too."""
    par = ParallelConfig(tp=ctx.world_size, vocab_parallel=vocab_parallel)
    bench = DecodeBench(path, (par,), (batch,), context_len=13, steps=1, warmup=1,
                        dtype="float32")
    return _Decoder(RankWorker.load(ctx, path, par, torch.float32), batch, bench)


def _fast_vs_plain(ctx, path: str, batch: int, attention: str = "gather",
                   linear: str = "auto", vocab_parallel: bool = False) -> float:
    """Max |fast - plain| of this rank's logits for one decode step after a 13-token prompt (the
    fast step uncompiled, with FusedDecoder's ``attention`` and ``linear``); both over the whole
    vocabulary (a vocabulary-parallel head's logits gathered)."""
    with torch.inference_mode():
        dec = tp_decoder(ctx, path, batch, vocab_parallel)
        fast = fused_step(dec, compile=False, attention=attention, linear=linear)()  # [B, vocab]
        plain = dec.forward(dec.batch(dec.pos))  # [B, vocab]
    assert fast.shape == plain.shape == (batch, dec.w.config.vocab_size), (fast.shape, plain.shape)
    return float((fast - plain).abs().max())


def test_fast_step_on_two_tp_ranks_equals_the_plain_step(tmp_path):
    biased = tiny_config(vocab_size=80, hidden_size=64, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, qkv_bias=True,
                         o_bias=True, mlp_bias=True)
    write_tiny_checkpoint(tmp_path, biased, seed=3)
    for path, batch in ((str(BUNDLED_DIR), 3), (str(tmp_path), 2)):
        diffs = launch(_fast_vs_plain, 2, path, batch, timeout_s=120)
        assert max(diffs) < 1e-4, (path, diffs)


def test_fast_step_with_a_vocabulary_parallel_head(tmp_path):
    """``bench tp --vocab-parallel --fast``: each rank looks up its rows of the embedding (summed
    by one all-reduce) and multiplies by its rows of the LM head (the logits all-gathered) - the
    plain TP step's logits, over the whole vocabulary, also where it does not split evenly (81
    rows over 2 and 4 ranks: the last shard padded)."""
    odd = tiny_config(vocab_size=81, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, head_dim=16)
    write_tiny_checkpoint(tmp_path, odd, seed=7)
    for ranks in (2, 4):  # _fast_vs_plain also checks that the logits are 81 wide
        diffs = launch(_fast_vs_plain, ranks, str(tmp_path), 3, "gather", "auto", True,
                       timeout_s=120)
        assert max(diffs) < 1e-4, (ranks, diffs)


def _pipeline_programs_vs_plain(ctx, path: str, batch: int, m: int) -> dict:
    """Every rank's result of :func:`pipeline_graph_step` without the capture, and its tokens."""
    par = ParallelConfig(pp=ctx.world_size, micro_batches=m)
    bench = DecodeBench(path, (par,), (batch,), context_len=11, steps=3, warmup=1,
                        dtype="float32")
    worker = RankWorker.load(ctx, path, par, torch.float32)
    with torch.inference_mode():
        dec = _Decoder(worker, batch, bench)
        dec.timed()
        out = pipeline_graph_step(dec, capture=False)
    return out | {"tokens": dec.tokens.tolist()}


def test_pipeline_stage_programs_give_the_plain_step(tmp_path):
    config = tiny_config(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=1, head_dim=16)
    write_tiny_checkpoint(tmp_path, config, seed=5)
    for path, batch, m in ((str(BUNDLED_DIR), 3, 2), (str(tmp_path), 4, 4), (str(tmp_path), 2, 1)):
        first, last = launch(_pipeline_programs_vs_plain, 2, path, batch, m, timeout_s=120)
        assert last["graph_max_abs_logit_diff"] < 1e-5 and last["graph_token_agreement"] == 1.0
        assert "graph_max_abs_logit_diff" not in first  # logits live on the last stage only
        assert first["tokens"] == last["tokens"]  # the last stage's greedy tokens came back
        assert last["graph_step_ms"] > 0
        events = first["graph_events"] + last["graph_events"]  # 3 timed steps, every stage x m
        assert sorted((e.step, e.stage, e.micro_batch) for e in events) == sorted(
            (i, s, j) for i in range(3) for s in range(2) for j in range(min(m, batch)))


def _reduce_on_gloo(ctx) -> tuple[list, float]:
    x = torch.full((3, 4), float(ctx.rank + 1))  # [3, 4]
    reduce = make_reduce("dist", dist.group.WORLD, x.numel(), x.dtype, torch.device("cpu"))
    assert reduce(x) is x  # summed in place, and returned
    return x.tolist(), reduce_latency_s(reduce, torch.zeros(3, 4), dist.group.WORLD, iters=3)


def test_allreduce_back_ends():
    for summed, seconds in launch(_reduce_on_gloo, 2, timeout_s=60):
        assert summed == [[3.0] * 4] * 3 and seconds > 0
    with pytest.raises(WorkbenchError, match="symmetric memory, which needs CUDA"):
        make_reduce("symm", None, 8, torch.float32, torch.device("cpu"))
    with pytest.raises(WorkbenchError, match="one of dist, symm"):
        make_reduce("ring", None, 8, torch.float32, torch.device("cpu"))


def _variants_that_fail(ctx) -> list:
    """optional() around a variant that works, fails on rank 1 only, fails everywhere; then one
    more collective, to show that the ranks are still in step."""
    def fails_on(ranks):
        def run():
            if ctx.rank in ranks:
                raise RuntimeError(f"no kernel image on rank {ctx.rank}")
            return {"x_ms": 1.5}
        return run

    out = [optional("x", fails_on(ranks), dist.group.WORLD) for ranks in ((), (1,), (0, 1))]
    total = torch.ones(1)
    dist.all_reduce(total)
    return out + [total.item()]


def test_a_failed_replay_variant_is_reported_not_fatal():
    for ok, one, both, total in launch(_variants_that_fail, 2, timeout_s=60):
        assert ok == {"x_ms": 1.5}
        assert one == {"x_error": "rank 1: RuntimeError: no kernel image on rank 1"}  # rank 0 too
        assert both == {"x_error": "rank 0: RuntimeError: no kernel image on rank 0"}
        assert total == 2.0
    par = ParallelConfig(tp=2)
    ranks = [{"stage": 0, "tp_rank": r, "layers": 2, "weight_bytes": 1e6, "kv_bytes": 0.0,
              "ar_s": 1e-5, "events": [], "fast_error": "rank 1: RuntimeError: no kernel image"}
             for r in range(2)]
    row = decode_row(par, 4, 2e-3, ranks, 1e9, DecodeBench("bundled", (par,), (4,)))
    assert row["fast_error"] == "rank 1: RuntimeError: no kernel image"
    assert "fast_step_ms" not in row and row["step_over_floor"] == pytest.approx(2e-3 / 1.04e-3)


def test_bench_pp_on_cpu_writes_its_rows(tmp_path, capsys):
    from workbench.cli import main

    out = tmp_path / "pp.json"
    assert main(["bench", "pp", "--pp", "1,2", "--micro-batches", "2", "--batch-sizes", "4",
                 "--context-len", "6", "--steps", "2", "--warmup", "1", "--device", "cpu",
                 "--in-flight", "--cuda-graphs", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "need a GPU: timing the eager step only" in printed and "in flight" in printed
    import json

    report = json.loads(out.read_text())
    rows = {(r["pp"], r["micro_batches"]): r for r in report["results"]}
    assert set(rows) == {(1, 1), (2, 2)} and report["hardware"]["backend"] == "gloo"
    assert rows[(1, 1)]["bandwidth_GB_s"] == rows[(2, 2)]["bandwidth_GB_s"]  # 2 jobs, one floor
    assert rows[(2, 2)]["bubble_run"] >= rows[(2, 2)]["bubble_measured"] - 1e-9  # + between steps
    two = rows[(2, 2)]
    assert 0 <= two["bubble_schedule"] <= two["bubble_measured"] < 1  # measured >= timetable
    assert two["bubble_formula"] == pytest.approx(1 / 3) and two["in_flight_step_ms"] > 0
    # the in-flight timetable on the fill-drain run's own stage times idles less (m = 2)
    assert two["in_flight_bubble_schedule_same_times"] < two["bubble_schedule"]
    assert not any(k.endswith("_error") or k.startswith("graph_") for k in two)  # no CUDA here
    assert "max_bubble_abs_error" in report["checks"]


def test_bench_tp_on_cpu_writes_its_rows(tmp_path, capsys):
    """``bench tp`` on gloo: a row per TP size against its floor (weights per rank over the
    measured bandwidth, plus two all-reduces a layer at their measured latency)."""
    import json

    from workbench.cli import main

    out = tmp_path / "tp.json"
    assert main(["bench", "tp", "--tp", "1,2", "--batch-sizes", "2", "--context-len", "6",
                 "--steps", "2", "--warmup", "1", "--device", "cpu", "--cuda-graphs", "--fast",
                 "--json", str(out)]) == 0
    assert "need a GPU: timing the eager step only" in capsys.readouterr().out
    report = json.loads(out.read_text())
    one, two = sorted(report["results"], key=lambda r: r["tp"])
    assert (one["tp"], two["tp"], one["batch"], two["batch"]) == (1, 2, 2, 2)
    assert (one["allreduces_per_step"], two["allreduces_per_step"]) == (0, 2 * 6)  # 6 layers
    per_rank = two["weight_bytes_per_gpu"]
    assert one["weight_bytes_per_gpu"] / 2 < per_rank < one["weight_bytes_per_gpu"]
    for row in (one, two):
        weights_ms = row["weight_bytes_per_gpu"] / (row["bandwidth_GB_s"] * 1e9) * 1e3
        comm_ms = row["allreduces_per_step"] * row["allreduce_us"] * 1e-3
        assert row["floor_ms"] >= weights_ms + comm_ms - 1e-9
        assert row["step_over_floor"] == pytest.approx(row["step_ms"] / row["floor_ms"])
        assert not any(k.startswith(("fast_", "graph_")) for k in row)  # nothing replayed here
    assert report["checks"]["tp2_speedup_b2"] == pytest.approx(one["step_ms"] / two["step_ms"])


def test_bench_tp_alone_times_each_ranks_shard_in_one_process(tmp_path):
    """``bench tp --alone``: every TP grid as one process with TP rank 0's shard and no peers - the
    rank's compute (what one GPU can time of TP 2 and 4), its floor without all-reduces."""
    import json

    from workbench.cli import main

    out = tmp_path / "alone.json"
    assert main(["bench", "tp", "--tp", "1,2,4", "--alone", "--batch-sizes", "2", "--context-len",
                 "6", "--steps", "2", "--warmup", "1", "--device", "cpu", "--profile",
                 "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = sorted(report["results"], key=lambda r: r["tp"])
    assert [r["tp"] for r in rows] == [1, 2, 4] and report["hardware"]["num_devices_used"] == 1
    assert [r["system"] for r in rows] == [f"workbench/TP{t}xPP1 rank alone" for t in (1, 2, 4)]
    assert all(r["alone"] and r["allreduces_per_step"] == 0 for r in rows)
    assert all(r["allreduce_calls_per_step"] == 0 for r in rows)  # counted: none ran
    one, two, four = (r["weight_bytes_per_gpu"] for r in rows)
    assert one / 4 < four < two < one  # the shards shrink; embedding and head stay whole
    for r in rows:  # the floor is the shard's bytes alone
        bytes_ms = r["weight_bytes_per_gpu"] / (r["bandwidth_GB_s"] * 1e9) * 1e3
        assert bytes_ms <= r["floor_ms"] < bytes_ms * 1.2
    assert "tp4_alone_speedup_b2" in report["checks"] and "tp4_speedup_b2" not in report["checks"]
    # --vocab-parallel: TP 2's rank reads half the LM head's rows (the embedding is a lookup)
    assert main(["bench", "tp", "--tp", "1,2", "--alone", "--vocab-parallel", "--batch-sizes", "2",
                 "--context-len", "6", "--steps", "2", "--warmup", "1", "--device", "cpu",
                 "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    one_v, two_v = sorted(report["results"], key=lambda r: r["tp"])
    assert "vocab_parallel" in report and "vocab_parallel" not in one_v and two_v["vocab_parallel"]
    assert two_v["system"] == "workbench/TP2xPP1 vocab-parallel rank alone"
    config = config_of(str(BUNDLED_DIR))
    V, h = config.vocab_size, config.hidden_size
    assert one_v["weight_bytes_per_gpu"] == one
    assert two - two_v["weight_bytes_per_gpu"] == (V - -(-V // 2)) * h * 4  # fp32 rows


def _replayed_on_cpu(ctx) -> dict:
    from workbench.parallel.measure import _replayed

    par = ParallelConfig(tp=ctx.world_size)
    bench = DecodeBench(str(BUNDLED_DIR), (par,), (2,), context_len=5, steps=1, warmup=1,
                        dtype="float32", cuda_graphs=True, fast=True, profile=True)
    worker = RankWorker.load(ctx, str(BUNDLED_DIR), par, torch.float32)
    with torch.inference_mode():
        return _replayed(_Decoder(worker, 2, bench), 2)


def test_replayed_variants_on_cpu_profile_the_plain_step():
    """``bench tp --cuda-graphs --fast --profile`` on 2 gloo ranks: no replay off CUDA, and a
    profiler table of the plain step, whose two all-reduces a layer are gloo's."""
    for out in launch(_replayed_on_cpu, 2, timeout_s=120):
        assert sorted(out) == ["allreduce_calls_per_step", "profile_table"], out.keys()
        assert "aten::linear" in out["profile_table"] and "all_reduce" in out["profile_table"]
        assert out["allreduce_calls_per_step"] == 2 * 6  # two a layer, counted (6 layers)
