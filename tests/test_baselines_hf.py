"""The Hugging Face peers (static ``generate`` batches, transformers' continuous batching) against
transformers ``generate`` run on each request alone: same greedy tokens, right finish reasons, and
times that only move forward.

The workload mixes prompt lengths, ``max_new_tokens`` (0 to 16), staggered arrivals and
``ignore_eos``; the EOS id is chosen from the model's own outputs so that one request really stops
at it and an ``ignore_eos`` request really runs through it.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tests.helpers import BUNDLED_DIR, tiny_config, torch_threads  # noqa: E402
from workbench.baselines import hf_continuous, hf_static, load_hf_model  # noqa: E402
from workbench.engine.requests import Request, RequestTrace  # noqa: E402
from workbench.errors import WorkbenchError  # noqa: E402
from workbench.model import presets  # noqa: E402

transformers.logging.set_verbosity_error()

LENGTHS = [(5, 16), (9, 6), (3, 10), (12, 16), (7, 1), (4, 0)]  # (prompt length, max_new_tokens)
IGNORE_EOS = [True, False, False, True, False, False]


def _alone(model, prompt: tuple[int, ...], n: int, eos: int | None) -> list[int]:
    """transformers ``generate`` on one prompt (batch 1, no padding): the oracle."""
    if n == 0:
        return []
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=n, eos_token_id=eos, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def workload():
    """The bundled model, the requests, an EOS id and each request's expected tokens."""
    with torch_threads(1):
        model = load_hf_model(BUNDLED_DIR)
        g = torch.Generator().manual_seed(0)
        prompts = [tuple(torch.randint(1, 8000, (p,), generator=g).tolist()) for p, _ in LENGTHS]
        free = [_alone(model, p, n, None) for p, (_, n) in zip(prompts, LENGTHS)]
        # EOS: a token a stopping request emits at step >= 2 and an ignore_eos one also emits
        stops = {t for k, t in enumerate(free[2]) if k >= 2 and t not in free[2][:k]}
        eos = min(stops & set(free[0]) or stops)
        requests = [Request(p, n, arrival_s=0.01 * i, ignore_eos=ig, id=10 + i)
                    for i, (p, (_, n), ig) in enumerate(zip(prompts, LENGTHS, IGNORE_EOS))]
        expected = [_alone(model, r.prompt_ids, r.max_new_tokens, None if r.ignore_eos else eos)
                    for r in requests]
    assert len(expected[2]) < LENGTHS[2][1] and expected[2][-1] == eos  # really stops at EOS
    return model, requests, eos, expected


def _check_traces(traces: list[RequestTrace], requests: list[Request], expected, eos: int,
                  per_token: bool = True) -> None:
    assert [t.request_id for t in traces] == [r.id for r in requests]
    for trace, r, want in zip(traces, requests, expected):
        assert trace.error is None
        assert trace.output_ids == want, f"request {r.id}"
        stopped = bool(want) and want[-1] == eos and not r.ignore_eos
        assert trace.finish_reason == ("eos" if stopped else "length")
        assert trace.prompt_len == len(r.prompt_ids) and trace.arrival_s == r.arrival_s
        assert trace.arrival_s <= trace.scheduled_s + 1e-3 <= trace.finish_s + 2e-3
        if per_token:
            assert len(trace.token_times) == len(want)
        times = trace.token_times
        assert all(a <= b for a, b in zip(times, times[1:]))
        if times:
            assert trace.scheduled_s <= times[0] <= times[-1] <= trace.finish_s + 1e-6


@pytest.mark.parametrize("batch_size", [1, 4])
def test_hf_static_equals_generate_alone(workload, batch_size):
    """Batch 4 mixes ignore_eos rows (EOS off, rows cut afterwards); batch 1 stops at EOS."""
    model, requests, eos, expected = workload
    with torch_threads(1):
        traces = hf_static(model, requests, batch_size=batch_size, eos_token_id=eos,
                           pad_token_id=0)
    _check_traces(traces, requests, expected, eos)
    # batches in arrival order: one scheduled time per batch, after its last member arrived
    first = traces[:batch_size]
    assert len({t.scheduled_s for t in first}) == 1
    assert first[0].scheduled_s >= first[-1].arrival_s
    assert traces[batch_size].scheduled_s >= max(t.finish_s for t in first)


def test_hf_continuous_equals_generate_alone(workload):
    model, requests, eos, expected = workload
    with torch_threads(1):
        traces = hf_continuous(model, requests, eos_token_id=eos)
        after = _alone(model, requests[0].prompt_ids, 4, None)
    _check_traces(traces, requests, expected, eos)
    assert after == expected[0][:4]  # the model works as before (attention restored)


def test_load_hf_model_from_save_pretrained_and_preset(tmp_path, monkeypatch):
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=8,
                                      max_position_embeddings=64, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    model = load_hf_model(tmp_path, "cpu", torch.float32)
    assert model.config.num_hidden_layers == 2 and not model.training
    with torch_threads(1):
        (trace,) = hf_static(model, [Request((1, 2, 3), 4, ignore_eos=True)], batch_size=1)
    assert len(trace.output_ids) == 4 and trace.finish_reason == "length"

    # a preset runs our random_model's weights, copied into the transformers model (tied head too)
    for tied in (True, False):
        monkeypatch.setitem(presets.PRESETS, "tiny-test", tiny_config(tie_word_embeddings=tied))
        hf = load_hf_model("preset:tiny-test", "cpu", torch.float32)
        ours = presets.random_model("tiny-test").state_dict()
        theirs = hf.state_dict()
        assert len(theirs) == len(ours) - ("inv_freq" in ours)
        for name, p in theirs.items():
            torch.testing.assert_close(p, ours[name.removeprefix("model.")], rtol=0, atol=0)


def test_errors(workload):
    model, requests, _, _ = workload
    with pytest.raises(WorkbenchError, match="batch_size"):
        hf_static(model, requests, batch_size=0)
    with pytest.raises(WorkbenchError, match="context"):
        hf_static(model, [Request((1,), 5000)], batch_size=1)
    with pytest.raises(WorkbenchError, match="model directory not found"):
        load_hf_model("/nonexistent/checkpoint")
    with pytest.raises(WorkbenchError, match="unknown preset"):
        load_hf_model("preset:gpt-5")
    assert hf_static(model, [], batch_size=2) == [] and hf_continuous(model, []) == []
