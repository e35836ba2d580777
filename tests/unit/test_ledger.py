"""ext_proc/ledger.py: KV-budget bookkeeping with the clock passed in."""

from __future__ import annotations

from ext_proc.ledger import Ledger, Ledgers, Reservation

TTL = 900.0


def reserve(ledger: Ledger, nbytes: int, now: float = 0.0, ttl_s: float = TTL) -> Reservation:
    r = ledger.try_reserve(nbytes, now, ttl_s)
    assert r is not None, f"{nbytes} B did not fit ({ledger.reserved}/{ledger.capacity})"
    return r


def hold_and_release(ledger: Ledger, nbytes: int, start: float, end: float) -> None:
    """One reservation held from `start` to `end`, which feeds the mean hold time."""
    assert ledger.release(reserve(ledger, nbytes, start), end)


# --- capacity --------------------------------------------------------------------------------

def test_fill_to_the_byte() -> None:
    ledger = Ledger("m", "e:1", budget=1000)
    reserve(ledger, 600)
    reserve(ledger, 400)
    assert ledger.reserved == 1000
    assert ledger.try_reserve(1, 0.0, TTL) is None


def test_one_byte_over_is_refused() -> None:
    ledger = Ledger("m", "e:1", budget=1000)
    reserve(ledger, 600)
    assert ledger.try_reserve(401, 0.0, TTL) is None
    assert ledger.reserved == 600
    assert ledger.active == 1


def test_larger_than_capacity_never_fits() -> None:
    assert Ledger("m", "e:1", budget=1000).try_reserve(1001, 0.0, TTL) is None


def test_reservation_records_key_bytes_and_deadline() -> None:
    r = Ledger("model-a", "e:1", budget=1000).try_reserve(10, 5.0, 30.0)
    assert r is not None
    assert (r.key, r.nbytes, r.started, r.expires, r.released) == ("model-a@e:1", 10, 5.0, 35.0, False)


def test_equal_looking_reservations_are_distinct() -> None:
    ledger = Ledger("m", "e:1", budget=1000)
    a, b = reserve(ledger, 10), reserve(ledger, 10)
    assert a != b
    assert ledger.active == 2


# --- release ---------------------------------------------------------------------------------

def test_release_is_idempotent() -> None:
    ledger = Ledger("m", "e:1", budget=1000)
    r = reserve(ledger, 300)
    reserve(ledger, 200)
    assert ledger.release(r, 1.0) is True
    assert ledger.release(r, 2.0) is False
    assert ledger.reserved == 200
    assert ledger.active == 1
    assert r.released


def test_released_bytes_are_reusable() -> None:
    ledger = Ledger("m", "e:1", budget=1000)
    r = reserve(ledger, 1000)
    assert ledger.try_reserve(500, 0.0, TTL) is None
    ledger.release(r, 1.0)
    reserve(ledger, 500)
    reserve(ledger, 500)
    assert ledger.reserved == 1000


def test_release_of_a_foreign_reservation_does_nothing() -> None:
    mine, other = Ledger("m", "e:1", budget=1000), Ledger("m", "e:1", budget=1000)
    reserve(mine, 100)
    foreign = reserve(other, 100)
    assert mine.release(foreign, 1.0) is False
    assert mine.reserved == 100
    assert other.reserved == 100


# --- expire ----------------------------------------------------------------------------------

def test_expire_releases_only_past_deadline() -> None:
    ledger = Ledger("m", "e:1", budget=1000)
    short = reserve(ledger, 100, now=0.0, ttl_s=10.0)
    long = reserve(ledger, 200, now=0.0, ttl_s=20.0)
    assert ledger.expire(9.9) == []
    assert ledger.expire(15.0) == [short]
    assert short.released and not long.released
    assert ledger.reserved == 200
    assert ledger.expire(25.0) == [long]
    assert ledger.reserved == 0


def test_expire_skips_already_released() -> None:
    ledger = Ledger("m", "e:1", budget=1000)
    r = reserve(ledger, 100, ttl_s=10.0)
    ledger.release(r, 1.0)
    assert ledger.expire(100.0) == []
    assert ledger.reserved == 0


def test_release_after_expire_is_a_no_op() -> None:
    ledger = Ledger("m", "e:1", budget=1000)
    r = reserve(ledger, 100, ttl_s=10.0)
    ledger.expire(11.0)
    reserve(ledger, 900, now=11.0)
    assert ledger.release(r, 12.0) is False  # the stream end arrives late: nothing double-released
    assert ledger.reserved == 900


# --- retry_after -----------------------------------------------------------------------------

def test_retry_after_bounds() -> None:
    ledger = Ledger("m", "e:1", budget=100)
    reserve(ledger, 100, now=0.0)
    for now in (0.0, 0.5, 10.0, 1000.0):
        assert 1 <= ledger.retry_after(50, now) <= 60


def test_retry_after_at_least_one_second() -> None:
    ledger = Ledger("m", "e:1", budget=100)
    reserve(ledger, 100, now=0.0)
    assert ledger.retry_after(50, now=500.0) == 1


