"""Paged KV storage and its scheduler: same tokens as generating alone, no block lost or shared.

Random workloads (hypothesis) vary block size, pool size (so that sequences are preempted by
recompute or swapped to CPU and resumed), shared prompt prefixes (prefix cache), chunked prefill
and cancellation. Every step the engine checks that block refcounts match the block tables and
that each written block has one writer; after every run every block is free again.
tests/test_model_vs_hf.py ties the same engine to transformers' ``generate`` on several shapes.
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import torch_threads
from tests.test_continuous import CONFIG, alone, requests_from
from workbench.engine import ContinuousEngine, EngineConfig, Request, SamplingParams, run_continuous
from workbench.engine.run import Clock
from workbench.errors import WorkbenchError
from workbench.kv.blocks import BlockManager
from workbench.kv.paged import PagedKVCache, kv_bytes_per_token
from workbench.model.presets import random_model


@pytest.fixture(scope="module")
def model():
    return random_model(CONFIG, std=0.3, seed=1)


def assert_all_free(engine: ContinuousEngine) -> None:
    sched = engine.scheduler
    assert sched.blocks.num_free == engine.num_blocks  # nothing leaked
    assert sched.cpu_blocks.num_free == sched.cpu_blocks.num_blocks
    assert not (sched.running or sched.waiting or sched.swapped)
    sched.blocks.check([])


# --------------------------------------------------------------------------- block manager


@settings(max_examples=60, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from("afwrp"), st.integers(0, 1000)), max_size=80))
def test_block_manager_invariants_under_random_operations(ops):
    """Allocate / fork / write (copy-on-write) / release / publish in any order: refcounts
    always equal the number of tables holding a block, and every block is free at the end."""
    bm = BlockManager(num_blocks=12, block_size=2)
    tables: list[list[int]] = []
    tokens: list[list[int]] = []
    for op, x in ops:
        if op == "a" and bm.num_free:
            found, _ = bm.lookup([x % 3] * 6, 5)  # a shared 4-token prefix, from the cache
            tables.append(found + [bm.allocate() for _ in range(min(bm.num_free, 1))])
            tokens.append([x % 3] * 6)
        elif op == "f" and tables:
            i = x % len(tables)
            tables.append(bm.fork(tables[i]))
            tokens.append(list(tokens[i]))
        elif op == "w" and tables and tables[x % len(tables)] and bm.num_free:
            table = tables[x % len(tables)]
            index = x % len(table)
            block, source = bm.writable(table, index)
            assert bm.is_private(block) and table[index] == block
            assert source is None or source != block
        elif op == "r" and tables:
            i = x % len(tables)
            bm.release_all(tables.pop(i))
            tokens.pop(i)
        elif op == "p" and tables:
            i = x % len(tables)
            bm.publish(tables[i], tokens[i], 2 * len(tables[i]), [])
        bm.check(tables)
    for table in tables:
        bm.release_all(table)
    bm.check([])
    assert bm.num_free == 12


def test_prefix_cache_finds_full_blocks_and_evicts_lru():
    bm = BlockManager(num_blocks=4, block_size=2)
    table = [bm.allocate(), bm.allocate()]
    prompt = [5, 6, 7, 8, 9]
    bm.publish(table, prompt, 4, [])
    found, hashes = bm.lookup(prompt, 4)
    assert found == table and len(hashes) == 2  # shared by reference
    assert bm.refcount[table[0]] == 2
    assert bm.lookup([5, 6, 1, 1], 4)[0] == [table[0]]  # a different second block: one hit
    for t in (table, table, [table[0]]):
        bm.release_all(list(t))
    assert bm.num_free == 4  # cached blocks count as free ...
    assert bm.count_cached(prompt, 4) == (2, 2)
    fresh = [bm.allocate() for _ in range(3)]  # ... and are evicted last, least recent first:
    assert len(set(fresh)) == 3 and table[1] in fresh  # the tail block went first,
    assert bm.count_cached(prompt, 4) == (1, 1)  # so the prefix's first block is still there


def test_block_manager_rejects_bad_use():
    with pytest.raises(WorkbenchError, match="num_blocks"):
        BlockManager(0, 16)
    bm = BlockManager(1, 4)
    b = bm.allocate()
    with pytest.raises(WorkbenchError, match="out of KV blocks"):
        bm.allocate()
    bm.release(b)
    with pytest.raises(WorkbenchError, match="released more often"):
        bm.release(b)


# --------------------------------------------------------------------------- paged attention


def test_paged_storage_reads_back_what_was_written():
    """Scattered blocks gathered through a table equal the contiguous keys."""
    kv = PagedKVCache(CONFIG, num_blocks=8, block_size=3)
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(7, CONFIG.num_key_value_heads, CONFIG.head_dim, generator=g)  # [T, Hkv, d]
    table = [5, 2, 7]
    for t in range(7):
        kv.k[0][table[t // 3], t % 3] = keys[t]
    dense = kv.gather(kv.k[0], torch.tensor([table]))  # [1, Hkv, 9, d]
    torch.testing.assert_close(dense[0, :, :7], keys.transpose(0, 1))
    assert kv_bytes_per_token(CONFIG, torch.float32) == 2 * 2 * 2 * 16 * 4


# --------------------------------------------------------------------------- the engine


@settings(max_examples=14, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_workloads_with_preemption_match_generating_alone(model, data):
    n = data.draw(st.integers(1, 6))
    lengths = data.draw(st.lists(st.integers(1, 24), min_size=n, max_size=n))
    limits = data.draw(st.lists(st.integers(0, 24), min_size=n, max_size=n))
    block_size = data.draw(st.sampled_from([1, 2, 4, 8]))
    longest = -(-max(a + b for a, b in zip(lengths, limits)) // block_size)
    num_blocks = data.draw(st.integers(longest, 3 * longest))  # tight: preemption is likely
    swap = data.draw(st.booleans())
    prefix = data.draw(st.booleans())
    requests = requests_from(lengths, limits, seed=data.draw(st.integers(0, 99)))
    if prefix:  # a shared "system prompt" in front of every prompt
        head = (11, 12, 13, 14, 15, 16, 17, 18)
        requests = [Request(head + r.prompt_ids, r.max_new_tokens, id=r.id) for r in requests]
        num_blocks += -(-8 // block_size)
    config = EngineConfig(max_num_seqs=data.draw(st.integers(1, 4)),
                          max_num_batched_tokens=data.draw(st.integers(4, 40)),
                          chunked_prefill=True, kv="paged", block_size=block_size,
                          num_blocks=num_blocks, prefix_caching=prefix,
                          preemption="swap" if swap else "recompute",
                          num_cpu_blocks=2 * num_blocks if swap else 0)
    # cancel some requests at some steps (waiting, running, swapped out: wherever they are)
    cancels = data.draw(st.dictionaries(st.integers(0, 30), st.integers(0, n - 1), max_size=2))
    with torch_threads(1):
        engine = ContinuousEngine(model, config, check_blocks=True)
        traces = [engine.add_request(r) for r in requests]
        clock, steps = Clock(), 0
        while engine.has_work():
            if steps in cancels:
                engine.cancel(cancels[steps])
            engine.step(clock)
            steps += 1
        expected = alone(model, requests)
    for trace, exp in zip(traces, expected):
        if trace.finish_reason == "cancelled":  # what it produced before, then nothing more
            assert trace.output_ids == exp[:len(trace.output_ids)]
        else:
            assert trace.output_ids == exp
            assert trace.finish_reason == ("eos" if exp and exp[-1] == 7 else "length")
    assert_all_free(engine)


def test_preemption_by_recompute_and_by_swap_keep_outputs(model):
    requests = requests_from([10, 12, 9, 14], [30, 30, 30, 30], seed=5, ignore_eos=True)
    expected = alone(model, requests)
    for mode in ("recompute", "swap"):
        config = EngineConfig(4, 64, kv="paged", block_size=4, num_blocks=16, preemption=mode,
                              num_cpu_blocks=40 if mode == "swap" else 0)
        with torch_threads(1):
            engine = ContinuousEngine(model, config, check_blocks=True)
            run = run_continuous(model, requests, config, engine=engine)
        assert [t.output_ids for t in run.traces] == expected, mode
        assert engine.scheduler.num_preemptions > 0, mode  # the pool really ran dry
        assert sum(h["preempted"] for h in engine.kv_history) == engine.scheduler.num_preemptions
        assert_all_free(engine)


def test_sampled_outputs_survive_preemption(model):
    requests = requests_from([10, 12, 9, 14], [25, 25, 25, 25], seed=6, ignore_eos=True)
    params = SamplingParams(temperature=0.9, top_k=20, seed=3)
    with torch_threads(1):
        roomy = run_continuous(model, requests, EngineConfig(4, 64), params)
        tight_cfg = EngineConfig(4, 64, kv="paged", block_size=2, num_blocks=24)
        engine = ContinuousEngine(model, tight_cfg, params, check_blocks=True)
        tight = run_continuous(model, requests, tight_cfg, params, engine=engine)
    assert engine.scheduler.num_preemptions > 0
    assert [t.output_ids for t in tight.traces] == [t.output_ids for t in roomy.traces]


def test_prefix_cache_shares_system_prompt_blocks(model):
    system = tuple(range(20, 52))  # 32 tokens = 8 blocks of 4
    requests = [Request(system + (60 + i, 61 + i), 6, id=i) for i in range(6)]
    expected = alone(model, requests)
    runs = {}
    for caching in (False, True):
        config = EngineConfig(2, 64, kv="paged", block_size=4, prefix_caching=caching)
        with torch_threads(1):
            engine = ContinuousEngine(model, config, check_blocks=True)
            run = run_continuous(model, requests, config, engine=engine)
        assert [t.output_ids for t in run.traces] == expected
        runs[caching] = engine
    assert runs[False].scheduler.blocks.cache_hits == 0
    assert runs[True].scheduler.blocks.cache_hits == 8 * 5  # every request after the first
    computed = [sum(h["tokens"] for h in e.kv_history) for e in runs.values()]
    assert computed[1] <= computed[0]


def test_cancelled_requests_free_their_blocks_at_once(model):
    requests = requests_from([6, 6, 6], [40, 40, 40], seed=7, ignore_eos=True)
    config = EngineConfig(3, 32, kv="paged", block_size=4)
    with torch_threads(1):
        engine = ContinuousEngine(model, config, check_blocks=True)
        for r in requests:
            engine.add_request(r)
        clock = Clock()
        for _ in range(5):
            engine.step(clock)
        held = engine.scheduler.blocks.num_used
        engine.cancel(1)
        assert engine.scheduler.blocks.num_used < held
        while engine.has_work():
            engine.step(clock)
    expected = alone(model, requests)
    traces = [engine.sequences[r.id].trace for r in requests]
    assert traces[1].finish_reason == "cancelled"
    assert traces[1].output_ids == expected[1][:len(traces[1].output_ids)]
    assert [traces[0].output_ids, traces[2].output_ids] == [expected[0], expected[2]]
    assert_all_free(engine)


def test_paged_memory_holds_mostly_real_tokens(model):
    requests = requests_from([5, 30, 12, 3, 25, 17], [20, 10, 30, 25, 15, 30], seed=2)
    fractions = {}
    for kv in ("contiguous", "paged"):
        config = EngineConfig(6, 64, kv=kv, **({"block_size": 4} if kv == "paged" else {}))
        with torch_threads(1):
            engine = ContinuousEngine(model, config)
            run_continuous(model, requests, config, engine=engine)
        h = engine.kv_history
        fractions[kv] = sum(x["tokens"] for x in h) / sum(x["reserved"] for x in h)
    assert fractions["paged"] > 0.9 > fractions["contiguous"]


def test_bad_paged_configs_and_oversized_requests(model):
    with pytest.raises(WorkbenchError, match="kv must be one of"):
        EngineConfig(kv="pages")
    with pytest.raises(WorkbenchError, match="preemption must be"):
        EngineConfig(kv="paged", preemption="drop")
    with pytest.raises(WorkbenchError, match="need kv='paged'"):
        EngineConfig(prefix_caching=True)
    with pytest.raises(WorkbenchError, match="block_size"):
        EngineConfig(kv="paged", block_size=0)
    engine = ContinuousEngine(model, EngineConfig(2, 64, kv="paged", block_size=4, num_blocks=3))
    trace = engine.add_request(Request(tuple(range(8, 18)), 5, id=0))  # 15 tokens > 12 slots
    assert trace.finish_reason == "rejected" and "KV blocks" in trace.error


def test_fused_decode_step_equals_the_model_forward(model):
    """The fast path's decode step (fused weights; eager here, compiled on a GPU) gives the
    plain forward's logits on the same paged storage."""
    from workbench.engine.fastpath import FusedDecoder

    requests = requests_from([5, 9, 3], [6, 6, 6], seed=8, ignore_eos=True)
    config = EngineConfig(3, 64, kv="paged", block_size=4)
    with torch_threads(1):
        engine = ContinuousEngine(model, config)
        for r in requests:
            engine.add_request(r)
        clock = Clock()
        for _ in range(3):
            engine.step(clock)
        step = engine.scheduler.schedule()
        assert len(step.decodes) == 3 and not step.prefills
        batch = engine._pack(step)
        plain = model(batch, engine.kv)  # [3, vocab]
        lay = batch.layout
        fused = FusedDecoder(model, engine.kv, compile=False)(
            batch.input_ids[0], batch.positions[0], lay.slot_mapping,
            lay.block_tables[:, :lay.decode_blocks], lay.context_lens_t)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    with pytest.raises(WorkbenchError, match="attention must be auto or one of triton"):
        FusedDecoder(model, engine.kv, compile=False, attention="flash")
    with pytest.raises(WorkbenchError, match="linear must be auto or one of torch, triton, fastest"):
        FusedDecoder(model, engine.kv, compile=False, linear="cutlass")
    with pytest.raises(WorkbenchError, match="linear='triton' needs Triton on a GPU"):
        FusedDecoder(model, engine.kv, compile=False, attention="gather", linear="triton")
    with pytest.raises(WorkbenchError, match="linear='fastest' needs Triton on a GPU"):
        FusedDecoder(model, engine.kv, compile=False, linear="fastest")
    seen = []  # compile: a torch.compile mode reaches each compiled piece (GPU runs time it)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "compile", lambda fn, **options: seen.append(options) or fn)
        FusedDecoder(model, engine.kv, compile="max-autotune-no-cudagraphs", attention="gather")
        FusedDecoder(model, engine.kv, compile=True, attention="gather")
    assert [o["mode"] for o in seen] == ["max-autotune-no-cudagraphs"] * 7 + [None] * 7
    with pytest.raises(WorkbenchError, match="reduce_norm takes the place of reduce"):
        FusedDecoder(model, engine.kv, compile=False, attention="gather", reduce_norm=object())
