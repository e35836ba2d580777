"""aiohttp pieces both HTTP personalities share: app keys, JSON and SSE
responses, and the simulator-only test hooks under /sim/."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator
from typing import Any, NoReturn

import orjson
from aiohttp import web

from engines.sim.config import SimConfig
from engines.sim.engine import Chunk, SimEngine
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

# Fault injection, off unless a request asks for it: the engine resets the connection of a request
# carrying this header once its generation has produced that many chunks (0: before the first), as
# an engine that crashes mid-response would. Tests send it through the gateway to exercise upstream
# resets on chosen requests; a real engine ignores the header. OpenAI front only, for now.
RESET_AFTER_HEADER = "x-sim-reset-after-chunks"


def requested_reset(request: web.Request) -> int | None:
    """The request's RESET_AFTER_HEADER; None without one. ValueError if it is not a count."""
    value = request.headers.get(RESET_AFTER_HEADER)
    if value is None:
        return None
    if not (value.isascii() and value.isdigit()):
        raise ValueError(f"{RESET_AFTER_HEADER} must be a non-negative integer, got {value!r}")
    return int(value)


async def reset_connection(request: web.Request) -> NoReturn:
    """Reset the client's TCP connection (RST, not a polite FIN), then end the handler the way
    a client disconnect does: cancelled, so every `async with generation.run(...)` frees its
    blocks."""
    transport = request.transport
    if transport is not None:
        sock = transport.get_extra_info("socket")
        if sock is not None:  # linger 0: close() sends RST
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    task = asyncio.current_task()
    assert task is not None
    task.cancel()
    await asyncio.sleep(0)  # the cancellation is delivered here
    raise AssertionError("unreachable: the handler was cancelled")


async def reset_after(
    request: web.Request, chunks: AsyncIterator[Chunk], count: int
) -> AsyncIterator[Chunk]:
    """The generation's chunks, but the connection is reset instead of handing over chunk
    `count` + 1. A generation with at most `count` chunks finishes normally."""
    handed = 0
    async for chunk in chunks:
        if handed == count:
            await reset_connection(request)
        yield chunk
        handed += 1


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