def test_retry_after_at_most_sixty_seconds() -> None:
    ledger = Ledger("m", "e:1", budget=100)
    hold_and_release(ledger, 10, start=0.0, end=1000.0)  # mean hold now ~200 s
    reserve(ledger, 100, now=1000.0)
    assert ledger.retry_after(50, now=1000.0) == 60


def test_retry_after_for_a_request_that_never_fits() -> None:
    ledger = Ledger("m", "e:1", budget=100)
    reserve(ledger, 10)
    assert ledger.retry_after(200, now=0.0) == 60


def test_retry_after_waits_for_the_oldest_holder_that_frees_enough() -> None:
    ledger = Ledger("m", "e:1", budget=100)
    hold_and_release(ledger, 10, start=0.0, end=50.0)  # mean hold 1 + 0.2 x 49 = 10.8 s
    reserve(ledger, 30, now=50.0)
    reserve(ledger, 70, now=55.0)
    assert ledger.retry_after(20, now=50.0) == 11   # the first (30 B) suffices: 50 + 10.8 - 50
    assert ledger.retry_after(50, now=50.0) == 16   # both needed: 55 + 10.8 - 50


def test_retry_after_shrinks_as_the_mean_hold_shrinks() -> None:
    ledger = Ledger("m", "e:1", budget=100)
    hold_and_release(ledger, 10, start=0.0, end=50.0)
    reserve(ledger, 60, now=50.0)
    seen = [ledger.retry_after(50, now=50.0)]
    for _ in range(5):
        hold_and_release(ledger, 40, start=50.0, end=50.0)  # instant requests
        seen.append(ledger.retry_after(50, now=50.0))
    # mean hold 10.8 s, then x 0.8 per instant release: 8.64, 6.91, 5.53, 4.42, 3.54
    assert seen == [11, 9, 7, 6, 5, 4]


def test_mean_hold_follows_released_reservations() -> None:
    ledger = Ledger("m", "e:1", budget=100)
    assert ledger.mean_hold_s == 1.0
    hold_and_release(ledger, 10, start=0.0, end=11.0)
    assert ledger.mean_hold_s == 3.0  # 1 + 0.2 x (11 - 1)


# --- Ledgers ---------------------------------------------------------------------------------

def test_ledgers_create_on_first_capacity() -> None:
    ledgers = Ledgers()
    assert ledgers.get("a", "e:1") is None
    ledger = ledgers.set_budget("a", "e:1", 100)
    assert ledgers.get("a", "e:1") is ledger
    assert ledger.capacity == 100


def test_set_budget_keeps_reservations() -> None:
    ledgers = Ledgers()
    ledger = ledgers.set_budget("a", "e:1", 1000)
    r = reserve(ledger, 800)
    assert ledgers.set_budget("a", "e:1", 500) is ledger
    assert ledger.reserved == 800
    assert ledger.try_reserve(1, 0.0, TTL) is None  # over the new capacity until released
    assert ledger.release(r, 1.0)
    reserve(ledger, 500)
    assert ledger.try_reserve(1, 0.0, TTL) is None


def test_set_budget_grow_admits_more() -> None:
    ledgers = Ledgers()
    ledger = ledgers.set_budget("a", "e:1", 100)
    reserve(ledger, 100)
    ledgers.set_budget("a", "e:1", 300)
    reserve(ledger, 200)
    assert ledger.reserved == 300


def test_ledgers_of_other_endpoints_or_pools_are_independent_and_sorted() -> None:
    ledgers = Ledgers()
    b = ledgers.set_budget("b", "e:2", 100)
    a = ledgers.set_budget("a", "e:1", 100)
    c = ledgers.set_budget("c", "e:1", 100, pool="e:1/other")
    reserve(a, 100)
    reserve(b, 10)
    reserve(c, 100)
    assert [lg.name for lg in ledgers.all()] == ["a@e:1", "b@e:2", "c@e:1"]
    assert [p.key for p in ledgers.pools()] == ["e:1", "e:1/other", "e:2"]
    assert (a.reserved, b.reserved, c.reserved) == (100, 10, 100)


def test_models_at_one_endpoint_draw_on_its_one_pool() -> None:
    """Aliases, or Triton's ensemble and BLS over one engine: one budget between them, whichever
    name a request came by (issue 11: two names each admitted the whole pool, 1.97x)."""
    ledgers = Ledgers()
    ensemble = ledgers.set_budget("ensemble", "e:1", 1000)
    bls = ledgers.set_budget("tensorrt_llm_bls", "e:1", 1000)
    assert ensemble.pool is bls.pool and ensemble is not bls
    r1, r2 = reserve(ensemble, 600), reserve(bls, 400)
    assert ensemble.try_reserve(1, 0.0, TTL) is None and bls.try_reserve(1, 0.0, TTL) is None
    assert (ensemble.reserved, bls.reserved, ensemble.active, bls.headroom) == (1000, 1000, 2, 0)
    assert (r1.ledger.model, r2.ledger.model) == ("ensemble", "tensorrt_llm_bls")  # each names its model
    assert bls.release(r1, 1.0)  # released through any door: the pool's
    assert ensemble.headroom == 600 and not ensemble.release(r1, 2.0)


