"""The Triton kernels (:mod:`workbench.kv.paged_triton`), run on the CPU by Triton's interpreter.

On GPUs they are compiled (``tests/test_paged_gpu.py``); here ``TRITON_INTERPRET=1`` runs each
program of the grid in Python with NumPy, on CPU tensors, so CI - which has no GPU - still checks
every kernel against the portable gather path. The interpreter is chosen when Triton is imported,
so the outer test runs this file again in a fresh process with the variable set; run it directly
with ``TRITON_INTERPRET=1 python -m pytest tests/test_triton_interpreter.py`` to see each case.
Skipped where Triton is not installed (it is a test dependency on Linux x86-64 only).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import paged_attention_case, rope_attention_outputs, torch_threads

triton = pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]


def _version(module) -> tuple[int, int]:
    return tuple(int(part) for part in module.__version__.split(".")[:2])


# Triton before 3.7 interprets a loop bound held in a tensor with int() of a one-element array, which
# NumPy 2.4 refuses ("only 0-dimensional arrays can be converted"); 3.7 squeezes it first. GPU builds
# of PyTorch 2.11 pin Triton 3.6, so such a machine skips here rather than failing on the interpreter
# (its GPU compiles and runs the kernels instead: tests/test_paged_gpu.py).
if _version(triton) < (3, 7) and _version(np) >= (2, 4):
    pytest.skip(f"Triton {triton.__version__}'s interpreter fails with NumPy {np.__version__} "
                "(needs Triton >= 3.7 or NumPy < 2.4)", allow_module_level=True)

if os.environ.get("TRITON_INTERPRET") != "1":

    def test_triton_kernels_in_the_interpreter():
        env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                              "-o", "addopts=", str(Path(__file__).relative_to(ROOT))],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
        assert " passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-2000:]

else:
    from workbench.kv.paged_triton import paged_decode, write_kv

    SHAPES = [(1, 32, 8, 64, 16, 16), (5, 4, 2, 16, 16, 3), (33, 8, 1, 128, 16, 9),
              (3, 6, 6, 32, 8, 40)]

    @pytest.mark.parametrize("splits", [None, 1, 3])
    @pytest.mark.parametrize("B,H,Hkv,D,bs,nb", SHAPES)
    def test_paged_decode_matches_gather(B, H, Hkv, D, bs, nb, splits):
        """Any number of splits (None: the GPU-filling default) gives the gather path's output:
        the combine kernel's rescaling is exact, and empty splits weigh nothing."""
        case = paged_attention_case(B, H, Hkv, D, bs, nb, torch.float32)
        got = paged_decode(case["q"], case["k_pool"], case["v_pool"], case["tables"],
                           case["lens"], splits)
        torch.testing.assert_close(got, case["expected"], rtol=1e-5, atol=1e-5)

    def test_split_counts():
        """Two programs per SM (264) by default; the fused kernel takes one split (no combine pass)
        once batch x KV heads reach 128 over at most 8 tiles."""
        from workbench.kv.paged_triton import num_splits

        assert num_splits(32, 8, 5) == 2 and num_splits(1, 8, 5) == 5 and num_splits(1, 8, 99) == 33
        assert num_splits(32, 8, 5, direct=True) == 1 and num_splits(32, 4, 5, direct=True) == 1
        assert num_splits(8, 8, 5, direct=True) == 5  # 64 programs: split
        assert num_splits(32, 8, 40, direct=True) == 2  # a long context: split

    @pytest.mark.parametrize("splits", [None, 1, 3])
    @pytest.mark.parametrize("B,H,Hkv,D,bs,nb", SHAPES + [(64, 4, 2, 16, 16, 3)])
    def test_rope_paged_decode_equals_rope_write_then_attend(B, H, Hkv, D, bs, nb, splits):
        """The fused kernel (RoPE of q and the new key, their write, attention over the earlier
        tokens plus the new one from registers) = RoPE, ``write_kv``, ``paged_decode``, with the
        new token at any place in any split, including a row's first token."""
        pools = rope_attention_outputs(B, H, Hkv, D, bs, nb, torch.float32, splits=splits)
        for got, want in zip(pools["fused"], pools["reference"]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    @pytest.mark.parametrize("tile,splits", [(16, None), (16, 1), (64, 2)])
    def test_rope_paged_decode_with_another_tile(tile, splits):
        """The fused kernel's tile (tokens per iteration) is a launch choice only: 16 or 64
        tokens give the reference's output and pools (tools/attention_configs.py times them)."""
        pools = rope_attention_outputs(3, 8, 2, 32, 8, 9, torch.float32, splits=splits,
                                       tile=tile, num_warps=2)
        for got, want in zip(pools["fused"], pools["reference"]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    def test_write_kv_stores_each_row_at_its_slot():
        g = torch.Generator().manual_seed(0)
        k_pool, v_pool = torch.zeros(6, 4, 2, 16), torch.zeros(6, 4, 2, 16)  # 24 slots
        k, v = torch.randn(3, 2, 16, generator=g), torch.randn(3, 2, 16, generator=g)
        slots = torch.tensor([5, 0, 22])
        write_kv(k_pool, v_pool, k, v, slots)
        assert torch.equal(k_pool.view(24, 2, 16)[slots], k)
        assert torch.equal(v_pool.view(24, 2, 16)[slots], v)
        assert k_pool.view(24, 2, 16).abs().sum(dim=(1, 2)).nonzero().flatten().tolist() == [0, 5, 22]

    def _step_logits(model, lens, ids, bs, **decoder):
        """Logits of one FusedDecoder step (uncompiled; ``decoder``: its options) for rows that
        hold ``lens`` tokens after it, over pools of the same random earlier keys and values."""
        from workbench.engine.fastpath import FusedDecoder
        from workbench.kv.paged import PagedKVCache

        c, lens = model.config, torch.tensor(lens)
        B, nb = len(lens), 3
        tables = torch.arange(B * nb).view(B, nb)
        positions = lens - 1
        slots = tables[torch.arange(B), positions // bs] * bs + positions % bs
        kv = PagedKVCache(c, B * nb, bs, torch.device("cpu"), torch.float32)
        g = torch.Generator().manual_seed(1)
        for i in range(c.num_hidden_layers):
            kv.k[i].copy_(torch.randn(kv.k[i].shape, generator=g))
            kv.v[i].copy_(torch.randn(kv.v[i].shape, generator=g))
        with torch.inference_mode():
            return FusedDecoder(model, kv, compile=False, **decoder)(
                torch.tensor(ids), positions, slots, tables, lens)

    def test_fast_path_with_triton_attention_matches_gather():
        """The engine's fused decode step with the Triton kernels (write, split, combine; or
        the RoPE-and-write fused kernel) gives the gather path's logits on the bundled model, at
        rows of different lengths."""
        from workbench.model.loading import load_model

        with torch_threads(1):
            model = load_model("bundled")
            logits = {attention: _step_logits(model, [9, 40, 17], [11, 222, 3333], 16,
                                              attention=attention)
                      for attention in ("gather", "triton", "triton-rope")}
        for attention in ("triton", "triton-rope"):
            torch.testing.assert_close(logits[attention], logits["gather"], rtol=1e-4, atol=1e-4)
            assert torch.equal(logits[attention].argmax(-1), logits["gather"].argmax(-1))

    SKINNY = [  # M, N, K, add, norm, bias, swiglu: every fused part alone and together
        (1, 48, 40, False, False, False, False), (3, 64, 96, True, True, True, False),
        (17, 40, 300, True, True, False, True), (33, 96, 64, False, False, True, True),
        (64, 32, 16, True, False, False, False), (2, 130, 70, False, True, False, False)]

    @pytest.mark.parametrize("config", [dict(BN=16, BK=64), dict(BN=32, BK=32, SPLIT=3)])
    @pytest.mark.parametrize("M,N,K,add,norm,bias,swiglu", SKINNY)
    def test_skinny_linear_matches_pytorch(M, N, K, add, norm, bias, swiglu, config):
        """One kernel = the residual add, RMSNorm, the product, its bias and SwiGLU as the model
        computes them, at batch 1 to 64 and sizes that fill no tile exactly, with K whole or split
        (the last split of each column adds the others' sums, the norm's among them, and sets its
        counter back to zero for the next call); the residual it stores is x + add exactly."""
        from workbench.engine.skinny import _workspaces, reference, skinny_linear

        g = torch.Generator().manual_seed(M * N + K)
        x = torch.randn(M, K, generator=g)
        weight = torch.randn(N, K, generator=g) / K ** 0.5
        kw = dict(add=torch.randn(M, K, generator=g) if add else None,
                  norm=1 + 0.1 * torch.randn(K, generator=g) if norm else None,
                  bias=torch.randn(N, generator=g) if bias else None, swiglu=swiglu, eps=1e-5)
        want = reference(x, weight, **kw)
        for _ in range(2):  # the second call finds the counters at zero again
            got = skinny_linear(x, weight, config=config, **kw)
            if add:
                assert torch.equal(got[1], want[1])
                got = got[0]
            assert got.shape == (M, N // 2 if swiglu else N)
            torch.testing.assert_close(got, want[0] if add else want, rtol=1e-5, atol=1e-5)
        assert all(count.sum() == 0 for _, count in _workspaces.values())

    def test_split_workspace_holds_every_config_it_allows():
        """Each (column, split) program writes 2 BM BN + BM floats at its own place; the workspace
        of a shape is large enough for any BN of 16-128 and up to 4 splits, and one counter per
        column of 16-wide programs."""
        from workbench.engine.skinny import MAX_BN, MAX_SPLIT, _workspace

        for n in (20, 65, 4096, 14336):
            for bm in (16, 32, 64):
                part, count = _workspace(torch.device("cpu"), bm, n)
                assert count.numel() >= -(-n // 16) and int(count.sum()) == 0
                for bn in (16, 32, 64, MAX_BN):
                    for split in range(2, MAX_SPLIT + 1):
                        assert -(-n // bn) * split * (2 * bm * bn + bm) <= part.numel()

    def test_skinny_linear_refuses_what_it_cannot_do():
        from workbench.engine.skinny import skinny_linear
        from workbench.errors import WorkbenchError

        with pytest.raises(WorkbenchError, match="at most 64 rows"):
            skinny_linear(torch.zeros(65, 8), torch.zeros(4, 8))
        with pytest.raises(WorkbenchError, match="shapes do not fit"):
            skinny_linear(torch.zeros(2, 8), torch.zeros(4, 9))
        with pytest.raises(WorkbenchError, match="even number of rows"):
            skinny_linear(torch.zeros(2, 8), torch.zeros(5, 8), swiglu=True)
        x, w = torch.zeros(2, 16), torch.zeros(4, 16)
        for bad in (dict(BN=16, BK=16, SPLIT=8), dict(BN=8, BK=16, SPLIT=2), dict(BN=24, BK=16),
                    dict(BN=16, BK=8)):  # the workspace has room for BN >= 16 and <= 4 splits
            with pytest.raises(WorkbenchError, match="BN a power of two from 16 to 128"):
                skinny_linear(x, w, config=bad)
        with pytest.raises(WorkbenchError, match="norm must be"):
            skinny_linear(x, w, norm=torch.ones(15))
        with pytest.raises(WorkbenchError, match="bias"):
            skinny_linear(x, w, bias=torch.ones(2))
        with pytest.raises(WorkbenchError, match="every tensor must be torch.float32"):
            skinny_linear(x, w.double())

    @pytest.mark.parametrize("overrides", [
        dict(head_dim=16),  # GQA, untied head
        dict(head_dim=16, num_key_value_heads=1, qkv_bias=True, o_bias=True, mlp_bias=True,
             tie_word_embeddings=True, hidden_size=48, intermediate_size=80)])
    @pytest.mark.parametrize("tiles", [dict(BN=16, BK=64), dict(BN=16, BK=16, SPLIT=3)])
    def test_fast_path_with_triton_linears_matches_cublas_way(overrides, tiles, monkeypatch):
        """The decode step as five kernels a layer (skinny products with the residual, norms and
        SwiGLU inside; K whole or split) gives the logits of the compiled-glue step (F.linear),
        with biases on every projection and a tied head too, at rows of different lengths."""
        from tests.helpers import tiny_config
        from workbench.engine import skinny
        from workbench.model.llama import LlamaModel

        monkeypatch.setattr(skinny, "INTERPRETER_CONFIG", tiles)

        torch.manual_seed(0)
        model = LlamaModel(tiny_config(**overrides)).eval()
        for p in model.parameters():  # biases and norms away from their 0 / 1 start
            p.data.add_(0.1 * torch.randn_like(p))
        logits = {linear: _step_logits(model, [3, 12, 1], [1, 20, 33], 4, linear=linear,
                                       attention="triton-rope") for linear in ("torch", "triton")}
        torch.testing.assert_close(logits["triton"], logits["torch"], rtol=1e-5, atol=1e-5)

    @pytest.mark.parametrize("skinny_wins", [True, False])
    def test_fast_path_with_fastest_linears_matches_cublas_way(skinny_wins, monkeypatch):
        """linear="fastest": o_proj, down_proj and the LM head take the skinny kernel where it was
        timed faster (here: forced either way, as nothing can be timed on a CPU) and the step's
        logits stay the compiled-glue step's, with biases everywhere and a tied head."""
        from tests.helpers import tiny_config
        from workbench.engine import skinny
        from workbench.model.llama import LlamaModel

        calls = []
        real = skinny.skinny_linear

        def counted(x, weight, **kw):
            calls.append(tuple(weight.shape))
            return real(x, weight, **kw)

        monkeypatch.setattr(skinny, "skinny_linear", counted)
        monkeypatch.setattr(skinny, "faster_than_cublas", lambda x, weight: skinny_wins)
        torch.manual_seed(0)
        config = tiny_config(head_dim=16, num_key_value_heads=1, qkv_bias=True, o_bias=True,
                             mlp_bias=True, tie_word_embeddings=True, hidden_size=48,
                             intermediate_size=80)
        model = LlamaModel(config).eval()
        for p in model.parameters():
            p.data.add_(0.1 * torch.randn_like(p))
        logits = {linear: _step_logits(model, [3, 12, 1], [1, 20, 33], 4, linear=linear,
                                       attention="triton-rope") for linear in ("torch", "fastest")}
        torch.testing.assert_close(logits["fastest"], logits["torch"], rtol=1e-5, atol=1e-5)
        c = model.config
        expected = [(c.hidden_size, c.num_attention_heads * c.head_dim),  # o_proj
                    (c.hidden_size, c.intermediate_size)] * c.num_hidden_layers  # down_proj
        assert calls == (expected + [(c.vocab_size, c.hidden_size)] if skinny_wins else [])

    def test_faster_than_cublas_says_no_off_a_gpu():
        """Nothing can be timed on a CPU: no, and no answer kept for the shape."""
        from workbench.engine import skinny

        assert skinny.faster_than_cublas(torch.zeros(2, 16), torch.zeros(8, 16)) is False
        assert not skinny._choices

    def test_triton_linears_on_two_tp_ranks_equal_the_plain_step(tmp_path):
        """On tensor-parallel ranks each norm kernel adds the *summed* output of the block before
        (o_proj's and down's partial sums go through the all-reduce first): the logits are the
        plain TP step's, with biases on every projection and the vocabulary-parallel head."""
        from tests.helpers import tiny_config, write_tiny_checkpoint
        from tests.test_parallel_fastpath import _fast_vs_plain
        from workbench.parallel.launch import launch

        biased = tiny_config(vocab_size=80, hidden_size=64, intermediate_size=64,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             head_dim=16, qkv_bias=True, o_bias=True, mlp_bias=True)
        write_tiny_checkpoint(tmp_path, biased, seed=3)
        diffs = launch(_fast_vs_plain, 2, str(tmp_path), 3, "triton-rope", "triton", timeout_s=300)
        assert max(diffs) < 1e-4, diffs

    FUSED_AR = [  # world, rows, hidden, dtype, bias
        (1, 1, 64, torch.float32, False), (2, 3, 48, torch.float32, True),
        (4, 5, 64, torch.float32, True), (4, 2, 40, torch.bfloat16, False)]

    @pytest.mark.parametrize("world,rows,n,dtype,bias", FUSED_AR)
    def test_fused_allreduce_sums_every_rank_then_adds_and_norms(world, rows, n, dtype, bias):
        """The fused all-reduce kernel (:mod:`workbench.parallel.allreduce_norm`) over plain
        tensors standing for the ranks' buffers and signal pads, every peer already at call 1:
        rank ``world - 1`` sums all ``world`` partial sums at the second buffer's offset, adds
        the bias and the residual (in place) and applies RMSNorm as the unfused step does; it
        leaves its own call number (1) for each row in every rank's pad, and no other flag."""
        from workbench.parallel.allreduce_norm import allreduce_add_rms, reference_add_rms

        g = torch.Generator().manual_seed(world * 100 + rows)
        max_rows, rank = rows + 2, world - 1
        buffers = [torch.randn(2 * max_rows * n, generator=g).to(dtype) for _ in range(world)]
        pads = [torch.zeros(max_rows * world, dtype=torch.int32) for _ in range(world)]
        for r in range(rows):  # every peer's row r of call 1 written (its own flag: the kernel's)
            pads[rank][r * world:(r + 1) * world] = 1
            pads[rank][r * world + rank] = 0
        before = [p.clone() for p in pads]
        residual = torch.randn(rows, n, generator=g).to(dtype)
        weight = torch.randn(n, generator=g).to(dtype)
        b = torch.randn(n, generator=g).to(dtype) if bias else None
        offset = max_rows * n
        partials = [t[offset:offset + rows * n].view(rows, n) for t in buffers]
        want_h, want_r = reference_add_rms(partials, residual.clone(), weight, 1e-5, b)
        address = lambda ts: torch.tensor([t.data_ptr() for t in ts])  # noqa: E731
        h = allreduce_add_rms(address(buffers), address(pads), offset, residual, weight, 1e-5,
                              rank, b)
        tol = dict(rtol=0, atol=0) if dtype == torch.float32 else dict(rtol=1e-2, atol=7e-2)
        torch.testing.assert_close(residual, want_r, **tol)  # updated in place
        torch.testing.assert_close(h, want_h, **({"rtol": 1e-6, "atol": 1e-6}
                                                  if dtype == torch.float32 else tol))
        for p in range(world):  # this rank's flag for each row: call 1, in every rank's pad
            assert pads[p].view(max_rows, world)[:rows, rank].tolist() == [1] * rows
            pads[p].view(max_rows, world)[:rows, rank] = before[p].view(max_rows, world)[:rows, rank]
            assert torch.equal(pads[p], before[p])  # and no other flag changed

    def test_fused_allreduce_counts_a_peer_one_call_ahead_as_arrived():
        """A peer that saw this rank arrive may finish its call and arrive at the next before this
        rank reads its flag: a flag past this call's number counts as arrived (the wait compares
        by difference), and the sum is this call's."""
        from workbench.parallel.allreduce_norm import allreduce_add_rms

        world, n = 2, 16
        buffers = [torch.full((2 * n,), float(r + 1)) for r in range(world)]
        pads = [torch.zeros(world, dtype=torch.int32) for _ in range(world)]
        pads[0][1] = 2  # rank 1 is already at call 2; rank 0 is at call 1
        residual = torch.zeros(1, n)
        address = lambda ts: torch.tensor([t.data_ptr() for t in ts])  # noqa: E731
        allreduce_add_rms(address(buffers), address(pads), 0, residual, torch.ones(n), 1e-5, 0)
        assert residual.eq(3.0).all()  # 1 + 2
        assert pads[0].tolist() == [1, 2] and pads[1].tolist() == [1, 0]

    def test_fused_allreduce_refuses_what_does_not_fit():
        from workbench.errors import WorkbenchError
        from workbench.parallel.allreduce_norm import allreduce_add_rms

        two = torch.zeros(2, dtype=torch.int64)
        with pytest.raises(WorkbenchError, match="do not fit"):
            allreduce_add_rms(two, torch.zeros(3, dtype=torch.int64), 0, torch.zeros(1, 8),
                              torch.ones(8), 1e-5, 0)
        with pytest.raises(WorkbenchError, match="must be"):
            allreduce_add_rms(two, two, 0, torch.zeros(1, 8), torch.ones(4), 1e-5, 1)

    @pytest.mark.parametrize("checkpoint", ["bundled", "biased"])
    def test_fast_path_with_the_fused_allreduce_matches_gather(checkpoint, tmp_path):
        """The step whose o_proj and down write into the all-reduce's buffers and whose fused
        kernel adds the residual and applies the next norm (a rank alone, plain memory) gives the
        gather path's logits: the bundled model, and a checkpoint with biases on every
        projection (each bias added once, after the sum); its flags count its calls."""
        from tests.helpers import tiny_config, write_tiny_checkpoint
        from workbench.model.loading import load_model
        from workbench.parallel.allreduce_norm import AllReduceAddNorm

        if checkpoint == "biased":
            write_tiny_checkpoint(tmp_path, tiny_config(
                vocab_size=80, hidden_size=64, intermediate_size=64, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, qkv_bias=True, o_bias=True, mlp_bias=True),
                seed=3)
        with torch_threads(1):
            model = load_model("bundled" if checkpoint == "bundled" else str(tmp_path))
            fused = AllReduceAddNorm(None, 3, model.config.hidden_size, torch.float32,
                                     torch.device("cpu"))
            rows = ([9, 40, 17], [11, 22, 33], 16)
            want = _step_logits(model, *rows, attention="gather")
            got = _step_logits(model, *rows, attention="triton-rope", reduce_norm=fused)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert torch.equal(got.argmax(-1), want.argmax(-1))
        # each row's flag counts the calls that held it: the check's 2 (rows 0-1), then the steps'
        calls = fused._pad.tolist()
        assert calls[0] == calls[1] == calls[2] + 2 and calls[2] > 0 and fused.phase == 0

    def _fused_vs_plain(ctx, path: str, batch: int, vocab: bool) -> tuple[float, float]:
        """This TP rank's fast step with the fused all-reduce (uncompiled, the ranks' buffers
        and pads shared files) against the plain TP step: max |fused - plain| of its logits, and
        max |second - first| of two fused steps in a row (the buffers alternate across steps)."""
        from tests.test_parallel_fastpath import tp_decoder
        from workbench.parallel.replay import fused_step

        with torch.inference_mode():
            dec = tp_decoder(ctx, path, batch, vocab_parallel=vocab)
            step = fused_step(dec, compile=False, attention="triton-rope", allreduce="fused")
            first, second = step(), step()
            plain = dec.forward(dec.batch(dec.pos))
        return float((first - plain).abs().max()), float((second - first).abs().max())

    @pytest.mark.parametrize("ranks, vocab", [(2, False), (4, True)])
    def test_fused_allreduce_on_tp_ranks_gives_the_plain_step(ranks, vocab, tmp_path):
        """TP ranks as processes, each mapping every rank's buffer and signal pad (shared files
        standing for symmetric memory): the fused kernels wait for each other through the flags,
        sum every rank's partial products and add the biases once - the plain TP step's logits,
        twice in a row; TP 4 with a vocabulary-parallel head (81 rows: the last shard padded)."""
        from tests.helpers import tiny_config, write_tiny_checkpoint
        from workbench.parallel.launch import launch

        biased = tiny_config(vocab_size=81, hidden_size=64, intermediate_size=64,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                             head_dim=16, qkv_bias=True, o_bias=True, mlp_bias=True)
        write_tiny_checkpoint(tmp_path, biased, seed=5)
        results = launch(_fused_vs_plain, ranks, str(tmp_path), 3, vocab, timeout_s=300)
        assert max(d for d, _ in results) < 1e-4, results
        assert max(again for _, again in results) == 0.0, results
