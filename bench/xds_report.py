"""Results of the control-plane benchmark (`python -m bench.xds`): Markdown tables for people, JSON
for tools."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from bench.machine import Machine
from bench.report import markdown_table

# The goals, checked against the conservative numbers (upper bounds, worst case).
GOAL_PROPAGATION_P99_MS = 100.0
GOAL_FANOUT_CLIENTS = 1000
GOAL_FANOUT_ALL_ACKED_S = 2.0
GOAL_RSS_MB = 300.0


@dataclass(frozen=True)
class Stats:
    n: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Stats:
        """Nearest-rank percentiles (as bench/loadgen.py); NaN when there is nothing."""
        if not seconds:
            return cls(0, math.nan, math.nan, math.nan, math.nan)
        ordered = sorted(seconds)

        def rank(q: float) -> float:
            return 1000 * ordered[max(0, math.ceil(q * len(ordered)) - 1)]

        return cls(len(ordered), rank(0.5), rank(0.99), 1000 * ordered[-1], 1000 * sum(ordered) / len(ordered))


@dataclass(frozen=True)
class ChangeKind:
    """All changes of one kind, to every Envoy: `observed` (the first answer showing the change was
    received from the last Envoy to show it) is an upper bound of the propagation time, `before` (the
    last probe to any Envoy still showing the old state was sent) a lower bound; both count from the
    start of the admin call. `envoy0`: `observed` for the first Envoy alone."""

    kind: str
    description: str
    observed: Stats
    envoy0: Stats
    before: Stats
    admin: Stats
    after_admin: Stats  # observed minus that change's admin call; negative: seen before the call returned
    other_answers: dict[str, int]  # answers that were neither the old nor the new state
    flaps: int  # the new state seen, then the old one again
    errors: int


@dataclass(frozen=True)
class Propagation:
    envoys: int
    poll_ms: float  # each probe loop's minimum gap between probe starts
    probe_gap: Stats  # actual gaps between one Envoy's probe starts while a change was pending
    probe_rtt: Stats  # one probe's round trip
    kinds: list[ChangeKind]
    all_changes: Stats  # `observed`, every kind together
    errors: list[str]


@dataclass(frozen=True)
class Fanout:
    clients: int
    channels: int
    changes: int
    connect_s: float  # fleet start to every stream having ACKed the first response
    all_acked: Stats  # admin call start to the last stream's ACK
    first_acked: Stats  # admin call start to the first stream's ACK
    admin: Stats
    server_cpu_ms_per_change: float  # admin call start to 250 ms after the last ACK
    client_cpu_ms_per_change: float  # the fleet process, same window
    server_cpu_connect_s: float  # while the N streams connected and got their first response
    rss_before_mib: float  # xds_server with no client
    rss_connected_mib: float  # with N streams, before any change
    rss_after_mib: float  # after the changes
    hwm_mib: float  # peak RSS (VmHWM) at the end
    errors: list[str]


@dataclass(frozen=True)
class Settings:
    changes: int
    envoys: int
    fanout_changes: int
    clients: list[int]
    per_channel: int
    poll_ms: float


@dataclass(frozen=True)
class XdsReport:
    command: str
    machine: Machine
    load_before: str  # /proc/loadavg when the run started
    settings: Settings
    propagation: Propagation | None
    fanout: list[Fanout]

    @property
    def errors(self) -> int:
        return len(self.propagation.errors if self.propagation else []) + sum(len(f.errors) for f in self.fanout)


def to_json(report: XdsReport) -> str:
    return json.dumps({**asdict(report), "errors": report.errors}, indent=2)


def _ms(v: float) -> str:
    return "-" if math.isnan(v) else f"{v:.1f}"


def _mib(v: float) -> str:
    return f"{v:.1f}"


def _propagation_table(p: Propagation) -> str:
    def others(k: ChangeKind) -> str:
        return ", ".join(f"{s} x{n}" for s, n in sorted(k.other_answers.items())) or "-"

    rows = [[k.kind, str(k.observed.n), _ms(k.observed.p50_ms), _ms(k.observed.p99_ms), _ms(k.observed.max_ms),
             _ms(k.envoy0.p50_ms), _ms(k.envoy0.p99_ms), _ms(k.envoy0.max_ms), _ms(k.before.p50_ms),
             _ms(k.before.max_ms), _ms(k.admin.p50_ms), _ms(k.admin.p99_ms), _ms(k.admin.max_ms),
             _ms(k.after_admin.p50_ms), _ms(k.after_admin.max_ms), others(k), str(k.flaps), str(k.errors)]
            for k in p.kinds]
    a = p.all_changes
    rows.append(["all", str(a.n), _ms(a.p50_ms), _ms(a.p99_ms), _ms(a.max_ms), *[""] * 13])
    return markdown_table(["change", "n", "p50", "p99", "max", "envoy-0 p50", "envoy-0 p99", "envoy-0 max", "lower p50",
                   "lower max", "admin p50", "admin p99", "admin max", "p50 - admin", "max - admin", "other answers",
                   "flaps", "errors"], rows)


def _fanout_table(fs: Sequence[Fanout]) -> str:
    return markdown_table(
        ["clients", "channels", "changes", "connect s", "all ACKed p50", "all ACKed max", "first ACK p50",
         "admin p50", "server CPU ms/change", "fleet CPU ms/change", "RSS idle MiB", "RSS connected MiB",
         "RSS after MiB", "peak MiB", "errors"],
        [[str(f.clients), str(f.channels), str(f.changes), f"{f.connect_s:.2f}", _ms(f.all_acked.p50_ms),
          _ms(f.all_acked.max_ms), _ms(f.first_acked.p50_ms), _ms(f.admin.p50_ms), _ms(f.server_cpu_ms_per_change),
          _ms(f.client_cpu_ms_per_change), _mib(f.rss_before_mib), _mib(f.rss_connected_mib),
          _mib(f.rss_after_mib), _mib(f.hwm_mib), str(len(f.errors))] for f in fs])


def goals(report: XdsReport) -> list[tuple[str, str, str]]:
    """(goal, measured, met) for each goal this run measured."""
    out = []
    p = report.propagation
    if p and p.kinds:
        worst = max(p.kinds, key=lambda k: k.observed.p99_ms)
        p99 = max(p.all_changes.p99_ms, worst.observed.p99_ms)
        out.append((f"propagation p99 < {GOAL_PROPAGATION_P99_MS:g} ms to every Envoy ({p.envoys})",
                    f"{_ms(p.all_changes.p99_ms)} ms over all changes; {_ms(worst.observed.p99_ms)} ms for "
                    f"{worst.kind}, the slowest kind (max {_ms(p.all_changes.max_ms)} ms)",
                    "yes" if p99 < GOAL_PROPAGATION_P99_MS else "NO"))
    for f in report.fanout:
        if f.clients == GOAL_FANOUT_CLIENTS:
            out.append((f"{GOAL_FANOUT_CLIENTS:,} streams all ACKed within {GOAL_FANOUT_ALL_ACKED_S:g} s",
                        f"max {_ms(f.all_acked.max_ms)} ms",
                        "yes" if f.all_acked.max_ms < 1000 * GOAL_FANOUT_ALL_ACKED_S else "NO"))
            mb = f.hwm_mib * 2**20 / 1e6
            out.append((f"xds_server memory < {GOAL_RSS_MB:g} MB at {GOAL_FANOUT_CLIENTS:,} streams",
                        f"peak {mb:.0f} MB ({_mib(f.hwm_mib)} MiB)", "yes" if mb < GOAL_RSS_MB else "NO"))
    return out


def render(report: XdsReport) -> str:
    s, m, p = report.settings, report.machine, report.propagation
    parts = ["## Control plane: propagation and ADS fan-out"]
    if p:
        parts += [
            f"### Propagation: admin API change to the data path of every Envoy (one gateway, {p.envoys} Envoys), "
            "ms from the admin call",
            "p50/p99/max: when the first probe answer showing the change was received from the last Envoy to show "
            "it (an upper bound); envoy-0: the same for the first Envoy alone; lower: when the last probe to any "
            "Envoy still showing the old state was sent (a lower bound); admin: the admin call itself "
            "(a new channel per call, as `kvgate models` makes); p50/max - admin: per change, the upper bound minus "
            "that change's admin call (negative: the data path showed the change before the call returned). "
            f"One probe in flight per Envoy (a thread each), started at most every {p.poll_ms:g} ms: actual gap "
            "between one Envoy's probe starts p50 "
            f"{_ms(p.probe_gap.p50_ms)} / p99 {_ms(p.probe_gap.p99_ms)} ms, probe round trip p50 "
            f"{_ms(p.probe_rtt.p50_ms)} / p99 {_ms(p.probe_rtt.p99_ms)} ms.",
            "\n".join(f"- {k.kind}: {k.description}" for k in p.kinds),
            _propagation_table(p),
        ]
    if report.fanout:
        parts += [
            "### ADS fan-out: one xds_server process, N ModelPolicy streams from one client process, ms from the "
            "admin call",
            f"{s.per_channel} streams per channel (TCP connection). all/first ACKed: the last/first stream's ACK of "
            "the new version handed to gRPC by the client process. CPU: from the admin call to 250 ms after the "
            "last ACK, per change. RSS: xds_server's VmRSS; peak: its VmHWM at the end.",
            _fanout_table(report.fanout),
        ]
    if g := goals(report):
        parts += ["### The issue's goals", markdown_table(["goal", "measured", "met"], [list(r) for r in g])]
    errors = (p.errors if p else []) + [e for f in report.fanout for e in f.errors]
    parts += [f"Errors: {report.errors}" + "".join(f"\n- {e}" for e in errors[:20]),
              "\n".join([f"command: {report.command}", f"date: {m.date}",
                         f"load average before (/proc/loadavg): {report.load_before}",
                         f"nproc: {m.nproc}", f"CPU: {m.cpu_model}", f"memory: {m.memory_gib} GiB",
                         f"Python: {m.python}", f"Envoy: {m.envoy}"])]
    return "\n\n".join(parts)
