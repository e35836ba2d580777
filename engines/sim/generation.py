"""Running one generation on the engine, whatever protocol asked for it.

Every front end does the same two things with a request: stream its chunks
as they are decoded, or wait for the whole text. Both must free the request's
KV blocks when the client goes away, which `run` guarantees.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, aclosing
from dataclasses import dataclass

from engines.sim.engine import Chunk, GenRequest, SimEngine


@dataclass(frozen=True)
class Completion:
    text: str
    completion_tokens: int
    finish_reason: str  # "stop" or "length"


def run(
    engine: SimEngine, request: GenRequest
) -> AbstractAsyncContextManager[AsyncIterator[Chunk]]:
    """The request's chunks, in an `async with` block.

    Admission errors (EngineFull, RequestTooLarge) surface on the first
    iteration. Leaving the block in any way, cancellation included, closes the
    generation and gives its KV blocks back.
    """
    return aclosing(engine.generate(request))


async def collect(chunks: AsyncIterator[Chunk]) -> Completion:
    """Joins a generation's chunks into its whole text."""
    text: list[str] = []
    last: Chunk | None = None
    async for last in chunks:
        text.append(last.text)
    assert last is not None and last.finish_reason is not None
    return Completion("".join(text), last.completion_tokens, last.finish_reason)


async def complete(engine: SimEngine, request: GenRequest) -> Completion:
    """Runs a generation to its end."""
    async with run(engine, request) as chunks:
        return await collect(chunks)
