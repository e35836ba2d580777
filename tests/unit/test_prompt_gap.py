"""ext_proc/prompt_gap.py: prompt tokens admitted against what the engine reports it prefilled."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from ext_proc.prompt_gap import PromptGap


def test_no_gap_before_the_engine_has_prefilled_anything_in_the_window() -> None:
    gap = PromptGap()
    gap.admitted("m", "a:1", 50)
    assert gap.gap("m") is None
    gap.engine_sample("m", "a:1", 7000, 0.0)  # the counter as first read: a base, not traffic
    gap.engine_sample("m", "a:1", 7000, 1.0)
    assert gap.gap("m") is None


def test_the_gap_is_admitted_over_prefilled_in_the_window_over_every_endpoint() -> None:
    gap = PromptGap(window_s=10.0)
    for endpoint, counter in (("a:1", 500), ("b:1", 0)):
        gap.engine_sample("m", endpoint, counter, 0.0)
    gap.admitted("m", "a:1", 120)
    gap.admitted("m", "b:1", 30)
    gap.engine_sample("m", "a:1", 600, 1.0)
    gap.engine_sample("m", "b:1", 50, 1.0)
    assert gap.gap("m") == pytest.approx(150 / 150 - 1)
    gap.admitted("m", "a:1", 100)  # counted at admission; the engine has not started it yet
    gap.engine_sample("m", "a:1", 680, 2.0)
    assert gap.gap("m") == pytest.approx(250 / 230 - 1)


def test_the_window_moves_on() -> None:
    gap = PromptGap(window_s=10.0)
    gap.engine_sample("m", "a:1", 0, 0.0)
    gap.admitted("m", "a:1", 200)  # over-counted, long ago
    gap.engine_sample("m", "a:1", 100, 1.0)
    for t in range(2, 14):
        gap.admitted("m", "a:1", 10)
        gap.engine_sample("m", "a:1", 100 + 10 * (t - 1), float(t))
    assert gap.gap("m") == pytest.approx(0.0)


def test_an_engine_restart_counts_from_its_new_counter() -> None:
    gap = PromptGap()
    gap.engine_sample("m", "a:1", 900, 0.0)
    gap.admitted("m", "a:1", 40)
    gap.engine_sample("m", "a:1", 40, 1.0)  # restarted: 40 new, not -860
    assert gap.gap("m") == pytest.approx(0.0)


def test_metrics() -> None:
    gap = PromptGap()
    registry = CollectorRegistry()
    registry.register(gap)
    gap.engine_sample("m", "a:1", 10, 0.0)
    gap.admitted("m", "a:1", 30)
    gap.engine_sample("m", "a:1", 34, 1.0)
    text = generate_latest(registry).decode()
    assert 'kvgate_prompt_tokens_admitted_total{endpoint="a:1",model="m"} 30.0' in text
    assert 'kvgate_engine_prompt_tokens_total{endpoint="a:1",model="m"} 24.0' in text
    assert 'kvgate_prompt_tokens_gap_ratio{model="m"} 0.25' in text
