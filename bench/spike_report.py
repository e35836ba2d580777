"""Results of bench/spike: per-request outcomes, per-set-up summaries, the issue's goals for kvgate,
and their two forms (Markdown for people, JSON for tools).

Steady-traffic numbers count the steady requests *due* in the measured window (from the burst to the
end of arrivals): the same requests in every set-up, burst or not, since the steady stream is
seeded apart from the burst.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from bench.loadgen import PhaseResult
from bench.machine import Machine
from bench.report import markdown_table  # the overhead benchmark's Markdown table, right-aligned
from bench.spike_client import DONE, ERROR, GAVE_UP, REFUSED, UNFINISHED, Recording
from bench.spike_metrics import EngineSample
from bench.spike_scenario import BURST, STEADY, Scenario
from bench.spike_setups import Setup

# Whose no-burst run every ratio (and every goal) is measured against.
BASELINE = "kvgate-noburst"


def percentile_ms(values_s: Sequence[float], q: float) -> float:
    """Nearest rank, as the other benchmarks count it; NaN for no values, inf when it lands on one."""
    return PhaseResult(latencies_s=list(values_s)).percentile_ms(q)


@dataclass(frozen=True)
class RequestResult:
    index: int
    kind: str
    due_s: float
    sent_s: float | None
    answered_s: float | None
    status: int | None
    outcome: str
    code: str
    prompt_tokens: int
    max_tokens: int
    tokens: int
    ttft_s: float | None  # from when it was due to its first token
    mean_itl_s: float | None  # mean gap between its tokens
    p99_gap_s: float | None  # its longest gaps
    slo_met: bool

    @classmethod
    def of(cls, rec: Recording, s: Scenario) -> RequestResult:
        p, times = rec.planned, rec.token_s
        gaps = [b - a for a, b in zip(times, times[1:])]
        ttft = times[0] - p.due_s if times else None
        mean_itl = sum(gaps) / len(gaps) if gaps else None
        return cls(index=p.index, kind=p.kind, due_s=p.due_s, sent_s=rec.sent_s, answered_s=rec.answered_s,
                   status=rec.status,
                   outcome=rec.outcome or UNFINISHED, code=rec.code, prompt_tokens=p.prompt_tokens,
                   max_tokens=p.max_tokens, tokens=len(times), ttft_s=ttft, mean_itl_s=mean_itl,
                   p99_gap_s=percentile_ms(gaps, 0.99) / 1000 if gaps else None,
                   slo_met=(rec.outcome == DONE and ttft is not None and ttft < s.slo_ttft_s
                            and (mean_itl or 0.0) < s.slo_itl_s))

    @property
    def ttft_or_inf(self) -> float:
        """Its TTFT; infinite when it never got a token (gave up, or still waiting at the end)."""
        return math.inf if self.ttft_s is None else self.ttft_s


@dataclass(frozen=True)
class Run:
    setup: Setup
    requests: list[RequestResult]
    samples: list[EngineSample]
    exhaustion_events: int  # the engine's exhaustion counter over the run: the simulator's events, vLLM's preemptions
    cpu_s: dict[str, float]  # role -> CPU seconds during the run
    wall_s: float
    repeats: int = 1  # runs of the set-up pooled into this one (pooled)


def pooled(runs: Sequence[Run]) -> Run:
    """One set-up's repeated runs as one: their requests and engine samples together (each sample's time
    still counted from its own run's start), counters and CPU summed. A p99 over three runs' 116 steady
    requests each is their 4th slowest, not one run's 2nd slowest."""
    cpu_s: dict[str, float] = {}
    for run in runs:
        for role, spent in run.cpu_s.items():
            cpu_s[role] = cpu_s.get(role, 0.0) + spent
    return Run(runs[0].setup, [r for run in runs for r in run.requests], [x for run in runs for x in run.samples],
               sum(run.exhaustion_events for run in runs), cpu_s, sum(run.wall_s for run in runs),
               sum(run.repeats for run in runs))


