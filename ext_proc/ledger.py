"""KV-budget ledgers: who holds how many bytes of which budget, and for how long.

Pure bookkeeping with the clock passed in, so every rule is unit-tested without sleeping. One ledger
per budget (a model for now; per endpoint later); `Ledgers` keeps them by key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(eq=False)  # identity: two equal-looking reservations are still two
class Reservation:
    key: str
    nbytes: int
    started: float
    expires: float
    released: bool = False


@dataclass
class Ledger:
    capacity: int
    reserved: int = 0
    # Smoothed time a reservation is held, for Retry-After; 1 s until something was released.
    mean_hold_s: float = 1.0
    _active: set[Reservation] = field(default_factory=set)
    _smoothing: float = 0.2

    @property
    def active(self) -> int:
        return len(self._active)

    def try_reserve(self, key: str, nbytes: int, now: float, ttl_s: float) -> Reservation | None:
        if self.reserved + nbytes > self.capacity:
            return None
        r = Reservation(key, nbytes, now, now + ttl_s)
        self._active.add(r)
        self.reserved += nbytes
        return r

    def release(self, r: Reservation, now: float) -> bool:
        """Idempotent: the first release returns True, later ones (stream end after TTL) do nothing."""
        if r.released or r not in self._active:
            return False
        self._active.discard(r)
        r.released = True
        self.reserved -= r.nbytes
        self.mean_hold_s += self._smoothing * (max(0.0, now - r.started) - self.mean_hold_s)
        return True

    def expire(self, now: float) -> list[Reservation]:
        """The TTL backstop: release what outlived its deadline (a lost stream end)."""
        expired = [r for r in self._active if r.expires <= now]
        for r in expired:
            self.release(r, now)
        return expired

    def retry_after(self, nbytes: int, now: float) -> int:
        """Seconds until `nbytes` are likely free, if reservations end after the mean hold time."""
        missing = self.reserved + nbytes - self.capacity
        for r in sorted(self._active, key=lambda r: r.started):
            missing -= r.nbytes
            if missing <= 0:
                return min(60, max(1, math.ceil(r.started + self.mean_hold_s - now)))
        return 60


@dataclass
class Ledgers:
    """Ledgers by budget key; capacities follow the policies, reservations survive a change."""

    _by_key: dict[str, Ledger] = field(default_factory=dict)

    def set_capacity(self, key: str, capacity: int) -> Ledger:
        ledger = self._by_key.get(key)
        if ledger is None:
            ledger = self._by_key[key] = Ledger(capacity)
        ledger.capacity = capacity
        return ledger

    def get(self, key: str) -> Ledger | None:
        return self._by_key.get(key)

    def items(self) -> list[tuple[str, Ledger]]:
        return sorted(self._by_key.items())

    def expire(self, now: float) -> list[Reservation]:
        return [r for ledger in self._by_key.values() for r in ledger.expire(now)]
