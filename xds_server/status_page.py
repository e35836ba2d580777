"""The control plane's HTTP port: the status page (`/`, static files, no build step), its data
(`/status.json`, and `/history.json` for its charts) and Prometheus metrics (`/metrics`).

`/status.json` asks every connected ext_proc replica for its own /status.json (the URL it put in its
node metadata), all at once and each with a short timeout: a replica that does not answer is named
with its error and the page still shows everything else. A background task asks them the same every
SAMPLE_INTERVAL_S, whether a page is open or not, to keep the charts' history (status_history.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import structlog
from aiohttp import web
from google.protobuf import json_format
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from xds_server.admin import fleet_status
from xds_server.control import Controller
from xds_server.metrics import registry_for
from xds_server.status import ReplicaReport, aggregate, model_statuses, status_url_of
from xds_server.status_history import DecisionDeltas, History, Sample, kv_use

STATIC_DIR = Path(__file__).parent / "static"
# The page polls every second: a replica slower than this is reported, not waited for.
FETCH_TIMEOUT_S = 0.5

_SESSION = web.AppKey("session", aiohttp.ClientSession)
_HISTORY = web.AppKey("history", History)


async def fetch_report(session: aiohttp.ClientSession, node_id: str, url: str,
                       timeout_s: float = FETCH_TIMEOUT_S) -> ReplicaReport:
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            resp.raise_for_status()
            body = await resp.json()
    except TimeoutError:
        return ReplicaReport(node_id, url, None, f"no answer within {timeout_s} s")
    except (aiohttp.ClientError, ValueError) as e:  # ValueError: not JSON
        return ReplicaReport(node_id, url, None, f"{type(e).__name__}: {e}")
    if not isinstance(body, dict):
        return ReplicaReport(node_id, url, None, "not a JSON object")
    return ReplicaReport(node_id, url, body)


async def fetch_reports(controller: Controller, session: aiohttp.ClientSession) -> list[ReplicaReport]:
    """Every connected replica's report, fetched at once."""
    clients = list(controller.server.servicer.clients.values())
    replicas = [(c.node_id, url) for c in clients if (url := status_url_of(c.metadata))]
    return list(await asyncio.gather(*(fetch_report(session, node, url) for node, url in replicas)))


async def status(controller: Controller, session: aiohttp.ClientSession) -> dict[str, Any]:
    reports = await fetch_reports(controller, session)
    fleet = json_format.MessageToDict(fleet_status(controller), preserving_proto_field_name=True)
    return aggregate(controller.catalog, fleet, reports, time.time())


async def keep_history(controller: Controller, session: aiohttp.ClientSession, history: History,
                       log: structlog.typing.FilteringBoundLogger) -> None:
    """Samples the replicas every history.interval_s, on a fixed rate: the admissions chart shows
    counts per interval, so intervals should be alike."""
    deltas = DecisionDeltas()
    loop = asyncio.get_running_loop()
    next_at = loop.time()
    while True:
        try:
            reports = await fetch_reports(controller, session)
            admitted, refused = deltas.step(reports)
            history.add(Sample(time.time(), kv_use(model_statuses(controller.catalog, reports)),
                               admitted, refused))
        except Exception:  # a replica's odd report must not end the history for good
            log.exception("status.history_sample_failed")
        # After a stall (a suspended process), start again from now rather than catch up in a burst.
        next_at = max(next_at + history.interval_s, loop.time())
        await asyncio.sleep(next_at - loop.time())


def status_app(controller: Controller) -> web.Application:
    registry = registry_for(controller.server.servicer)
    log = structlog.get_logger(component="status_page")

    async def page(_: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC_DIR / "index.html")

    async def status_json(request: web.Request) -> web.Response:
        # Live numbers: a cached copy would show a reservation that is gone.
        return web.json_response(await status(controller, request.app[_SESSION]),
                                 headers={"Cache-Control": "no-store"})

    async def history_json(request: web.Request) -> web.Response:
        return web.json_response(request.app[_HISTORY].to_json(controller.catalog),
                                 headers={"Cache-Control": "no-store"})

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def session(app: web.Application) -> AsyncIterator[None]:
        async with aiohttp.ClientSession() as s:
            app[_SESSION] = s
            yield

    async def sampler(app: web.Application) -> AsyncIterator[None]:
        app[_HISTORY] = History()
        task = asyncio.create_task(keep_history(controller, app[_SESSION], app[_HISTORY], log))
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    app = web.Application()
    app.cleanup_ctx.append(session)
    app.cleanup_ctx.append(sampler)  # after the session it uses: cleaned up before it
    app.router.add_get("/", page)
    app.router.add_get("/status.json", status_json)
    app.router.add_get("/history.json", history_json)
    app.router.add_get("/metrics", metrics)
    app.router.add_static("/static/", STATIC_DIR)
    return app


async def serve_http(controller: Controller, host: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(status_app(controller), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
