"""Paged KV storage (vLLM's PagedAttention): one pool of fixed-size blocks per layer.

Per layer the keys live in one tensor ``[num_blocks, block_size, Hkv, d]`` (values alike). A token
is written at its *slot*, ``block * block_size + offset``, which the engine computes from the
sequence's block table (:mod:`workbench.kv.blocks`); attention reads a sequence's keys back
through its block table. Two attention paths share that layout:

- **gather** (CPU and GPU, the reference): ``pool[block_tables]`` copies each sequence's blocks
  into a dense ``[B, Hkv, S, d]`` tensor, then SDPA runs under a length mask. Its shapes depend only
  on the batch size and the number of table columns, so a decode step can be captured in a CUDA
  graph for a few (batch, context) buckets (:mod:`workbench.engine.cudagraph`);
- a real engine's kernel (vLLM's paged attention, FlashInfer) reads the blocks in place instead of
  gathering them; the gather costs one extra write and read of the context's keys and values.

Blocks also move: :meth:`copy_block` for copy-on-write, :meth:`swap_out` / :meth:`swap_in` to and
from a CPU pool when the scheduler preempts a sequence by swapping. Taught in notebook 03.
"""

from __future__ import annotations

import torch

from workbench.attention.masks import causal_mask
from workbench.attention.sdpa import sdpa
from workbench.kv.base import KVCache
from workbench.model.batch import ForwardBatch
from workbench.model.config import ModelConfig


def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    """Keys and values of one token over all layers: 2 x layers x Hkv x d x element size."""
    return (2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim
            * torch.empty((), dtype=dtype).element_size())


def gather_blocks(pool: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """Blocks of each row of ``tables`` [B, nb] from ``pool`` [blocks, block_size, Hkv, d] as one
    dense [B, Hkv, nb * block_size, d] (the portable paged read)."""
    B, nb = tables.shape
    blocks = pool[tables]  # [B, nb, block_size, Hkv, d]
    return blocks.reshape(B, nb * pool.shape[1], *pool.shape[2:]).transpose(1, 2)


class PagedKVCache(KVCache):
    """Block pools per layer; the packed batch's ``layout`` carries slots and block tables.

    ``layers``: the layers this storage serves (a pipeline stage's); the others hold no pool
    (``None``), and block moves skip them."""

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 num_cpu_blocks: int = 0, layers: range | None = None) -> None:
        shape = (num_blocks, block_size, config.num_key_value_heads, config.head_dim)
        held = range(config.num_hidden_layers) if layers is None else layers
        mine = [i in held for i in range(config.num_hidden_layers)]
        self.k = [torch.zeros(shape, device=device, dtype=dtype) if m else None for m in mine]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) if m else None for m in mine]
        cpu_shape = (num_cpu_blocks,) + shape[1:]
        pin = torch.device(device).type == "cuda"
        self.cpu_k = [torch.zeros(cpu_shape, dtype=dtype, pin_memory=pin) if m else None
                      for m in mine]
        self.cpu_v = [torch.zeros(cpu_shape, dtype=dtype, pin_memory=pin) if m else None
                      for m in mine]
        self.num_blocks, self.block_size, self.num_cpu_blocks = num_blocks, block_size, num_cpu_blocks
        self.device = torch.device(device)
        self.move_log: list | None = None  # set: every block move is noted, (name, args)

    def _note(self, name: str, *args) -> None:
        """Note a block move for whoever replays them (the followers of parallel generation)."""
        if self.move_log is not None:
            self.move_log.append((name, args))

    def _pools(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(device pool, CPU pool) of every held layer, keys then values."""
        return [(p, c) for p, c in zip(self.k + self.v, self.cpu_k + self.cpu_v) if p is not None]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor,
               batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the packed tokens' k/v [1, Hkv, N, d] at their slots; return the pools."""
        slots = batch.layout.slot_mapping  # [N] block * block_size + offset
        Hkv, d = k.shape[1], k.shape[3]
        self.k[layer].view(-1, Hkv, d)[slots] = k[0].transpose(0, 1)  # [N, Hkv, d]
        self.v[layer].view(-1, Hkv, d)[slots] = v[0].transpose(0, 1)
        return self.k[layer], self.v[layer]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               batch: ForwardBatch) -> torch.Tensor:
        """Packed attention, q [1, H, N, d] -> [1, H, N, d]: decodes batched, prefills one by one."""
        k_pool, v_pool = self.update(layer, k, v, batch)
        lay = batch.layout
        nd, parts = lay.num_decodes, []
        if nd:
            parts.append(self._decode(q[0, :, :nd], k_pool, v_pool, lay))  # [1, H, nd, d]
        start = nd
        for i in range(nd, len(lay.query_lens)):
            n, ctx = lay.query_lens[i], lay.context_lens[i]
            table = lay.block_tables[i:i + 1, :-(-ctx // self.block_size)]  # [1, blocks]
            keys, values = self.gather(k_pool, table), self.gather(v_pool, table)
            q_seq = q[:, :, start:start + n]  # [1, H, n, d]
            mask = None if n == ctx else causal_mask(n, ctx, q.device)[None, None]
            parts.append(sdpa(q_seq, keys[:, :, :ctx], values[:, :, :ctx], mask, causal=True))
            start += n
        return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]

    def gather(self, pool: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        return gather_blocks(pool, tables)

    def _decode(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                lay) -> torch.Tensor:
        """One query per decoding sequence, q [H, nd, d], over its blocks: [1, H, nd, d]."""
        nd = q.shape[1]
        tables = lay.block_tables[:nd, :lay.decode_blocks]  # [nd, nb]
        if "decode_mask" not in lay.scratch:  # the same for every layer of this step
            S = lay.decode_blocks * self.block_size
            lay.scratch["decode_mask"] = (torch.arange(S, device=q.device)
                                          < lay.context_lens_t[:nd, None])[:, None, None]
        keys, values = self.gather(k_pool, tables), self.gather(v_pool, tables)  # [nd,Hkv,S,d]
        out = sdpa(q.transpose(0, 1)[:, :, None], keys, values,  # q as [nd, H, 1, d]
                   lay.scratch["decode_mask"], causal=False)  # [nd, H, 1, d]
        return out[:, :, 0].transpose(0, 1)[None]  # [1, H, nd, d]

    def advance(self, batch: ForwardBatch) -> None:
        pass  # the engine's block tables and lengths already say what is cached

    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p, _ in self._pools())

    # --- moving blocks ----------------------------------------------------------------------
    def copy_block(self, src: int, dst: int) -> None:
        """Copy-on-write: a shared block's contents into a sequence's new private block."""
        self._note("copy_block", src, dst)
        for pool, _ in self._pools():
            pool[dst].copy_(pool[src])

    def swap_out(self, blocks: list[int], cpu_blocks: list[int]) -> None:
        """Copy device blocks to the CPU pool (preemption by swapping)."""
        self._note("swap_out", blocks, cpu_blocks)
        src = torch.tensor(blocks, device=self.device)
        dst = torch.tensor(cpu_blocks)
        for pool, cpu in self._pools():
            cpu[dst] = pool[src].cpu()

    def swap_in(self, cpu_blocks: list[int], blocks: list[int]) -> None:
        """Copy CPU-pool blocks back into (new) device blocks (resuming a swapped sequence)."""
        self._note("swap_in", cpu_blocks, blocks)
        src = torch.tensor(cpu_blocks)
        dst = torch.tensor(blocks, device=self.device)
        for pool, cpu in self._pools():
            pool[dst] = cpu[src].to(pool.device, non_blocking=True)
