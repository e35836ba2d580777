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


@dataclass(eq=False)
class _Waiter(Generic[T]):
    rank: int
    seq: int
    try_admit: Callable[[], T | None]
    done: asyncio.Future[T]


@dataclass
class WaitQueue(Generic[T]):
    max_waiting: int = 1000
    _waiters: list[_Waiter[T]] = field(default_factory=list)
    _seq: itertools.count = field(default_factory=itertools.count)

    def __len__(self) -> int:
        return len(self._waiters)

    @property
    def full(self) -> bool:
        return len(self._waiters) >= self.max_waiting

    async def wait(self, rank: int, try_admit: Callable[[], T | None], timeout_s: float,
                   release: Callable[[T], None]) -> T | None:
        """What `try_admit` returned once it succeeded within `timeout_s`, else None. Rank 0 is the
        highest priority. The caller checks `full` first: a full queue means refuse now. If the
        caller is cancelled after its waiter was admitted, `release` gives the admission back."""
        waiter = _Waiter(rank, next(self._seq), try_admit, asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        self._waiters.sort(key=lambda w: (w.rank, w.seq))
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
            self._waiters.remove(waiter)

    def wake(self) -> None:
        for waiter in list(self._waiters):
            if waiter.done.done():
                continue
            admitted = waiter.try_admit()
            if admitted is not None:
                waiter.done.set_result(admitted)
