"""StreamingLLM: the rolling cache against the plain model and against recomputation.

Oracles: (1) with a window larger than the sequence the rolling cache is the plain model;
(2) in a one-layer model a token's key and value depend on the token alone, so sinks + window
must equal a fresh forward pass over [sinks + window] tokens at positions 0..k+w-1, exactly
the positions the cache assigns; (3) chunked scoring equals token-by-token decoding.
"""

import json
import math

import pytest
import torch

from tests.helpers import tiny_config, torch_threads
from workbench.cli import main
from workbench.errors import WorkbenchError
from workbench.model import LlamaModel, load_model
from workbench.model.batch import ForwardBatch
from workbench.roofline import Roofline
from workbench.streaming import SinkKVCache, StreamingConfig
from workbench.streaming.cost import roofline_speedup
from workbench.streaming.probe import AttentionProbe, attention_maps, sink_share, uniform_share
from workbench.streaming.score import (METHODS, StreamEval, eviction_penalty, long_stream,
                                       score_stream, time_per_token)

SHAPES = [dict(), dict(num_attention_heads=4, num_key_value_heads=4, head_dim=16),
          dict(num_attention_heads=8, num_key_value_heads=1, head_dim=4, num_hidden_layers=3)]


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1), torch.inference_mode():
        yield


def _model(seed: int = 0, **overrides) -> LlamaModel:
    torch.manual_seed(seed)
    return LlamaModel(tiny_config(**overrides)).eval()


def _feed(model, cache: SinkKVCache, ids: torch.Tensor, chunk: int) -> torch.Tensor:
    """Logits [B, N, V] of ids [B, N] fed ``chunk`` tokens at a time through ``cache``."""
    out = [model(cache.next_batch(ids[:, s:s + chunk]), cache)
           for s in range(0, ids.shape[1], chunk)]
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("shape", SHAPES, ids=["gqa2", "mha", "mqa-3layers"])
@pytest.mark.parametrize("chunk", [1, 5, 40])
def test_window_larger_than_sequence_is_the_plain_model(shape, chunk):
    model = _model(**shape)
    ids = torch.randint(1, 64, (2, 40))
    plain = model(ForwardBatch.prefill(ids))
    cache = SinkKVCache(model.config, StreamingConfig(sinks=4, window=60), batch_size=2)
    torch.testing.assert_close(_feed(model, cache, ids, chunk), plain, atol=1e-5, rtol=1e-5)


