"""ext_proc/reconcile.py: ledgers corrected by the engines' own KV metrics, without sockets."""

from __future__ import annotations

import pytest

from ext_proc.engine_metrics import EngineLoad, NotPublishedYet, parse_engine_load
from ext_proc.ledger import Ledgers
from ext_proc.policy import EndpointPolicy, Policy
from ext_proc.prompt_gap import PromptGap
from ext_proc.reconcile import Reconciler, apply_sample, engine_used_bytes, is_idle
from ext_proc.scraper import EngineScraper, Sample
from ext_proc.state import AdmissionState

BPT, BLOCK = 100, 16
ENDPOINT = EndpointPolicy("e:1", 64 * BLOCK * BPT, "", "http://e:1/prometheus/metrics")
POLICY = Policy(name="m", protocol="openai", backend_model="m", max_context_tokens=1024, max_output_tokens=100,
                kv_bytes_per_token=BPT, tokens_per_block=BLOCK, endpoints=(ENDPOINT,), estimate_bytes_per_token=1.0,
                estimate_per_message=0, estimate_per_request=0, metrics_interval_s=1.0, metrics_stale_after_s=5.0)


def load(used_blocks: int | None, fraction: float = 0.0, running: int | None = 1, waiting: int | None = 0) -> EngineLoad:
    return EngineLoad(kv_used_fraction=fraction, kv_used_blocks=used_blocks, kv_max_blocks=64, tokens_per_block=BLOCK,
                      running=running, waiting=waiting)


def test_used_bytes_from_blocks_when_published_else_from_the_fraction() -> None:
    assert engine_used_bytes(load(10), ENDPOINT, POLICY) == 10 * BLOCK * BPT
    vllm = EngineLoad(kv_used_fraction=0.25)
    assert engine_used_bytes(vllm, ENDPOINT, POLICY) == ENDPOINT.budget_bytes // 4


@pytest.mark.parametrize(("engine", "idle"), [
    (load(0, running=0), True),
    (load(0, running=1), False),
    (load(0, running=0, waiting=2), False),
    (load(3, fraction=0.05, running=0), False),
    (load(0, running=None), False),  # unknown is not idle
])
def test_idle_means_nothing_running_waiting_or_held(engine: EngineLoad, idle: bool) -> None:
    assert is_idle(engine) is idle


def test_sample_counts_the_unexplained_use_for_this_replicas_share() -> None:
    ledgers = Ledgers(share=0.5)
    ledger = ledgers.set_budget("m", "e:1", ENDPOINT.budget_bytes)
    assert ledger.try_reserve(2 * BLOCK * BPT, 0.0, 900.0) is not None
    apply_sample(ledger, load(20), taken_at=1.0, endpoint=ENDPOINT, policy=POLICY, now=1.0)
    # Half of the engine's 20 blocks is this replica's to answer for: 10, of which 2 are its own.
    assert ledger.excess == 8 * BLOCK * BPT


def test_an_idle_engine_releases_reservations_admitted_well_before_the_sample() -> None:
    ledger = Ledgers().set_budget("m", "e:1", ENDPOINT.budget_bytes)
    old = ledger.try_reserve(BLOCK * BPT, 0.0, 900.0)
    recent = ledger.try_reserve(BLOCK * BPT, 8.0, 900.0)
    released = apply_sample(ledger, load(0, running=0), taken_at=10.0, endpoint=ENDPOINT, policy=POLICY, now=10.0)
    assert released == 1 and old is not None and old.released and recent is not None and not recent.released


class FixedScraper(EngineScraper):
    """Serves the samples a test sets instead of scraping."""

    def __init__(self) -> None:
        super().__init__()
        self.samples: dict[str, Sample] = {}

    def sample(self, key: str) -> Sample | None:
        return self.samples.get(key)


def reconciler(now: list[float]) -> tuple[Reconciler, FixedScraper, AdmissionState]:
    table = AdmissionState(Ledgers())
    table.replace([POLICY])
    scraper = FixedScraper()
    return Reconciler(table, scraper, clock=lambda: now[0]), scraper, table


