"""The overhead benchmark runs end to end, over both protocols. Its numbers are checked for presence,
never for speed: timings belong in docs/benchmarks.md, not in assertions."""

from __future__ import annotations

import json
import math

import pytest

from bench.overhead import main, parse_args


def test_overhead_benchmark_measures_both_setups_over_both_protocols(capsys: pytest.CaptureFixture[str]) -> None:
    report = main(["--protocols", "openai,grpc", "--duration", "1", "--warmup", "0.2", "--rates", "50",
                   "--concurrency", "2", "--rounds", "1", "--profile", "--json"])

    assert report.errors == 0
    assert [(c.protocol, c.load) for c in report.comparisons] == [
        ("openai", "50 req/s"), ("openai", "concurrency 2"), ("grpc", "50 req/s"), ("grpc", "concurrency 2")]
    for c in report.comparisons:
        for side in (c.baseline, c.gateway):
            assert side.requests > 0
            assert side.errors == {}
            assert side.throughput_rps > 0
            assert not math.isnan(side.p50_ms) and not math.isnan(side.p99_ms)
        assert set(c.baseline.cpu_ms_per_request) == {"client", "envoy", "sim", "total"}
        assert set(c.gateway.cpu_ms_per_request) == {"client", "envoy", "ext_proc", "sim", "total"}
        assert not math.isnan(c.added_p50_ms) and not math.isnan(c.throughput_ratio)
    printed = json.loads(capsys.readouterr().out)
    assert printed["errors"] == 0
    assert set(printed["settings"]["requests"]) == {"openai", "grpc"}
    assert printed["command"].endswith("-m bench.overhead --protocols openai,grpc --duration 1 --warmup 0.2 "
                                       "--rates 50 --concurrency 2 --rounds 1 --profile --json")


def test_protocols_flag_defaults_to_all_and_rejects_unknown_names() -> None:
    assert parse_args([]).protocols == ["openai", "grpc"]
    assert parse_args(["--protocols", "grpc"]).protocols == ["grpc"]
    with pytest.raises(SystemExit):
        parse_args(["--protocols", "grpc,http3"])
