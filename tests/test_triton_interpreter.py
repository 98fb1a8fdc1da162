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

import pytest
import torch

from tests.helpers import paged_attention_case, rope_attention_outputs, torch_threads

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]

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

    def test_write_kv_stores_each_row_at_its_slot():
        g = torch.Generator().manual_seed(0)
        k_pool, v_pool = torch.zeros(6, 4, 2, 16), torch.zeros(6, 4, 2, 16)  # 24 slots
        k, v = torch.randn(3, 2, 16, generator=g), torch.randn(3, 2, 16, generator=g)
        slots = torch.tensor([5, 0, 22])
        write_kv(k_pool, v_pool, k, v, slots)
        assert torch.equal(k_pool.view(24, 2, 16)[slots], k)
        assert torch.equal(v_pool.view(24, 2, 16)[slots], v)
        assert k_pool.view(24, 2, 16).abs().sum(dim=(1, 2)).nonzero().flatten().tolist() == [0, 5, 22]

    def test_fast_path_with_triton_attention_matches_gather():
        """The engine's fused decode step with the Triton kernels (write, split, combine; or
        the RoPE-and-write fused kernel) gives the gather path's logits on the bundled model, at
        rows of different lengths."""
        from workbench.engine.fastpath import FusedDecoder
        from workbench.kv.paged import PagedKVCache
        from workbench.model.loading import load_model

        with torch_threads(1):
            model = load_model("bundled")
            c, bs = model.config, 16
            lens = torch.tensor([9, 40, 17])  # tokens after this step
            B, nb = len(lens), 3
            tables = torch.arange(B * nb).view(B, nb)
            positions = lens - 1
            slots = tables[torch.arange(B), positions // bs] * bs + positions % bs
            ids = torch.tensor([11, 222, 3333])
            logits = {}
            for attention in ("gather", "triton", "triton-rope"):
                kv = PagedKVCache(c, B * nb, bs, torch.device("cpu"), torch.float32)
                g = torch.Generator().manual_seed(1)
                for i in range(c.num_hidden_layers):  # the same earlier keys and values
                    kv.k[i].copy_(torch.randn(kv.k[i].shape, generator=g))
                    kv.v[i].copy_(torch.randn(kv.v[i].shape, generator=g))
                step = FusedDecoder(model, kv, compile=False, attention=attention)
                with torch.inference_mode():
                    logits[attention] = step(ids, positions, slots, tables, lens)
        for attention in ("triton", "triton-rope"):
            torch.testing.assert_close(logits[attention], logits["gather"], rtol=1e-4, atol=1e-4)
            assert torch.equal(logits[attention].argmax(-1), logits["gather"].argmax(-1))
