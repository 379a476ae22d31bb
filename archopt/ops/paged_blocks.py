"""Blocks of a paged KV cache as bookkeeping: ids, reference counts, a free list and the
prefix cache (a chained digest of a full block's tokens -> the block holding them).

No tensors here: ``archopt.ops.paged_kv.PagedKVCache`` owns the pool and asks this allocator
which block to use. Why chained digests rather than a radix tree: see that module.
"""

from __future__ import annotations

import hashlib
import heapq
from array import array
from collections import OrderedDict
from collections.abc import Sequence


def block_digest(parent: bytes, tokens: Sequence[int]) -> bytes:
    """The key of a full block: its tokens chained with its parent's key (b"" for the first)."""
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


class BlockAllocator:
    """Block ids, reference counts, a free list and the prefix cache (digest -> block).

    Bookkeeping only, no tensors. A block is in exactly one state: referenced (``refs > 0``),
    cached (unreferenced but registered under a digest, evictable, least recently used first)
    or free. ``allocate`` takes the lowest free id, so live blocks stay packed at low ids.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.refs = [0] * num_blocks
        self._free = list(range(num_blocks))  # a heap
        self._cached: OrderedDict[int, None] = OrderedDict()  # LRU: oldest first
        self.digest_of: dict[int, bytes] = {}
        self.block_of: dict[bytes, int] = {}
        self.evictions = 0

    def grow(self, num_blocks: int) -> None:
        for b in range(self.num_blocks, num_blocks):
            self.refs.append(0)
            heapq.heappush(self._free, b)
        self.num_blocks = max(self.num_blocks, num_blocks)

    @property
    def num_free(self) -> int:
        """Blocks ``allocate`` can hand out (free ones, then cached ones by eviction)."""
        return len(self._free) + len(self._cached)

    @property
    def num_unused(self) -> int:
        """Blocks neither referenced nor cached: taking one evicts nothing."""
        return len(self._free)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def allocate(self) -> int | None:
        """A block with one reference, or None when every block is referenced."""
        if self._free:
            block = heapq.heappop(self._free)
        elif self._cached:
            block, _ = self._cached.popitem(last=False)
            self.unregister(block)
            self.evictions += 1
        else:
            return None
        self.refs[block] = 1
        return block

    def ref(self, block: int) -> None:
        if self.refs[block] == 0:
            self._cached.pop(block)  # only cached blocks are found unreferenced
        self.refs[block] += 1

    def release(self, block: int) -> None:
        if self.refs[block] < 1:
            raise ValueError(f"block {block} released more often than referenced")
        self.refs[block] -= 1
        if self.refs[block] == 0:
            if block in self.digest_of:
                self._cached[block] = None  # most recently used last
            else:
                heapq.heappush(self._free, block)

    def lookup(self, digest: bytes) -> int | None:
        return self.block_of.get(digest)

    def register(self, block: int, digest: bytes) -> None:
        """Make ``block`` findable by ``digest`` (a block already there keeps the digest)."""
        if digest not in self.block_of and block not in self.digest_of:
            self.block_of[digest] = block
            self.digest_of[block] = digest

    def unregister(self, block: int) -> None:
        digest = self.digest_of.pop(block, None)
        if digest is not None:
            del self.block_of[digest]
