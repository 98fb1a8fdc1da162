"""TP, PP and TP x PP over real gloo processes give the greedy tokens of one device (fp32).

One spawn of 4 ranks runs every check (starting a process group costs seconds): TP 4, PP 4,
TP 2 x PP 2, TP 2 and PP 2 (static and continuous engines, vocabulary-parallel head on some), on
random checkpoints of several shapes written by ``tests/helpers.py`` and on the
bundled model (8 heads, 4 KV heads, 6 layers). The reference is the plain model's static engine
in this process, which tests/test_model_vs_hf.py ties to transformers' ``generate``.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import BUNDLED_DIR, tiny_config, torch_threads, write_tiny_checkpoint
from workbench.engine import EngineConfig, Request, run_static
from workbench.model.config import RopeScaling
from workbench.model.loading import load_model, load_tokenizer
from workbench.parallel import GenerateJob, ParallelConfig, generate_parallel

SHAPES = {  # head counts divisible by 4; odd layer counts and vocabularies give uneven splits
    "gqa": dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                num_attention_heads=8, num_key_value_heads=4, head_dim=8),
    "mha-bias-tied": dict(vocab_size=90, hidden_size=64, intermediate_size=96,
                          num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=4,
                          head_dim=16, qkv_bias=True, model_type="qwen2",
                          tie_word_embeddings=True),
    "llama3-biases": dict(vocab_size=80, hidden_size=128, intermediate_size=64,
                          num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                          head_dim=32, qkv_bias=True, o_bias=True, mlp_bias=True,
                          rope_scaling=RopeScaling(8.0, 1.0, 4.0, 32)),
}
GRIDS = {"TP4": (ParallelConfig(tp=4), "static"),
         "TP4-vocab-cont": (ParallelConfig(tp=4, vocab_parallel=True), "continuous"),
         "PP4": (ParallelConfig(pp=4, micro_batches=2), "static"),
         "TP2xPP2": (ParallelConfig(tp=2, pp=2, micro_batches=2), "static"),
         "TP2xPP2-cont": (ParallelConfig(tp=2, pp=2), "continuous"),
         "TP2": (ParallelConfig(tp=2), "static"),  # ranks 2 and 3 sit these out
         "TP2-vocab-cont": (ParallelConfig(tp=2, vocab_parallel=True), "continuous"),
         "PP2": (ParallelConfig(pp=2, micro_batches=3), "static"),
         "PP2-cont": (ParallelConfig(pp=2), "continuous"),
         # paged KV on every rank, a pool small enough to preempt (swap) and a prefix cache
         "TP2-paged": (ParallelConfig(tp=2), "continuous"),
         "TP2xPP2-paged": (ParallelConfig(tp=2, pp=2), "continuous")}
CASES = [(name, grid) for name in ("gqa", "bundled") for grid in GRIDS] + [
    ("mha-bias-tied", "TP4-vocab-cont"), ("mha-bias-tied", "PP4"),  # uneven vocab and stages
    ("mha-bias-tied", "TP2xPP2-cont"), ("llama3-biases", "TP4"), ("llama3-biases", "TP2xPP2"),
    ("llama3-biases", "PP2")]
ENGINE = EngineConfig(max_num_seqs=3, max_num_batched_tokens=64)
PAGED = EngineConfig(max_num_seqs=3, max_num_batched_tokens=64, kv="paged", block_size=2,
                     num_blocks=12, preemption="swap", num_cpu_blocks=32, prefix_caching=True)


def _requests(model_dir, vocab: int) -> tuple[Request, ...]:
    tok = load_tokenizer(model_dir)
    if tok is not None:
        texts = ["def fibonacci(n):", "import os", "class Stack:", "for i in range(10):"]
        prompts = [tok(t).input_ids for t in texts]
    else:
        g = torch.Generator().manual_seed(vocab)
        prompts = [torch.randint(1, vocab, (n,), generator=g).tolist() for n in (5, 9, 3, 7)]
    return tuple(Request(tuple(p), 5, id=i) for i, p in enumerate(prompts))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (checkpoint dir, requests, reference tokens from the plain model)."""
    out = {}
    with torch_threads(1):
        for name, shape in SHAPES.items():
            path = tmp_path_factory.mktemp(name)
            write_tiny_checkpoint(path, tiny_config(**shape), seed=len(name))
            out[name] = path
        out["bundled"] = BUNDLED_DIR
        table = {}
        for name, path in out.items():
            requests = _requests(path, load_model(path).config.vocab_size)
            ref = run_static(load_model(path), list(requests), batch_size=len(requests))
            table[name] = (str(path), requests, [t.output_ids for t in ref.traces])
    return table


