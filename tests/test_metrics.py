"""Serving metrics (vLLM's names) on hand-computed traces, and the batching figures."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workbench.engine.requests import RequestTrace
from workbench.errors import WorkbenchError
from workbench.metrics import (
    queue_lengths,
    request_latencies,
    slot_utilization,
    summarize,
    timeline_utilization,
)

matplotlib.use("Agg")


def trace(rid, arrival, times, finish=None, reason="length", prompt_len=4, scheduled=None):
    return RequestTrace(request_id=rid, arrival_s=arrival, prompt_len=prompt_len,
                        output_ids=list(range(len(times))), token_times=list(times),
                        scheduled_s=scheduled, finish_s=finish, finish_reason=reason)


def two_requests():
    # A: arrives 0.0, tokens at 0.1, 0.3, 0.6. B: arrives 0.2, one token at 0.5.
    return [trace(0, 0.0, [0.1, 0.3, 0.6], finish=0.6, scheduled=0.0),
            trace(1, 0.2, [0.5], finish=0.5, reason="eos", scheduled=0.4)]


def test_hand_computed_example():
    s = summarize(two_requests(), duration_s=2.0)
    assert (s["completed"], s["rejected"], s["cancelled"]) == (2, 0, 0)
    assert s["total_output_tokens"] == 4 and s["total_input_tokens"] == 8
    assert s["request_throughput"] == pytest.approx(1.0)
    assert s["output_throughput"] == s["output_tok_s"] == pytest.approx(2.0)
    assert s["total_token_throughput"] == pytest.approx(6.0)
    # TTFT: 100 and 300 ms.
    assert s["mean_ttft_ms"] == pytest.approx(200) and s["median_ttft_ms"] == pytest.approx(200)
    assert s["p90_ttft_ms"] == pytest.approx(280) and s["p99_ttft_ms"] == pytest.approx(298)
    assert s["std_ttft_ms"] == pytest.approx(100)
    # TPOT: only A has >= 2 tokens: (0.6 - 0.1) / 2 = 250 ms.
    assert s["mean_tpot_ms"] == pytest.approx(250) and s["p99_tpot_ms"] == pytest.approx(250)
    # ITL: A's gaps 200 and 300 ms; B has none.
    assert s["mean_itl_ms"] == pytest.approx(250) and s["p90_itl_ms"] == pytest.approx(290)
    # E2E: 600 and 300 ms.
    assert s["mean_e2el_ms"] == pytest.approx(450) and s["median_e2el_ms"] == pytest.approx(450)
    assert s["p90_e2el_ms"] == pytest.approx(570) and s["p99_e2el_ms"] == pytest.approx(597)
    np.testing.assert_allclose(request_latencies(two_requests(), "itl"), [200, 300])


def test_empty_run_gives_zeros_and_nones():
    s = summarize([], duration_s=0.0)
    assert s["completed"] == 0 and s["output_tok_s"] == 0.0 and s["request_throughput"] == 0.0
    assert s["mean_ttft_ms"] is None and s["p99_e2el_ms"] is None
    assert summarize([], duration_s=3.0)["total_token_throughput"] == 0.0


def test_zero_and_one_token_requests():
    traces = [trace(0, 0.0, [], finish=0.05), trace(1, 0.0, [0.2], finish=0.2)]
    s = summarize(traces, duration_s=1.0)
    assert s["completed"] == 2 and s["total_output_tokens"] == 1
    assert s["mean_ttft_ms"] == pytest.approx(200)  # the empty request has no first token
    assert s["mean_tpot_ms"] is None and s["mean_itl_ms"] is None
    assert s["mean_e2el_ms"] == pytest.approx(125)


def test_only_completed_requests_count():
    traces = two_requests() + [
        trace(2, 0.0, [0.1, 0.2], finish=0.3, reason="cancelled"),
        RequestTrace(request_id=3, arrival_s=0.1, prompt_len=9999, finish_s=0.1,
                     finish_reason="rejected", error="too long")]
    s = summarize(traces, duration_s=2.0)
    assert (s["num_requests"], s["completed"], s["cancelled"], s["rejected"]) == (4, 2, 1, 1)
    assert s["output_tok_s"] == pytest.approx(2.0) and s["total_input_tokens"] == 8
    assert s["mean_ttft_ms"] == pytest.approx(200)


def test_bad_duration_raises():
    with pytest.raises(WorkbenchError):
        summarize(two_requests(), duration_s=0.0)
    with pytest.raises(WorkbenchError):
        summarize([], duration_s=-1.0)
    with pytest.raises(WorkbenchError, match="unknown latency metric"):
        request_latencies([], "latency")


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 5), st.lists(st.floats(0.001, 1), min_size=2,
                                                    max_size=6)), min_size=1, max_size=6))
def test_metrics_agree_with_each_other(requests):
    """TTFT + (n-1) * TPOT = E2EL when the request ends on its last token; ITL pools the gaps."""
    traces = []
    for rid, (arrival, gaps) in enumerate(requests):
        times = list(arrival + np.cumsum(gaps))
        traces.append(trace(rid, arrival, times, finish=times[-1]))
    ttft, tpot = request_latencies(traces, "ttft"), request_latencies(traces, "tpot")
    e2el, itl = request_latencies(traces, "e2el"), request_latencies(traces, "itl")
    n = np.array([len(g) for _, g in requests])
    np.testing.assert_allclose(ttft + (n - 1) * tpot, e2el, rtol=1e-9, atol=1e-6)
    np.testing.assert_allclose(np.sort(itl), np.sort(np.concatenate(
        [np.array(g[1:]) * 1000 for _, g in requests])), rtol=1e-9, atol=1e-6)
    s = summarize(traces, duration_s=10.0)
    assert s["p99_itl_ms"] == pytest.approx(np.percentile(itl, 99))
    assert s["median_e2el_ms"] == pytest.approx(np.median(e2el))


def test_slot_utilization():
    assert slot_utilization(3, 4) == 0.75 and slot_utilization(0, 0) == 0.0
    assert timeline_utilization([[0, 1], [0, None], [None, None]]) == pytest.approx(0.5)
    for busy, total in [(5, 4), (-1, 4), (1.5, 4)]:
        with pytest.raises(WorkbenchError):
            slot_utilization(busy, total)


def test_queue_lengths():
    traces = two_requests() + [
        RequestTrace(request_id=2, arrival_s=0.3, prompt_len=5, finish_s=0.3,
                     finish_reason="rejected"),
        trace(3, 0.25, [], reason=None)]  # arrived, never scheduled, still waiting
    # waiting: B over [0.2, 0.4), D from 0.25 on; A is scheduled at once, C rejected on arrival.
    got = queue_lengths(traces, [0.0, 0.1, 0.2, 0.3, 0.39, 0.4, 1.0])
    assert got.tolist() == [0, 0, 1, 2, 2, 1, 1]
    assert queue_lengths([], [0.0, 1.0]).tolist() == [0, 0]


def test_batching_figures():
    import matplotlib.pyplot as plt
    from matplotlib.axes import Axes

    from workbench.viz.batching import (
        plot_latency_cdf,
        plot_queue_length,
        plot_throughput_vs_cap,
        plot_timeline,
    )

    rows = [[0, 1], [0, 1], [0, None], [2, 3], [None, 3]]
    ax = plot_timeline(rows, title="static")
    assert isinstance(ax, Axes)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["S1", "S2"]
    assert "static" in ax.get_title() and "80%" in ax.get_title()
    image = ax.images[0].get_array()  # [slot, step, RGBA]
    assert image.shape[:2] == (2, 5)
    np.testing.assert_allclose(image[0, 0], image[0, 2])  # the same request, the same colour
    assert not np.allclose(image[0, 0], image[1, 0])  # different requests differ
    np.testing.assert_allclose(image[1, 2], [1, 1, 1, 1])  # idle is white
    assert isinstance(plot_timeline([]), Axes)

    by_system = {"static": two_requests(), "continuous": two_requests()[:1], "none": []}
    for metric in ("e2el", "ttft"):
        assert isinstance(plot_latency_cdf(by_system, metric=metric), Axes)
    with pytest.raises(WorkbenchError):
        plot_latency_cdf(by_system, metric="speed")
    ax = plot_throughput_vs_cap({"static": {32: 100.0, 128: 80.0, 512: 60.0, 1536: 50.0},
                                 "continuous": {32: 110.0, 512: 150.0}})
    assert [t.get_text() for t in ax.get_xticklabels()] == ["32", "128", "512", "1536"]
    ax = plot_queue_length([0.0, 1.0, 2.0], {"static": [0, 3, 1], "continuous": [0, 1, 0]})
    assert len(ax.get_lines()) == 2
    with pytest.raises(WorkbenchError):
        plot_queue_length([0.0, 1.0], {"static": [0]})
    plt.close("all")
