"""EngineScraper against simulators on real sockets: what it sees, how it ages, what it survives."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from structlog.testing import capture_logs

from ext_proc.scraper import EngineScraper, Sample
from kvgate.cli.processes import free_port

from .helpers import MODEL, StartSim
from .triton_helpers import TritonSim

REPO = Path(__file__).resolve().parents[2]
INTERVAL_S = 0.1


@dataclass(frozen=True)
class Personality:
    """How to start one of the simulator's personalities and hold a request in it."""

    args: tuple[str, ...]
    health: str
    metrics: str  # the path the real engine publishes its Prometheus metrics at
    stream: str
    body: dict[str, Any]
    grpc: bool = False  # Triton's gRPC front needs a port of its own


TRTLLM_SERVE = Personality(
    (), "/health", "/prometheus/metrics", "/v1/completions",
    {"model": MODEL, "prompt": "long", "max_tokens": 500, "stream": True},
)  # fmt: skip
TRITON = Personality(
    ("--protocol", "triton", "--model", "ensemble"), "/v2/health/ready", "/metrics",
    "/v2/models/ensemble/generate_stream", {"text_input": "long", "max_tokens": 500, "stream": True}, grpc=True,
)  # fmt: skip


@asynccontextmanager
async def sim_process(p: Personality) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    """`python -m engines.sim` on a free port, slow enough (20 ms a token) to hold a request."""
    port = free_port()
    args = [*p.args, "--port", str(port), "--kv-blocks", "64", "--tokens-per-block", "16"]
    args += ["--ttft-base-ms", "0", "--itl-ms", "20"]
    if p.grpc:
        args += ["--grpc-port", str(free_port())]
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "engines.sim", *args, cwd=REPO,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:

            async def healthy() -> bool:
                assert process.returncode is None, "the simulator exited"
                try:
                    async with session.get(url + p.health) as response:
                        return response.status == 200
                except aiohttp.ClientConnectionError:
                    return False

            await wait_for(healthy, timeout=20.0)
        yield process, url
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


async def wait_for(condition: Callable[[], Any], timeout: float = 5.0) -> None:
    """Polls a (sync or async) condition every 10 ms."""
    deadline = time.monotonic() + timeout
    while True:
        ok = condition()
        if asyncio.iscoroutine(ok):
            ok = await ok
        if ok:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.01)


@asynccontextmanager
async def running(scraper: EngineScraper) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(scraper.run())
    try:
        yield task
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def failures(logs: list[dict[str, Any]], key: str) -> list[str]:
    return [e["error"] for e in logs if e["event"] == "engine_scraper.failing" and e["key"] == key]


@pytest.mark.asyncio
@pytest.mark.parametrize("personality", [TRTLLM_SERVE, TRITON], ids=["trtllm-serve", "triton"])
async def test_sees_a_request_in_flight_and_goes_stale_when_the_engine_stops(personality: Personality) -> None:
    scraper = EngineScraper(interval_s=INTERVAL_S)
    with capture_logs() as logs:
        async with (
            sim_process(personality) as (process, url),
            running(scraper) as task,
            aiohttp.ClientSession() as http,
        ):
            scraper.set_targets({"e1": url + personality.metrics})
            await wait_for(lambda: scraper.sample("e1") is not None)
            idle = scraper.fresh("e1", time.monotonic(), stale_after_s=1.0)
            assert idle is not None and (idle.kv_used_blocks, idle.kv_max_blocks, idle.tokens_per_block) == (0, 64, 16)

            response = await http.post(url + personality.stream, json=personality.body)
            assert (await response.content.readline()).startswith(b"data: ")  # generating: blocks held
            async with http.get(url + "/sim/state") as state_response:
                held = (await state_response.json())["kv_blocks_used"]
            assert held > 0  # the whole sequence, reserved up front

            def seen(blocks: int, requests: int) -> bool:
                s = scraper.sample("e1")
                return s is not None and (s.load.kv_used_blocks, s.load.running) == (blocks, requests)

            await wait_for(lambda: seen(held, 1))
            assert scraper.sample("e1").load.kv_used_fraction == held / 64  # type: ignore[union-attr]
            response.close()  # the client goes away: the engine frees the blocks
            await wait_for(lambda: seen(0, 0))

            last = scraper.sample("e1")
            process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(process.wait(), 10) == 0
            stale_after_s = 5 * INTERVAL_S
            await wait_for(lambda: scraper.fresh("e1", time.monotonic(), stale_after_s) is None)
            # Failed scrapes leave the last sample in place to age, never an empty one in its stead.
            assert scraper.sample("e1") is last
            assert time.monotonic() - last.taken_at > stale_after_s  # type: ignore[union-attr]
            assert not task.done()
    # Many failed rounds, one warning.
    assert [e["event"] for e in logs if e.get("key") == "e1"] == ["engine_scraper.ok", "engine_scraper.failing"]


