"""bench/floor runs end to end, briefly: both set-ups serve wrk's load over the same upstream without
errors, and the gateway's side accounts for ext_proc's CPU (its numbers belong in docs/benchmarks.md)."""

from __future__ import annotations

from bench.floor import chat_body, main


def test_a_short_run_measures_both_set_ups() -> None:
    data = main(["--concurrency", "2", "--seconds", "1", "--rounds", "1", "--json"])
    sides = data["results"]["2"]
    assert set(sides) == {"envoy alone", "kvgate"}
    for side in sides.values():
        assert side["requests"] > 0 and side["errors"] == 0 and side["p50_ms"] > 0
    assert sides["kvgate"]["cpu_ms_per_request"]["ext_proc-0"] > 0
    assert "ext_proc-0" not in sides["envoy alone"]["cpu_ms_per_request"]


def test_the_long_prompt_body_has_the_size_asked_for() -> None:
    assert 0.95 * 220_000 <= len(chat_body(220)) <= 1.05 * 220_000
