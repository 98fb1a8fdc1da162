"""The GPU fast path (CUDA graphs over paged storage) gives the eager path's tokens.

Skipped without CUDA (CI has none); run on a GPU machine by tools/gpu/paged.sh.
"""

import pytest
import torch

from tests.helpers import paged_attention_case, rope_attention_outputs
from workbench.engine import ContinuousEngine, EngineConfig, Request, run_continuous, run_static
from workbench.model.loading import load_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def model():
    return load_model("bundled", "cuda", torch.float32)


def requests(n, seed=0, new=24):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 40, (n,), generator=g).tolist()
    return [Request(tuple(torch.randint(1, 8000, (k,), generator=g).tolist()), new,
                    ignore_eos=True, id=i) for i, k in enumerate(lengths)]


def _with_linear(monkeypatch, linear: str):
    """The engine's CUDA graphs built over FusedDecoder(linear=linear): "triton" (the skinny
    products with the glue inside) or "fastest" (o_proj, down, head: skinny where timed faster)."""
    import functools

    from workbench.engine import fastpath

    monkeypatch.setattr(fastpath, "FusedDecoder",
                        functools.partial(fastpath.FusedDecoder, linear=linear))


@pytest.mark.parametrize("compile,linear", [(False, "torch"), (True, "torch"), (True, "triton"),
                                            (True, "fastest")])
@pytest.mark.parametrize("num_blocks", [None, 24])  # roomy, and tight enough to preempt
def test_cuda_graphs_match_eager_and_alone(model, num_blocks, compile, linear, monkeypatch):
    if linear != "torch":  # the skinny products (workbench.engine.skinny) in the fused step
        _with_linear(monkeypatch, linear)
    reqs = requests(11)
    config = EngineConfig(8, 256, max_model_len=64, chunked_prefill=True, kv="paged",
                          block_size=4, num_blocks=num_blocks, cuda_graphs=True, compile=compile)
    engine = ContinuousEngine(model, config, check_blocks=True)
    assert not compile or engine.graphs.fused.linear == linear
    fast = run_continuous(model, reqs, config, engine=engine)
    eager = run_continuous(model, reqs, EngineConfig(8, 256, max_model_len=64,
                                                     chunked_prefill=True))
    alone = [run_static(model, [r], 1).traces[0].output_ids for r in reqs]
    assert [t.output_ids for t in fast.traces] == [t.output_ids for t in eager.traces] == alone
    assert engine.graphs is not None and engine.graphs.graphs  # the graphs really ran
    assert engine.scheduler.blocks.num_free == engine.num_blocks
    if num_blocks:
        assert engine.scheduler.num_preemptions > 0


@pytest.mark.parametrize("compile,linear", [(False, "torch"), (True, "torch"), (True, "triton"),
                                            (True, "fastest")])
def test_bf16_graphs_agree_with_eager(compile, linear, monkeypatch):
    if linear != "torch":
        _with_linear(monkeypatch, linear)
    bf16 = load_model("bundled", "cuda", torch.bfloat16)
    reqs = requests(16, seed=1, new=16)
    base = dict(max_model_len=64, chunked_prefill=True, kv="paged", block_size=16)
    fast = run_continuous(bf16, reqs, EngineConfig(16, 512, cuda_graphs=True, compile=compile,
                                                   **base))
    eager = run_continuous(bf16, reqs, EngineConfig(16, 512, **base))
    same = sum(a.output_ids == b.output_ids for a, b in zip(fast.traces, eager.traces))
    assert same >= 12, f"only {same}/16 bf16 outputs identical between graphs and eager"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,H,Hkv,D,bs,nb", [(1, 32, 8, 64, 16, 16), (5, 4, 2, 16, 16, 3),
                                             (33, 8, 1, 128, 16, 9), (3, 6, 6, 32, 8, 40)])
def test_triton_paged_decode_matches_gather(B, H, Hkv, D, bs, nb, dtype):
    from workbench.kv.paged_triton import paged_decode

    case = paged_attention_case(B, H, Hkv, D, bs, nb, dtype, "cuda")
    got = paged_decode(case["q"], case["k_pool"], case["v_pool"], case["tables"], case["lens"])
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), case["expected"].float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("splits", [None, 1])
@pytest.mark.parametrize("B,H,Hkv,D,bs,nb", [(1, 32, 8, 64, 16, 16), (5, 4, 2, 16, 16, 3),
                                             (33, 8, 1, 128, 16, 9), (32, 32, 8, 128, 16, 9)])
def test_triton_rope_paged_decode_matches_rope_write_then_attend(B, H, Hkv, D, bs, nb, splits,
                                                                 dtype):
    ways = rope_attention_outputs(B, H, Hkv, D, bs, nb, dtype, "cuda", splits)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for got, want in zip(ways["fused"], ways["reference"]):
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


def _skinny_case(M, N, K, add, norm, bias, swiglu, dtype, seed=0):
    """Inputs of a skinny product on the GPU and the PyTorch reference's result."""
    from workbench.engine.skinny import reference

    g = torch.Generator(device="cuda").manual_seed(M + N + seed)
    rand = (lambda *shape: torch.randn(*shape, generator=g, device="cuda"))  # noqa: E731
    x = rand(M, K).to(dtype)
    weight = (rand(N, K) / K ** 0.5).to(dtype)
    kw = dict(add=rand(M, K).to(dtype) if add else None,
              norm=(1 + 0.1 * rand(K)).to(dtype) if norm else None,
              bias=rand(N).to(dtype) if bias else None, swiglu=swiglu, eps=1e-5)
    return x, weight, kw, reference(x, weight, **kw)


