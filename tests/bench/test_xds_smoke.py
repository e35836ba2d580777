"""The control-plane benchmark runs end to end: propagation through a real gateway and ADS fan-out to a
small fleet. Its numbers are checked for presence, never for speed: timings belong in
docs/benchmarks.md, not in assertions."""

from __future__ import annotations

import json
import math

import pytest

from bench.xds import main, parse_args
from bench.xds_fleet import Fleet


def test_xds_benchmark_measures_propagation_and_fanout(capsys: pytest.CaptureFixture[str]) -> None:
    report = main(["--changes", "4", "--envoys", "2", "--clients", "10", "--fanout-changes", "2", "--per-channel", "4",
                   "--json"])

    assert report.errors == 0
    p = report.propagation
    assert p is not None and p.errors == [] and p.envoys == 2
    assert {k.kind: k.observed.n for k in p.kinds} == {"add": 2, "remove": 2, "clamp": 4}
    for k in p.kinds:
        assert k.errors == 0
        for stats in (k.observed, k.envoy0, k.before, k.admin):
            assert not math.isnan(stats.p50_ms) and not math.isnan(stats.max_ms)
        assert k.before.max_ms <= k.observed.max_ms  # the lower bound is below the upper one
        assert k.envoy0.max_ms <= k.observed.max_ms  # one Envoy is no later than the last of them
    assert p.all_changes.n == 8 and p.probe_rtt.n > 0 and p.probe_gap.n > 0

    (f,) = report.fanout
    assert (f.clients, f.channels, f.changes, f.errors) == (10, 3, 2, [])
    assert f.all_acked.n == f.first_acked.n == f.admin.n == 2
    assert f.first_acked.max_ms <= f.all_acked.max_ms
    for v in (f.connect_s, f.server_cpu_ms_per_change, f.client_cpu_ms_per_change, f.rss_before_mib,
              f.rss_connected_mib, f.rss_after_mib, f.hwm_mib):
        assert not math.isnan(v) and v >= 0

    printed = json.loads(capsys.readouterr().out)
    assert printed["errors"] == 0
    assert printed["command"].endswith("-m bench.xds --changes 4 --envoys 2 --clients 10 --fanout-changes 2 "
                                       "--per-channel 4 --json")
    assert printed["machine"]["nproc"] >= 1 and printed["load_before"]


def test_the_fleet_reports_a_version_once_every_stream_acked_it(capsys: pytest.CaptureFixture[str]) -> None:
    fleet = Fleet(size=2)
    fleet.on_ack(0, "A", 1.0)
    fleet.on_ack(1, "A", 2.0)
    fleet.on_ack(0, "B", 3.0)
    fleet.on_ack(0, "B", 3.5)  # a repeated ACK of the same version counts once
    fleet.on_ack(1, "B", 4.0)
    fleet.on_ack(1, "A", 5.0)  # back to a version seen before: a new transition
    fleet.on_ack(0, "A", 6.0)
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert events == [{"event": "ready", "version": "A", "first_s": 1.0, "last_s": 2.0},
                      {"event": "acked", "version": "B", "first_s": 3.0, "last_s": 4.0},
                      {"event": "acked", "version": "A", "first_s": 5.0, "last_s": 6.0}]


def test_quick_only_changes_the_defaults() -> None:
    assert (parse_args([]).clients, parse_args([]).envoys) == ([100, 1000], 10)
    assert (parse_args(["--quick"]).clients, parse_args(["--quick"]).envoys) == ([100], 3)
    assert parse_args(["--quick", "--clients", "10,20"]).clients == [10, 20]
    with pytest.raises(SystemExit):
        parse_args(["--changes", "0", "--clients", ""])