@pytest.mark.asyncio
async def test_bad_targets_fail_alone_and_recover(start_sim: StartSim, start_triton: Callable[..., TritonSim]) -> None:
    trtllm = await start_sim(kv_blocks=64, tokens_per_block=16)
    triton = start_triton(kv_blocks=32, tokens_per_block=8)
    async with aiohttp.ClientSession() as http, http.get(trtllm.url + "/prometheus/metrics") as response:
        good_text = await response.text()
    page = {"body": "<html><body>It works!</body></html>"}

    async def lenient(_: web.Request) -> web.Response:
        return web.Response(text=page["body"], content_type="text/html")

    app = web.Application()
    app.router.add_get("/metrics", lenient)  # anything else: 404
    other = TestServer(app, host="127.0.0.1")
    await other.start_server()
    other_url = f"http://127.0.0.1:{other.port}"
    targets = {
        "trtllm": trtllm.url + "/prometheus/metrics",
        "triton": triton.http_url + "/metrics",
        "garbage": other_url + "/metrics",
        "missing": other_url + "/prometheus/metrics",
        "refused": f"http://127.0.0.1:{free_port()}/metrics",
    }
    # These servers share the test's event loop (and a busy machine): a roomier timeout than the
    # subprocess test's, or a slow answer would show up as a timeout among the expected failures.
    scraper = EngineScraper(interval_s=0.25)
    scraper.set_targets(targets)
    try:
        with capture_logs() as logs:
            async with running(scraper) as task:
                first = await wait_for_sample(scraper, "trtllm")
                # A few more rounds, so that repeated failures had their chance to be logged again.
                for _ in range(3):
                    first = await wait_for_sample(scraper, "trtllm", newer_than=first)
                assert not task.done()
                triton_load = scraper.sample("triton").load  # type: ignore[union-attr]
                assert triton_load.engine == "triton"
                assert (triton_load.kv_max_blocks, triton_load.tokens_per_block) == (32, 8)
                for key in ("garbage", "missing", "refused"):
                    assert scraper.sample(key) is None
                assert failures(logs, "garbage") == [
                    "ValueError: no engine KV metrics found: expected trtllm_kv_cache_utilization (trtllm-serve), "
                    "nv_trt_llm_kv_cache_block_metrics (Triton TensorRT-LLM backend) or vllm:kv_cache_usage_perc (vLLM)"
                ]
                assert failures(logs, "missing") == ["HTTP 404"]
                [refused] = failures(logs, "refused")
                assert refused.startswith("ClientConnectorError: Cannot connect to host 127.0.0.1")

                page["body"] = good_text  # the target now answers metrics
                await wait_for(lambda: scraper.sample("garbage") is not None)
                assert [e["event"] for e in logs if e.get("key") == "garbage"] == [
                    "engine_scraper.failing", "engine_scraper.ok",
                ]  # fmt: skip

                # New policies: keys that stay keep their samples; a key pointed elsewhere starts over.
                kept = scraper.sample("trtllm")
                scraper.set_targets({"trtllm": targets["trtllm"], "triton": targets["garbage"]})
                assert scraper.sample("trtllm") is kept and scraper.sample("triton") is None
                assert scraper.sample("garbage") is None and scraper.sample("refused") is None
                await wait_for(lambda: scraper.sample("triton") is not None)
                assert scraper.sample("triton").load.engine == "trtllm-serve"  # type: ignore[union-attr]
    finally:
        await other.close()


async def wait_for_sample(scraper: EngineScraper, key: str, newer_than: Sample | None = None) -> Sample:
    def newer() -> bool:
        s = scraper.sample(key)
        return s is not None and (newer_than is None or s.taken_at > newer_than.taken_at)

    await wait_for(newer)
    return scraper.sample(key)  # type: ignore[return-value]


@pytest.mark.asyncio
async def test_a_slow_engine_times_out_within_the_interval() -> None:
    """The per-request timeout keeps one hung engine from holding up the rounds."""
    release = asyncio.Event()

    async def hang(_: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="")

    app = web.Application()
    app.router.add_get("/metrics", hang)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    scraper = EngineScraper(interval_s=0.2, timeout_s=0.1)
    scraper.set_targets({"slow": f"http://127.0.0.1:{server.port}/metrics"})
    try:
        with capture_logs() as logs:
            started = time.monotonic()
            await scraper.scrape_once()
            assert time.monotonic() - started < 0.2
        assert failures(logs, "slow") == ["no answer within 0.1 s"]
    finally:
        release.set()
        await scraper.close()
        await server.close()


def test_the_timeout_must_be_below_the_interval() -> None:
    with pytest.raises(ValueError, match=r"timeout_s must be in \(0, interval_s=1.0\), got 1.0"):
        EngineScraper(interval_s=1.0, timeout_s=1.0)
    assert EngineScraper(interval_s=2.0).timeout_s == 1.6


@pytest.mark.asyncio
async def test_samples_age_by_the_injected_clock(start_sim: StartSim) -> None:
    sim = await start_sim()
    scraper = EngineScraper(clock=lambda: 100.0)
    scraper.set_targets({"e1": sim.url + "/prometheus/metrics"})
    assert scraper.sample("e1") is None and scraper.fresh("e1", 100.0, stale_after_s=1.0) is None
    try:
        await scraper.scrape_once()
    finally:
        await scraper.close()
    sample = scraper.sample("e1")
    assert sample is not None and sample.taken_at == 100.0
    assert scraper.fresh("e1", 101.0, stale_after_s=1.0) is sample.load
    assert scraper.fresh("e1", 101.5, stale_after_s=1.0) is None
