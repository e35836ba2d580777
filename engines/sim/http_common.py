"""aiohttp pieces both HTTP personalities share: app keys, JSON and SSE
responses, and the simulator-only test hooks under /sim/."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from engines.sim.config import SimConfig
from engines.sim.engine import SimEngine
from engines.sim.records import Records, record

CONFIG = web.AppKey("config", SimConfig)
ENGINE = web.AppKey("engine", SimEngine)
RECORDS = web.AppKey("records", Records)

# Open streams get this long to finish on shutdown; a simulator need not drain politely.
SHUTDOWN_TIMEOUT_S = 0.25

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


async def read_json_and_record(request: web.Request) -> tuple[Any, bool]:
    """Reads the body as JSON and records it as received.

    Returns (body, valid); a body that is not JSON is recorded (and returned)
    as text, so tests still see what arrived.
    """
    raw = await request.read()
    try:
        body, valid = orjson.loads(raw), True
    except orjson.JSONDecodeError:
        body, valid = raw.decode(errors="replace"), False
    record(request.app[RECORDS], request.path, request.headers.items(), body)
    return body, valid


class SseWriter:
    """Server-sent events, `data: <payload>` each.

    The status line and headers go out with the first event, so an error
    raised before it (such as an admission error) still becomes a proper HTTP
    status.
    """

    def __init__(self, request: web.Request) -> None:
        self._request = request
        self.response = web.StreamResponse(headers=SSE_HEADERS)

    async def send(self, data: Any) -> None:
        """Sends a str verbatim and anything else as JSON."""
        if not self.response.prepared:
            await self.response.prepare(self._request)
        payload = data.encode() if isinstance(data, str) else orjson.dumps(data)
        await self.response.write(b"data: " + payload + b"\n\n")

    async def finish(self) -> web.StreamResponse:
        if not self.response.prepared:
            await self.response.prepare(self._request)
        await self.response.write_eof()
        return self.response


# Simulator-only test hooks; neither trtllm-serve nor Triton has such routes.


async def _get_records(request: web.Request) -> web.Response:
    return json_response(list(request.app[RECORDS]))


async def _clear_records(request: web.Request) -> web.Response:
    request.app[RECORDS].clear()
    return web.Response(status=204)


async def _state(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    return json_response(
        {
            "kv_blocks_total": engine.kv.total_blocks,
            "kv_blocks_used": engine.kv.used_blocks,
            "running": engine.running,
            "waiting": engine.waiting,
            "kv_exhaustion_events": engine.stats.kv_exhaustion_events,
            "completed": engine.stats.completed,
        }
    )


def setup_sim_app(
    app: web.Application, config: SimConfig, engine: SimEngine, records: Records
) -> None:
    """Stores the shared state on the app and adds /sim/requests and /sim/state."""
    app[CONFIG] = config
    app[ENGINE] = engine
    app[RECORDS] = records
    app.router.add_get("/sim/requests", _get_records)
    app.router.add_delete("/sim/requests", _clear_records)
    app.router.add_get("/sim/state", _state)
