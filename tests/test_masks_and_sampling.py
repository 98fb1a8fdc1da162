"""Attention masks, left padding through the model + KV cache, sampling, and static batching.

The model-level tests use the bundled stdlib-llama-7m in float32 (fast on CPU, trained weights so
that distributions are peaked the way real ones are).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import torch_threads
from workbench.attention.masks import causal_mask, padded_causal_mask
from workbench.engine import SamplingParams, generate_static
from workbench.engine.sampling import filtered_probs, sample
from workbench.errors import WorkbenchError
from workbench.kv import ContiguousKVCache
from workbench.model import ForwardBatch, load_model

FP32 = dict(rtol=1e-4, atol=1e-4)  # fp32, different batch shapes -> different summation orders
HYPO = settings(max_examples=8, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def model():
    return load_model("bundled")


def prompts_of(lengths: list[int], seed: int = 0, vocab: int = 8192) -> list[list[int]]:
    """Random prompts of the given lengths that avoid EOS (id 0)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=gen).tolist() for n in lengths]


# --------------------------------------------------------------------------- causal_mask


@pytest.mark.parametrize("T", [1, 2, 5])
def test_causal_mask_square(T: int) -> None:
    m = causal_mask(T)
    assert m.shape == (T, T) and m.dtype == torch.bool
    assert torch.equal(m, torch.ones(T, T, dtype=torch.bool).tril())


@pytest.mark.parametrize("T, S", [(1, 1), (1, 6), (2, 6), (3, 4), (4, 4)])
def test_causal_mask_queries_are_the_last_T_keys(T: int, S: int) -> None:
    m = causal_mask(T, S)
    assert m.shape == (T, S)
    for t in range(T):
        for s in range(S):
            assert bool(m[t, s]) == (s <= S - T + t), (t, s)
    assert m[-1].all()  # the newest query sees every key
    assert torch.equal(m, torch.ones(T, S, dtype=torch.bool).tril(S - T))


def test_causal_mask_single_decode_query_sees_everything() -> None:
    assert causal_mask(1, 9).all()


# --------------------------------------------------------------------------- padded_causal_mask


def left_padded_valid(lengths: list[int], S: int | None = None) -> torch.Tensor:
    S = max(lengths) if S is None else S
    return torch.tensor([[False] * (S - n) + [True] * n for n in lengths])


def test_padded_causal_mask_example() -> None:
    valid = left_padded_valid([3, 1])  # row 1 = [pad, pad, tok]
    m = padded_causal_mask(valid, 3)
    assert m.shape == (2, 1, 3, 3) and m.dtype == torch.bool
    assert torch.equal(m[0, 0], causal_mask(3))
    assert torch.equal(m[1, 0], torch.tensor([[True, False, False],   # pad query: only itself
                                              [False, True, False],   # pad query: only itself
                                              [False, False, True]]))  # real: pads hidden


@given(lengths=st.lists(st.integers(1, 7), min_size=1, max_size=4),
       extra=st.integers(0, 3), T=st.integers(1, 4))
@settings(max_examples=40, deadline=None)
def test_padded_causal_mask_properties(lengths: list[int], extra: int, T: int) -> None:
    S = max(lengths) + extra  # extra decoded (always valid) columns after the prompts
    valid = torch.cat([left_padded_valid(lengths), torch.ones(len(lengths), extra, dtype=torch.bool)],
                      dim=1)
    T = min(T, S)
    m = padded_causal_mask(valid, T)
    assert m.shape == (len(lengths), 1, T, S)
    causal = causal_mask(T, S)
    for b in range(len(lengths)):
        for t in range(T):
            col = S - T + t  # the query's own column
            if valid[b, col]:
                expected = causal[t] & valid[b]  # real query: causal keys that are not pads
            else:
                expected = torch.zeros(S, dtype=torch.bool)
                expected[col] = True  # pad query: itself only (no NaN row in SDPA)
            assert torch.equal(m[b, 0, t], expected), (b, t)
            assert m[b, 0, t].any()


def test_padded_causal_mask_decode_step_equals_valid_row() -> None:
    valid = torch.cat([left_padded_valid([2, 5, 4]), torch.ones(3, 1, dtype=torch.bool)], dim=1)
    assert torch.equal(padded_causal_mask(valid, 1), valid[:, None, None, :])


# --------------------------------------------------------------------------- padding equivalence