def test_window_larger_than_sequence_bundled_model():
    model = load_model("bundled")
    ids = torch.randint(1, model.config.vocab_size, (1, 48))
    plain = model(ForwardBatch.prefill(ids))
    cache = SinkKVCache(model.config, StreamingConfig(sinks=4, window=100))
    torch.testing.assert_close(_feed(model, cache, ids, 1), plain, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("sinks,window", [(4, 8), (0, 8), (1, 5), (3, 1)])
@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_sinks_window_equals_recomputation_over_kept_tokens(sinks, window, chunk):
    model = _model(num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    ids = torch.randint(1, 64, (1, 36))
    cache = SinkKVCache(model.config, StreamingConfig(sinks=sinks, window=window))
    logits = _feed(model, cache, ids, chunk)
    for P in range(ids.shape[1]):
        kept = list(range(min(sinks, P + 1))) + list(range(max(sinks, P - window + 1), P + 1))
        direct = model(ForwardBatch.prefill(ids[:, kept]))[:, -1]  # positions 0..len(kept)-1
        torch.testing.assert_close(logits[:, P], direct, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES, ids=["gqa2", "mha", "mqa-3layers"])
def test_chunked_equals_token_by_token(shape):
    model = _model(**shape)
    ids = torch.randint(1, 64, (1, 50))
    stream = StreamingConfig(sinks=2, window=9)
    one = _feed(model, SinkKVCache(model.config, stream), ids, 1)
    for chunk in (4, 13, 50):
        torch.testing.assert_close(_feed(model, SinkKVCache(model.config, stream), ids, chunk), one,
                                   atol=1e-5, rtol=1e-5)


def test_batch_rows_are_independent():
    model = _model()
    ids = torch.randint(1, 64, (2, 30))
    stream = StreamingConfig(sinks=3, window=6)
    both = _feed(model, SinkKVCache(model.config, stream, batch_size=2), ids, 1)
    for row in range(2):
        alone = _feed(model, SinkKVCache(model.config, stream), ids[row:row + 1], 1)
        torch.testing.assert_close(both[row:row + 1], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk", [1, 4])
def test_eviction_keeps_exactly_sinks_and_last_window(chunk):
    model = _model()
    k, w = 3, 5
    cache = SinkKVCache(model.config, StreamingConfig(sinks=k, window=w))
    ids = torch.randint(1, 64, (1, 29))
    layer0 = model.layers[0]
    for start in range(0, ids.shape[1], chunk):
        model(cache.next_batch(ids[:, start:start + chunk]), cache)
        n = min(start + chunk, ids.shape[1])
        expected = list(range(min(k, n))) + list(range(max(k, n - w), n))
        assert cache.token_indices() == expected and cache.seen == n
        # layer 0 stores raw (un-rotated) keys: k_proj(norm(embed(token))) of exactly those tokens
        raw = layer0.self_attn.k_proj(layer0.input_layernorm(model.embed_tokens(ids[0, expected])))
        slots = [cache.slot_of(i) for i in expected]
        stored = cache.k[0][0, :, slots].transpose(0, 1).reshape(len(expected), -1)  # [S, Hkv*d]
        torch.testing.assert_close(stored, raw)
    assert cache.next_positions(1).item() == k + w - 1  # a full cache: the newest position


def test_bad_parameters_are_clear_errors():
    config = tiny_config(max_position_embeddings=16)
    for kwargs, message in [(dict(sinks=-1), "sinks must be an integer >= 0"),
                            (dict(window=0), "window must be an integer >= 1"),
                            (dict(window=True), "window must be an integer >= 1"),
                            (dict(sinks="4"), "sinks must be an integer >= 0")]:
        with pytest.raises(WorkbenchError, match=message):
            StreamingConfig(**kwargs)
    with pytest.raises(WorkbenchError, match="exceeds the model's context of 16"):
        SinkKVCache(config, StreamingConfig(sinks=4, window=13))
    with pytest.raises(WorkbenchError, match="batch_size must be >= 1"):
        SinkKVCache(config, StreamingConfig(sinks=4, window=8), batch_size=0)
    with pytest.raises(WorkbenchError, match="must be smaller than the window"):
        StreamEval(window=4, sinks=4)
    with pytest.raises(WorkbenchError, match="chunk must be a positive integer"):
        StreamEval(chunk=0)
    with pytest.raises(WorkbenchError, match="recompute_every must be a positive integer"):
        StreamEval(recompute_every=-2)
    model = LlamaModel(config).eval()
    ids = torch.randint(1, 64, (30,))
    with pytest.raises(WorkbenchError, match="unknown method 'sliding'"):
        score_stream(model, ids, "sliding", StreamEval(window=8))
    with pytest.raises(WorkbenchError, match="window 32 exceeds the model's context of 16"):
        score_stream(model, ids, "sinks", StreamEval(window=32))
    with pytest.raises(WorkbenchError, match="needs a stream of"):
        time_per_token(model, ids, "recompute", StreamEval(window=16), steps=20)
    with pytest.raises(WorkbenchError, match="at least 2 tokens"):
        long_stream(None, 1, vocab_size=64)


def test_methods_agree_where_they_must():
    """Dense chunked = token by token = the plain model; recomputation = dense inside the first
    window; in a one-layer model window attention = recomputation (same keys, same positions)."""
    model = _model()
    ids = torch.randint(1, 64, (40,))
    plain = model(ForwardBatch.prefill(ids[None]))[0, :-1].log_softmax(-1)
    plain_nll = -plain.gather(-1, ids[1:, None])[:, 0]
    spec = StreamEval(window=8, sinks=2)
    dense1 = score_stream(model, ids, "dense", spec)
    dense7 = score_stream(model, ids, "dense", StreamEval(window=8, sinks=2, chunk=7))
    torch.testing.assert_close(dense1.nll, plain_nll, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dense7.nll, plain_nll, atol=1e-5, rtol=1e-5)
    recompute = score_stream(model, ids, "recompute", spec)
    torch.testing.assert_close(recompute.nll[:8], plain_nll[:8], atol=1e-5, rtol=1e-5)
    assert recompute.forward_tokens == sum(min(8, t + 1) for t in range(39))
    for method in ("window", "sinks"):  # chunked scoring = token by token
        a = score_stream(model, ids, method, spec)
        b = score_stream(model, ids, method, StreamEval(window=8, sinks=2, chunk=6))
        torch.testing.assert_close(a.nll, b.nll, atol=1e-5, rtol=1e-5)
        assert a.kv_tokens == 8 and not a.nll.isnan().any()
    one_layer = _model(num_hidden_layers=1)
    torch.testing.assert_close(score_stream(one_layer, ids, "window", spec).nll,
                               score_stream(one_layer, ids, "recompute", spec).nll,
                               atol=1e-5, rtol=1e-5)
    every = score_stream(model, ids, "recompute", StreamEval(window=8, recompute_every=3))
    assert every.evaluated.nonzero()[:, 0].tolist() == list(range(2, 39, 3))
    where = every.evaluated
    assert math.isclose(every.ppl(where=where), math.exp(recompute.nll[where].double().mean()),
                        rel_tol=1e-6)
    capped = score_stream(model, ids, "dense", StreamEval(window=8, dense_max_tokens=20))
    assert capped.evaluated.sum() == 20 and capped.evaluated[:20].all()


def test_time_per_token_and_roofline_estimate():
    model = _model()
    ids = torch.randint(1, 64, (40,))
    for method in METHODS:
        assert 0 < time_per_token(model, ids, method, StreamEval(window=16), steps=3) < 10
    roof = Roofline(bandwidth=10e9, peak_flops=40e9)
    floors = [roofline_speedup(load_model("bundled").config, w, roof, 4) for w in (64, 256, 1024)]
    assert 1 <= floors[0] < floors[1] < floors[2] <= 1024


def test_probe_returns_the_model_attention():
    model = _model()
    ids = torch.randint(1, 64, (24,))
    probe = AttentionProbe()
    torch.testing.assert_close(model(ForwardBatch.prefill(ids[None]), probe),
                               model(ForwardBatch.prefill(ids[None])), atol=1e-5, rtol=1e-5)
    probs = attention_maps(model, ids)  # [L, H, T, T]
    assert probs.shape == (2, 4, 24, 24)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, 24))
    assert (probs.triu(diagonal=1) == 0).all()
    share = sink_share(probs, sinks=2, skip=4)
    assert share.shape == (2, 4) and ((share > 0) & (share < 1)).all()
    assert math.isclose(uniform_share(24, 2, 4), sum(2 / (t + 1) for t in range(4, 24)) / 20)


def test_bfloat16_cache_tracks_float32():
    model = _model()
    ids = torch.randint(1, 64, (1, 30))
    stream = StreamingConfig(sinks=2, window=8)
    ref = _feed(model, SinkKVCache(model.config, stream), ids, 1)
    half = model.to(torch.bfloat16)
    got = _feed(half, SinkKVCache(model.config, stream, dtype=torch.bfloat16), ids, 1)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref, atol=0.05, rtol=0.05)


