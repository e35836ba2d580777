"""The ledgers corrected by what each engine itself reports (its KV metrics, docs/reference.md, "The engines and their protocols").

- More use than this replica's reservations explain (other clients, a leak elsewhere): the excess
  counts against the budget until the next sample.
- Less: not credited, because a paged engine allocates blocks as it generates, so its use grows
  into the reservations. But an engine that is idle (nothing running, nothing waiting, no blocks
  used) holds none of the requests admitted well before the sample: those reservations are released
  (requests that finished while their stream end was lost or is still on its way).
- No fresh sample: the endpoint counts as full (`blind`), never as empty.

What an engine reports is about its KV pool, so samples correct pools (ext_proc/ledger.py `KVPool`),
however many catalog names draw on one: the whole pool's use is set against all of its reservations.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import structlog

from ext_proc.engine_metrics import EngineLoad
from ext_proc.ledger import KVPool, Ledger
from ext_proc.policy import EndpointPolicy, Policy
from ext_proc.prompt_gap import PromptGap
from ext_proc.scraper import EngineScraper, Target
from ext_proc.state import AdmissionState


IDLE_GRACE_S = 5.0


def _block_bytes(load: EngineLoad, policy: Policy) -> int:
    return (load.tokens_per_block or policy.tokens_per_block) * policy.kv_bytes_per_token


def engine_used_bytes(load: EngineLoad, endpoint: EndpointPolicy, policy: Policy) -> int:
    """KV bytes in use on the engine: from its block counts when it publishes them (exact), else from
    its utilisation fraction of the blocks sequences may hold (vLLM publishes only that, and its cache
    size), else of the budget."""
    if load.kv_used_blocks is not None:
        return load.kv_used_blocks * _block_bytes(load, policy)
    if load.kv_usable_blocks is not None:
        return round(load.kv_used_fraction * load.kv_usable_blocks) * _block_bytes(load, policy)
    return round(load.kv_used_fraction * endpoint.budget_bytes)


def engine_capacity_bytes(load: EngineLoad, policy: Policy) -> int | None:
    """The KV the engine holds for sequences, when it says (vLLM: its blocks but the null one)."""
    return None if load.kv_usable_blocks is None else load.kv_usable_blocks * _block_bytes(load, policy)


def is_idle(load: EngineLoad) -> bool:
    return load.running == 0 and not load.waiting and load.kv_used_fraction == 0 and not load.kv_used_blocks


def apply_sample(ledger: KVPool | Ledger, load: EngineLoad, taken_at: float, endpoint: EndpointPolicy, policy: Policy,
                 now: float, held_at_scrape: int = 0) -> int:
    """Correct one ledger by a fresh sample; returns how many reservations the idle rule released.
    The engine's use is divided like the budget: this replica answers for its share of it. It is set
    against what the ledger held when the scrape began, if that was more: requests that ended while
    the scrape was on its way were on the engine when it was read, and are no excess."""
    ledger.engine_budget = engine_capacity_bytes(load, policy)
    ledger.observe_engine(int(ledger.share * engine_used_bytes(load, endpoint, policy)),
                          max(ledger.reserved, held_at_scrape))
    if not is_idle(load):
        return 0
    # Admitted this long before the engine was seen idle: on the engine and finished, not on the way
    # (engines refresh their gauges every second or two: Triton every 2 s by default).
    grace_s = max(IDLE_GRACE_S, policy.metrics_stale_after_s)
    return len(ledger.release_where(lambda r: r.started < taken_at - grace_s, now))


@dataclass(frozen=True)
class ScrapedPool:
    """A KV pool whose engine is read: its key (also the scraper's), the first policy and endpoint
    drawing on it (models sharing a pool agree on the metrics, budget and block size: the catalog
    checks it), and the models drawing on it."""

    key: str
    policy: Policy
    endpoint: EndpointPolicy
    models: tuple[str, ...]

    @property
    def target(self) -> Target:
        return Target(self.endpoint.metrics_url, self.policy.metrics_model or None)


def scraped_pools(policies: Iterable[Policy]) -> list[ScrapedPool]:
    first: dict[str, tuple[Policy, EndpointPolicy]] = {}
    models: dict[str, list[str]] = {}
    for p in policies:
        for e in p.endpoints if p.metrics_interval_s > 0 else ():
            first.setdefault(e.pool, (p, e))
            models.setdefault(e.pool, []).append(p.name)
    return [ScrapedPool(key, p, e, tuple(models[key])) for key, (p, e) in first.items()]


@dataclass
class Reconciler:
    """Scrapes the engine of every KV pool a policy asks to, and applies what it reads."""

    table: AdmissionState
    scraper: EngineScraper
    clock: Callable[[], float] = time.monotonic
    log: structlog.typing.FilteringBoundLogger = field(
        default_factory=lambda: structlog.get_logger(component="reconcile"))
    prompt_gap: PromptGap | None = None  # fed the engines' prompt-token counters
    _applied: dict[str, float] = field(default_factory=dict)  # pool key -> sample time last applied
    _held_at_scrape: dict[str, int] = field(default_factory=dict)  # pool key -> bytes reserved as the scrape began

    def _scraped(self) -> list[ScrapedPool]:
        return scraped_pools(self.table.policies.values())

    def step(self) -> None:
        now = self.clock()
        for src in self._scraped():
            pool = self.table.ledgers.pool(src.key)
            if pool is None:
                continue
            policy, endpoint = src.policy, src.endpoint
            sample = self.scraper.sample(src.key)
            if sample is None or now - sample.taken_at > policy.metrics_stale_after_s:
                if not pool.blind:
                    self.log.warning("reconcile.blind", pool=src.key, models=list(src.models), url=endpoint.metrics_url)
                pool.blind = True
                continue
            if self._applied.get(src.key) == sample.taken_at:
                continue
            self._applied[src.key] = sample.taken_at
            if sample.load is None:  # up, but no numbers yet: the ledger alone counts
                if pool.blind:
                    pool.blind = False
                    self.table.wake(policy.name)
                continue
            released = apply_sample(pool, sample.load, sample.taken_at, endpoint, policy, now,
                                    self._held_at_scrape.get(src.key, 0))
            # The engine's counter is the whole engine's: comparable with one model's admissions only
            # when that model is all that draws on it.
            if self.prompt_gap is not None and sample.load.prompt_tokens is not None and len(src.models) == 1:
                self.prompt_gap.engine_sample(policy.name, endpoint.address, sample.load.prompt_tokens, sample.taken_at)
            if released:
                self.log.warning("reconcile.released_idle", pool=src.key, reservations=released)
            self.table.wake(policy.name)  # and every model sharing the pool

    async def run(self) -> None:
        """Scrape, apply, repeat at the shortest interval any policy asks for."""
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            scraped = self._scraped()
            self.scraper.set_targets({src.key: src.target for src in scraped})
            self._held_at_scrape = {src.key: pool.reserved for src in scraped
                                    if (pool := self.table.ledgers.pool(src.key)) is not None}
            await self.scraper.scrape_once()
            self.step()
            interval = min((src.policy.metrics_interval_s for src in scraped), default=1.0)
            await asyncio.sleep(max(0.0, started + interval - loop.time()))
