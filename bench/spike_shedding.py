"""`python -m bench.spike_shedding`: the comparator of bench/spike, an Envoy ext_proc that sheds load
the way the Gateway API Inference Extension's endpoint picker does with its saturation detector.

It scrapes the engine's Prometheus metrics every 50 ms (the picker's default --refresh-metrics-interval;
trtllm-serve's names by default, vLLM's with --kv-metric and --waiting-metric, the picker's own source)
and refuses a request with 429 when the engine looks saturated: KV-cache utilisation >= 0.8, or
>= 5 requests waiting, or metrics older than 200 ms (the picker's defaults:
DefaultKVCacheUtilThreshold, DefaultQueueDepthThreshold, DefaultMetricsStalenessThreshold).
Anything else goes through untouched. The picker sheds only requests it may drop (priority < 0) and
lets the others through whatever the engine's state; here every request is sheddable, as the
benchmark's issue asks. It does not pick endpoints: the benchmark has one.

It answers the same two messages as kvgate's ext_proc (request headers, then the BUFFERED body),
behind the same filter configuration, so only the admission rule differs.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import grpc

from bench.spike_metrics import SIM_METRICS, fetch
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc
from envoy.service.ext_proc.v3.external_processor_pb2 import BodyResponse, ProcessingRequest, ProcessingResponse
from ext_proc.admission import Refusal
from ext_proc.apis import Convention
from ext_proc.responses import continue_headers, refuse

CONTINUE_BODY = ProcessingResponse(request_body=BodyResponse())


@dataclass(frozen=True)
class Thresholds:
    kv_utilization: float = 0.8
    queue_depth: int = 5
    staleness_s: float = 0.2


@dataclass
class EngineState:
    """The last successful scrape; none yet counts as stale."""

    kv_utilization: float = 0.0
    waiting: float = 0.0
    scraped_at: float = -math.inf


def saturation(state: EngineState, now: float, t: Thresholds) -> str | None:
    """Why the engine counts as saturated (the refusal's code), or None when it does not."""
    if now - state.scraped_at > t.staleness_s:
        return "shed_stale_metrics"
    if state.kv_utilization >= t.kv_utilization:
        return "shed_kv_utilization"
    if state.waiting >= t.queue_depth:
        return "shed_queue_depth"
    return None


@dataclass
class Shedder(external_processor_pb2_grpc.ExternalProcessorServicer):
    state: EngineState
    thresholds: Thresholds
    decisions: Counter[str] = field(default_factory=Counter)

    async def Process(self, request_iterator: AsyncIterator[ProcessingRequest],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[ProcessingResponse]:
        async for msg in request_iterator:
            kind = msg.WhichOneof("request")
            if kind == "request_headers":
                yield continue_headers()
            elif kind == "request_body":
                reason = saturation(self.state, time.monotonic(), self.thresholds)
                self.decisions[reason or "admitted"] += 1
                if reason is None:
                    yield CONTINUE_BODY
                else:
                    yield refuse(Refusal(429, reason, "system saturated, sheddable request dropped",
                                         type_="rate_limit_error"), Convention.OPENAI)


async def scrape(url: str, names: tuple[str, str], every_s: float, state: EngineState) -> None:
    """Refreshes `state` every `every_s` (start to start) until cancelled from the engine's KV utilisation
    and queue depth (`names`); a failed scrape leaves it to go stale."""
    kv, waiting = names
    async with aiohttp.ClientSession() as session:
        while True:
            started = time.monotonic()
            try:
                values = await fetch(session, url, names)
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass
            else:
                state.kv_utilization, state.waiting = values[kv], values[waiting]
                state.scraped_at = time.monotonic()
            await asyncio.sleep(max(0.0, started + every_s - time.monotonic()))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.spike_shedding", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True, help="gRPC port Envoy's ext_proc filter calls")
    p.add_argument("--engine-metrics", required=True, help="the engine's Prometheus URL")
    p.add_argument("--kv-metric", default=SIM_METRICS.kv_utilization, help="KV utilisation gauge (default: %(default)s)")
    p.add_argument("--waiting-metric", default=SIM_METRICS.waiting, help="queue depth gauge (default: %(default)s)")
    p.add_argument("--interval-ms", type=float, default=50.0, help="scrape interval (default: %(default)s)")
    defaults = Thresholds()
    p.add_argument("--kv-threshold", type=float, default=defaults.kv_utilization, help="(default: %(default)s)")
    p.add_argument("--queue-threshold", type=int, default=defaults.queue_depth, help="(default: %(default)s)")
    p.add_argument("--staleness-ms", type=float, default=1000 * defaults.staleness_s, help="(default: %(default)s)")
    return p.parse_args(argv)


async def run(args: argparse.Namespace) -> int:
    state = EngineState()
    shedder = Shedder(state, Thresholds(args.kv_threshold, args.queue_threshold, args.staleness_ms / 1000))
    server = grpc.aio.server()
    external_processor_pb2_grpc.add_ExternalProcessorServicer_to_server(shedder, server)
    if not server.add_insecure_port(f"{args.host}:{args.port}"):
        print(f"cannot bind {args.host}:{args.port}", file=sys.stderr)
        return 2
    await server.start()
    scraper = asyncio.create_task(scrape(args.engine_metrics, (args.kv_metric, args.waiting_metric),
                                         args.interval_ms / 1000, state))
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    print(f"shedding on {args.host}:{args.port}, scraping {args.engine_metrics} every {args.interval_ms:g} ms",
          flush=True)
    await stop.wait()
    scraper.cancel()
    await server.stop(1.0)
    print(f"decisions: {dict(shedder.decisions)}", flush=True)
    return 0


def main() -> None:
    sys.exit(asyncio.run(run(parse_args())))


if __name__ == "__main__":
    main()
