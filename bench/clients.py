"""How the load generator sends one request and judges its answer, per wire protocol: an HTTP POST
over an aiohttp keep-alive pool, or a unary gRPC call over grpc.aio channels.

A client is an async context manager yielding `Send`: each call sends the same prebuilt request and
returns None on success or a short error label. The client is opened per phase, so connections are
made during the phase's warm-up.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import aiohttp
import grpc

Send = Callable[[], Awaitable[str | None]]
# (listener "host:port", request bytes, most requests in flight) -> a client for one phase.
Client = Callable[[str, bytes, int], AbstractAsyncContextManager[Send]]

# Far above any sane latency here; a request that takes this long counts as an error.
REQUEST_TIMEOUT_S = 10.0
_JSON = {"content-type": "application/json"}
# A few HTTP/2 connections rather than one, so both set-ups' Envoys spread the load over their
# workers (each connection stays on one worker); HTTP/1.1 gets one connection per request in flight.
_GRPC_CHANNELS = 4
# Without it, channels to the same target share one subchannel, i.e. one TCP connection.
_OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


def http_post(path: str) -> Client:
    """POSTs of a JSON body to `path`; only a 200 counts as success."""

    @asynccontextmanager
    async def open_client(listener: str, body: bytes, in_flight: int) -> AsyncIterator[Send]:
        url = f"http://{listener}{path}"
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=in_flight),
                                         cookie_jar=aiohttp.DummyCookieJar(),
                                         timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)) as session:
            async def send() -> str | None:
                try:
                    async with session.post(url, data=body, headers=_JSON) as resp:
                        await resp.read()
                        return None if resp.status == 200 else f"HTTP {resp.status}"
                except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                    return type(e).__name__

            yield send

    return open_client


def grpc_unary(method: str) -> Client:
    """Unary calls of `method` ("/package.Service/Method"); only status OK counts as success."""

    @asynccontextmanager
    async def open_client(listener: str, message: bytes, in_flight: int) -> AsyncIterator[Send]:
        channels = [grpc.aio.insecure_channel(listener, options=_OWN_CONNECTION)
                    for _ in range(min(in_flight, _GRPC_CHANNELS))]
        # No (de)serializers: the request is already serialized and the answer is not decoded, which
        # keeps the client's CPU per call low. A successful status is the whole check.
        calls = itertools.cycle([c.unary_unary(method) for c in channels])
        try:
            async def send() -> str | None:
                try:
                    await next(calls)(message, timeout=REQUEST_TIMEOUT_S)
                    return None
                except grpc.aio.AioRpcError as e:
                    return f"gRPC {e.code().name}"

            yield send
        finally:
            await asyncio.gather(*(c.close() for c in channels))

    return open_client