@pytest.fixture(scope="module")
def runs(models):
    """One spawn of 4 gloo ranks runs every case (a process group costs seconds to start)."""
    jobs = []
    for name, grid in CASES:
        path, requests, _ = models[name]
        par, strategy = GRIDS[grid]
        jobs.append(GenerateJob(path, requests, par, strategy, batch_size=len(requests),
                                engine=PAGED if grid.endswith("paged") else ENGINE))
    return dict(zip(CASES, generate_parallel(jobs, timeout_s=240)))


@pytest.mark.parametrize("name, grid", CASES, ids=[f"{g}-{n}" for n, g in CASES])
def test_parallel_tokens_match_one_device(models, runs, name, grid):
    result = runs[(name, grid)]
    assert [t.output_ids for t in result["run"].traces] == models[name][2]
    assert len(result["ranks"]) == GRIDS[grid][0].world_size


def test_ranks_read_only_their_shard(models, runs):
    """TP 4: each rank reads about a quarter of the weights; PP 4: each stage only its layers."""
    path = models["gqa"][0]
    total = sum(p.numel() * 4 for p in load_model(path).parameters())  # fp32 checkpoint
    for grid in ("TP4", "PP4"):
        ranks = runs[("gqa", grid)]["ranks"]
        read = [r["bytes_read"] for r in ranks]
        assert all(b < 0.5 * total for b in read), (grid, read, total)
        assert sum(read) >= total  # together they hold everything (norms are replicated)
    stages = [r["layers"] for r in runs[("gqa", "PP4")]["ranks"]]
    assert stages == [(0, 1), (1, 2), (2, 3), (3, 4)]


def test_pipeline_records_fill_drain_timeline(runs):
    """PP 2 with 3 micro-batches: each stage computed each micro-batch of each pass once, and
    stage 1 never started a micro-batch before stage 0 finished it."""
    ranks = runs[("gqa", "PP2")]["ranks"]
    by_stage = {r["stage"]: {(e.step, e.micro_batch): e for e in r["events"]} for r in ranks}
    assert set(by_stage[0]) == set(by_stage[1]) and len(by_stage[0]) >= 3
    assert {mb for _, mb in by_stage[0]} == {0, 1, 2}  # 4 rows in 3 micro-batches
    for key, e1 in by_stage[1].items():
        assert e1.start >= by_stage[0][key].end - 1e-3


def test_paged_pools_follow_the_drivers_block_moves(runs):
    """The paged runs above really moved blocks between steps (swaps out and in), which every
    follower replayed on its own pool: otherwise their tokens could not match."""
    for name in ("gqa", "bundled"):
        for grid in ("TP2-paged", "TP2xPP2-paged"):
            moves = runs[(name, grid)]["block_moves"]
            assert moves.get("swap_out", 0) > 0 and moves.get("swap_in", 0) > 0, (name, grid, moves)



def test_cuda_graphs_across_ranks_is_a_clear_error():
    from workbench.errors import WorkbenchError

    job = GenerateJob("bundled", (Request((1, 2, 3), 2),), ParallelConfig(tp=2), "continuous",
                      engine=EngineConfig(kv="paged", cuda_graphs=True))
    with pytest.raises(WorkbenchError, match="not supported across ranks"):
        generate_parallel(job)


def test_a_stage_pool_holds_only_its_layers():
    from workbench.kv.paged import PagedKVCache

    config = tiny_config(num_hidden_layers=4)
    kv = PagedKVCache(config, 6, 2, num_cpu_blocks=3, layers=range(2, 4))
    assert [p is None for p in kv.k] == [True, True, False, False]
    whole = PagedKVCache(config, 6, 2, num_cpu_blocks=3)
    assert kv.nbytes() * 2 == whole.nbytes()
    kv.k[2][1].fill_(1.0)
    kv.swap_out([1], [0])
    kv.swap_in([0], [4])
    kv.copy_block(4, 5)
    assert kv.k[2][5].eq(1.0).all() and kv.k[3][5].eq(0.0).all()
