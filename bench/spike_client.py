"""The open-loop streaming client of bench/spike: sends each planned request at its due time whatever
the answers do, and records when each token arrived.

Streaming chat completions (SSE) over one aiohttp session to the set-up's listener. A request is
refused when the answer is not a 200 (kvgate's and the comparator's 429, an engine's or Envoy's 503);
it gives up when no token came `give_up_s` after it was due, as a waiting user would; it is
unfinished when the run ended while it still streamed or waited. No retries: a refusal is counted
as one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field

import aiohttp
import orjson

from bench.spike_scenario import STEADY, Planned

REFUSED, GAVE_UP, ERROR, UNFINISHED, DONE = "refused", "gave_up", "error", "unfinished", "done"
CHAT_PATH = "/v1/chat/completions"


@dataclass
class Recording:
    """One request as the client saw it; times in seconds from the start of the run."""

    planned: Planned
    sent_s: float | None = None
    answered_s: float | None = None  # when the response status arrived (with the first token, if any)
    status: int | None = None
    outcome: str | None = None  # one of the constants above; None while in flight
    code: str = ""  # the refusal's error code, or the error
    token_s: list[float] = field(default_factory=list)


def _error_code(body: bytes) -> str:
    try:
        return str(orjson.loads(body)["error"]["code"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return body[:60].decode(errors="replace").strip()


async def _stream(session: aiohttp.ClientSession, rec: Recording, headers: Mapping[str, str], t0: float,
                  give_up_s: float) -> None:
    loop = asyncio.get_running_loop()
    rec.sent_s = loop.time() - t0
    try:
        # The engine sends its response headers with the first token, so this deadline covers both.
        async with asyncio.timeout_at(t0 + rec.planned.due_s + give_up_s) as first_token:
            async with session.post(CHAT_PATH, data=rec.planned.body, headers=headers) as resp:
                rec.status, rec.answered_s = resp.status, loop.time() - t0
                if resp.status != 200:
                    rec.outcome = REFUSED if resp.status in (429, 503) else ERROR
                    rec.code = _error_code(await resp.read())
                    return
                async for line in resp.content:
                    # Only token events carry "content" (the closing event has an empty delta):
                    # no JSON parsing, which keeps this client's cost per token small.
                    if line.startswith(b"data: {") and b'"content"' in line:
                        rec.token_s.append(loop.time() - t0)
                        if len(rec.token_s) == 1:
                            first_token.reschedule(None)
                    elif line.startswith(b"data: [DONE]"):
                        rec.outcome = DONE
        if rec.outcome is None:
            rec.outcome, rec.code = ERROR, "stream ended without [DONE]"
    except TimeoutError:
        rec.outcome = GAVE_UP
    except aiohttp.ClientError as e:
        rec.outcome, rec.code = ERROR, type(e).__name__


async def run_load(url: str, plan: list[Planned], headers: Mapping[str, Mapping[str, str]], t0: float,
                   give_up_s: float, stop_at: float) -> list[Recording]:
    """Sends `plan` open loop from loop time `t0`, with each kind's extra `headers`; returns once
    every steady request is over, or at loop time `stop_at`, when whatever still runs is cut
    (UNFINISHED). Burst requests still streaming then are cut too: the run measures steady traffic."""
    loop = asyncio.get_running_loop()
    recordings = [Recording(p) for p in plan]
    tasks: list[asyncio.Task[None]] = []
    steady: list[asyncio.Task[None]] = []
    # No connection limit: open loop means no request waits for another's connection.
    async with aiohttp.ClientSession(url, connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=None, sock_connect=5)) as session:
        for rec in recordings:
            await asyncio.sleep(max(0.0, t0 + rec.planned.due_s - loop.time()))
            h = {"content-type": "application/json", **headers.get(rec.planned.kind, {})}
            task = asyncio.create_task(_stream(session, rec, h, t0, give_up_s))
            tasks.append(task)
            if rec.planned.kind == STEADY:
                steady.append(task)
        if steady:
            await asyncio.wait(steady, timeout=max(0.0, stop_at - loop.time()))
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for rec in recordings:
        if rec.outcome is None:
            rec.outcome = UNFINISHED
    return recordings