def run_alone(model, prompt: list[int], follow: list[int]) -> list[torch.Tensor]:
    """Last-token logits after the prompt and after each of ``follow``, no padding, KV cached."""
    kv = ContiguousKVCache(model.config, 1, len(prompt) + len(follow))
    out = [model(ForwardBatch.prefill(torch.tensor([prompt])), kv, last_only=True)[0]]
    for i, tok in enumerate(follow):
        step = ForwardBatch(torch.tensor([[tok]]), torch.tensor([[len(prompt) + i]]),
                            kv_start=kv.length)
        out.append(model(step, kv, last_only=True)[0])
    return out


def run_padded(model, prompts: list[list[int]], follow: list[list[int]],
               prefill_chunks: int = 1) -> list[torch.Tensor]:
    """The same for a left-padded batch: [B, V] logits after the prompt and each decode step.

    ``prefill_chunks > 1`` feeds the padded prompt in several multi-token steps (T < S masks).
    """
    B, P, steps = len(prompts), max(map(len, prompts)), len(follow[0])
    ids = torch.tensor([[0] * (P - len(p)) + p for p in prompts])  # pad id 0 = EOS, hidden
    valid = left_padded_valid([len(p) for p in prompts])
    positions = (valid.cumsum(1) - 1).clamp(min=0)
    kv = ContiguousKVCache(model.config, B, P + steps)
    bounds = torch.linspace(0, P, prefill_chunks + 1).round().long().tolist()
    for lo, hi in zip(bounds, bounds[1:]):
        if hi == lo:
            continue
        batch = ForwardBatch(ids[:, lo:hi], positions[:, lo:hi],
                             padded_causal_mask(valid[:, :hi], hi - lo), kv_start=lo)
        logits = model(batch, kv, last_only=True)
    out = [logits]
    pos = positions[:, -1:]
    for i in range(steps):
        valid = torch.cat([valid, torch.ones(B, 1, dtype=torch.bool)], dim=1)
        pos = pos + 1
        tokens = torch.tensor([[f[i]] for f in follow])
        batch = ForwardBatch(tokens, pos, padded_causal_mask(valid, 1), kv_start=kv.length)
        out.append(model(batch, kv, last_only=True))
    return out


@given(lengths=st.lists(st.integers(1, 12), min_size=1, max_size=4), seed=st.integers(0, 99))
@HYPO
def test_left_padding_matches_running_alone(model, lengths: list[int], seed: int) -> None:
    prompts = prompts_of(lengths, seed)
    follow = prompts_of([3] * len(prompts), seed + 1)  # fed-back tokens, same for both runs
    with torch.inference_mode():
        batched = run_padded(model, prompts, follow)
        alone_runs = [run_alone(model, p, f) for p, f in zip(prompts, follow)]
    for b, alone in enumerate(alone_runs):
        for step, (x, y) in enumerate(zip(batched, alone)):
            torch.testing.assert_close(x[b], y, **FP32, msg=lambda m: f"row {b} step {step}: {m}")


def test_chunked_prefill_of_padded_batch(model) -> None:
    """T < S masks through the model: a padded prompt fed in 3 chunks gives the same logits."""
    prompts = prompts_of([9, 3, 12, 6], seed=5)
    follow = prompts_of([2] * 4, seed=6)
    with torch.inference_mode():
        chunked = run_padded(model, prompts, follow, prefill_chunks=3)
        whole = run_padded(model, prompts, follow)
    for x, y in zip(chunked, whole):
        torch.testing.assert_close(x, y, **FP32)


# --------------------------------------------------------------------------- SamplingParams


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(temperature=-0.1), "temperature"),
    (dict(top_k=-1), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=-0.5), "top_p"),
    (dict(top_p=1.01), "top_p"),
    (dict(top_p=float("nan")), "top_p"),
])
def test_sampling_params_validation(kwargs: dict, fragment: str) -> None:
    with pytest.raises(WorkbenchError, match=fragment):
        SamplingParams(**kwargs)


def test_sampling_params_rejects_nan_temperature() -> None:
    with pytest.raises(WorkbenchError, match="temperature"):
        SamplingParams(temperature=float("nan"))


def test_sampling_params_valid_edges() -> None:
    assert SamplingParams().greedy
    assert not SamplingParams(temperature=1e-3, top_k=0, top_p=1.0).greedy
    SamplingParams(temperature=2.0, top_k=1, top_p=1e-6)


# --------------------------------------------------------------------------- sample / filtered_probs


def test_greedy_is_argmax() -> None:
    logits = torch.randn(5, 100, generator=torch.Generator().manual_seed(0))
    gens = [torch.Generator().manual_seed(i) for i in range(5)]
    assert sample(logits, SamplingParams(), gens) == logits.argmax(-1).tolist()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_top_k_1_is_greedy(temperature: float) -> None:
    logits = torch.randn(16, 300, generator=torch.Generator().manual_seed(1))
    params = SamplingParams(temperature=temperature, top_k=1, seed=4)
    gens = [params.generator(i) for i in range(16)]
    for _ in range(3):
        assert sample(logits, params, gens) == logits.argmax(-1).tolist()


