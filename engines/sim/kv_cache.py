"""Block accounting of a paged KV cache: which request holds how many blocks."""

from __future__ import annotations

from collections.abc import Hashable


class PagedKVCache:
    def __init__(self, total_blocks: int, tokens_per_block: int) -> None:
        if total_blocks < 1 or tokens_per_block < 1:
            raise ValueError("total_blocks and tokens_per_block must be >= 1")
        self.total_blocks = total_blocks
        self.tokens_per_block = tokens_per_block
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
        return self.total_blocks - self._used

    @property
    def utilization(self) -> float:
        return self._used / self.total_blocks
