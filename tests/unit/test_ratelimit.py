"""ext_proc/ratelimit.py and ext_proc/tenants.py: keys, allow-lists and per-minute limits, no sockets."""

from __future__ import annotations

import hashlib

import pytest

from ext_proc.ratelimit import Charge, OverLimit, RateLimits
from ext_proc.tenants import Tenant, TenantTable, Unauthenticated
from kvgate.v1 import policy_pb2

T = Tenant("t", frozenset({"*"}), requests_per_minute=3, tokens_per_minute=600, priority_class="")


def test_a_full_minute_may_be_spent_at_once_then_the_rate_refills() -> None:
    limits = RateLimits()
    assert isinstance(limits.charge(T, 500, now=0.0), Charge)
    over = limits.charge(T, 200, now=0.0)
    assert isinstance(over, OverLimit) and (over.what, over.limit) == ("tokens", 600)
    assert over.retry_after == 10  # 100 tokens short at 10 tokens/s
    assert isinstance(limits.charge(T, 200, now=10.0), Charge)


def test_requests_per_minute_counts_requests_whatever_their_size() -> None:
    limits = RateLimits()
    for _ in range(3):
        assert isinstance(limits.charge(T, 1, now=0.0), Charge)
    over = limits.charge(T, 1, now=0.0)
    assert isinstance(over, OverLimit) and over.what == "requests" and over.retry_after == 20


def test_a_refused_charge_takes_nothing() -> None:
    limits = RateLimits()
    assert isinstance(limits.charge(T, 700, now=0.0), OverLimit)  # more than a minute's worth
    assert limits.charge(T, 700, now=0.0).retry_after == 60  # type: ignore[union-attr]
    assert isinstance(limits.charge(T, 600, now=0.0), Charge)  # the failed one took no request either


def test_refund_gives_back_what_a_refused_request_was_charged() -> None:
    limits = RateLimits()
    charge = limits.charge(T, 600, now=0.0)
    assert isinstance(charge, Charge)
    limits.refund(charge, now=0.0)
    assert isinstance(limits.charge(T, 600, now=0.0), Charge)


def test_each_replica_enforces_its_share() -> None:
    limits = RateLimits(share=0.5)
    over = limits.charge(T, 301, now=0.0)
    assert isinstance(over, OverLimit) and over.limit == 300
    assert isinstance(limits.charge(T, 300, now=0.0), Charge)


def test_unlimited_tenants_are_never_refused() -> None:
    free = Tenant("f", frozenset({"*"}), 0, 0, "")
    assert all(isinstance(RateLimits().charge(free, 10**9, now=0.0), Charge) for _ in range(100))


def table(*keys: str) -> TenantTable:
    t = TenantTable()
    t.replace([policy_pb2.Tenant(name=f"t{i}", api_key_sha256=[hashlib.sha256(k.encode()).hexdigest()], models=["a"])
               for i, k in enumerate(keys)])
    return t


@pytest.mark.parametrize(("headers", "tenant"), [
    ({"authorization": "Bearer k0"}, "t0"),
    ({"authorization": "bearer k1"}, "t1"),
    ({"api-key": "k1"}, "t1"),
    ({"x-api-key": "k0"}, "t0"),
])
def test_keys_are_found_in_the_usual_headers(headers: dict[str, str], tenant: str) -> None:
    caller = table("k0", "k1").authenticate(headers)
    assert isinstance(caller, Tenant) and caller.name == tenant and caller.may_call("a") and not caller.may_call("b")


@pytest.mark.parametrize("headers", [{}, {"authorization": "Bearer nope"}, {"authorization": "Bearer "}])
def test_missing_or_unknown_keys_are_unauthenticated(headers: dict[str, str]) -> None:
    assert isinstance(table("k0").authenticate(headers), Unauthenticated)


def test_no_tenants_means_an_open_gateway() -> None:
    t = TenantTable()
    t.replace([])
    assert t.loaded and not t.required and t.authenticate({}) is None


def test_two_tenants_sharing_a_key_are_refused() -> None:
    with pytest.raises(ValueError, match="share an API key"):
        table("same", "same")