def test_top_p_keeps_smallest_set_reaching_p() -> None:
    # probabilities 0.05, 0.4, 0.1, 0.3, 0.15 (shuffled so the sort is exercised)
    p = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15])
    logits = p.log()

    def probs(top_p: float, **kw) -> torch.Tensor:
        return filtered_probs(logits, SamplingParams(temperature=1.0, top_p=top_p, **kw))

    # 0.4 < 0.5 needs 0.3 too: kept mass 0.7 >= 0.5 -> {0.4, 0.3} renormalised
    torch.testing.assert_close(probs(0.5), torch.tensor([0, 4 / 7, 0, 3 / 7, 0]))
    # 0.4 >= 0.35 alone
    torch.testing.assert_close(probs(0.35), torch.tensor([0.0, 1, 0, 0, 0]))
    # 0.7 < 0.8: add 0.15 -> 0.85
    torch.testing.assert_close(probs(0.8), torch.tensor([0, 0.4, 0, 0.3, 0.15]) / 0.85)
    # 0.95 < 0.96: all but nothing -> everything kept
    torch.testing.assert_close(probs(0.96), p)
    torch.testing.assert_close(probs(1.0), p)
    # top_k first, then top_p on the renormalised survivors: top-2 is {4/7, 3/7}, and
    # 4/7 = 0.571 >= 0.5 suffices alone, while 0.6 needs both
    torch.testing.assert_close(probs(0.5, top_k=2), torch.tensor([0.0, 1, 0, 0, 0]))
    torch.testing.assert_close(probs(0.6, top_k=2), torch.tensor([0, 4 / 7, 0, 3 / 7, 0]))
    # top-3 is {0.4, 0.3, 0.15} / 0.85 = {0.47, 0.35, 0.18}: 0.6 needs the first two
    torch.testing.assert_close(probs(0.6, top_k=3), torch.tensor([0, 0.4, 0, 0.3, 0]) / 0.7)


def test_temperature_and_top_k() -> None:
    p = torch.tensor([0.1, 0.6, 0.3])
    sharp = filtered_probs(p.log(), SamplingParams(temperature=0.5))
    torch.testing.assert_close(sharp, p ** 2 / (p ** 2).sum())
    top2 = filtered_probs(p.log(), SamplingParams(temperature=1.0, top_k=2))
    torch.testing.assert_close(top2, torch.tensor([0, 2 / 3, 1 / 3]))
    big_k = filtered_probs(p.log(), SamplingParams(temperature=1.0, top_k=50))  # k > V
    torch.testing.assert_close(big_k, p)


@given(seed=st.integers(0, 10_000), top_k=st.integers(0, 40),
       top_p=st.floats(0.01, 1.0), temperature=st.floats(0.2, 3.0))
@settings(max_examples=60, deadline=None)
def test_filtered_probs_properties(seed: int, top_k: int, top_p: float,
                                   temperature: float) -> None:
    logits = 3 * torch.randn(50, generator=torch.Generator().manual_seed(seed))  # no ties
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    probs = filtered_probs(logits, params)
    kept = probs > 0
    torch.testing.assert_close(probs.sum(), torch.tensor(1.0))
    if top_k:
        assert kept.sum() <= top_k
    # the kept tokens are the most likely ones
    assert logits[kept].min() > logits[~kept].max() if (~kept).any() else True
    # nucleus: the kept set of the top-k distribution reaches p, and is minimal
    base = filtered_probs(logits, SamplingParams(temperature=temperature, top_k=top_k))
    mass = base[kept].sum().item()
    assert mass >= top_p - 1e-5
    assert mass - base[kept].min().item() < top_p + 1e-5
    # the kept tokens keep their relative weights
    torch.testing.assert_close(probs[kept], base[kept] / mass)


# --------------------------------------------------------------------------- generate_static


SAMPLED = SamplingParams(temperature=1.0, top_k=40, top_p=0.9, seed=11)


