"""Per-tenant requests and tokens per minute, charged at admission with what a request may use.

Token buckets refilled continuously: a tenant may burst up to one minute's worth, then gets its rate.
Charging the reserved tokens (prompt + max_tokens after the clamp) up front means concurrent requests
can never overshoot the limit together, which charging after the response allows. Each ext_proc
replica enforces its budget share of every limit, so the replicas together enforce the whole.
Pure, with the clock passed in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ext_proc.tenants import Tenant


@dataclass
class Bucket:
    per_minute: float
    level: float
    at: float

    def refill(self, now: float) -> None:
        self.level = min(self.per_minute, self.level + (now - self.at) * self.per_minute / 60)
        self.at = now

    def wait_s(self, amount: float) -> float:
        """Seconds until `amount` is there; inf when it never will be (more than a minute's worth)."""
        if amount > self.per_minute:
            return math.inf
        return max(0.0, (amount - self.level) * 60 / self.per_minute)


@dataclass(frozen=True)
class Charge:
    tenant: str
    requests: int
    tokens: int


@dataclass(frozen=True)
class OverLimit:
    what: str  # "requests" or "tokens"
    limit: int  # per minute, this replica's share of it
    retry_after: int  # seconds, 1..60


@dataclass
class RateLimits:
    share: float = 1.0
    _buckets: dict[tuple[str, str], Bucket] = field(default_factory=dict)

    def _bucket(self, tenant: str, what: str, per_minute: int, now: float) -> Bucket:
        limit = per_minute * self.share
        bucket = self._buckets.get((tenant, what))
        if bucket is None or bucket.per_minute != limit:
            # New: full. Its limit or share changed: as full as it was, in proportion.
            level = limit if bucket is None or bucket.per_minute <= 0 else bucket.level * limit / bucket.per_minute
            bucket = self._buckets[(tenant, what)] = Bucket(limit, level, now)
        bucket.refill(now)
        return bucket

    def charge(self, tenant: Tenant, tokens: int, now: float) -> Charge | OverLimit:
        """Takes one request and `tokens` from the tenant's buckets, or nothing and says which is short."""
        wanted = [(what, per_minute, amount) for what, per_minute, amount in (
            ("requests", tenant.requests_per_minute, 1), ("tokens", tenant.tokens_per_minute, tokens)) if per_minute]
        buckets = [(what, self._bucket(tenant.name, what, per_minute, now), amount)
                   for what, per_minute, amount in wanted]
        for what, bucket, amount in buckets:
            if bucket.level < amount:
                wait = bucket.wait_s(amount)
                return OverLimit(what, int(bucket.per_minute), 60 if math.isinf(wait) else min(60, max(1, math.ceil(wait))))
        for _, bucket, amount in buckets:
            bucket.level -= amount
        return Charge(tenant.name, 1, tokens)

    def refund(self, charge: Charge, now: float) -> None:
        """Gives back a charge whose request was refused after all (it never ran)."""
        for what, amount in (("requests", charge.requests), ("tokens", charge.tokens)):
            bucket = self._buckets.get((charge.tenant, what))
            if bucket is not None:
                bucket.refill(now)
                bucket.level = min(bucket.per_minute, bucket.level + amount)