def test_what_one_name_sets_on_the_pool_every_name_sees() -> None:
    ledgers = Ledgers()
    a, b = ledgers.set_budget("a", "e:1", 1000), ledgers.set_budget("b", "e:1", 1000)
    a.blind = True
    assert b.blind and b.headroom == 0
    b.observe_engine(used_bytes=300, reserved_then=0)
    assert (a.blind, a.excess, a.headroom) == (False, 300, 700)
    ledgers.set_share(0.5)
    assert (a.capacity, b.capacity) == (500, 500)  # the pool's share, not one per name


def test_a_model_moved_to_another_pool_leaves_its_reservations_where_they_were() -> None:
    ledgers = Ledgers()
    old = ledgers.set_budget("a", "e:1", 1000)
    r = reserve(old, 400)
    new = ledgers.set_budget("a", "e:1", 1000, pool="e:1/p")
    assert new is not old and ledgers.get("a", "e:1") is new and new.reserved == 0
    ledgers.retain({("a", "e:1")})
    assert ledgers.pool("e:1") is old.pool  # still holds r
    assert [x.key for x in ledgers.expire(TTL + 1)] == ["a@e:1"] and r.released
    ledgers.retain({("a", "e:1")})
    assert [p.key for p in ledgers.pools()] == ["e:1/p"]


def test_ledgers_expire_across_keys() -> None:
    ledgers = Ledgers()
    ra = reserve(ledgers.set_budget("a", "e:1", 100), 10, ttl_s=5.0)
    rb = reserve(ledgers.set_budget("b", "e:1", 100), 20, ttl_s=50.0)
    assert ledgers.expire(10.0) == [ra]
    assert set(ledgers.expire(60.0)) == {rb}


# --- shares, engine view, pruning ------------------------------------------------------------

def test_share_scales_capacity_of_every_ledger_now_and_later() -> None:
    ledgers = Ledgers()
    a = ledgers.set_budget("m", "a:1", 1000)
    ledgers.set_share(0.5)
    b = ledgers.set_budget("m", "b:1", 1001)
    assert (a.capacity, b.capacity) == (500, 500)  # rounded down: replicas never sum above the engine
    assert a.try_reserve(501, 0.0, TTL) is None
    reserve(a, 500)


def test_share_zero_admits_nothing() -> None:
    ledgers = Ledgers(share=0.0)
    assert ledgers.set_budget("m", "a:1", 1000).try_reserve(1, 0.0, TTL) is None


def test_engine_excess_counts_until_the_next_sample() -> None:
    ledger = Ledger("m", "e:1", budget=1000)
    reserve(ledger, 300)
    ledger.observe_engine(used_bytes=700, reserved_then=300)  # someone else holds 400
    assert (ledger.excess, ledger.used, ledger.headroom) == (400, 700, 300)
    assert ledger.try_reserve(301, 0.0, TTL) is None
    ledger.observe_engine(used_bytes=100, reserved_then=300)  # less than reserved: not credited
    assert (ledger.excess, ledger.headroom) == (0, 700)


def test_blind_ledger_is_full_until_a_sample_arrives() -> None:
    ledger = Ledger("m", "e:1", budget=1000)
    ledger.blind = True
    assert ledger.headroom == 0 and ledger.try_reserve(1, 0.0, TTL) is None
    ledger.observe_engine(used_bytes=0, reserved_then=0)
    assert not ledger.blind and ledger.headroom == 1000


def test_release_where_releases_only_matching() -> None:
    ledger = Ledger("m", "e:1", budget=1000)
    old, new = reserve(ledger, 100, now=1.0), reserve(ledger, 200, now=9.0)
    assert ledger.release_where(lambda r: r.started < 5.0, now=10.0) == [old]
    assert not new.released and ledger.reserved == 200


def test_long_reservations_are_counted_apart() -> None:
    ledger = Ledger("m", "e:1", budget=1000)
    r = ledger.try_reserve(600, 0.0, TTL, long=True)
    reserve(ledger, 100)
    assert r is not None and (ledger.reserved, ledger.reserved_long) == (700, 600)
    ledger.release(r, 1.0)
    assert (ledger.reserved, ledger.reserved_long) == (100, 0)


def test_retain_forgets_unnamed_ledgers_once_empty() -> None:
    ledgers = Ledgers()
    held = reserve(ledgers.set_budget("old", "e:1", 100), 10)
    ledgers.set_budget("new", "e:1", 100)
    ledgers.retain({("new", "e:1")})
    assert ledgers.get("old", "e:1") is not None  # still holds a reservation
    held.ledger.release(held, 1.0)
    ledgers.retain({("new", "e:1")})
    assert ledgers.get("old", "e:1") is None and ledgers.get("new", "e:1") is not None