def test_seeded_sampling_reproducible_and_batch_independent(model) -> None:
    prompts = prompts_of([5, 2, 9, 4, 7], seed=2)
    runs = {bs: generate_static(model, prompts, 8, batch_size=bs, sampling=SAMPLED, eos_ids=())
            for bs in (1, 4, 5)}
    tokens = {bs: [o.output_ids for o in r.outputs] for bs, r in runs.items()}
    assert tokens[1] == tokens[4] == tokens[5]
    again = generate_static(model, prompts, 8, batch_size=4, sampling=SAMPLED, eos_ids=())
    assert [o.output_ids for o in again.outputs] == tokens[4]
    other = generate_static(model, prompts, 8, batch_size=4, eos_ids=(),
                            sampling=SamplingParams(temperature=1.0, top_k=40, top_p=0.9, seed=12))
    assert [o.output_ids for o in other.outputs] != tokens[4]
    greedy = generate_static(model, prompts, 8, batch_size=5, eos_ids=())
    assert [o.output_ids for o in greedy.outputs] != tokens[4]  # sampling really samples


def test_top_k_1_generation_equals_greedy(model) -> None:
    prompts = prompts_of([6, 3, 10], seed=3)
    greedy = generate_static(model, prompts, 10, batch_size=3, eos_ids=())
    top1 = generate_static(model, prompts, 10, batch_size=2, eos_ids=(),
                           sampling=SamplingParams(temperature=0.8, top_k=1, seed=1))
    assert [o.output_ids for o in top1.outputs] == [o.output_ids for o in greedy.outputs]


def test_per_request_max_new_tokens(model) -> None:
    limits = [3, 0, 7, 1, 5]
    run = generate_static(model, prompts_of([4, 6, 2, 8, 3], seed=4), limits, batch_size=2,
                          eos_ids=())
    assert [len(o.output_ids) for o in run.outputs] == limits
    assert all(o.finish_reason == "length" for o in run.outputs)
    # batches (3, 0) -> 3 steps, (7, 1) -> 7 steps, (5,) -> 5 steps; busy = sum of limits
    assert run.slot_steps == 2 * 3 + 2 * 7 + 1 * 5
    assert run.busy_slot_steps == sum(limits)
    assert run.utilization == pytest.approx(sum(limits) / (2 * 3 + 2 * 7 + 5))
    assert 0 < run.utilization < 1


def test_max_new_tokens_zero(model) -> None:
    run = generate_static(model, prompts_of([3, 5], seed=5), 0, batch_size=2)
    assert [o.output_ids for o in run.outputs] == [[], []]
    assert run.slot_steps == 0 and run.timeline == []


def test_full_batches_have_full_utilization(model) -> None:
    run = generate_static(model, prompts_of([3, 8, 5, 1], seed=6), 4, batch_size=2, eos_ids=())
    assert run.utilization == 1.0
    assert len(run.timeline) == 2 * 4
    assert run.seconds > 0


def test_eos_ends_a_row(model) -> None:
    prompts = prompts_of([5, 9, 3, 7], seed=7)
    free = [o.output_ids for o in generate_static(model, prompts, 12, batch_size=4,
                                                  eos_ids=()).outputs]
    eos = free[0][4]  # a token row 0 emits at step 4 (maybe earlier too)
    run = generate_static(model, prompts, 12, batch_size=4, eos_ids=(eos,))
    for out, ref in zip(run.outputs, free):
        if eos in ref:
            cut = ref.index(eos) + 1
            assert out.output_ids == ref[:cut]  # ends with EOS, nothing after it
            assert out.finish_reason == "eos"
        else:
            assert out.output_ids == ref  # other rows unaffected by the finished one
            assert out.finish_reason == "length"
    assert run.outputs[0].finish_reason == "eos" and len(run.outputs[0].output_ids) <= 5
    assert 0 < run.utilization <= 1
    # a finished row stops being listed as active
    assert all(row[0] != 0 for row in run.timeline[len(run.outputs[0].output_ids):])


def test_config_eos_used_by_default(model) -> None:
    """eos_ids=None means the checkpoint's EOS (id 0 for the bundled model)."""
    assert model.config.eos_token_ids == (0,)
    run = generate_static(model, prompts_of([4], seed=8), 100)
    out = run.outputs[0]
    if out.finish_reason == "eos":
        assert out.output_ids[-1] == 0 and 0 not in out.output_ids[:-1]
    else:
        assert len(out.output_ids) == 100 and 0 not in out.output_ids


@pytest.mark.parametrize("prompts, limit", [
    ([[]], 3), ([[1, 2], []], 3), ([[8192]], 3), ([[-1]], 3), ([[1]], -1), ([[1], [2]], [3]),
], ids=["empty-alone", "empty-in-batch", "oov", "negative-id", "negative-limit", "short-limits"])
def test_generate_static_rejects_bad_requests(model, prompts, limit) -> None:
    with pytest.raises(WorkbenchError):
        generate_static(model, prompts, limit)