@dataclass(frozen=True)
class Summary:
    name: str
    label: str
    burst: bool
    steady_measured: int
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float  # over requests, of each request's mean ITL
    itl_p99_ms: float
    gap_p99_ms: float  # p99 over requests of each request's own p99 gap
    goodput_rps: float
    goodput_ratio: float  # against BASELINE's goodput
    ttft_p99_ratio: float  # against BASELINE's
    exhaustion_events: int
    refused_steady: int
    refused_burst: int
    failed_steady: int  # gave up, unfinished or errors
    gave_up_steady: int
    unfinished_steady: int  # still waiting or streaming when the run ended
    burst_sent: int
    burst_done: int
    burst_gave_up: int
    burst_cut: int  # still streaming (or waiting) when the run ended
    refusal_codes: dict[str, int]
    refusal_wait_max_s: float  # the longest from due time to a refusal (a gateway's wait queue shows here)
    kv_mean: float  # engine KV utilisation sampled in the measured window
    kv_peak: float
    waiting_peak: int  # engine queue, over the whole run
    capacity_wait_s: float  # request-seconds spent queued at the engine for KV blocks, over the whole run
    client_lag_max_ms: float  # worst delay between a request's due time and its sending
    cpu_s: dict[str, float]
    wall_s: float


def _ratio(a: float, b: float) -> float:
    if math.isnan(a) or math.isnan(b) or b == 0 or b == math.inf:
        return math.nan
    return a / b


def summarize(run: Run, s: Scenario) -> Summary:
    """One set-up's numbers; the ratios are left NaN for `with_ratios`."""
    lo, hi = s.window
    steady = [r for r in run.requests if r.kind == STEADY and lo <= r.due_s < hi]
    burst = [r for r in run.requests if r.kind == BURST]
    answered = [r for r in steady if r.outcome not in (REFUSED, ERROR)]
    done = [r for r in steady if r.outcome == DONE and r.mean_itl_s is not None]
    lags = [r.sent_s - r.due_s for r in run.requests if r.sent_s is not None]
    kv = [x.kv_utilization for x in run.samples if lo <= x.t_s < hi]
    return Summary(
        name=run.setup.name, label=run.setup.label, burst=run.setup.burst, steady_measured=len(steady),
        ttft_p50_ms=percentile_ms([r.ttft_or_inf for r in answered], 0.5),
        ttft_p99_ms=percentile_ms([r.ttft_or_inf for r in answered], 0.99),
        itl_p50_ms=percentile_ms([r.mean_itl_s for r in done], 0.5),
        itl_p99_ms=percentile_ms([r.mean_itl_s for r in done], 0.99),
        gap_p99_ms=percentile_ms([r.p99_gap_s for r in done], 0.99),
        goodput_rps=sum(r.slo_met for r in steady) / ((hi - lo) * run.repeats), goodput_ratio=math.nan,
        ttft_p99_ratio=math.nan,
        exhaustion_events=run.exhaustion_events,
        refused_steady=sum(r.outcome == REFUSED for r in steady),
        refused_burst=sum(r.outcome == REFUSED for r in burst),
        failed_steady=sum(r.outcome in (GAVE_UP, UNFINISHED, ERROR) for r in steady),
        gave_up_steady=sum(r.outcome == GAVE_UP for r in steady),
        unfinished_steady=sum(r.outcome == UNFINISHED for r in steady),
        burst_sent=len(burst), burst_done=sum(r.outcome == DONE for r in burst),
        burst_gave_up=sum(r.outcome == GAVE_UP for r in burst), burst_cut=sum(r.outcome == UNFINISHED for r in burst),
        refusal_codes=dict(Counter(f"{r.kind} {r.status} {r.code}" for r in run.requests if r.outcome == REFUSED)),
        refusal_wait_max_s=max((r.answered_s - r.due_s for r in run.requests
                                if r.outcome == REFUSED and r.answered_s is not None), default=math.nan),
        kv_mean=sum(kv) / len(kv) if kv else math.nan, kv_peak=max(kv, default=math.nan),
        waiting_peak=max((x.waiting for x in run.samples), default=0),
        # A pooled run's sample times restart with each of its runs: no interval spans two.
        capacity_wait_s=sum(a.capacity_waiting * max(0.0, b.t_s - a.t_s) for a, b in zip(run.samples, run.samples[1:])),
        client_lag_max_ms=1000 * max(lags, default=0.0), cpu_s=run.cpu_s, wall_s=run.wall_s)


