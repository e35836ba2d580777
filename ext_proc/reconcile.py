"""The ledgers corrected by what each engine itself reports (its KV metrics, docs/reference.md, "The engines and their protocols").

- More use than this replica's reservations explain (other clients, a leak elsewhere): the excess
  counts against the budget until the next sample.
- Less: not credited, because a paged engine allocates blocks as it generates, so its use grows
  into the reservations. But an engine that is idle (nothing running, nothing waiting, no blocks
  used) holds none of the requests admitted well before the sample: those reservations are released
  (requests that finished while their stream end was lost or is still on its way).
- No fresh sample: the endpoint counts as full (`blind`), never as empty.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from ext_proc.engine_metrics import EngineLoad
from ext_proc.ledger import Ledger
from ext_proc.policy import EndpointPolicy, Policy
from ext_proc.prompt_gap import PromptGap
from ext_proc.scraper import EngineScraper
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


def apply_sample(ledger: Ledger, load: EngineLoad, taken_at: float, endpoint: EndpointPolicy, policy: Policy,
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


@dataclass
class Reconciler:
    """Scrapes every endpoint of every policy that asks for it, and applies what it reads."""

    table: AdmissionState
    scraper: EngineScraper
    clock: Callable[[], float] = time.monotonic
    log: structlog.typing.FilteringBoundLogger = field(
        default_factory=lambda: structlog.get_logger(component="reconcile"))
    prompt_gap: PromptGap | None = None  # fed the engines' prompt-token counters
    _applied: dict[tuple[str, str], float] = field(default_factory=dict)  # sample time last applied
    _held_at_scrape: dict[tuple[str, str], int] = field(default_factory=dict)  # bytes reserved as the scrape began

    def _scraped(self) -> list[tuple[Policy, EndpointPolicy]]:
        return [(p, e) for p in self.table.policies.values() if p.metrics_interval_s > 0 for e in p.endpoints]

    def step(self) -> None:
        now = self.clock()
        for policy, endpoint in self._scraped():
            ledger = self.table.ledgers.get(policy.name, endpoint.address)
            if ledger is None:
                continue
            sample = self.scraper.sample(endpoint.metrics_url)
            if sample is None or now - sample.taken_at > policy.metrics_stale_after_s:
                if not ledger.blind:
                    self.log.warning("reconcile.blind", ledger=ledger.name, url=endpoint.metrics_url)
                ledger.blind = True
                continue
            if self._applied.get((policy.name, endpoint.address)) == sample.taken_at:
                continue
            self._applied[(policy.name, endpoint.address)] = sample.taken_at
            if sample.load is None:  # up, but no numbers yet: the ledger alone counts
                if ledger.blind:
                    ledger.blind = False
                    self.table.wake(policy.name)
                continue
            released = apply_sample(ledger, sample.load, sample.taken_at, endpoint, policy, now,
                                    self._held_at_scrape.get((policy.name, endpoint.address), 0))
            if self.prompt_gap is not None and sample.load.prompt_tokens is not None:
                self.prompt_gap.engine_sample(policy.name, endpoint.address, sample.load.prompt_tokens, sample.taken_at)
            if released:
                self.log.warning("reconcile.released_idle", ledger=ledger.name, reservations=released)
            self.table.wake(policy.name)

    async def run(self) -> None:
        """Scrape, apply, repeat at the shortest interval any policy asks for."""
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            scraped = self._scraped()
            self.scraper.set_targets({e.metrics_url: e.metrics_url for _, e in scraped})
            self._held_at_scrape = {(p.name, e.address): lg.reserved for p, e in scraped
                                    if (lg := self.table.ledgers.get(p.name, e.address)) is not None}
            await self.scraper.scrape_once()
            self.step()
            interval = min((p.metrics_interval_s for p, _ in scraped), default=1.0)
            await asyncio.sleep(max(0.0, started + interval - loop.time()))
