"""Packed (varlen), sliding-window and padded masks: hand-checked values, properties, and the key
property through the model: a sequence gets the same logits inside a padded or packed batch as
alone (fp32, the bundled model and a small random GQA model)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import torch_threads
from workbench.attention import (causal_mask, cu_seqlens, mask_text, packed_causal_mask,
                                 packed_positions, padded_causal_mask,
                                 padded_sliding_window_mask, sequence_ids, sliding_window_mask)
from workbench.attention.packed import (PackedKVCache, batch_waste, last_token_indices,
                                        packed_batch, padded_batch, reference_logits,
                                        split_packed, time_layouts)
from workbench.errors import WorkbenchError
from workbench.model import ModelConfig, load_model
from workbench.model.presets import random_model

FP32 = dict(rtol=1e-4, atol=1e-4)  # fp32, different batch shapes -> different summation orders
HYPO = settings(max_examples=6, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
T_, F_ = True, False


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def bundled():
    return load_model("bundled")


@pytest.fixture(scope="module")
def tiny():
    """Random GQA model with odd sizes (3 kv heads, group 2) and a large RoPE theta."""
    config = ModelConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=3, head_dim=8,
                         max_position_embeddings=128, rope_theta=500000.0)
    return random_model(config, std=0.2, seed=3)


@pytest.fixture(params=["bundled", "tiny"])
def model(request):
    return request.getfixturevalue(request.param)


def token_lists(lengths: list[int], vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=gen).tolist() for n in lengths]


def alone(model, ids: list[int], window: int | None = None) -> torch.Tensor:
    """Logits [T, V] of one unpadded sequence, causal (or sliding-window) attention."""
    return reference_logits(model, ids, window)


# --------------------------------------------------------------------------- hand-checked values


def test_cu_seqlens_and_sequence_ids() -> None:
    cu = cu_seqlens([3, 1, 2])
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 4, 6]
    assert cu_seqlens([]).tolist() == [0]
    assert sequence_ids([2, 1, 3]).tolist() == [0, 0, 1, 2, 2, 2]
    assert last_token_indices([3, 1, 2]).tolist() == [2, 3, 5]


def test_packed_positions_restart_per_sequence() -> None:
    assert packed_positions([3, 2]).tolist() == [[0, 1, 2, 0, 1]]
    # prefill of a new request (3 of 3), a decode token (1 of 5), a second chunk (2 of 4)
    assert packed_positions([3, 1, 2], [3, 5, 4]).tolist() == [[0, 1, 2, 4, 2, 3]]


def test_packed_causal_mask_example() -> None:
    m = packed_causal_mask([2, 1], [2, 3])  # seq 0: fresh prefill of 2; seq 1: 1 decode of 3
    assert m.shape == (1, 1, 3, 5) and m.dtype == torch.bool
    assert m[0, 0].tolist() == [[T_, F_, F_, F_, F_],
                                [T_, T_, F_, F_, F_],
                                [F_, F_, T_, T_, T_]]  # the decode token sees its whole context
    assert mask_text(m) == "1....\n11...\n..111"


def test_packed_mask_of_prefills_is_block_diagonal_causal() -> None:
    lens = [3, 1, 4]
    expected = torch.block_diag(*[causal_mask(n).int() for n in lens]).bool()
    assert torch.equal(packed_causal_mask(lens)[0, 0], expected)


@given(q_and_extra=st.lists(st.tuples(st.integers(1, 5), st.integers(0, 4)), min_size=1,
                            max_size=4),
       window=st.one_of(st.none(), st.integers(1, 6)))
@settings(max_examples=40, deadline=None)
def test_packed_mask_blocks_are_causal_masks(q_and_extra, window) -> None:
    """Each diagonal block is causal_mask(q, c) (or the sliding window), the rest is False."""
    q_lens = [q for q, _ in q_and_extra]
    c_lens = [q + e for q, e in q_and_extra]
    m = packed_causal_mask(q_lens, c_lens, window=window)[0, 0]
    qc, kc = cu_seqlens(q_lens).tolist(), cu_seqlens(c_lens).tolist()
    expected = torch.zeros(sum(q_lens), sum(c_lens), dtype=torch.bool)
    for i, (q, c) in enumerate(zip(q_lens, c_lens)):
        block = causal_mask(q, c) if window is None else sliding_window_mask(q, c, window)
        expected[qc[i]:qc[i + 1], kc[i]:kc[i + 1]] = block
    assert torch.equal(m, expected)
    assert m.any(-1).all()  # every query sees at least itself: no NaN rows in SDPA


def test_sliding_window_example() -> None:
    assert mask_text(sliding_window_mask(4, window=2)) == "1...\n11..\n.11.\n..11"
    assert mask_text(sliding_window_mask(2, 5, window=3)) == ".111.\n..111"
    assert torch.equal(sliding_window_mask(5, window=1), torch.eye(5, dtype=torch.bool))


@pytest.mark.parametrize("T, S", [(1, 1), (3, 3), (2, 6), (6, 6)])
def test_sliding_window_is_causal_when_window_covers_everything(T: int, S: int) -> None:
    for window in (S, S + 3):
        assert torch.equal(sliding_window_mask(T, S, window), causal_mask(T, S))
    assert sliding_window_mask(T, S, 2).sum(-1).le(2).all()  # never more than window keys


def test_padded_sliding_window_mask() -> None:
    valid = torch.tensor([[F_, F_, T_, T_, T_], [T_, T_, T_, T_, T_]])  # left padding
    assert torch.equal(padded_sliding_window_mask(valid, 5, 5), padded_causal_mask(valid, 5))
    m = padded_sliding_window_mask(valid, 5, window=2)
    assert mask_text(m, row=0) == "1....\n.1...\n..1..\n..11.\n...11"  # pads: only themselves
    assert mask_text(m, row=1) == mask_text(sliding_window_mask(5, window=2))


@pytest.mark.parametrize("call", [
    lambda: packed_causal_mask([2, 0], [2, 3]),
    lambda: packed_causal_mask([4], [3]),
    lambda: packed_causal_mask([1, 2], [3]),
    lambda: sliding_window_mask(3, window=0),
    lambda: packed_causal_mask([2], window=0),
])
def test_bad_lengths_and_windows_raise(call) -> None:
    with pytest.raises(WorkbenchError):
        call()


def test_time_layouts_reports_both(tiny) -> None:
    times = time_layouts(tiny, [[1, 2, 3], [4, 5]], repeats=1, warmup=0)
    assert set(times) == {"padded_s", "packed_s"} and min(times.values()) > 0


def test_batch_waste_counts() -> None:
    w = batch_waste([4, 2, 1, 1])
    assert (w["padded_tokens"], w["packed_tokens"]) == (16, 8)
    assert w["padding_token_waste"] == 0.5
    assert (w["padded_scores"], w["packed_dense_scores"], w["varlen_scores"]) == (64, 64, 22)
    assert w["needed_scores"] == 10 + 3 + 1 + 1


# --------------------------------------------------------------------------- through the model


@torch.inference_mode()
def test_packed_batch_matches_alone(model) -> None:
    seqs = token_lists([7, 1, 4, 12], model.config.vocab_size)
    logits = model(packed_batch(seqs))  # [1, N, V]
    for ids, got in zip(seqs, split_packed(logits, [len(s) for s in seqs])):
        torch.testing.assert_close(got, alone(model, ids), **FP32)


@given(lengths=st.lists(st.integers(1, 10), min_size=1, max_size=4), seed=st.integers(0, 99),
       window=st.one_of(st.none(), st.integers(1, 6)))
@HYPO
def test_packed_matches_alone_random_lengths(bundled, lengths, seed, window) -> None:
    seqs = token_lists(lengths, bundled.config.vocab_size, seed)
    with torch.inference_mode():
        logits = bundled(packed_batch(seqs, window=window))
        for ids, got in zip(seqs, split_packed(logits, lengths)):
            torch.testing.assert_close(got, alone(bundled, ids, window), **FP32)


@pytest.mark.parametrize("side", ["left", "right"])
@torch.inference_mode()
def test_padded_batch_matches_alone(model, side: str) -> None:
    seqs = token_lists([5, 9, 2], model.config.vocab_size, seed=1)
    batch, valid = padded_batch(seqs, side=side)
    logits = model(batch)  # [B, P, V]
    for b, ids in enumerate(seqs):
        torch.testing.assert_close(logits[b][valid[b]], alone(model, ids), **FP32)
    if side == "left":  # the last column is every row's last real token
        last = torch.stack([alone(model, ids)[-1] for ids in seqs])
        torch.testing.assert_close(logits[:, -1], last, **FP32)


@given(lengths=st.lists(st.integers(1, 9), min_size=1, max_size=3), seed=st.integers(0, 99),
       window=st.one_of(st.none(), st.integers(1, 5)), left=st.booleans())
@HYPO
def test_padded_matches_alone_random_lengths(tiny, lengths, seed, window, left) -> None:
    seqs = token_lists(lengths, tiny.config.vocab_size, seed)
    with torch.inference_mode():
        batch, valid = padded_batch(seqs, side="left" if left else "right", window=window)
        logits = tiny(batch)
        for b, ids in enumerate(seqs):
            torch.testing.assert_close(logits[b][valid[b]], alone(tiny, ids, window), **FP32)


@torch.inference_mode()
def test_sliding_window_model_equals_causal_when_window_covers_prompt(model) -> None:
    ids = token_lists([9], model.config.vocab_size, seed=2)[0]
    torch.testing.assert_close(alone(model, ids, window=9), alone(model, ids), **FP32)
    torch.testing.assert_close(alone(model, ids, window=50), alone(model, ids), **FP32)
    narrow = alone(model, ids, window=2)
    assert not torch.allclose(narrow[-1], alone(model, ids)[-1], **FP32)  # the window matters
    torch.testing.assert_close(narrow[:2], alone(model, ids)[:2], **FP32)  # not yet, for t < 2


@torch.inference_mode()
def test_mixed_prefill_and_decode_step_matches_alone(model) -> None:
    """Step 1: prefill a and b packed. Step 2: one decode token each for a and b next to the
    prefill of c, and a second prefill chunk of d. Every sequence matches its unpadded run."""
    V = model.config.vocab_size
    a, b, c, d = token_lists([6, 3, 5, 7], V, seed=4)
    kv = PackedKVCache(model.config.num_hidden_layers)
    ctx = kv.schedule(["a", "b", "d"], [6, 3, 4])
    model(packed_batch([a, b, d[:4]], ctx), kv)
    nxt_a, nxt_b = 11, 12
    ctx = kv.schedule(["a", "b", "c", "d"], [1, 1, 5, 3])
    assert ctx == [7, 4, 5, 7]
    logits = model(packed_batch([[nxt_a], [nxt_b], c, d[4:]], ctx), kv)
    got = split_packed(logits, [1, 1, 5, 3])
    torch.testing.assert_close(got[0][0], alone(model, a + [nxt_a])[-1], **FP32)
    torch.testing.assert_close(got[1][0], alone(model, b + [nxt_b])[-1], **FP32)
    torch.testing.assert_close(got[2], alone(model, c), **FP32)
    torch.testing.assert_close(got[3], alone(model, d)[4:], **FP32)
    assert kv.lengths == {"a": 7, "b": 4, "c": 5, "d": 7}
    kv.release("a")
    assert "a" not in kv.lengths and kv.nbytes() > 0


def test_packed_kv_rejects_a_step_off_its_schedule(tiny) -> None:
    kv = PackedKVCache(tiny.config.num_hidden_layers)
    kv.schedule(["a"], [2])
    with pytest.raises(WorkbenchError, match="schedule"), torch.inference_mode():
        tiny(packed_batch([[1, 2, 3]]), kv)
    with pytest.raises(WorkbenchError):
        kv.schedule(["a", "a"], [1, 1])


# --------------------------------------------------------------------------- figures and widget


def test_plots_and_explorer() -> None:
    import matplotlib.pyplot as plt

    from workbench.viz.masks import LAYOUTS, layout_mask, mask_explorer, plot_mask, plot_masks

    ax = plot_mask(packed_causal_mask([3, 1], [3, 4]), query_lens=[3, 1], context_lens=[3, 4],
                   key_labels=list("abcdefg"), title="packed")
    assert len(ax.lines) == 2  # one boundary across, one down
    assert "10 of 28 cells" in ax.get_title()  # 3-token causal block 6 + decode row 4
    fig = plot_masks({"causal": causal_mask(4), "window": (sliding_window_mask(4, window=2), {})})
    assert len([a for a in fig.axes if a.get_visible()]) == 2
    with pytest.raises(WorkbenchError):
        plot_mask(causal_mask(3), key_labels=["x"])
    for layout in LAYOUTS:
        mask, kwargs = layout_mask(layout, [5, 2, 3], [5, 1, 2], window=2)
        assert mask.any(-1).all(), layout
    explorer = mask_explorer(lengths=(4, 2), layout="packed")
    assert explorer.draw().shape == (1, 1, 6, 6)
    explorer.lengths.value = "4, nope"
    assert explorer.draw() is None and "whole numbers" in explorer.status.value
    plt.close("all")
