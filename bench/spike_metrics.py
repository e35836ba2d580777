"""Reading a few Prometheus series over HTTP: the engine's KV state (and kvgate's ledger), for the
shedding comparator's decisions and for the benchmark's KV-over-time samples."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

KV_UTILIZATION = "trtllm_kv_cache_utilization"
WAITING = "trtllm_num_requests_waiting"
RUNNING = "trtllm_num_requests_running"
EXHAUSTION = "kvgate_sim_kv_exhaustion_events_total"
LEDGER_RESERVED = "kvgate_kv_reserved_bytes"
LEDGER_BUDGET = "kvgate_kv_budget_bytes"

# A scrape that takes longer than this is a failed scrape, not a late one.
SCRAPE_TIMEOUT_S = 2.0


def parse(text: str, names: Iterable[str]) -> dict[str, float]:
    """The value of each named sample (summed over its labels) present in Prometheus text."""
    wanted, out = set(names), {}
    # Only the wanted lines are parsed: kvgate's ext_proc publishes ~140 lines of histograms whose
    # parsing took ~7 ms, a stall of the client's event loop that showed up as gaps between tokens.
    lines = "\n".join(line for line in text.splitlines() if line.startswith(tuple(wanted)))
    for family in text_string_to_metric_families(lines):
        for sample in family.samples:
            if sample.name in wanted:
                out[sample.name] = out.get(sample.name, 0.0) + sample.value
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


async def sample_engine(session: aiohttp.ClientSession, engine_url: str, ledger_url: str | None, t0: float,
                        every_s: float, out: list[EngineSample]) -> None:
    """Appends a sample every `every_s` until cancelled; a failed scrape is skipped, not fatal."""
    loop = asyncio.get_running_loop()
    while True:
        started = loop.time()
        try:
            engine = await fetch(session, engine_url, (KV_UTILIZATION, WAITING, RUNNING))
            ledger = await fetch(session, ledger_url, (LEDGER_RESERVED, LEDGER_BUDGET)) if ledger_url else {}
        except (aiohttp.ClientError, asyncio.TimeoutError):
            pass
        else:
            budget = ledger.get(LEDGER_BUDGET)
            out.append(EngineSample(started - t0, engine[KV_UTILIZATION], int(engine[WAITING]),
                                    int(engine[RUNNING]),
                                    ledger[LEDGER_RESERVED] / budget if budget else None))
        await asyncio.sleep(max(0.0, started + every_s - loop.time()))