def test_no_sample_or_a_stale_one_makes_the_endpoint_full() -> None:
    now = [100.0]
    rec, scraper, table = reconciler(now)
    ledger = table.ledgers.get("m", "e:1")
    assert ledger is not None
    rec.step()
    assert ledger.blind and ledger.headroom == 0
    scraper.samples[ENDPOINT.pool] = Sample(load(4), taken_at=99.5)
    rec.step()
    assert not ledger.blind and ledger.excess == 4 * BLOCK * BPT
    now[0] = 105.6  # the last sample is 6.1 s old, above stale_after_s
    rec.step()
    assert ledger.blind


def test_an_engine_that_answers_without_kv_numbers_yet_is_not_full() -> None:
    now = [100.0]
    rec, scraper, table = reconciler(now)
    scraper.samples[ENDPOINT.pool] = Sample(None, taken_at=99.9)
    rec.step()
    ledger = table.ledgers.get("m", "e:1")
    assert ledger is not None and not ledger.blind and ledger.headroom == ENDPOINT.budget_bytes


def test_trtllm_serve_declaring_its_gauges_without_values_is_not_published_yet() -> None:
    text = "# HELP trtllm_kv_cache_utilization x\n# TYPE trtllm_kv_cache_utilization gauge\n"
    with pytest.raises(NotPublishedYet):
        parse_engine_load(text)


def vllm(fraction: float, usable: int | None = 31, prompt_tokens: int | None = None) -> EngineLoad:
    return EngineLoad(kv_used_fraction=fraction, kv_max_blocks=None if usable is None else usable + 1,
                      kv_usable_blocks=usable, tokens_per_block=BLOCK, running=1, waiting=0, engine="vllm",
                      prompt_tokens=prompt_tokens)


def test_vllm_use_is_its_fraction_of_the_blocks_sequences_may_hold() -> None:
    """vLLM's usage gauge is 1 - free / (blocks - 1): a fraction of the usable blocks, not of the budget."""
    assert engine_used_bytes(vllm(10 / 31), ENDPOINT, POLICY) == 10 * BLOCK * BPT


def test_the_ledger_holds_no_more_than_the_cache_vllm_reports() -> None:
    ledgers = Ledgers(share=0.5)
    ledger = ledgers.set_budget("m", "e:1", ENDPOINT.budget_bytes)  # 64 blocks in the catalog
    apply_sample(ledger, vllm(0.0), taken_at=1.0, endpoint=ENDPOINT, policy=POLICY, now=1.0)
    assert ledger.capacity == 31 * BLOCK * BPT // 2
    apply_sample(ledger, vllm(0.0, usable=200), taken_at=2.0, endpoint=ENDPOINT, policy=POLICY, now=2.0)
    assert ledger.capacity == ENDPOINT.budget_bytes // 2  # the catalog's budget still bounds it
    apply_sample(ledger, vllm(0.0, usable=None), taken_at=3.0, endpoint=ENDPOINT, policy=POLICY, now=3.0)
    assert ledger.capacity == ENDPOINT.budget_bytes // 2


def test_samples_feed_the_prompt_gap() -> None:
    now = [100.0]
    rec, scraper, table = reconciler(now)
    rec.prompt_gap = gap = PromptGap()
    gap.admitted("m", "e:1", 0)
    for t, counter in ((99.0, 1000), (100.0, 1100)):
        now[0] = t + 0.5
        scraper.samples[ENDPOINT.pool] = Sample(vllm(0.1, prompt_tokens=counter), taken_at=t)
        rec.step()
        gap.admitted("m", "e:1", 80)
    assert gap.gap("m") == pytest.approx(80 / 100 - 1)


def test_requests_that_ended_during_the_scrape_are_no_excess() -> None:
    """The engine was read while a request still held its blocks; its stream ended before the sample
    was applied: what the ledger held when the scrape began explains that use."""
    ledger = Ledgers().set_budget("m", "e:1", ENDPOINT.budget_bytes)
    r = ledger.try_reserve(4 * BLOCK * BPT, 0.0, 900.0)
    assert r is not None and ledger.release(r, now=1.0)
    apply_sample(ledger, load(4), taken_at=0.9, endpoint=ENDPOINT, policy=POLICY, now=1.0,
                 held_at_scrape=4 * BLOCK * BPT)
    assert ledger.excess == 0
    apply_sample(ledger, load(4), taken_at=1.9, endpoint=ENDPOINT, policy=POLICY, now=2.0)
    assert ledger.excess == 4 * BLOCK * BPT  # still held at the next scrape: not this replica's
