"""Block accounting of a paged KV cache: which request holds how many blocks, and, with prefix
caching, which prompt blocks are shared.

Prefix caching as vLLM's automatic prefix caching does it: a prompt's whole blocks are known by the
chained hash of their tokens (`prefix`); a request finding its leading blocks in the cache takes them
instead of computing them, and shares them with every other request holding them (one block, however
many hold it). A block nobody holds any more stays cached but counts as free: it is evicted, least
recently freed first, when a block is needed.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field


@dataclass
class _Held:
    private: int  # blocks of this request alone
    shared: tuple[Hashable, ...] = ()  # its prompt's cached blocks, by hash
    hit: int = 0  # leading blocks it found cached


@dataclass
class _Prefixes:
    """Cached prompt blocks: those held (by how many requests), and those free but not evicted yet."""

    held: dict[Hashable, int] = field(default_factory=dict)
    evictable: OrderedDict[Hashable, None] = field(default_factory=OrderedDict)

    def leading(self, prefix: Sequence[Hashable]) -> int:
        n = 0
        for h in prefix:
            if h not in self.held and h not in self.evictable:
                break
            n += 1
        return n


class PagedKVCache:
    """`total_blocks`, of which `reserved_blocks` hold no sequence (vLLM's null block). With
    `prefix_caching`, prompt blocks given by hash are shared and kept cached after their requests."""

    def __init__(self, total_blocks: int, tokens_per_block: int, reserved_blocks: int = 0,
                 prefix_caching: bool = False) -> None:
        if total_blocks <= reserved_blocks or tokens_per_block < 1:
            raise ValueError("total_blocks must exceed reserved_blocks and tokens_per_block must be >= 1")
        self.total_blocks = total_blocks
        self.tokens_per_block = tokens_per_block
        self.usable_blocks = total_blocks - reserved_blocks
        self.prefix_caching = prefix_caching
        self._held: dict[Hashable, _Held] = {}
        self._private = 0
        self._prefixes = _Prefixes()

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.tokens_per_block)

    def try_allocate(self, request_id: Hashable, tokens: int, prefix: Sequence[Hashable] = ()) -> bool:
        """Reserve blocks for `tokens` tokens, all or nothing; with prefix caching, the whole blocks of
        its prompt known by `prefix` (hashes, first block first) are taken from the cache when there and
        shared from then on. `hit_blocks` then tells how many leading ones were found."""
        if request_id in self._held:
            raise ValueError(f"request {request_id!r} already holds blocks")
        blocks = self.blocks_for(tokens)
        shared = tuple(prefix[:blocks]) if self.prefix_caching else ()
        hit = self._prefixes.leading(shared)
        # New blocks: every block but the cached ones somebody holds (those cost nothing more); cached
        # free ones are taken back from the free blocks.
        taken = blocks - sum(1 for h in shared[:hit] if h in self._prefixes.held)
        if taken > self.free_blocks:
            return False
        for h in shared:
            self._prefixes.evictable.pop(h, None)
            self._prefixes.held[h] = self._prefixes.held.get(h, 0) + 1
        self._held[request_id] = _Held(blocks - len(shared), shared, hit)
        self._private += blocks - len(shared)
        self._trim()
        return True

    def hit_blocks(self, request_id: Hashable) -> int:
        """Leading prompt blocks the request found cached when it was allocated."""
        return self._held[request_id].hit

    def grow(self, request_id: Hashable, tokens: int) -> bool:
        """Hold blocks for `tokens` tokens of a request that holds some: the blocks it lacks, all or
        nothing (a paged engine allocating as a sequence grows)."""
        held = self._held[request_id]
        more = self.blocks_for(tokens) - held.private - len(held.shared)
        if more > self.free_blocks:
            return False
        held.private += max(0, more)
        self._private += max(0, more)
        self._trim()
        return True

    def free(self, request_id: Hashable) -> int:
        """Release a request's blocks; returns how many it held. Freeing twice is a no-op. Its shared
        blocks nobody else holds stay cached, the most recently freed."""
        held = self._held.pop(request_id, None)
        if held is None:
            return 0
        self._private -= held.private
        # Last block first, as vLLM frees them: a prompt's tail is evicted before its head.
        for h in reversed(held.shared):
            left = self._prefixes.held[h] - 1
            if left:
                self._prefixes.held[h] = left
            else:
                del self._prefixes.held[h]
                self._prefixes.evictable[h] = None
        self._trim()
        return held.private + len(held.shared)

    def _trim(self) -> None:
        """Cached free blocks live in the free blocks: evict the oldest beyond them."""
        while len(self._prefixes.evictable) > self.free_blocks:
            self._prefixes.evictable.popitem(last=False)

    @property
    def used_blocks(self) -> int:
        return self._private + len(self._prefixes.held)

    @property
    def cached_free_blocks(self) -> int:
        """Free blocks still holding a cached prompt block."""
        return len(self._prefixes.evictable)

    @property
    def free_blocks(self) -> int:
        return self.usable_blocks - self.used_blocks

    @property
    def utilization(self) -> float:
        return self.used_blocks / self.usable_blocks
