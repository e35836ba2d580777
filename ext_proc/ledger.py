"""KV-budget ledgers: who holds how many bytes of which engine's KV pool, and for how long.

The budget belongs to an engine's KV pool (`KVPool`), not to a catalog name: aliases of one model, and
Triton's ensemble and BLS over one TensorRT-LLM engine, are several names on one pool, and each name
having a budget of its own admitted the pool's worth once per name (issue 11: 1.97x with two names).
A `Ledger` is one catalog model's door into a pool at one endpoint: everything it counts is the pool's,
and the reservations made through it name the model (for metrics, wake-ups and decisions).

Pure bookkeeping with the clock passed in, so every rule is unit-tested without sleeping. What a pool
counts against its capacity is its reservations plus any use the engine reports that they do not
explain (other clients, leaks); an engine whose metrics went stale counts as full (`blind`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar


@dataclass(eq=False)  # identity: two equal-looking reservations are still two
class Reservation:
    ledger: Ledger  # the model's door it was made through: its pool holds the bytes
    nbytes: int
    started: float
    expires: float
    long: bool = False  # a long request, counted against the long-request cap (admission.py)
    released: bool = False

    @property
    def key(self) -> str:
        return self.ledger.name


@dataclass(eq=False)
class KVPool:
    """One engine's KV pool, as this replica may draw on it: its budget, what is reserved there and
    what the engine reports beyond that. `key` is its identity (the endpoint's address unless the
    catalog names pools: kvgate/catalog.py `Model.kv_pool_key`)."""

    key: str
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

    def reserve(self, ledger: Ledger, nbytes: int, now: float, ttl_s: float, long: bool = False) -> Reservation | None:
        if not self.fits(nbytes):
            return None
        r = Reservation(ledger, nbytes, now, now + ttl_s, long)
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

    def holds_for(self, ledger: Ledger) -> bool:
        return any(r.ledger is ledger for r in self._active)

    def expire(self, now: float) -> list[Reservation]:
        """The TTL backstop: release what outlived its deadline (a lost stream end)."""
        return self.release_where(lambda r: r.expires <= now, now)

    def release_where(self, predicate: Callable[[Reservation], bool], now: float) -> list[Reservation]:
        chosen = [r for r in self._active if predicate(r)]
        for r in chosen:
            self.release(r, now)
        return chosen

    def observe_engine(self, used_bytes: int, reserved_then: int) -> None:
        """The engine's use attributed to this replica, sampled when this pool held `reserved_then`:
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


T = TypeVar("T")


class _OfPool(Generic[T]):
    """An attribute (or method) of the ledger's pool, read and written through the ledger: every name
    on a pool sees, and sets, the same numbers."""

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    def __get__(self, ledger: Ledger, owner: type | None = None) -> T:
        value: T = getattr(ledger.pool, self._name)
        return value

    def __set__(self, ledger: Ledger, value: T) -> None:
        setattr(ledger.pool, self._name, value)


class Ledger:
    """One catalog model's budget at one endpoint: a door into that endpoint's KV pool. Without a pool
    given it has one of its own (a model alone on its engine)."""

    budget: _OfPool[int] = _OfPool()
    share: _OfPool[float] = _OfPool()
    reserved: _OfPool[int] = _OfPool()
    reserved_long: _OfPool[int] = _OfPool()
    excess: _OfPool[int] = _OfPool()
    blind: _OfPool[bool] = _OfPool()
    engine_budget: _OfPool[int | None] = _OfPool()
    short_at: _OfPool[float] = _OfPool()
    mean_hold_s: _OfPool[float] = _OfPool()
    # Read only (the pool's properties); `active` counts requests by any name.
    capacity: _OfPool[int] = _OfPool()
    used: _OfPool[int] = _OfPool()
    headroom: _OfPool[int] = _OfPool()
    active: _OfPool[int] = _OfPool()
    fits: _OfPool[Callable[[int], bool]] = _OfPool()
    release: _OfPool[Callable[[Reservation, float], bool]] = _OfPool()
    expire: _OfPool[Callable[[float], list[Reservation]]] = _OfPool()
    release_where: _OfPool[Callable[[Callable[[Reservation], bool], float], list[Reservation]]] = _OfPool()
    observe_engine: _OfPool[Callable[[int, int], None]] = _OfPool()
    retry_after: _OfPool[Callable[[int, float], int]] = _OfPool()

    def __init__(self, model: str, endpoint: str, budget: int = 0, share: float = 1.0,
                 pool: KVPool | None = None) -> None:
        self.model = model
        self.endpoint = endpoint
        self.pool = pool if pool is not None else KVPool(endpoint, budget, share)

    def __repr__(self) -> str:
        return f"Ledger({self.name!r}, pool={self.pool.key!r})"

    @property
    def name(self) -> str:
        return f"{self.model}@{self.endpoint}"

    def try_reserve(self, nbytes: int, now: float, ttl_s: float, long: bool = False) -> Reservation | None:
        """Reserves in the pool; the reservation names this ledger (its model)."""
        return self.pool.reserve(self, nbytes, now, ttl_s, long)


@dataclass
class Ledgers:
    """Pools by key, and each model's ledger (door) by (model, endpoint). Budgets follow the policies;
    reservations survive a change."""

    share: float = 1.0
    _pools: dict[str, KVPool] = field(default_factory=dict)
    _by_key: dict[tuple[str, str], Ledger] = field(default_factory=dict)

    def set_budget(self, model: str, endpoint: str, budget: int, pool: str = "") -> Ledger:
        """The model's ledger at `endpoint`, on the pool named `pool` (default: the endpoint's own).
        A model moved to another pool gets a new ledger there; reservations made through the old one
        stay in the old pool until released."""
        kv_pool = self._pools.get(pool or endpoint)
        if kv_pool is None:
            kv_pool = self._pools[pool or endpoint] = KVPool(pool or endpoint, budget, self.share)
        kv_pool.budget = budget
        ledger = self._by_key.get((model, endpoint))
        if ledger is None or ledger.pool is not kv_pool:
            ledger = self._by_key[(model, endpoint)] = Ledger(model, endpoint, pool=kv_pool)
        return ledger

    def set_share(self, share: float) -> None:
        self.share = share
        for pool in self._pools.values():
            pool.share = share

    def retain(self, keys: set[tuple[str, str]]) -> None:
        """Forget ledgers no policy names once nothing is held through them, and pools no ledger
        leads to once empty (their metrics go too)."""
        for key in [k for k, lg in self._by_key.items() if k not in keys and not lg.pool.holds_for(lg)]:
            del self._by_key[key]
        named = {lg.pool.key for lg in self._by_key.values()}
        for key in [k for k, p in self._pools.items() if k not in named and p.active == 0]:
            del self._pools[key]

    def get(self, model: str, endpoint: str) -> Ledger | None:
        return self._by_key.get((model, endpoint))

    def of_model(self, model: str, endpoints: list[str]) -> list[Ledger]:
        return [lg for e in endpoints if (lg := self._by_key.get((model, e))) is not None]

    def pool(self, key: str) -> KVPool | None:
        return self._pools.get(key)

    def pools(self) -> list[KVPool]:
        return [p for _, p in sorted(self._pools.items())]

    def all(self) -> list[Ledger]:
        return [lg for _, lg in sorted(self._by_key.items())]

    def expire(self, now: float) -> list[Reservation]:
        return [r for pool in list(self._pools.values()) for r in pool.expire(now)]
