"""KV-budget ledgers: who holds how many bytes of which engine's budget, and for how long.

One ledger per (model, endpoint). Pure bookkeeping with the clock passed in, so every rule is
unit-tested without sleeping. What the ledger counts against its capacity is its own reservations
plus any use the engine reports that they do not explain (other clients, leaks); an engine whose
metrics went stale counts as full (`blind`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(eq=False)  # identity: two equal-looking reservations are still two
class Reservation:
    ledger: Ledger
    nbytes: int
    started: float
    expires: float
    long: bool = False  # a long request, counted against the long-request cap (admission.py)
    released: bool = False

    @property
    def key(self) -> str:
        return self.ledger.name


@dataclass(eq=False)
class Ledger:
    model: str
    endpoint: str
    budget: int  # the engine's whole budget
    share: float = 1.0  # this replica's part of it, from the control plane
    reserved: int = 0
    reserved_long: int = 0
    # Engine use the reservations do not explain, from the last metrics sample; never negative.
    excess: int = 0
    blind: bool = False  # engine metrics stale: admit nothing here
    # The KV the engine itself reports holding (vLLM's cache_config_info); None until it says. The
    # budget never exceeds it: a catalog may over-state a pool the engine sized itself.
    engine_budget: int | None = None
    # When a short (not long) request last held budget here: the long-request cap protects them.
    short_at: float = -math.inf
    # Smoothed time a reservation is held, for Retry-After; 1 s until something was released.
    mean_hold_s: float = 1.0
    _active: set[Reservation] = field(default_factory=set)
    _smoothing: float = 0.2

    @property
    def name(self) -> str:
        return f"{self.model}@{self.endpoint}"

    @property
    def capacity(self) -> int:
        budget = self.budget if self.engine_budget is None else min(self.budget, self.engine_budget)
        return int(budget * self.share)

    @property
    def used(self) -> int:
        return self.reserved + self.excess

    @property
    def headroom(self) -> int:
        return 0 if self.blind else max(0, self.capacity - self.used)

    @property
    def active(self) -> int:
        return len(self._active)

    def fits(self, nbytes: int) -> bool:
        return nbytes <= self.headroom

    def try_reserve(self, nbytes: int, now: float, ttl_s: float, long: bool = False) -> Reservation | None:
        if not self.fits(nbytes):
            return None
        r = Reservation(self, nbytes, now, now + ttl_s, long)
        self._active.add(r)
        self.reserved += nbytes
        self.reserved_long += nbytes if long else 0
        self.short_at = self.short_at if long else now
        return r

    def release(self, r: Reservation, now: float) -> bool:
        """Idempotent: the first release returns True, later ones (stream end after TTL) do nothing."""
        if r.released or r not in self._active:
            return False
        self._active.discard(r)
        r.released = True
        self.reserved -= r.nbytes
        self.reserved_long -= r.nbytes if r.long else 0
        self.short_at = self.short_at if r.long else now
        self.mean_hold_s += self._smoothing * (max(0.0, now - r.started) - self.mean_hold_s)
        return True

    def expire(self, now: float) -> list[Reservation]:
        """The TTL backstop: release what outlived its deadline (a lost stream end)."""
        return self.release_where(lambda r: r.expires <= now, now)

    def release_where(self, predicate: Callable[[Reservation], bool], now: float) -> list[Reservation]:
        chosen = [r for r in self._active if predicate(r)]
        for r in chosen:
            self.release(r, now)
        return chosen

    def observe_engine(self, used_bytes: int, reserved_then: int) -> None:
        """The engine's use attributed to this replica, sampled when this ledger held `reserved_then`:
        what exceeds it is counted until the next sample. Less than reserved is not credited: a paged
        engine allocates blocks as tokens are generated, so its use grows into the reservations."""
        self.excess = max(0, used_bytes - reserved_then)
        self.blind = False

    def retry_after(self, nbytes: int, now: float) -> int:
        """Seconds until `nbytes` are likely free, if reservations end after the mean hold time."""
        missing = self.used + nbytes - self.capacity
        for r in sorted(self._active, key=lambda r: r.started):
            missing -= r.nbytes
            if missing <= 0:
                return min(60, max(1, math.ceil(r.started + self.mean_hold_s - now)))
        return 60


@dataclass
class Ledgers:
    """Ledgers by (model, endpoint); budgets follow the policies, reservations survive a change."""

    share: float = 1.0
    _by_key: dict[tuple[str, str], Ledger] = field(default_factory=dict)

    def set_budget(self, model: str, endpoint: str, budget: int) -> Ledger:
        ledger = self._by_key.get((model, endpoint))
        if ledger is None:
            ledger = self._by_key[(model, endpoint)] = Ledger(model, endpoint, budget, self.share)
        ledger.budget = budget
        return ledger

    def set_share(self, share: float) -> None:
        self.share = share
        for ledger in self._by_key.values():
            ledger.share = share

    def retain(self, keys: set[tuple[str, str]]) -> None:
        """Forget ledgers no policy names once nothing is held in them (their metrics go too)."""
        for key in [k for k, lg in self._by_key.items() if k not in keys and lg.active == 0]:
            del self._by_key[key]

    def get(self, model: str, endpoint: str) -> Ledger | None:
        return self._by_key.get((model, endpoint))

    def of_model(self, model: str, endpoints: list[str]) -> list[Ledger]:
        return [lg for e in endpoints if (lg := self._by_key.get((model, e))) is not None]

    def all(self) -> list[Ledger]:
        return [lg for _, lg in sorted(self._by_key.items())]

    def expire(self, now: float) -> list[Reservation]:
        return [r for ledger in self._by_key.values() for r in ledger.expire(now)]
