"""An asyncio HTTP load generator (aiohttp, one keep-alive pool per phase).

Open loop: requests leave at a fixed rate whatever the answers do, and latency counts from the time a
request was due, so a stall shows up in the numbers instead of silently lowering the load.
Closed loop: `concurrency` workers send back to back, which finds the highest sustained throughput.
It measures one URL and knows nothing of Envoy or kvgate.
"""

from __future__ import annotations

import asyncio
import gc
import math
from collections import Counter
from dataclasses import dataclass, field

import aiohttp

_HEADERS = {"content-type": "application/json"}
# Far above any sane latency here; a request that takes this long counts as an error.
REQUEST_TIMEOUT_S = 10.0
# Open loop: connections the pool may open if answers fall behind the rate.
_OPEN_LOOP_CONNECTIONS = 256


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


@dataclass(frozen=True)
class _Sample:
    start: float  # when the request was due (open loop) or sent (closed loop)
    end: float
    error: str | None


@dataclass
class PhaseResult:
    """What one or more phases measured, warm-up excluded except from `requests` and `errors`."""

    latencies_s: list[float] = field(default_factory=list)  # 200s that started in the window
    completed: int = 0  # 200s that finished in the window
    window_s: float = 0.0
    requests: int = 0  # all sent, warm-up included: the denominator of CPU per request
    errors: Counter[str] = field(default_factory=Counter)  # anything but a 200, warm-up included

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


async def _send(session: aiohttp.ClientSession, url: str, body: bytes, start: float,
                samples: list[_Sample]) -> None:
    try:
        async with session.post(url, data=body, headers=_HEADERS) as resp:
            await resp.read()
            error = None if resp.status == 200 else f"HTTP {resp.status}"
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        error = type(e).__name__
    samples.append(_Sample(start, asyncio.get_running_loop().time(), error))


async def _open_loop(session: aiohttp.ClientSession, url: str, body: bytes, rate: float, t0: float,
                     until: float, samples: list[_Sample]) -> None:
    loop = asyncio.get_running_loop()
    tasks = []
    for i in range(math.ceil((until - t0) * rate)):
        due = t0 + i / rate
        if due > loop.time():
            await asyncio.sleep(due - loop.time())
        tasks.append(asyncio.create_task(_send(session, url, body, due, samples)))
    await asyncio.gather(*tasks)


async def _closed_loop(session: aiohttp.ClientSession, url: str, body: bytes, concurrency: int,
                       until: float, samples: list[_Sample]) -> None:
    loop = asyncio.get_running_loop()

    async def worker() -> None:
        while (now := loop.time()) < until:
            await _send(session, url, body, now, samples)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def _phase(url: str, body: bytes, load: Load, duration_s: float, warmup_s: float) -> PhaseResult:
    connector = aiohttp.TCPConnector(limit=load.concurrency or _OPEN_LOOP_CONNECTIONS)
    samples: list[_Sample] = []
    async with aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar(),
                                     timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)) as session:
        t0 = asyncio.get_running_loop().time()
        window = (t0 + warmup_s, t0 + warmup_s + duration_s)
        if load.rate is not None:
            await _open_loop(session, url, body, load.rate, t0, window[1], samples)
        else:
            await _closed_loop(session, url, body, load.concurrency or 0, window[1], samples)
    ok = [s for s in samples if s.error is None]
    return PhaseResult(
        latencies_s=[s.end - s.start for s in ok if window[0] <= s.start < window[1]],
        completed=sum(window[0] <= s.end < window[1] for s in ok),
        window_s=duration_s,
        requests=len(samples),
        errors=Counter(s.error for s in samples if s.error is not None),
    )


def run_phase(url: str, body: bytes, load: Load, duration_s: float, warmup_s: float) -> PhaseResult:
    """POST `body` to `url` under `load` for warmup_s + duration_s; blocks until every answer is in."""
    # The client's own full collections stalled its loop for ~50 ms every few thousand requests, a
    # tail that belonged to neither set-up: collect between phases, never during one.
    gc.collect()
    gc.disable()
    try:
        return asyncio.run(_phase(url, body, load, duration_s, warmup_s))
    finally:
        gc.enable()
