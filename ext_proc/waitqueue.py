"""Requests waiting for KV budget: bounded, by priority class, first come first served within one.

Whenever budget may have freed up (a release, a new share, fresh engine metrics) `wake` offers it
to the waiters in order: higher classes first, then arrival. A waiter that does not fit is passed
over rather than blocking the ones behind it: a long request at the head must not stall every short
one, which is the latency cliff kvgate exists to prevent. It waits until its own deadline at most.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")

# The most request bytes all waiters of a replica may hold (their bodies stay in memory while they
# wait): 1,000 waiters of a model could otherwise hold 4 GiB of 4 MiB bodies.
DEFAULT_MAX_WAITING_BYTES = 256 * 2**20


@dataclass
class WaitingBytes:
    """The request bytes waiting across every queue of a replica, and their cap."""

    limit: int = DEFAULT_MAX_WAITING_BYTES
    held: int = 0

    def room_for(self, nbytes: int) -> bool:
        return self.held + nbytes <= self.limit


@dataclass(eq=False)
class _Waiter(Generic[T]):
    need: int  # KV bytes it wants: a waiter that wants more than the headroom is not even tried
    try_admit: Callable[[], T | None]
    done: asyncio.Future[T]


@dataclass
class WaitQueue(Generic[T]):
    max_waiting: int = 1000
    waiting_bytes: WaitingBytes = field(default_factory=WaitingBytes)
    # By rank, then arrival: dicts keep insertion order and drop a waiter in O(1).
    _ranks: dict[int, dict[int, _Waiter[T]]] = field(default_factory=dict)
    _seq: itertools.count = field(default_factory=itertools.count)
    _len: int = 0

    def __len__(self) -> int:
        return self._len

    @property
    def full(self) -> bool:
        return self._len >= self.max_waiting

    def has_room(self, body_bytes: int) -> bool:
        return not self.full and self.waiting_bytes.room_for(body_bytes)

    async def wait(self, rank: int, try_admit: Callable[[], T | None], timeout_s: float,
                   release: Callable[[T], None], need: int = 0, body_bytes: int = 0) -> T | None:
        """What `try_admit` returned once it succeeded within `timeout_s`, else None. Rank 0 is the
        highest priority. The caller checks `has_room` first: no room means refuse now. If the
        caller is cancelled after its waiter was admitted, `release` gives the admission back."""
        waiter = _Waiter(need, try_admit, asyncio.get_running_loop().create_future())
        seq = next(self._seq)
        if rank not in self._ranks:
            self._ranks = dict(sorted({**self._ranks, rank: {}}.items()))
        self._ranks[rank][seq] = waiter
        self._len += 1
        self.waiting_bytes.held += body_bytes
        try:
            return await asyncio.wait_for(asyncio.shield(waiter.done), timeout_s)
        except TimeoutError:
            # Admitted in the same loop turn as the deadline: the admission wins.
            return waiter.done.result() if waiter.done.done() else None
        except asyncio.CancelledError:
            if waiter.done.done():
                release(waiter.done.result())
            raise
        finally:
            del self._ranks[rank][seq]
            self._len -= 1
            self.waiting_bytes.held -= body_bytes

    def wake(self, headroom: Callable[[], int] | None = None) -> None:
        """Offer freed budget to the waiters, in order. With `headroom` (the most any endpoint has
        free), a waiter that needs more is passed over without trying it, so a release costs a
        comparison per waiter, not an admission attempt: with 1,000 waiters, tries at every release
        would saturate the process exactly when the queue is full."""
        room = headroom() if headroom is not None else None
        for waiters in self._ranks.values():
            for waiter in list(waiters.values()):
                if waiter.done.done() or (room is not None and waiter.need > room):
                    continue
                admitted = waiter.try_admit()
                if admitted is not None:
                    waiter.done.set_result(admitted)
                    if headroom is not None:
                        room = headroom()
