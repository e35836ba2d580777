"""Reading a few Prometheus series over HTTP: the engine's KV state (and kvgate's ledger), for the
shedding comparator's decisions and for the benchmark's KV-over-time samples."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterable
from dataclasses import dataclass

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

LEDGER_RESERVED = "kvgate_kv_reserved_bytes"
LEDGER_BUDGET = "kvgate_kv_budget_bytes"

# A scrape that takes longer than this is a failed scrape, not a late one.
SCRAPE_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class EngineMetrics:
    """An engine's names for its KV state (bench/spike_engines.py has the simulator's and vLLM's). A name
    may select labels, as `name{label="value"}`."""

    path: str  # on the engine's HTTP port
    kv_utilization: str  # gauge, 0..1 of the cache
    waiting: str  # gauge: requests queued at the engine
    running: str  # gauge
    exhaustion: str  # counter of the engine's KV exhaustion: the simulator's events, vLLM's preemptions
    capacity_waiting: str  # gauge: requests queued for want of KV blocks


# The simulator's requests waiting are all waiting for KV blocks (or a batch slot, which the benchmark
# never fills); vLLM tells the two apart.
SIM_METRICS = EngineMetrics(path="/prometheus/metrics", kv_utilization="trtllm_kv_cache_utilization",
                            waiting="trtllm_num_requests_waiting", running="trtllm_num_requests_running",
                            exhaustion="kvgate_sim_kv_exhaustion_events_total",
                            capacity_waiting="trtllm_num_requests_waiting")
VLLM_METRICS = EngineMetrics(path="/metrics", kv_utilization="vllm:kv_cache_usage_perc",
                             waiting="vllm:num_requests_waiting", running="vllm:num_requests_running",
                             exhaustion="vllm:num_preemptions_total",
                             capacity_waiting='vllm:num_requests_waiting_by_reason{reason="capacity"}')

_SELECTOR = re.compile(r'^([^{]+)(?:\{(.*)\})?$')


def _selector(name: str) -> tuple[str, dict[str, str]]:
    match = _SELECTOR.match(name)
    assert match is not None, name
    labels = dict(re.findall(r'(\w+)="([^"]*)"', match[2] or ""))
    return match[1], labels


def parse(text: str, names: Iterable[str]) -> dict[str, float]:
    """The value of each named sample (summed over its labels, or the labels it selects) present in
    Prometheus text."""
    wanted = {name: _selector(name) for name in names}
    out: dict[str, float] = {}
    # Only the wanted lines are parsed: kvgate's ext_proc publishes ~140 lines of histograms whose
    # parsing took ~7 ms, a stall of the client's event loop that showed up as gaps between tokens.
    prefixes = tuple(sample for sample, _ in wanted.values())
    lines = "\n".join(line for line in text.splitlines() if line.startswith(prefixes))
    for family in text_string_to_metric_families(lines):
        for s in family.samples:
            for name, (sample, labels) in wanted.items():
                if s.name == sample and labels.items() <= s.labels.items():
                    out[name] = out.get(name, 0.0) + s.value
    return out


async def fetch(session: aiohttp.ClientSession, url: str, names: Iterable[str]) -> dict[str, float]:
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT_S)) as resp:
        resp.raise_for_status()
        return parse(await resp.text(), names)


@dataclass(frozen=True)
class EngineSample:
    t_s: float  # from the start of the run
    kv_utilization: float
    waiting: int
    running: int
    ledger_fraction: float | None  # kvgate's reserved / budget; None without kvgate
    capacity_waiting: int = 0  # of `waiting`, those waiting for KV blocks


async def sample_engine(session: aiohttp.ClientSession, names: EngineMetrics, engine_url: str,
                        ledger_url: str | None, t0: float, every_s: float, out: list[EngineSample]) -> None:
    """Appends a sample every `every_s` until cancelled; a failed scrape is skipped, not fatal."""
    loop = asyncio.get_running_loop()
    wanted = (names.kv_utilization, names.waiting, names.running, names.capacity_waiting)
    while True:
        started = loop.time()
        try:
            engine = await fetch(session, engine_url, wanted)
            ledger = await fetch(session, ledger_url, (LEDGER_RESERVED, LEDGER_BUDGET)) if ledger_url else {}
        except (aiohttp.ClientError, asyncio.TimeoutError):
            pass
        else:
            budget = ledger.get(LEDGER_BUDGET)
            out.append(EngineSample(started - t0, engine[names.kv_utilization], int(engine[names.waiting]),
                                    int(engine[names.running]),
                                    ledger[LEDGER_RESERVED] / budget if budget else None,
                                    int(engine[names.capacity_waiting])))
        await asyncio.sleep(max(0.0, started + every_s - loop.time()))