def _check_skinny(got, want, add, dtype):
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    if add:
        assert torch.equal(got[1], want[1])  # the residual: one rounding of x + add either way
        got, want = got[0], want[0]
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


SKINNY_GPU = [(1, 1024, 512, False, False, True, False), (32, 3072, 1024, True, True, True, False),
              (7, 2816, 512, True, True, False, True), (64, 512, 1408, False, False, False, False),
              (48, 2048, 768, True, True, True, True), (33, 1024, 4096, True, True, False, False)]


@pytest.mark.parametrize("M,N,K,add,norm,bias,swiglu,dtype", [
    (*SKINNY_GPU[0], torch.bfloat16), (*SKINNY_GPU[1], torch.bfloat16),
    (*SKINNY_GPU[3], torch.float32), (*SKINNY_GPU[4], torch.bfloat16),
    (*SKINNY_GPU[4], torch.float32), (*SKINNY_GPU[5], torch.float32)])
def test_skinny_linear_autotuned_matches_pytorch(M, N, K, add, norm, bias, swiglu, dtype):
    """The skinny product compiled and autotuned (float32 at 33-64 rows with SwiGLU included:
    configs too large for shared memory are pruned) against the PyTorch reference, twice."""
    from workbench.engine.skinny import skinny_linear

    x, weight, kw, want = _skinny_case(M, N, K, add, norm, bias, swiglu, dtype)
    for _ in range(2):
        _check_skinny(skinny_linear(x, weight, **kw), want, add, dtype)


def _every_config():
    from workbench.engine.skinny import CONFIGS

    return [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages) for c in CONFIGS]


@pytest.mark.parametrize("config", _every_config() if torch.cuda.is_available() else [None])
@pytest.mark.parametrize("M,N,K,add,norm,bias,swiglu", [SKINNY_GPU[2], SKINNY_GPU[4]])
def test_every_skinny_config_is_correct(config, M, N, K, add, norm, bias, swiglu):
    """Each config the autotuner may pick, split ones included, in bf16 (whichever wins on a GPU
    must be right): SwiGLU with the residual add and norm at 7 and 48 rows."""
    from triton.runtime.errors import OutOfResources

    from workbench.engine.skinny import SMEM_LIMIT, skinny_linear, smem_lower_bound

    x, weight, kw, want = _skinny_case(M, N, K, add, norm, bias, swiglu, torch.bfloat16)
    bm = max(16, 1 << (M - 1).bit_length())  # the kernel's BM: rows rounded up to a power of 2
    if smem_lower_bound(bm, config["BN"], config["BK"], config["num_stages"], 2, add,
                        swiglu) > SMEM_LIMIT:
        pytest.skip("more shared memory than an SM has, surely: the autotuner prunes it")
    try:
        got = skinny_linear(x, weight, config=config, **kw)
    except OutOfResources:  # past the bound, Triton's autotuner times it as infinitely slow
        pytest.skip("does not fit in shared memory: the autotuner skips it")
    _check_skinny(got, want, add, torch.bfloat16)


def test_skinny_split_k_replayed_from_a_cuda_graph():
    """K split 4 ways, captured once and replayed 200 times on new inputs: every result right
    (the last program of a column sees the other splits' sums), every counter back at zero."""
    from workbench.engine.skinny import _workspaces, reference, skinny_linear

    x, weight, kw, _ = _skinny_case(32, 4096, 4096, True, True, False, False, torch.bfloat16)
    config = dict(BN=128, BK=128, SPLIT=4, num_stages=3)
    skinny_linear(x, weight, config=config, **kw)  # warm-up: compile, workspace
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = skinny_linear(x, weight, config=config, **kw)
    g = torch.Generator(device="cuda").manual_seed(7)
    for i in range(200):
        x.copy_(torch.randn(x.shape, generator=g, device="cuda"))
        graph.replay()
        if i % 20 == 0 or i == 199:
            _check_skinny(out, reference(x, weight, **kw), True, torch.bfloat16)
    torch.cuda.synchronize()
    assert all(int(count.sum()) == 0 for _, count in _workspaces.values())
    graph.reset()


def test_skinny_first_call_of_a_shape_during_capture_is_a_clear_error():
    from workbench.engine.skinny import skinny_linear
    from workbench.errors import WorkbenchError

    x = torch.randn(3, 320, device="cuda")
    weight = torch.randn(96, 320, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(WorkbenchError, match="before capturing a CUDA graph"):
        with torch.cuda.graph(graph):
            skinny_linear(x, weight)


def test_graph_call_us_times_the_calls_and_keeps_the_output():
    """The GPU timing tools' helper: one graph of several calls timed per call (16 products in one
    graph take about 16 times one product's time, not one), and the captured output still right
    after the graph is released."""
    from workbench.engine.cudagraph import graph_call_us

    a = torch.randn(1024, 1024, device="cuda")
    b = torch.randn(1024, 1024, device="cuda")

    one_us, outs = graph_call_us(lambda j: a @ b, 1, replays=20)
    torch.testing.assert_close(outs[0], a @ b)
    many_us, outs = graph_call_us(lambda j: a @ b, 16, replays=20)
    assert len(outs) == 16 and 0 < many_us
    torch.testing.assert_close(outs[-1], a @ b)
    assert 0 < one_us and many_us < 2 * one_us  # per call, not per graph