def with_ratios(summaries: Sequence[Summary]) -> list[Summary]:
    """Goodput and p99 TTFT of each set-up against BASELINE's (NaN without it)."""
    base = next((x for x in summaries if x.name == BASELINE), None)
    if base is None:
        return list(summaries)
    return [replace(x, goodput_ratio=_ratio(x.goodput_rps, base.goodput_rps),
                    ttft_p99_ratio=_ratio(x.ttft_p99_ms, base.ttft_p99_ms)) for x in summaries]


@dataclass(frozen=True)
class Goal:
    goal: str
    measured: str
    met: bool | None  # None: a set-up it needs was not run


def goals(summaries: Sequence[Summary], exhaustion: str = "KV exhaustion events") -> list[Goal]:
    """The issue's goals for kvgate, against its own no-burst run and the two other set-ups; `exhaustion`
    names what the engine's exhaustion counter counts."""
    by = {x.name: x for x in summaries}
    k, base = by.get("kvgate"), by.get(BASELINE)
    first = f"zero {exhaustion} at the engine"
    if k is None or base is None:
        missing = "needs the kvgate and kvgate-noburst set-ups"
        return [Goal(g, missing, None) for g in (first, "steady p99 TTFT <= 1.5x no-burst",
                                                 "goodput >= 95% of no-burst", "goodput above (1) and (2)")]
    others = [by[n] for n in ("envoy", "shedding") if n in by]
    return [
        Goal(first, f"{k.exhaustion_events} {exhaustion}", k.exhaustion_events == 0),
        Goal("steady p99 TTFT <= 1.5x no-burst",
             f"{_ms(k.ttft_p99_ms)} vs {_ms(base.ttft_p99_ms)} ms ({_x(k.ttft_p99_ratio)})",
             k.ttft_p99_ratio <= 1.5),
        Goal("goodput >= 95% of no-burst",
             f"{k.goodput_rps:.3f} vs {base.goodput_rps:.3f} req/s ({100 * k.goodput_ratio:.1f}%)",
             k.goodput_ratio >= 0.95),
        Goal("goodput above (1) and (2)",
             f"{k.goodput_rps:.3f} req/s vs " + ", ".join(f"{o.label} {o.goodput_rps:.3f}" for o in others),
             all(k.goodput_rps > o.goodput_rps for o in others) if len(others) == 2 else None),
    ]


@dataclass(frozen=True)
class SpikeReport:
    command: str
    engine: str  # bench/spike_engines.py's name
    exhaustion: str  # what the engine's exhaustion counter counts, as the tables name it
    machine: Machine
    loadavg_before: str
    scenario: Scenario
    catalog: dict[str, Any]
    summaries: list[Summary]
    goals: list[Goal]
    runs: list[Run]
    wall_s: float
    repeats: int = 1  # each set-up's runs, pooled


def _ms(v: float) -> str:
    return "∞" if v == math.inf else "-" if math.isnan(v) else f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def _x(v: float) -> str:
    return "∞" if v == math.inf else "-" if math.isnan(v) else f"{v:.2f}x"


def _pct(v: float) -> str:
    return "-" if math.isnan(v) else f"{100 * v:.0f}%"


def _main_table(xs: Sequence[Summary], exhaustion: str) -> str:
    return markdown_table(
        ["set-up", "steady reqs", "TTFT p50 ms", "TTFT p99 ms", "p99 vs no-burst", "ITL p50 ms", "ITL p99 ms",
         "goodput req/s", "goodput vs no-burst", exhaustion, "refused steady", "refused burst",
         "failed steady"],
        [[x.label, str(x.steady_measured), _ms(x.ttft_p50_ms), _ms(x.ttft_p99_ms), _x(x.ttft_p99_ratio),
          _ms(x.itl_p50_ms), _ms(x.itl_p99_ms), f"{x.goodput_rps:.3f}", _pct(x.goodput_ratio),
          str(x.exhaustion_events), str(x.refused_steady), str(x.refused_burst), str(x.failed_steady)] for x in xs])


