"""The block manager of paged KV storage (vLLM's PagedAttention): who owns which block.

KV memory is cut into ``num_blocks`` fixed blocks of ``block_size`` tokens. A sequence holds a
*block table*, the list of its blocks in token order, so token ``t`` of the sequence lives at

    block_table[t // block_size] * block_size + t % block_size      (its *slot* in the pool)

and a sequence only ever reserves whole blocks for the tokens it has: the waste is at most the
unfilled tail of its last block, instead of a max-length reservation.

Blocks are reference counted, so sequences can share them:

- **prefix caching**: a *full* block is named by a hash of its tokens and of every token before
  it (the hash of the previous block), so two requests with the same prefix find the same blocks;
  a freed full block stays in the cache (evictable, least recently used first) until its memory
  is needed again;
- **fork + copy-on-write**: parallel samples of one prompt share the prompt's blocks; the first
  write into a shared block copies it to a private one.

Every block is at any time either free (refcount 0, maybe still cached) or owned (refcount >= 1):
tests check that no block leaks and no block has two writers. Taught in notebook 03.
"""

from __future__ import annotations

from collections import OrderedDict

from workbench.errors import WorkbenchError
from workbench.plug import pluggable


@pluggable("paged.slots")  # lab 03: a student's lookup can run in the engine
def slot_mapping(block_table: list[int], start: int, num_tokens: int,
                 block_size: int) -> list[int]:
    """Pool slots of a sequence's tokens ``start .. start + num_tokens - 1``: the block-table lookup.

    Token ``t`` lives in block ``block_table[t // block_size]`` at offset ``t % block_size``, so its
    slot in the pool (viewed as ``[num_blocks * block_size, ...]``) is
    ``block_table[t // block_size] * block_size + t % block_size``. The engine computes where each
    new token's key and value are written with it, every step (notebook 03).
    """
    return [block_table[t // block_size] * block_size + t % block_size
            for t in range(start, start + num_tokens)]


def block_hash(parent: int | None, tokens: tuple[int, ...]) -> int:
    """The prefix-cache name of a full block: its tokens and the hash of the block before it."""
    return hash((parent, tokens))


class BlockManager:
    """Free list, reference counts and the prefix cache of one pool of KV blocks."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise WorkbenchError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise WorkbenchError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.refcount = [0] * num_blocks
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # never cached, pop from end
        self._evictable: OrderedDict[int, None] = OrderedDict()  # free but cached, LRU first
        self._hash_of: dict[int, int] = {}  # block -> hash, for cached blocks
        self._block_of: dict[int, int] = {}  # hash -> block
        self.cache_hits = 0  # blocks found in the prefix cache (tokens saved = hits * block_size)

    # --- counting ---------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (never used, or cached but unreferenced)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # --- allocation -------------------------------------------------------------------------
    def allocate(self) -> int:
        """One private block (refcount 1); evicts the least recently used cached block if needed."""
        if self._free:
            block = self._free.pop()
        elif self._evictable:
            block, _ = self._evictable.popitem(last=False)
            del self._block_of[self._hash_of.pop(block)]
        else:
            raise WorkbenchError("out of KV blocks: the scheduler must preempt before allocating")
        self.refcount[block] = 1
        return block

    def share(self, block: int) -> int:
        """Another owner for ``block`` (fork, or a prefix-cache hit)."""
        if self.refcount[block] == 0:  # a cached block coming back into use
            del self._evictable[block]
        self.refcount[block] += 1
        return block

    def release(self, block: int) -> None:
        """Drop one owner; a block nobody owns becomes free (and stays cached if it has a hash)."""
        if self.refcount[block] < 1:
            raise WorkbenchError(f"block {block} released more often than it was taken")
        self.refcount[block] -= 1
        if self.refcount[block] == 0:
            if block in self._hash_of:
                self._evictable[block] = None
            else:
                self._free.append(block)

    def release_all(self, table: list[int]) -> None:
        for block in reversed(table):  # tail first: the prompt's blocks stay cached longest
            self.release(block)
        table.clear()

    def fork(self, table: list[int]) -> list[int]:
        """A child sequence's table sharing every block of ``table`` (parallel samples)."""
        return [self.share(b) for b in table]

    def writable(self, table: list[int], index: int) -> tuple[int, int | None]:
        """Make ``table[index]`` safe to write (copy-on-write).

        Returns (block, source): ``source`` is the shared block whose contents the caller must
        copy into the new private ``block``, or None when the block was already private.
        """
        block = table[index]
        if self.is_private(block):
            return block, None
        new = self.allocate()
        self.release(block)
        table[index] = new
        return new, block

    # --- prefix cache -----------------------------------------------------------------------
    def lookup(self, tokens: list[int] | tuple[int, ...],
               limit: int) -> tuple[list[int], list[int]]:
        """The longest full-block prefix of ``tokens[:limit]`` found in the cache, now shared:
        (blocks, their hashes)."""
        found, hashes, parent = [], [], None
        for start in range(0, limit - self.block_size + 1, self.block_size):
            h = block_hash(parent, tuple(tokens[start:start + self.block_size]))
            block = self._block_of.get(h)
            if block is None:
                break
            found.append(self.share(block))
            hashes.append(h)
            parent = h
        self.cache_hits += len(found)
        return found, hashes

    def count_cached(self, tokens: list[int] | tuple[int, ...], limit: int) -> tuple[int, int]:
        """(cached blocks of the prefix, of them evictable now) - a dry run of :meth:`lookup`."""
        hits = evictable = 0
        parent = None
        for start in range(0, limit - self.block_size + 1, self.block_size):
            h = block_hash(parent, tuple(tokens[start:start + self.block_size]))
            block = self._block_of.get(h)
            if block is None:
                break
            hits += 1
            evictable += self.refcount[block] == 0
            parent = h
        return hits, evictable

    def publish(self, table: list[int], tokens: list[int] | tuple[int, ...], num_tokens: int,
                hashes: list[int]) -> None:
        """Name the blocks filled since the last call (``hashes`` grows with them) in the cache."""
        bs = self.block_size
        for i in range(len(hashes), num_tokens // bs):
            h = block_hash(hashes[-1] if hashes else None, tuple(tokens[i * bs:(i + 1) * bs]))
            block = table[i]
            if block not in self._hash_of and h not in self._block_of:
                self._hash_of[block], self._block_of[h] = h, block
            hashes.append(h)

    def is_cached(self, block: int) -> bool:
        """Named in the prefix cache (owned or not): a later request with its prefix finds it."""
        return block in self._hash_of

    def is_private(self, block: int) -> bool:
        """Owned by one sequence and not in the prefix cache: safe to write in place."""
        return self.refcount[block] == 1 and block not in self._hash_of

    # --- checks -----------------------------------------------------------------------------
    def check(self, tables: list[list[int]]) -> None:
        """Raise if the refcounts disagree with the live tables, or a block is lost or doubled."""
        counts = [0] * self.num_blocks
        for table in tables:
            for block in table:
                counts[block] += 1
        if counts != self.refcount:
            bad = [b for b in range(self.num_blocks) if counts[b] != self.refcount[b]]
            raise AssertionError(f"refcounts disagree with block tables at blocks {bad[:8]}")
        free = set(self._free) | set(self._evictable)
        if len(free) != len(self._free) + len(self._evictable):
            raise AssertionError("a block is both in the free list and cached")
        owned = {b for b in range(self.num_blocks) if self.refcount[b] > 0}
        if free & owned or len(free | owned) != self.num_blocks:
            raise AssertionError("a block is lost, or free and owned at once")
