"""The simulator's fault-injection hook: a request carrying x-sim-reset-after-chunks has its connection
reset by the engine (a TCP RST, as a crashing engine gives), and its KV blocks are freed."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
import pytest

from engines.sim.http_common import RESET_AFTER_HEADER

from .helpers import MODEL, StartSim, wait_until


async def raw_post(
    url: str, path: str, body: dict, headers: dict[str, str]
) -> tuple[bytes, BaseException | None]:
    """POST over a plain socket; returns every byte received and how the connection ended
    (None: a clean end of stream, else the error reading raised)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    payload = orjson.dumps(body)
    fields = {"host": host, "content-type": "application/json",
              "content-length": str(len(payload)), "connection": "close", **headers}
    head = "".join(f"{k}: {v}\r\n" for k, v in fields.items())
    writer.write(f"POST {path} HTTP/1.1\r\n{head}\r\n".encode() + payload)
    received, ended = b"", None
    try:
        while chunk := await reader.read(65536):
            received += chunk
    except OSError as e:
        ended = e
    writer.close()
    return received, ended


async def state(url: str) -> dict:
    async with aiohttp.ClientSession() as session, session.get(url + "/sim/state") as response:
        return await response.json()


async def freed(url: str) -> bool:
    s = await state(url)
    return s["kv_blocks_used"] == 0 and s["running"] == 0


@pytest.mark.asyncio
async def test_stream_is_reset_after_the_chunks_asked_for(start_sim: StartSim) -> None:
    sim = await start_sim(itl_ms=5.0)
    body = {"model": MODEL, "prompt": "p", "max_tokens": 50, "stream": True}
    received, ended = await raw_post(sim.url, "/v1/completions", body, {RESET_AFTER_HEADER: "3"})
    assert received.startswith(b"HTTP/1.1 200")
    assert received.count(b"data: ") == 3 and b"[DONE]" not in received
    assert isinstance(ended, ConnectionResetError)  # an RST, not a clean close
    await wait_until(lambda: freed(sim.url))
    assert (await state(sim.url))["completed"] == 0


@pytest.mark.asyncio
@pytest.mark.parametrize("stream", [False, True])
async def test_reset_before_the_first_chunk_sends_nothing(start_sim: StartSim, stream: bool) -> None:
    sim = await start_sim(itl_ms=5.0)
    chat = [{"role": "user", "content": "hi"}]
    body = {"model": MODEL, "messages": chat, "max_tokens": 50, "stream": stream}
    received, ended = await raw_post(sim.url, "/v1/chat/completions", body, {RESET_AFTER_HEADER: "0"})
    assert received == b"" and isinstance(ended, ConnectionResetError)
    await wait_until(lambda: freed(sim.url))


@pytest.mark.asyncio
async def test_no_header_or_more_chunks_than_generated_change_nothing(start_sim: StartSim) -> None:
    sim = await start_sim()
    body = {"model": MODEL, "prompt": "p", "max_tokens": 4, "stream": True}
    for headers in ({}, {RESET_AFTER_HEADER: "4"}):
        received, ended = await raw_post(sim.url, "/v1/completions", body, headers)
        # The whole SSE stream, closed by the last chunk of the chunked encoding.
        assert ended is None and received.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")
    assert (await state(sim.url))["completed"] == 2


@pytest.mark.asyncio
@pytest.mark.parametrize("value", ["-1", "two", "²"])
async def test_a_bad_header_value_is_a_400(start_sim: StartSim, value: str) -> None:
    sim = await start_sim()
    body = {"model": MODEL, "prompt": "p"}
    async with aiohttp.ClientSession() as session, session.post(
        sim.url + "/v1/completions", json=body, headers={RESET_AFTER_HEADER: value}
    ) as response:
        assert response.status == 400
        assert RESET_AFTER_HEADER in (await response.json())["error"]["message"]
