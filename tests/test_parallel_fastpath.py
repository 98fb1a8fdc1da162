"""The engine's fast decode step on tensor-parallel ranks (``bench tp --fast``): fused weights,
the two all-reduces of each layer between its pieces, biases added once after the sum. On 2 gloo
ranks (CPU: no torch.compile, gathered attention) it gives the logits of the plain TP step."""

from __future__ import annotations

import torch

from tests.helpers import BUNDLED_DIR, tiny_config, write_tiny_checkpoint
from workbench.parallel.engine import RankWorker
from workbench.parallel.launch import launch
from workbench.parallel.measure import DecodeBench, _Decoder, fused_step
from workbench.parallel.plan import ParallelConfig


def _fast_vs_plain(ctx, path: str, batch: int) -> float:
    """Max |fast - plain| of this rank's logits for one decode step after a 13-token prompt."""
    par = ParallelConfig(tp=ctx.world_size)
    bench = DecodeBench(path, (par,), (batch,), context_len=13, steps=1, warmup=1,
                        dtype="float32")
    worker = RankWorker.load(ctx, path, par, torch.float32)
    with torch.inference_mode():
        dec = _Decoder(worker, batch, bench)
        fast = fused_step(dec, compile=False, attention="gather")()  # [B, vocab]
        plain = dec.forward(dec.batch(dec.pos))  # [B, vocab]
    return float((fast - plain).abs().max())


def test_fast_step_on_two_tp_ranks_equals_the_plain_step(tmp_path):
    biased = tiny_config(vocab_size=80, hidden_size=64, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, qkv_bias=True,
                         o_bias=True, mlp_bias=True)
    write_tiny_checkpoint(tmp_path, biased, seed=3)
    for path, batch in ((str(BUNDLED_DIR), 3), (str(tmp_path), 2)):
        diffs = launch(_fast_vs_plain, 2, path, batch, timeout_s=120)
        assert max(diffs) < 1e-4, (path, diffs)