def _detail_table(xs: Sequence[Summary]) -> str:
    roles = ["client", "envoy", "ext_proc", "xds_server", "sim"]
    return markdown_table(
        ["set-up", "steady failed: gave up / cut / error", "burst sent: refused / gave up / done / cut",
         "slowest refusal s", "worst-gap p99 ms", "engine KV mean", "engine KV peak", "engine waiting peak",
         "waiting for KV, request-s", "client lag max ms", *(f"CPU s {r}" for r in roles), "wall s"],
        [[x.label, f"{x.gave_up_steady} / {x.unfinished_steady} / "
                   f"{x.failed_steady - x.gave_up_steady - x.unfinished_steady}",
          f"{x.burst_sent}: {x.refused_burst} / {x.burst_gave_up} / {x.burst_done} / {x.burst_cut}"
          if x.burst else "-", "-" if math.isnan(x.refusal_wait_max_s) else f"{x.refusal_wait_max_s:.2f}",
          _ms(x.gap_p99_ms),
          _pct(x.kv_mean), _pct(x.kv_peak), str(x.waiting_peak), f"{x.capacity_wait_s:.1f}",
          f"{x.client_lag_max_ms:.1f}",
          *(f"{x.cpu_s[r]:.1f}" if r in x.cpu_s else "-" for r in roles), f"{x.wall_s:.0f}"] for x in xs])


def _goals_table(gs: Sequence[Goal]) -> str:
    return markdown_table(["goal (kvgate)", "measured", "met"],
                  [[g.goal, g.measured, "n/a" if g.met is None else "yes" if g.met else "NO"] for g in gs])


def render(report: SpikeReport) -> str:
    s, m = report.scenario, report.machine
    lo, hi = s.window
    codes = [f"{x.label}: {code} x{n}" for x in report.summaries for code, n in sorted(x.refusal_codes.items())]
    parts = [
        "## Sequence-length spike (bench/spike)",
        f"Steady: Poisson {s.steady_rate:g} req/s of streaming chat, {s.prompt_words[0]}-{s.prompt_words[1]} words "
        f"of prompt, {s.steady_output_tokens} output tokens, from 0 to {s.duration_s:g} s. Burst: {s.burst_count} "
        f"requests for {s.burst_output_tokens} output tokens, due uniformly in {s.burst_start_s:g}-"
        f"{s.burst_start_s + s.burst_window_s:g} s. Measured: steady requests due in {lo:g}-{hi:g} s. "
        f"SLO: finished, TTFT < {1000 * s.slo_ttft_s:g} ms and mean ITL < {1000 * s.slo_itl_s:g} ms; goodput = "
        f"steady requests meeting it per second of the window. Clients give up after {s.give_up_s:g} s without a "
        f"token. Ratios are against \"{BASELINE}\"."
        + (f" Each set-up ran {report.repeats} times, in rounds; its numbers pool the runs' requests (goodput: "
           f"per second of one window)." if report.repeats > 1 else ""),
        _main_table(report.summaries, report.exhaustion),
        "TTFT counts from when a request was due; ∞: the percentile fell on a request that never got a token "
        "(gave up or still waiting at the end). ITL: each request's mean gap between tokens.",
        _detail_table(report.summaries),
        "Refusals (kind, status, code): " + ("; ".join(codes) if codes else "none"),
        "### Goals",
        _goals_table(report.goals),
        "\n".join([f"command: {report.command}", f"engine: {report.engine}", f"date: {m.date}", f"load average before: {report.loadavg_before}",
                   f"run took: {report.wall_s:.0f} s", f"nproc: {m.nproc}", f"CPU: {m.cpu_model}",
                   f"memory: {m.memory_gib} GiB", f"Python: {m.python}", f"Envoy: {m.envoy}"]),
    ]
    return "\n\n".join(parts)


def _finite(value: Any) -> Any:
    """JSON has no infinity or NaN: null stands for both."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def to_json(report: SpikeReport) -> str:
    return json.dumps(_finite(asdict(report)), indent=2, allow_nan=False)
