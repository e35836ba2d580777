"""Block accounting of a paged KV cache: which request holds how many blocks."""

from __future__ import annotations

from collections.abc import Hashable


class PagedKVCache:
    """`total_blocks`, of which `reserved_blocks` hold no sequence (vLLM's null block)."""

    def __init__(self, total_blocks: int, tokens_per_block: int, reserved_blocks: int = 0) -> None:
        if total_blocks <= reserved_blocks or tokens_per_block < 1:
            raise ValueError("total_blocks must exceed reserved_blocks and tokens_per_block must be >= 1")
        self.total_blocks = total_blocks
        self.tokens_per_block = tokens_per_block
        self.usable_blocks = total_blocks - reserved_blocks
        self._held: dict[Hashable, int] = {}
        self._used = 0

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.tokens_per_block)

    def try_allocate(self, request_id: Hashable, tokens: int) -> bool:
        """Reserve blocks for `tokens` tokens; all or nothing."""
        if request_id in self._held:
            raise ValueError(f"request {request_id!r} already holds blocks")
        blocks = self.blocks_for(tokens)
        if blocks > self.free_blocks:
            return False
        self._held[request_id] = blocks
        self._used += blocks
        return True

    def grow(self, request_id: Hashable, tokens: int) -> bool:
        """Hold blocks for `tokens` tokens of a request that holds some: the blocks it lacks, all or
        nothing (a paged engine allocating as a sequence grows)."""
        more = self.blocks_for(tokens) - self._held[request_id]
        if more > self.free_blocks:
            return False
        self._held[request_id] += max(0, more)
        self._used += max(0, more)
        return True

    def free(self, request_id: Hashable) -> int:
        """Release a request's blocks; returns how many. Freeing twice is a no-op."""
        blocks = self._held.pop(request_id, 0)
        self._used -= blocks
        return blocks

    @property
    def used_blocks(self) -> int:
        return self._used

    @property
    def free_blocks(self) -> int:
        return self.usable_blocks - self._used

    @property
    def utilization(self) -> float:
        return self._used / self.usable_blocks
