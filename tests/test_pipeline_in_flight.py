"""Decode with the pipeline kept full across steps (``decode_in_flight``) on 2 gloo ranks: the same
greedy tokens as GPipe's fill-drain steps, every (step, micro-batch) through every stage once, and
the in-flight bubble formula's two regimes."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import BUNDLED_DIR, tiny_config, write_tiny_checkpoint
from workbench.parallel.engine import RankWorker
from workbench.parallel.launch import launch
from workbench.parallel.measure import DecodeBench, _Decoder
from workbench.parallel.in_flight import (as_one_pass, bubble_formula_in_flight, decode_in_flight,
                                          replay_in_flight, schedule_bubble_in_flight)
from workbench.parallel.pipeline import (StageEvent, bubble_formula, idle_share, measured_bubble,
                                         replay_fill_drain, schedule_bubble)
from workbench.parallel.plan import ParallelConfig


def _both_ways(ctx, path: str, batch: int, m: int, steps: int, tp: int = 1) -> dict:
    par = ParallelConfig(tp=tp, pp=ctx.world_size // tp, micro_batches=m)
    bench = DecodeBench(path, (par,), (batch,), context_len=7, steps=steps, warmup=0,
                        dtype="float32")
    worker = RankWorker.load(ctx, path, par, torch.float32)
    with torch.inference_mode():
        plain, fill_drain = _Decoder(worker, batch, bench), []
        for i in range(steps):
            plain.step(i)
            fill_drain.append(plain.tokens.clone())
        fresh, events = _Decoder(worker, batch, bench), []
        in_flight = decode_in_flight(worker.model, worker.mesh, fresh.tokens, fresh.kv, fresh.pos,
                                     steps, m, worker.config.hidden_size, fresh.dev, worker.dtype,
                                     events)
    return {"fill_drain": torch.stack(fill_drain, 1).tolist(), "events": events,
            "in_flight": None if in_flight is None else in_flight.tolist()}


def test_in_flight_decode_gives_the_fill_drain_tokens(tmp_path):
    write_tiny_checkpoint(tmp_path, tiny_config(vocab_size=90, num_hidden_layers=3), seed=4)
    for path, batch, m in ((str(BUNDLED_DIR), 3, 2), (str(tmp_path), 5, 3), (str(tmp_path), 2, 1)):
        ranks = launch(_both_ways, 2, path, batch, m, 4, timeout_s=120)
        for r in ranks:  # both stages hold the tokens
            assert r["in_flight"] == r["fill_drain"], (path, m)
        items = sorted((e.stage, e.micro_batch) for r in ranks for e in r["events"])
        assert items == sorted((s, k) for s in range(2) for k in range(4 * min(m, batch)))


def test_in_flight_decode_on_tensor_parallel_stages():
    """TP 2 x PP 2: each TP rank of the last stage sends the tokens back to its counterpart in
    stage 0; the tokens are those of the fill-drain steps on every rank that holds them."""
    ranks = launch(_both_ways, 4, str(BUNDLED_DIR), 4, 2, 3, 2, timeout_s=180)
    assert all(r["in_flight"] == r["fill_drain"] for r in ranks)  # 4 ranks: first and last stages


@pytest.mark.parametrize("p, m, steps", [(2, 2, 1), (4, 4, 8), (4, 8, 8), (4, 2, 8), (2, 1, 5)])
def test_in_flight_bubble_formula(p, m, steps):
    """One step is GPipe's fill-drain; with m >= p the bubble is only the first fill, spread
    over every step; with m < p each step waits for its round trip through the p stages."""
    got = bubble_formula_in_flight(p, m, steps)
    if steps == 1:
        assert got == pytest.approx(bubble_formula(p, m))
    if m >= p:
        assert got == pytest.approx((p - 1) / (steps * m + p - 1))
        assert got <= bubble_formula(p, m) + 1e-12
    else:
        assert got == pytest.approx(1 - steps * m / (steps * p + m - 1))
        assert got > 1 - m / p - 1e-9  # at least the round trip's share


@pytest.mark.parametrize("p, m, steps", [(2, 2, 3), (4, 4, 2), (4, 8, 2), (4, 2, 3), (3, 1, 4)])
def test_equal_stages_replay_to_the_in_flight_formula(p, m, steps):
    """Equal stages of one second and free hand-overs, scheduled as decode_in_flight runs them
    (item k = t m + j enters stage 0 once the last stage finished k - m): the measured bubble, the
    replayed timetable and the formula agree."""
    finish: dict = {}
    events = []
    for k in range(steps * m):
        for s in range(p):
            start = max(finish.get((s, k - 1), 0.0), finish.get((s - 1, k), 0.0),
                        finish.get((p - 1, k - m), 0.0) if s == 0 else 0.0)
            finish[(s, k)] = start + 1.0
            events.append(StageEvent(s, 0, k, start, start + 1.0))
    want = bubble_formula_in_flight(p, m, steps)
    assert measured_bubble(events, p) == pytest.approx(want)
    assert schedule_bubble_in_flight(events, p, m) == pytest.approx(want)


@pytest.mark.parametrize("p, m, steps", [(2, 2, 3), (2, 8, 8), (4, 2, 3), (4, 8, 2), (3, 1, 4)])
def test_in_flight_timetable_on_fill_drain_times(p, m, steps):
    """Fill-drain steps with random (unequal) stage times, replayed both ways on those same times:
    keeping micro-batches in flight idles strictly less with m >= 2, exactly as much with m = 1
    (nothing to overlap), and both timetables count the same compute."""
    gen = torch.Generator().manual_seed(p * 100 + m * 10 + steps)
    events, t0 = [], 0.0
    for t in range(steps):  # the events a fill-drain run records: step t, micro-batch j
        for s in range(p):
            for j in range(m):
                took = 0.5 + torch.rand((), generator=gen).item()
                events.append(StageEvent(s, t + 3, j, t0, t0 + took))  # steps need not start at 0
                t0 += took
    one = as_one_pass(events)
    assert sorted((e.stage, e.micro_batch) for e in one) == [(s, k) for s in range(p) for k in range(steps * m)]
    assert sum(e.end - e.start for e in one) == pytest.approx(sum(e.end - e.start for e in events))
    fill_drain, in_flight = schedule_bubble(events, p), schedule_bubble_in_flight(one, p, m)
    if m == 1:
        assert in_flight == pytest.approx(fill_drain)
    else:
        assert in_flight < fill_drain - 1e-6
    # the timelines behind both numbers: the same compute, each stage one item at a time, every
    # item after the stage before finished it; the in-flight one ends no later
    drained, flowing = replay_fill_drain(events, p), replay_in_flight(one, p, m)
    assert idle_share(drained, p) == pytest.approx(fill_drain)  # passes back to back
    for replayed in (drained, flowing):
        assert sorted(round(e.end - e.start, 9) for e in replayed) == sorted(
            round(e.end - e.start, 9) for e in events)
        for stage in range(p):
            mine = sorted((e for e in replayed if e.stage == stage), key=lambda e: e.start)
            assert all(b.start >= a.end - 1e-9 for a, b in zip(mine, mine[1:]))
    ends = {(e.stage, e.micro_batch): e.end for e in flowing}
    assert all(e.start >= ends[(e.stage - 1, e.micro_batch)] - 1e-9 for e in flowing if e.stage)
    assert max(ends.values()) <= max(e.end for e in drained) + 1e-9
