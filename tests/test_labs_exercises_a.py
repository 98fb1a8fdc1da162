"""The exercises of labs 01 (masks), 02 (admission), 03 (paged lookup/read) and 08 (sinks).

For each: the check passes the library's function on several seeds, fails a stub with the "not
implemented" message, and fails a realistic wrong implementation naming the input. Each plug-in
point is live: ``try_in_engine`` with the reference routes the engine's calls through it and gives
the engine's own tokens. The lab notebooks' hint boxes say what the checks say.
"""

from __future__ import annotations

import re

import pytest
import torch

from tests.helpers import tiny_config, torch_threads
from workbench import labs, plug
from workbench.attention.packed import PackedKVCache, packed_batch
from workbench.engine import EngineConfig, Request, generate_static, run_continuous
from workbench.labs.build import LABS_DIR, read_lab
from workbench.model import LlamaModel
from workbench.streaming.cache import SinkKVCache, StreamingConfig, kept_tokens, slot_positions
from workbench.streaming.generate import generate_streaming

NAMES = ["masks.causal", "masks.padded", "masks.packed", "batching.admit", "paged.slots",
         "paged.gather", "sinks.kept", "sinks.positions"]
LABS = {"masks": "lab01_masking", "batching": "lab02_batching", "paged": "lab03_paged_kv",
        "sinks": "lab08_attention_sinks"}


# ----------------------------------------------------------------------------- realistic bugs


def causal_without_offset(T, S=None, device="cpu"):
    S = T if S is None else S
    return torch.ones(T, S, dtype=torch.bool, device=device).tril()  # forgets the cached keys


def padded_without_self(valid, T):
    B, S = valid.shape
    causal = torch.arange(S)[None, :] <= torch.arange(S - T, S)[:, None]
    return (causal[None] & valid[:, None, :])[:, None]  # pad queries see nothing: NaN


def packed_ignoring_sequences(query_lens, context_lens=None, window=None, device="cpu"):
    context_lens = query_lens if context_lens is None else context_lens
    N, S = sum(query_lens), sum(context_lens)
    return (torch.arange(S)[None, :] <= torch.arange(S - N, S)[:, None])[None, None]  # one causal


def admit_overtaking(prompt_lens, free_slots, token_budget, chunked_prefill=False):
    out = []
    for n in prompt_lens:
        if len(out) == free_slots or token_budget <= 0:
            break
        if n > token_budget and not chunked_prefill:
            continue  # lets a short prompt overtake a long one
        out.append(min(n, token_budget))
        token_budget -= out[-1]
    return out


