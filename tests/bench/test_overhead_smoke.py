"""The overhead benchmark runs end to end. Its numbers are checked for presence, never for speed:
timings belong in docs/benchmarks.md, not in assertions."""

from __future__ import annotations

import json
import math

import pytest

from bench.overhead import main


def test_overhead_benchmark_measures_both_setups(capsys: pytest.CaptureFixture[str]) -> None:
    report = main(["--duration", "1", "--warmup", "0.2", "--rates", "50", "--concurrency", "2",
                   "--rounds", "1", "--profile", "--json"])

    assert report.errors == 0
    assert [c.load for c in report.comparisons] == ["50 req/s", "concurrency 2"]
    for c in report.comparisons:
        for side in (c.baseline, c.gateway):
            assert side.requests > 0
            assert side.throughput_rps > 0
            assert not math.isnan(side.p50_ms) and not math.isnan(side.p99_ms)
        assert set(c.baseline.cpu_ms_per_request) == {"client", "envoy", "sim", "total"}
        assert set(c.gateway.cpu_ms_per_request) == {"client", "envoy", "ext_proc", "sim", "total"}
        assert not math.isnan(c.added_p50_ms) and not math.isnan(c.throughput_ratio)
    printed = json.loads(capsys.readouterr().out)
    assert printed["errors"] == 0
    assert printed["command"].endswith("-m bench.overhead --duration 1 --warmup 0.2 --rates 50 --concurrency 2 "
                                       "--rounds 1 --profile --json")
