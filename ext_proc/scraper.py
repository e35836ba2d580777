"""Scrapes the engines' Prometheus endpoints, so the ledger can hear what each engine itself reports.

One `EngineScraper` per ext_proc process polls every target concurrently each `interval_s` over one
aiohttp session. A failed scrape keeps the previous sample, which then ages: callers read it through
`fresh()`, and an endpoint whose metrics are stale must count as full, never as empty. Failures are
logged when a target's state changes (ok -> failing, one failure -> another, failing -> ok), not on
every round; so is an answer without the numbers asked for (a named Triton model missing), and a
Triton whose KV series had to be summed over several models is warned about once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import aiohttp
import structlog

from ext_proc.engine_metrics import EngineLoad, ModelNotPublished, NotPublishedYet, parse_engine_load

# Engines answer the text format; asking for it keeps a prometheus_client server from choosing OpenMetrics.
_ACCEPT = "text/plain;version=0.0.4"


@dataclass(frozen=True)
class Target:
    url: str  # the metrics URL, e.g. http://host:8000/prometheus/metrics (trtllm-serve)
    model: str | None = None  # Triton serving several TensorRT-LLM models: which (see parse_engine_load)


@dataclass(frozen=True)
class Sample:
    # None: the engine answered but published no KV numbers yet (NotPublishedYet); it is reachable,
    # so it must not count as full, and there is nothing to correct the ledger with.
    load: EngineLoad | None
    taken_at: float  # clock() when the scrape was sent: the engine's state is at least this recent


class _ScrapeError(Exception):
    """A response that carries no metrics (an HTTP error status)."""


@dataclass(eq=False)
class EngineScraper:
    interval_s: float = 1.0
    # Per request; below the interval so that one slow engine cannot delay the next round.
    timeout_s: float | None = None  # None: 80% of interval_s
    clock: Callable[[], float] = time.monotonic
    log: structlog.typing.FilteringBoundLogger = field(
        default_factory=lambda: structlog.get_logger(component="engine_scraper"))
    _targets: dict[str, Target] = field(default_factory=dict, init=False, repr=False)
    _samples: dict[str, Sample] = field(default_factory=dict, init=False, repr=False)
    _errors: dict[str, str | None] = field(default_factory=dict, init=False, repr=False)  # None: last scrape ok
    _summed: set[str] = field(default_factory=set, init=False, repr=False)  # keys warned about summing
    _session: aiohttp.ClientSession | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.timeout_s is None:
            self.timeout_s = 0.8 * self.interval_s
        if not 0 < self.timeout_s < self.interval_s:
            raise ValueError(f"timeout_s must be in (0, interval_s={self.interval_s}), got {self.timeout_s}")

    @property
    def targets(self) -> dict[str, Target]:
        return dict(self._targets)

    def set_targets(self, targets: Mapping[str, str | Target]) -> None:
        """key -> metrics URL (or Target). Keys that stay with the same target keep their sample;
        a key whose URL changed loses it, as it described another server."""
        new = {key: t if isinstance(t, Target) else Target(t) for key, t in targets.items()}
        for key in self._samples.keys() | self._errors.keys():
            if new.get(key) != self._targets.get(key):
                self._samples.pop(key, None)
                self._errors.pop(key, None)
                self._summed.discard(key)
        self._targets = new

    def sample(self, key: str) -> Sample | None:
        """The last successful scrape of `key`, however old."""
        return self._samples.get(key)

    def fresh(self, key: str, now: float, stale_after_s: float) -> EngineLoad | None:
        """The engine's load if scraped within stale_after_s of `now` (the scraper's clock), else None."""
        s = self._samples.get(key)
        return s.load if s is not None and now - s.taken_at <= stale_after_s else None

    async def run(self) -> None:
        """Scrapes every interval_s until cancelled; closes the session on the way out."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                started = loop.time()
                await self.scrape_once()
                await asyncio.sleep(max(0.0, started + self.interval_s - loop.time()))
        finally:
            await self.close()

    async def scrape_once(self) -> None:
        """One round: every target concurrently; returns within about timeout_s."""
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout_s), headers={"Accept": _ACCEPT})
        session = self._session
        await asyncio.gather(*(self._scrape(session, key, t) for key, t in list(self._targets.items())))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _scrape(self, session: aiohttp.ClientSession, key: str, target: Target) -> None:
        taken_at = self.clock()
        sample: Sample | None = None
        error: str | None = None
        try:
            sample = Sample(await _fetch(session, target), taken_at)
        except ModelNotPublished as e:
            # Up (so not counted full), but the model asked for is not there: say so, it may be a typo.
            sample, error = Sample(None, taken_at), str(e)
        except NotPublishedYet:
            sample = Sample(None, taken_at)
        except asyncio.TimeoutError:
            error = f"no answer within {self.timeout_s:g} s"
        except _ScrapeError as e:
            error = str(e)
        # Anything else a target does (refuse, reset, answer garbage) is that target's failure:
        # it must not end the loop that scrapes the others.
        except Exception as e:
            error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        if self._targets.get(key) != target:
            return  # retargeted while the scrape was in flight: this answer is about another server
        if sample is not None:
            self._samples[key] = sample
            self._warn_summed(key, target, sample.load)
        self._log_change(key, target, error)

    def _warn_summed(self, key: str, target: Target, load: EngineLoad | None) -> None:
        if load is None or len(load.models) < 2 or key in self._summed:
            return
        self._summed.add(key)
        self.log.warning("engine_scraper.summed_models", key=key, url=target.url, models=list(load.models),
                         hint="several models publish non-zero KV numbers: their pools are added up; "
                              "name the one that counts with engine_metrics.model")

    def _log_change(self, key: str, target: Target, error: str | None) -> None:
        known, previous = key in self._errors, self._errors.get(key)
        self._errors[key] = error
        if known and error == previous:
            return
        if error is None:
            self.log.info("engine_scraper.ok", key=key, url=target.url)
        else:
            self.log.warning("engine_scraper.failing", key=key, url=target.url, error=error)


async def _fetch(session: aiohttp.ClientSession, target: Target) -> EngineLoad:
    async with session.get(target.url) as response:
        body = await response.read()
        if response.status != 200:
            raise _ScrapeError(f"HTTP {response.status}")
    return parse_engine_load(body.decode("utf-8", errors="replace"), target.model)
