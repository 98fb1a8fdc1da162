"""Continuous batching: same tokens as generating alone (and as transformers), nothing lost.

Random workloads (hypothesis) vary prompt lengths, output limits, EOS, engine limits and chunked
prefill; every request's greedy tokens must equal the static engine's batch-1 tokens, which
tests/test_model_vs_hf.py ties to transformers' ``generate``.
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import torch_threads
from workbench.engine import (ContinuousEngine, EngineConfig, Request, SamplingParams,
                              run_continuous, run_static)
from workbench.engine.run import Clock
from workbench.errors import WorkbenchError
from workbench.model import ModelConfig
from workbench.model.presets import random_model

CONFIG = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                     max_position_embeddings=96, eos_token_ids=(7,))


@pytest.fixture(scope="module")
def model():
    return random_model(CONFIG, std=0.3, seed=1)  # std 0.3: decisive argmaxes, EOS reachable


def requests_from(lengths, limits, seed=0, arrivals=None, ignore_eos=False):
    g = torch.Generator().manual_seed(seed)
    return [Request(tuple(torch.randint(8, 96, (n,), generator=g).tolist()), m,
                    arrival_s=0.0 if arrivals is None else arrivals[i], ignore_eos=ignore_eos,
                    id=i) for i, (n, m) in enumerate(zip(lengths, limits))]


def alone(model, requests, sampling=SamplingParams()):
    return [run_static(model, [r], 1, sampling).traces[0].output_ids for r in requests]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_workloads_match_generating_alone(model, data):
    n = data.draw(st.integers(1, 7))
    lengths = data.draw(st.lists(st.integers(1, 30), min_size=n, max_size=n))
    limits = data.draw(st.lists(st.integers(0, 20), min_size=n, max_size=n))
    seqs = data.draw(st.integers(1, 4))
    chunked = data.draw(st.booleans())
    budget = data.draw(st.integers(seqs, 40)) if chunked else 40
    requests = requests_from(lengths, limits, seed=data.draw(st.integers(0, 99)))
    with torch_threads(1):
        run = run_continuous(model, requests, EngineConfig(seqs, budget, chunked_prefill=chunked))
        static = run_static(model, requests, batch_size=3)
        expected = alone(model, requests)
    assert [t.request_id for t in run.traces] == [r.id for r in requests]  # none lost or doubled
    for trace, exp, static_trace, r in zip(run.traces, expected, static.traces, requests):
        assert trace.output_ids == exp == static_trace.output_ids
        assert trace.finish_reason == ("eos" if exp and exp[-1] == 7 else "length")
        assert len(trace.token_times) == len(trace.output_ids) <= r.max_new_tokens
    assert all(row.count(None) < len(row) for row in run.timeline)  # no fully idle step


def test_sampled_tokens_do_not_depend_on_batching(model):
    requests = requests_from([5, 12, 3, 9, 20], [15, 4, 18, 9, 11], seed=3)
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=5)
    with torch_threads(1):
        a = run_continuous(model, requests, EngineConfig(2, 8, chunked_prefill=True), params)
        b = run_static(model, requests, 4, params)
    assert [t.output_ids for t in a.traces] == [t.output_ids for t in b.traces]


def test_slots_are_refilled_as_soon_as_a_sequence_ends(model):
    requests = requests_from([4] * 6, [2, 12, 2, 12, 2, 12], seed=4, ignore_eos=True)
    with torch_threads(1):
        cont = run_continuous(model, requests, EngineConfig(max_num_seqs=2, max_num_batched_tokens=16))
        static = run_static(model, requests, batch_size=2)
    assert cont.utilization > static.utilization
    assert len(cont.timeline) < len(static.timeline)
    last_admitted = next(i for i, row in enumerate(cont.timeline) if requests[-1].id in row)
    # while requests wait, a freed slot is taken at the very next step: no idle slot-step
    assert all(None not in row for row in cont.timeline[:last_admitted + 1])


def test_bad_requests_are_rejected_alone(model):
    good = requests_from([5, 6], [4, 4], seed=5)
    too_long = Request((9,) * 90, 10, id=2)  # 100 > context 96
    over_budget = Request(tuple(range(8, 8 + 50)), 2, id=3)  # prompt > 40-token step budget
    empty = Request((), 3, id=4)
    out_of_vocab = Request((500,), 3, id=5)
    nothing = Request((9, 10), 0, id=6)
    requests = [*good, too_long, over_budget, empty, out_of_vocab, nothing]
    with torch_threads(1):
        run = run_continuous(model, requests, EngineConfig(2, 40))
    reasons = [t.finish_reason for t in run.traces]
    assert reasons[2:6] == ["rejected"] * 4 and reasons[6] == "length"
    assert "exceeds the model's context" in run.traces[2].error
    assert "max_num_batched_tokens" in run.traces[3].error
    assert "empty prompt" in run.traces[4].error and "vocabulary" in run.traces[5].error
    assert run.traces[6].output_ids == []
    assert [t.output_ids for t in run.traces[:2]] == alone(model, good)
    chunked = run_continuous(model, [over_budget], EngineConfig(2, 40, chunked_prefill=True))
    assert chunked.traces[0].finish_reason == "length"  # with chunking the long prompt runs


def test_kv_budget_per_sequence(model):
    run = run_continuous(model, requests_from([30], [30]), EngineConfig(1, 64, max_model_len=50))
    assert run.traces[0].finish_reason == "rejected" and "KV budget" in run.traces[0].error


def test_cancellation_frees_the_slot(model):
    engine = ContinuousEngine(model, EngineConfig(max_num_seqs=1, max_num_batched_tokens=32))
    clock = Clock()
    first, second = requests_from([5, 6], [50, 3], seed=6, ignore_eos=True)
    t1, t2 = engine.add_request(first), engine.add_request(second)
    for _ in range(3):
        engine.step(clock)
    assert len(t1.output_ids) == 3 and t2.output_ids == []  # one slot: the second waits
    engine.cancel(first.id, clock.now())
    while engine.has_work():
        engine.step(clock)
    assert t1.finish_reason == "cancelled" and len(t1.output_ids) == 3
    assert t2.finish_reason == "length" and t2.output_ids == alone(model, [second])[0]
    assert engine.scheduler.free_slots == [0]


def test_poisson_arrivals_are_respected(model):
    requests = requests_from([4, 4, 4], [3, 3, 3], arrivals=[0.0, 0.05, 0.1])
    run = run_continuous(model, requests, EngineConfig(4, 32))
    for trace, r in zip(run.traces, requests):
        assert trace.scheduled_s >= r.arrival_s and trace.token_times[0] >= r.arrival_s


def test_empty_workload_and_config_errors(model):
    assert run_continuous(model, [], EngineConfig()).traces == []
    with pytest.raises(WorkbenchError, match="max_num_batched_tokens"):
        EngineConfig(max_num_seqs=8, max_num_batched_tokens=4)
    with pytest.raises(WorkbenchError, match="max_num_seqs"):
        EngineConfig(max_num_seqs=0)
    engine = ContinuousEngine(model)
    engine.add_request(Request((9,), 1, id=1))
    with pytest.raises(WorkbenchError, match="duplicate"):
        engine.add_request(Request((9,), 1, id=1))
