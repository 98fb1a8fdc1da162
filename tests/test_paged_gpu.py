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


def _with_triton_linears(monkeypatch):
    """The engine's CUDA graphs built over FusedDecoder(linear="triton")."""
    import functools

    from workbench.engine import fastpath

    monkeypatch.setattr(fastpath, "FusedDecoder",
                        functools.partial(fastpath.FusedDecoder, linear="triton"))


@pytest.mark.parametrize("compile,linear", [(False, "torch"), (True, "torch"), (True, "triton")])
@pytest.mark.parametrize("num_blocks", [None, 24])  # roomy, and tight enough to preempt
def test_cuda_graphs_match_eager_and_alone(model, num_blocks, compile, linear, monkeypatch):
    if linear == "triton":  # the skinny products (workbench.engine.skinny) in the fused step
        _with_triton_linears(monkeypatch)
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


@pytest.mark.parametrize("compile,linear", [(False, "torch"), (True, "torch"), (True, "triton")])
def test_bf16_graphs_agree_with_eager(compile, linear, monkeypatch):
    if linear == "triton":
        _with_triton_linears(monkeypatch)
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,N,K,add,norm,swiglu", [(1, 1024, 512, False, False, False),
                                                  (32, 3072, 1024, True, True, False),
                                                  (7, 2816, 512, True, True, True),
                                                  (64, 512, 1408, False, False, False)])
@pytest.mark.parametrize("config", [None, dict(BN=64, BK=128, SPLIT=4, num_stages=3)])
def test_skinny_linear_compiled_matches_pytorch(M, N, K, add, norm, swiglu, dtype, config):
    """The skinny product, compiled (autotuned, or K split 4 ways: the last program of each column
    adds the partial sums other SMs left in L2), against the PyTorch reference, twice."""
    from workbench.engine.skinny import reference, skinny_linear

    g = torch.Generator(device="cuda").manual_seed(M + N)
    x = torch.randn(M, K, generator=g, device="cuda").to(dtype)
    weight = (torch.randn(N, K, generator=g, device="cuda") / K ** 0.5).to(dtype)
    kw = dict(add=torch.randn(M, K, generator=g, device="cuda").to(dtype) if add else None,
              norm=(1 + 0.1 * torch.randn(K, generator=g, device="cuda")).to(dtype) if norm else None,
              swiglu=swiglu, eps=1e-5)
    want = reference(x, weight, **kw)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for _ in range(2):
        got = skinny_linear(x, weight, config=config, **kw)
        if add:
            assert torch.equal(got[1], want[1])  # the residual: one rounding of x + add either way
            got = got[0]
        torch.testing.assert_close(got.float(), (want[0] if add else want).float(), rtol=tol,
                                   atol=tol)

