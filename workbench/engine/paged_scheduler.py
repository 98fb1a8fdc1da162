"""Scheduling under memory pressure with paged KV storage (vLLM's scheduler, simplified).

A sequence takes KV blocks as it grows instead of a max-length slot, so many more sequences fit,
but the pool can run dry mid-generation. Every step:

1. each running sequence (oldest first) gets room for its next token(s); when no block is free,
   the *newest* running sequence is preempted - its blocks freed (``recompute``: it will prefill
   its prompt and generated tokens again) or copied to CPU memory (``swap``) - until it fits;
2. swapped-out sequences come back first, their blocks copied in again;
3. waiting requests are admitted first come, first served, while a lane (``max_num_seqs``), the
   token budget and enough free blocks for the prompt allow; with the prefix cache, the prompt's
   leading full blocks already in memory are shared instead of computed.

A preempted sequence resumes with exactly the tokens it had, so its output is unchanged (greedy,
or sampled from its own generator). Taught in notebook 03.
"""

from __future__ import annotations

from collections import deque

from workbench.engine.scheduler import EngineConfig, Scheduler, Sequence, Step
from workbench.kv.blocks import BlockManager


class PagedScheduler(Scheduler):
    """Admission by free blocks; preemption by recompute or swap; prefix-cache hits."""

    def __init__(self, config: EngineConfig, num_blocks: int) -> None:
        super().__init__(config)
        self.blocks = BlockManager(num_blocks, config.block_size)
        self.cpu_blocks = BlockManager(max(1, config.num_cpu_blocks), config.block_size)
        self.swapped: deque[Sequence] = deque()
        self.num_preemptions = 0

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def schedule(self) -> Step:
        step, budget = Step(), self.config.max_num_batched_tokens
        for seq in list(self.running):  # oldest first: the newest give way
            if seq not in self.running:
                continue  # preempted to make room for an older one
            n = 1 if not seq.prefilling else min(len(seq.tokens) - seq.num_cached, budget)
            if n < 1:
                continue  # a prefill under way, but this step's budget is spent
            while not self._fits(seq, n):
                self._preempt(self.running[-1], step)
                if seq.slot is None:
                    break
            else:
                self._reserve(seq, n, step)
                if seq.prefilling:
                    step.prefills.append((seq, n))
                else:
                    step.decodes.append(seq)
                budget -= n
        while self.swapped and self.free_slots and budget > 0:  # resume swapped sequences
            seq = self.swapped[0]
            if self.blocks.blocks_needed(seq.num_cached + 1) > self.blocks.num_free:
                break
            self.swapped.popleft()
            self._swap_in(seq, step)  # only decoding sequences are swapped
            step.decodes.append(seq)
            budget -= 1
        while self.waiting and self.free_slots and budget > 0 and not self.swapped:
            if not self._admit(self.waiting[0], budget, step):
                break
            budget -= step.prefills[-1][1]
        return step

    def _admit(self, seq: Sequence, budget: int, step: Step) -> bool:
        """Start (or restart, after recompute preemption) the prefill of the oldest waiting one."""
        limit = len(seq.tokens) - 1  # the last token is always computed: its logits are due
        hits, evictable = (self.blocks.count_cached(seq.tokens, limit)
                           if self.config.prefix_caching else (0, 0))
        cached = hits * self.config.block_size
        n = min(len(seq.tokens) - cached, budget)
        chunkable = self.config.chunked_prefill or seq.num_preemptions > 0
        if n < len(seq.tokens) - cached and not chunkable:
            return False  # first come, first served: wait for a step with room for the prompt
        new_blocks = self.blocks.blocks_needed(cached + n) - hits
        if new_blocks > self.blocks.num_free - evictable:
            return False
        self.waiting.popleft()
        if hits:
            seq.block_table, seq.block_hashes = self.blocks.lookup(seq.tokens, limit)
        seq.num_cached = cached
        seq.slot = self.free_slots.pop()
        self.running.append(seq)
        self._reserve(seq, n, step)
        step.prefills.append((seq, n))
        return True

    def _fits(self, seq: Sequence, n: int) -> bool:
        """Whether ``n`` more tokens of ``seq`` can be stored with the blocks free now."""
        bs, table = self.config.block_size, seq.block_table
        need = self.blocks.blocks_needed(seq.num_cached + n) - len(table)
        if seq.num_cached % bs and not self.blocks.is_private(table[seq.num_cached // bs]):
            need += 1  # its partly filled last block is shared: copy on write
        return need <= self.blocks.num_free

    def _reserve(self, seq: Sequence, n: int, step: Step) -> None:
        """Blocks for ``seq``'s next ``n`` tokens: copy a shared last block, then append new ones."""
        bs, table = self.config.block_size, seq.block_table
        if seq.num_cached % bs:
            block, source = self.blocks.writable(table, seq.num_cached // bs)
            if source is not None:
                step.copies.append((source, block))
        while len(table) * bs < seq.num_cached + n:
            table.append(self.blocks.allocate())

    def _preempt(self, seq: Sequence, step: Step) -> None:
        """Free ``seq``'s device blocks: to the CPU pool (swap) or dropped (recompute)."""
        self.running.remove(seq)
        self.free_slots.append(seq.slot)
        seq.slot, seq.num_preemptions = None, seq.num_preemptions + 1
        self.num_preemptions += 1
        step.preempted.append(seq)
        full = len(seq.block_table)
        if (self.config.preemption == "swap" and not seq.prefilling
                and full <= self.cpu_blocks.num_free and self.config.num_cpu_blocks):
            seq.cpu_blocks = [self.cpu_blocks.allocate() for _ in range(full)]
            step.swap_out += list(zip(seq.block_table, seq.cpu_blocks))
            self.blocks.release_all(seq.block_table)
            self.swapped.append(seq)
        else:  # recompute: forget the KV, prefill prompt + generated tokens again later
            self.blocks.release_all(seq.block_table)
            seq.num_cached, seq.block_hashes = 0, []
            self.waiting.appendleft(seq)

    def _swap_in(self, seq: Sequence, step: Step) -> None:
        seq.block_table = [self.blocks.allocate() for _ in seq.cpu_blocks]
        step.swap_in += list(zip(seq.cpu_blocks, seq.block_table))
        self.cpu_blocks.release_all(seq.cpu_blocks)
        seq.slot = self.free_slots.pop()
        self.running.append(seq)
        self._reserve(seq, 1, step)

    def cached(self, seq: Sequence) -> None:
        """After a step: name ``seq``'s newly filled blocks in the prefix cache."""
        if self.config.prefix_caching:
            self.blocks.publish(seq.block_table, seq.tokens, seq.num_cached, seq.block_hashes)

    def finish(self, seq: Sequence) -> None:
        """Take a sequence out (finished or cancelled); its blocks and lane are free at once."""
        for queue in (self.waiting, self.swapped):
            if seq in queue:
                queue.remove(seq)
        if seq in self.running:
            self.running.remove(seq)
            self.free_slots.append(seq.slot)
        self.blocks.release_all(seq.block_table)
        self.cpu_blocks.release_all(seq.cpu_blocks)
        seq.slot = None

    def check(self, step: Step) -> None:
        """Raise unless every block is owned exactly as the tables say and each block this step
        writes has exactly one writer (tests call it after every ``schedule``)."""
        self.blocks.check([s.block_table for s in self.running])
        self.cpu_blocks.check([s.cpu_blocks for s in self.swapped])
        bs, written = self.config.block_size, set()
        for seq, n in step.scheduled:
            for p in range(seq.num_cached, seq.num_cached + n):
                block = seq.block_table[p // bs]
                if not self.blocks.is_private(block):
                    raise AssertionError(f"request {seq.request.id} writes shared block {block}")
                if (block, p % bs) in written:
                    raise AssertionError(f"two writers for slot {p % bs} of block {block}")
                written.add((block, p % bs))