def slots_without_block_size(block_table, start, num_tokens, block_size):
    return [block_table[t // block_size] + t % block_size for t in range(start, start + num_tokens)]


def gather_without_transpose(pool, tables):
    B, nb = tables.shape
    return pool[tables].reshape(B, pool.shape[2], nb * pool.shape[1], pool.shape[3])


def kept_with_duplicates(seen, sinks, window):
    return list(range(min(seen, sinks))) + list(range(max(0, seen - window), seen))


def positions_off_by_one(seen, sinks, window, device="cpu"):
    C = sinks + window
    if seen <= C:
        return torch.arange(seen)
    newest = sinks + (seen - 1 - sinks) % window
    age = (newest - torch.arange(sinks, C)) % window
    return torch.cat([torch.arange(sinks), C - age])  # the newest at C instead of C - 1


WRONG = {"masks.causal": causal_without_offset, "masks.padded": padded_without_self,
         "masks.packed": packed_ignoring_sequences, "batching.admit": admit_overtaking,
         "paged.slots": slots_without_block_size, "paged.gather": gather_without_transpose,
         "sinks.kept": kept_with_duplicates, "sinks.positions": positions_off_by_one}


@pytest.mark.parametrize("name", NAMES)
def test_check_passes_the_reference_and_fails_stub_and_bug(name: str) -> None:
    ex = labs.get(name)
    for seed in range(4):
        result = labs.check(name, ex.reference, seed=seed, quiet=True)
        assert result, result.message

    def stub(*args, **kwargs):
        raise NotImplementedError("write this function")

    todo = labs.check(name, stub, quiet=True)
    assert not todo and "not implemented" in todo.message
    wrong = labs.check(name, WRONG[name], seed=0, quiet=True)
    assert not wrong and "input:" in wrong.message and "hint:" in wrong.message, wrong.message
    assert len(ex.hints) >= 2 and ex.notebook


@pytest.mark.parametrize("name", NAMES)
def test_lab_notebook_shows_the_checks_hints(name: str) -> None:
    lab = read_lab(LABS_DIR / "solutions" / f"{LABS[name.split('.')[0]]}.ipynb")
    assert name in [e.name for e in lab.exercises]
    text = " ".join(c.source for c in lab.notebook.cells if c.cell_type == "markdown")
    flat = re.sub(r"\s+", " ", text)
    for hint in labs.get(name).hints:
        assert re.sub(r"\s+", " ", hint) in flat, f"{name}: hint missing from the lab: {hint}"


# ----------------------------------------------------------------------------- the references


def test_admit_rules() -> None:
    admit = plug.library("batching.admit")
    assert admit([6, 9, 2], 3, 10, False) == [6]  # 9 does not fit and 2 may not overtake it
    assert admit([6, 9, 2], 3, 10, True) == [6, 4]  # 9 starts with a partial chunk
    assert admit([4, 4, 4], 2, 64) == [4, 4]  # two slots
    assert admit([5], 1, 5) == [5] and admit([], 3, 9) == [] and admit([1], 3, 0, True) == []


def test_sinks_positions_agree_with_kept_tokens() -> None:
    """The i-th kept token (position order) sits in the slot whose position is i."""
    for sinks in range(0, 4):
        for window in range(1, 6):
            for seen in range(0, 3 * (sinks + window)):
                kept = kept_tokens(seen, sinks, window)
                pos = slot_positions(seen, sinks, window)
                slot = [t if t < sinks else sinks + (t - sinks) % window for t in kept]
                assert len(pos) == len(kept) == len(set(slot))
                assert [int(pos[s]) for s in slot] == list(range(len(kept)))


# ----------------------------------------------------------------------------- the plug-in points


@pytest.fixture(scope="module")
def tiny() -> LlamaModel:
    torch.manual_seed(0)
    with torch_threads(1):
        yield LlamaModel(tiny_config()).eval()


def _requests(n: int = 4, new: int = 6) -> list[Request]:
    gen = torch.Generator().manual_seed(1)
    return [Request(tuple(torch.randint(1, 64, (3 + 4 * i,), generator=gen).tolist()), new, id=i)
            for i in range(n)]


def _outputs(run) -> list[list[int]]:
    return [t.output_ids for t in run.traces]


def _packed_next(model):
    kv = PackedKVCache(model.config.num_hidden_layers)
    a, b = [5, 6, 7, 8], [9, 10]
    ctx = kv.schedule(["a", "b"], [4, 2])
    model(packed_batch([a, b], ctx), kv)
    ctx = kv.schedule(["a", "b", "c"], [1, 1, 3])
    return model(packed_batch([[11], [12], [1, 2, 3]], ctx), kv)[0].argmax(-1).tolist()


def _stream(model):
    cache = SinkKVCache(model.config, StreamingConfig(sinks=2, window=6))
    return generate_streaming(model, cache, [3, 4, 5, 6, 7], max_new_tokens=20)


RUNS = {
    "masks.causal": lambda m: _outputs(run_continuous(m, _requests(), EngineConfig(
        max_num_seqs=4, max_num_batched_tokens=5, chunked_prefill=True))),
    "masks.padded": lambda m: _outputs(generate_static(m, [list(r.prompt_ids) for r in _requests()],
                                                       6, batch_size=4)),
    "masks.packed": _packed_next,
    "batching.admit": lambda m: (lambda r: (_outputs(r), r.timeline))(run_continuous(
        m, _requests(6), EngineConfig(max_num_seqs=3, max_num_batched_tokens=24))),
    "paged.slots": lambda m: _outputs(run_continuous(m, _requests(), EngineConfig(
        kv="paged", block_size=4, max_num_seqs=4))),
    "sinks.positions": _stream,
}


@pytest.mark.parametrize("name", sorted(RUNS))
def test_try_in_engine_with_the_reference_gives_the_engines_own_result(name, tiny) -> None:
    ex = labs.get(name)
    calls = []

    def spy(*args, **kwargs):
        calls.append(1)
        return ex.reference(*args, **kwargs)

    def run():
        calls.clear()  # count the engine's calls only, not the check's
        return RUNS[name](tiny)

    with torch_threads(1):
        own = RUNS[name](tiny)
        got = labs.try_in_engine(name, spy, run)
    assert calls, f"{name}: the engine never called the plug-in point"
    assert got == own
