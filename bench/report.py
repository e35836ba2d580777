"""Results of the overhead benchmark and their two forms: Markdown tables for people, JSON for tools."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

from bench.loadgen import Load, PhaseResult
from bench.machine import Machine


@dataclass(frozen=True)
class Side:
    """One set-up under one protocol and load, all rounds together."""

    requests: int
    errors: dict[str, int]
    p50_ms: float
    p99_ms: float
    throughput_rps: float
    cpu_ms_per_request: dict[str, float]  # by process role, plus "total"; empty without --profile

    @classmethod
    def of(cls, result: PhaseResult, cpu_s: Mapping[str, float]) -> Side:
        per_request = {role: 1000 * s / result.requests for role, s in cpu_s.items()} if result.requests else {}
        if per_request:
            per_request["total"] = sum(per_request.values())
        return cls(requests=result.requests, errors=dict(result.errors), p50_ms=result.percentile_ms(0.50),
                   p99_ms=result.percentile_ms(0.99), throughput_rps=result.throughput_rps,
                   cpu_ms_per_request=per_request)


@dataclass(frozen=True)
class Comparison:
    protocol: str  # as --protocols names it
    load: str
    rate: float | None
    concurrency: int | None
    baseline: Side
    gateway: Side
    added_p50_ms: float
    added_p99_ms: float
    p50_ratio: float
    p99_ratio: float
    throughput_ratio: float

    @classmethod
    def of(cls, protocol: str, load: Load, baseline: Side, gateway: Side) -> Comparison:
        def ratio(g: float, b: float) -> float:
            return g / b if b else float("nan")

        return cls(protocol=protocol, load=load.label, rate=load.rate, concurrency=load.concurrency, baseline=baseline,
                   gateway=gateway, added_p50_ms=gateway.p50_ms - baseline.p50_ms,
                   added_p99_ms=gateway.p99_ms - baseline.p99_ms,
                   p50_ratio=ratio(gateway.p50_ms, baseline.p50_ms), p99_ratio=ratio(gateway.p99_ms, baseline.p99_ms),
                   throughput_ratio=ratio(gateway.throughput_rps, baseline.throughput_rps))


@dataclass(frozen=True)
class Settings:
    duration_s: float
    warmup_s: float
    rounds: int
    requests: dict[str, str]  # protocol -> what one request is
    request_bytes: dict[str, int]  # protocol -> bytes of the JSON body or the protobuf message
    max_tokens: int
    profile: bool


@dataclass(frozen=True)
class Report:
    command: str
    machine: Machine
    settings: Settings
    comparisons: list[Comparison]

    @property
    def errors(self) -> int:
        return sum(sum(s.errors.values()) for c in self.comparisons for s in (c.baseline, c.gateway))


def to_json(report: Report) -> str:
    return json.dumps({**asdict(report), "errors": report.errors}, indent=2)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([line(headers), "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|", *map(line, rows)])


def _ms(v: float) -> str:
    return f"{v:.2f}"


def _x(v: float) -> str:
    return f"{v:.2f}x"


def _errors(c: Comparison) -> str:
    return f"{sum(c.baseline.errors.values())} / {sum(c.gateway.errors.values())}"


def _latency_table(cs: Sequence[Comparison]) -> str:
    return markdown_table(
        ["protocol", "load", "baseline p50", "baseline p99", "gateway p50", "gateway p99", "added p50", "added p99",
         "ratio p50", "ratio p99", "done req/s b / g", "errors b / g"],
        [[c.protocol, c.load, _ms(c.baseline.p50_ms), _ms(c.baseline.p99_ms), _ms(c.gateway.p50_ms),
          _ms(c.gateway.p99_ms), _ms(c.added_p50_ms), _ms(c.added_p99_ms), _x(c.p50_ratio), _x(c.p99_ratio),
          f"{c.baseline.throughput_rps:.0f} / {c.gateway.throughput_rps:.0f}", _errors(c)] for c in cs])


def _throughput_table(cs: Sequence[Comparison]) -> str:
    return markdown_table(
        ["protocol", "load", "baseline req/s", "gateway req/s", "ratio", "baseline p50 / p99", "gateway p50 / p99",
         "errors b / g"],
        [[c.protocol, c.load, f"{c.baseline.throughput_rps:.0f}", f"{c.gateway.throughput_rps:.0f}",
          _x(c.throughput_ratio), f"{_ms(c.baseline.p50_ms)} / {_ms(c.baseline.p99_ms)}",
          f"{_ms(c.gateway.p50_ms)} / {_ms(c.gateway.p99_ms)}", _errors(c)] for c in cs])


def _cpu_table(cs: Sequence[Comparison]) -> str:
    roles = ["client", "envoy", "ext_proc", "sim", "total"]
    rows = [[c.protocol, c.load, name, *(_ms(side.cpu_ms_per_request[r]) if r in side.cpu_ms_per_request else "-"
                             for r in roles)]
            for c in cs for name, side in (("baseline", c.baseline), ("gateway", c.gateway))]
    return markdown_table(["protocol", "load", "set-up", *roles], rows)


def render(report: Report) -> str:
    s, m = report.settings, report.machine
    open_loop = [c for c in report.comparisons if c.rate is not None]
    closed_loop = [c for c in report.comparisons if c.concurrency is not None]
    parts = [
        "## Overhead: Envoy alone vs Envoy + kvgate ext_proc",
        f"Zero-latency simulated engines shared by both set-ups. max_tokens {s.max_tokens} is each model's limit and "
        "each model name is its engine's, so ext_proc admits every request without rewriting it. "
        f"{s.rounds} round(s) of {s.warmup_s:g} s warm-up + {s.duration_s:g} s measured per set-up, protocol and "
        "load, baseline and gateway alternating. Latencies in ms.",
        "\n".join(f"- {protocol}: {text}" for protocol, text in s.requests.items()),
    ]
    if open_loop:
        parts += ["### Latency at fixed request rates (open loop; latency counted from when each request was due)",
                  _latency_table(open_loop)]
    if closed_loop:
        parts += ["### Highest sustained throughput (closed loop)", _throughput_table(closed_loop)]
    if s.profile:
        parts += ["### CPU ms per request, by process (warm-up included; client = this load generator)",
                  _cpu_table(report.comparisons)]
    parts += [f"Errors (failed requests: not an HTTP 200, not gRPC OK): {report.errors}",
              "\n".join([f"command: {report.command}", f"date: {m.date}", f"nproc: {m.nproc}",
                         f"CPU: {m.cpu_model}", f"memory: {m.memory_gib} GiB", f"Python: {m.python}",
                         f"Envoy: {m.envoy}"])]
    return "\n\n".join(parts)