def test_long_stream_is_heldout_code():
    from workbench.model import load_tokenizer

    tok = load_tokenizer("bundled")
    ids = long_stream(tok, 3000)
    assert ids.shape == (3000,) and ids.dtype == torch.long
    assert tok.decode(ids[:5]).strip()  # text, not padding
    assert (ids == 0).any()  # documents joined by <|endoftext|> (id 0)
    assert torch.equal(long_stream(None, 50, vocab_size=64), long_stream(None, 50, vocab_size=64))


def test_bench_streaming_json(tmp_path, capsys):
    out = tmp_path / "s.json"
    assert main(["bench", "streaming", "--num-tokens", "300", "--window", "64", "--chunk", "32",
                 "--recompute-every", "16", "--time-steps", "3", "--device", "cpu",
                 "--threads", "1", "--no-progress", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["benchmark"] == "streaming" and report["hardware"]["device"]
    assert {r["system"] for r in report["results"]} == {f"workbench/{m}" for m in METHODS}
    for row in report["results"]:
        assert row["output_tok_s"] > 0 and row["ppl"] > 1 and row["kv_tokens"] <= 300
    assert 0.5 < report["comparison"]["ppl_sinks_over_recompute"] < 2
    code = main(["bench", "streaming", "--methods", "dense,foo", "--json", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "unknown ['foo']" in err and err.count("\n") == 1


def test_generation_goes_on_past_the_context_in_constant_memory():
    from workbench.streaming.generate import generate_streaming

    model = _model(max_position_embeddings=16)
    cache = SinkKVCache(model.config, StreamingConfig(sinks=2, window=6))
    before = cache.nbytes()
    out = generate_streaming(model, cache, [5, 6, 7], max_new_tokens=40)
    assert len(out) == 40 and cache.seen == 42 and cache.nbytes() == before
    # the same tokens as scoring the generated stream through a fresh cache, token by token
    ids = torch.tensor([[5, 6, 7, *out]])
    logits = _feed(model, SinkKVCache(model.config, StreamingConfig(sinks=2, window=6)), ids, 1)
    assert logits[0, 2:-1].argmax(-1).tolist() == out


@pytest.mark.parametrize("sinks", [0, 3])
def test_graph_mode_bookkeeping_on_the_device_gives_the_same_logits(sinks):
    """The device-side slot and positions of graph mode (what a CUDA graph replays) give the logits
    of the Python bookkeeping, token after token, through several turns of the ring."""
    model = _model(**SHAPES[0])
    ids = torch.randint(1, 64, (2, 60))
    stream = StreamingConfig(sinks=sinks, window=7)
    ref = _feed(model, SinkKVCache(model.config, stream, batch_size=2), ids, 1)
    cache = SinkKVCache(model.config, stream, batch_size=2)
    first = _feed(model, cache, ids[:, :12], 12)  # fill it (and more) in one chunk
    with pytest.raises(WorkbenchError, match="full cache"):
        SinkKVCache(model.config, stream).graph_mode()
    cache.graph_mode()
    rest = _feed(model, cache, ids[:, 12:], 1)
    torch.testing.assert_close(torch.cat([first, rest], dim=1), ref, atol=1e-5, rtol=1e-5)
    assert int(cache._seen_t) == cache.seen == 60


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_replays_give_the_eager_logits():
    from workbench.streaming.score import _graph_decode

    torch.manual_seed(0)
    model = LlamaModel(tiny_config(**SHAPES[0])).eval().to("cuda")
    ids = torch.randint(1, 64, (40,), device="cuda")
    stream, prefix = StreamingConfig(sinks=2, window=9), 11
    cache = SinkKVCache(model.config, stream, 1, "cuda")
    model(cache.next_batch(ids[None, :prefix]), cache)
    step = _graph_decode(model, cache, ids, prefix)  # its warm-up fed ids[prefix] twice
    fed = torch.cat([ids[:prefix], ids[prefix:prefix + 1].repeat(2), ids[prefix:prefix + 20]])
    ref = _feed(model, SinkKVCache(model.config, stream, 1, "cuda"), fed[None], 1)
    for i in range(20):
        step(i)
        torch.testing.assert_close(step.logits[0], ref[0, prefix + 2 + i], atol=1e-4, rtol=1e-4)


def test_shipped_sinks_model_needs_its_sinks():
    """data/models' two models, on held-out code: the one trained longer puts several times uniform
    attention on the first tokens, and evicting them (window without sinks) costs it perplexity at
    a small window; the project's model has no sinks and loses nothing (notebook 08, section 4)."""
    from workbench.model import load_tokenizer

    ids = long_stream(load_tokenizer("bundled"), 1024)
    penalty, top = {}, {}
    for name in ("bundled", "bundled-sinks"):
        model = load_model(name)
        share = sink_share(attention_maps(model, ids[:256]), sinks=4)  # [L, H]
        top[name] = float(share.mean(1).max()) / uniform_share(256, 4)
        penalty[name] = eviction_penalty(model, ids, [32])[32]
    assert top["bundled-sinks"] > 5 > top["bundled"], top
    assert penalty["bundled-sinks"] > 1.10 and penalty["bundled"] < 1.0, penalty


def test_eviction_penalty_is_the_ratio_of_the_two_scores():
    model = _model()
    ids = torch.randint(1, 64, (80,))
    got = eviction_penalty(model, ids, [8, 16], sinks=2, chunk=4)
    spec = StreamEval(window=16, sinks=2, chunk=4)
    window, sinks = (score_stream(model, ids, m, spec) for m in ("window", "sinks"))
    assert set(got) == {8, 16} and math.isclose(got[16], window.ppl(16) / sinks.ppl(16))
    assert got[8] != got[16]
    with pytest.raises(WorkbenchError, match="no position after the first eviction"):
        eviction_penalty(model, ids, [16, 79])
