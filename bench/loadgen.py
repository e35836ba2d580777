"""An asyncio load generator: open or closed loop over any client of bench/clients.py, one client
(connection pool or channels) per phase.

Open loop: requests leave at a fixed rate whatever the answers do, and latency counts from the time a
request was due, so a stall shows up in the numbers instead of silently lowering the load.
Closed loop: `concurrency` workers send back to back, which finds the highest sustained throughput.
It measures one listener and knows nothing of Envoy or kvgate.
"""

from __future__ import annotations

import asyncio
import gc
import math
from collections import Counter
from dataclasses import dataclass, field

from bench.clients import Client, Send

# Open loop: connections the HTTP pool may open if answers fall behind the rate.
_OPEN_LOOP_IN_FLIGHT = 256


@dataclass(frozen=True)
class Load:
    """Open loop at `rate` req/s, or closed loop with `concurrency` workers (exactly one is set)."""

    rate: float | None = None
    concurrency: int | None = None

    def __post_init__(self) -> None:
        if (self.rate is None) == (self.concurrency is None):
            raise ValueError("give exactly one of rate and concurrency")

    @property
    def label(self) -> str:
        return f"{self.rate:g} req/s" if self.rate is not None else f"concurrency {self.concurrency}"

    @property
    def in_flight(self) -> int:
        return self.concurrency or _OPEN_LOOP_IN_FLIGHT


@dataclass(frozen=True)
class _Sample:
    start: float  # when the request was due (open loop) or sent (closed loop)
    end: float
    error: str | None


@dataclass
class PhaseResult:
    """What one or more phases measured, warm-up excluded except from `requests` and `errors`."""

    latencies_s: list[float] = field(default_factory=list)  # successes that started in the window
    completed: int = 0  # successes that finished in the window
    window_s: float = 0.0
    requests: int = 0  # all sent, warm-up included: the denominator of CPU per request
    errors: Counter[str] = field(default_factory=Counter)  # anything but a success, warm-up included

    @property
    def throughput_rps(self) -> float:
        return self.completed / self.window_s if self.window_s else 0.0

    def percentile_ms(self, q: float) -> float:
        """Nearest-rank percentile, q in (0, 1]; NaN when nothing was measured."""
        if not self.latencies_s:
            return math.nan
        ordered = sorted(self.latencies_s)
        return 1000 * ordered[max(0, math.ceil(q * len(ordered)) - 1)]

    def __add__(self, other: PhaseResult) -> PhaseResult:
        return PhaseResult(self.latencies_s + other.latencies_s, self.completed + other.completed,
                           self.window_s + other.window_s, self.requests + other.requests,
                           self.errors + other.errors)


async def _timed(send: Send, start: float, samples: list[_Sample]) -> None:
    error = await send()
    samples.append(_Sample(start, asyncio.get_running_loop().time(), error))


async def _open_loop(send: Send, rate: float, t0: float, until: float, samples: list[_Sample]) -> None:
    loop = asyncio.get_running_loop()
    tasks = []
    for i in range(math.ceil((until - t0) * rate)):
        due = t0 + i / rate
        if due > loop.time():
            await asyncio.sleep(due - loop.time())
        tasks.append(asyncio.create_task(_timed(send, due, samples)))
    await asyncio.gather(*tasks)


async def _closed_loop(send: Send, concurrency: int, until: float, samples: list[_Sample]) -> None:
    loop = asyncio.get_running_loop()

    async def worker() -> None:
        while (now := loop.time()) < until:
            await _timed(send, now, samples)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def _phase(client: Client, listener: str, request: bytes, load: Load, duration_s: float,
                 warmup_s: float) -> PhaseResult:
    samples: list[_Sample] = []
    async with client(listener, request, load.in_flight) as send:
        t0 = asyncio.get_running_loop().time()
        window = (t0 + warmup_s, t0 + warmup_s + duration_s)
        if load.rate is not None:
            await _open_loop(send, load.rate, t0, window[1], samples)
        else:
            await _closed_loop(send, load.in_flight, window[1], samples)
    ok = [s for s in samples if s.error is None]
    return PhaseResult(
        latencies_s=[s.end - s.start for s in ok if window[0] <= s.start < window[1]],
        completed=sum(window[0] <= s.end < window[1] for s in ok),
        window_s=duration_s,
        requests=len(samples),
        errors=Counter(s.error for s in samples if s.error is not None),
    )


def run_phase(client: Client, listener: str, request: bytes, load: Load, duration_s: float,
              warmup_s: float) -> PhaseResult:
    """Send `request` to `listener` under `load` for warmup_s + duration_s; blocks until every answer is in."""
    # The client's own full collections stalled its loop for ~50 ms every few thousand requests, a
    # tail that belonged to neither set-up: collect between phases, never during one.
    gc.collect()
    gc.disable()
    try:
        return asyncio.run(_phase(client, listener, request, load, duration_s, warmup_s))
    finally:
        gc.enable()


def send_one(client: Client, listener: str, request: bytes) -> str | None:
    """One request, outside any phase: None when it succeeded, else the error."""

    async def once() -> str | None:
        async with client(listener, request, 1) as send:
            return await send()

    return asyncio.run(once())
