"""ext_proc/waitqueue.py: bounded waiting by priority class, arrival order, no head-of-line blocking."""

from __future__ import annotations

import asyncio

import pytest

pytestmark = pytest.mark.asyncio

from ext_proc.waitqueue import WaitQueue


class Budget:
    """A pool of units; try_admit(n) takes n units or nothing."""

    def __init__(self, free: int) -> None:
        self.free = free
        self.order: list[str] = []

    def taker(self, name: str, n: int):  # noqa: ANN201
        def take() -> str | None:
            if n > self.free:
                return None
            self.free -= n
            self.order.append(name)
            return name
        return take


def no_release(_: str) -> None:
    raise AssertionError("nothing should be given back")


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_waiters_are_served_by_class_then_arrival() -> None:
    q: WaitQueue[str] = WaitQueue()
    budget = Budget(0)
    tasks = [asyncio.create_task(q.wait(rank, budget.taker(name, 1), 5.0, no_release))
             for name, rank in (("low-1", 1), ("high-1", 0), ("low-2", 1), ("high-2", 0))]
    await settle()
    assert len(q) == 4
    budget.free = 3
    q.wake()
    await settle()
    assert budget.order == ["high-1", "high-2", "low-1"]
    budget.free = 1
    q.wake()
    assert await asyncio.gather(*tasks) == ["low-1", "high-1", "low-2", "high-2"]
    assert len(q) == 0


async def test_a_waiter_that_does_not_fit_does_not_block_the_ones_behind() -> None:
    q: WaitQueue[str] = WaitQueue()
    budget = Budget(0)
    big = asyncio.create_task(q.wait(0, budget.taker("big", 10), 0.2, no_release))
    small = asyncio.create_task(q.wait(0, budget.taker("small", 2), 5.0, no_release))
    await settle()
    budget.free = 3
    q.wake()
    assert await small == "small"
    assert await big is None  # its own deadline, not the small one's fate, ends its wait
    assert budget.free == 1


async def test_deadline_returns_none_and_leaves_the_queue() -> None:
    q: WaitQueue[str] = WaitQueue()
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await q.wait(0, Budget(0).taker("x", 1), 0.05, no_release) is None
    assert loop.time() - started >= 0.05
    assert len(q) == 0


async def test_cancelled_after_admission_gives_it_back() -> None:
    q: WaitQueue[str] = WaitQueue()
    budget = Budget(0)
    released: list[str] = []
    task = asyncio.create_task(q.wait(0, budget.taker("x", 1), 5.0, released.append))
    await settle()
    budget.free = 1
    q.wake()  # admitted, but the waiting request is cancelled before it runs again
    task.cancel()
    try:
        got = [await task]  # Python 3.11's wait_for may hand over a result that beat the cancel
    except asyncio.CancelledError:
        got = []
    # Exactly one owner: the caller, or the release callback.
    assert sorted(got + released) == ["x"] and len(q) == 0


async def test_cancelled_while_waiting_takes_nothing() -> None:
    q: WaitQueue[str] = WaitQueue()
    budget = Budget(0)
    task = asyncio.create_task(q.wait(0, budget.taker("x", 1), 5.0, no_release))
    await settle()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    budget.free = 1
    q.wake()
    assert budget.order == [] and len(q) == 0


async def test_full_at_max_waiting() -> None:
    q: WaitQueue[str] = WaitQueue(max_waiting=2)
    tasks = [asyncio.create_task(q.wait(0, Budget(0).taker(str(i), 1), 5.0, no_release)) for i in range(2)]
    await settle()
    assert q.full
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert not q.full


async def test_a_release_tries_only_the_waiters_the_headroom_could_fit() -> None:
    """With 1,000 waiters, trying every one at every release saturated the process (6 ms a release);
    a waiter that needs more than any endpoint has free is passed over without a try."""
    q: WaitQueue[str] = WaitQueue()
    tried: list[int] = []

    def taker(i: int):  # noqa: ANN202
        def take() -> str | None:
            tried.append(i)
            return None
        return take

    tasks = [asyncio.create_task(q.wait(0, taker(i), 5.0, no_release, need=100 if i % 100 else 10))
             for i in range(1000)]
    await settle()
    q.wake(headroom=lambda: 50)
    assert tried == list(range(0, 1000, 100))  # the ten that need 10
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert len(q) == 0


async def test_after_an_admission_the_next_waiters_see_the_smaller_headroom() -> None:
    q: WaitQueue[str] = WaitQueue()
    budget = Budget(0)
    tasks = [asyncio.create_task(q.wait(0, budget.taker(n, 3), 5.0, no_release, need=3)) for n in ("a", "b")]
    await settle()
    budget.free = 4
    q.wake(headroom=lambda: budget.free)
    assert await tasks[0] == "a"
    assert budget.order == ["a"]  # b was not tried with 1 unit left
    tasks[1].cancel()
    await asyncio.gather(tasks[1], return_exceptions=True)
