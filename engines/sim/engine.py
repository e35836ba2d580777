"""Request scheduler modelled on TensorRT-LLM's GUARANTEED_NO_EVICT policy."""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from engines.sim.config import SimConfig
from engines.sim.kv_cache import PagedKVCache
from engines.sim.latency import LatencyModel
from engines.sim.text import StopScanner, generate_words


class EngineFull(Exception):
    """on_full="fail" and the request cannot be scheduled right now."""


class RequestTooLarge(Exception):
    """The request needs more KV blocks than the whole cache has, so it could never run."""


@dataclass(frozen=True)
class GenRequest:
    prompt_tokens: int
    max_tokens: int
    stop: tuple[str, ...] = ()
    key: str = ""  # selects the generated text; the same key gives the same words

    def __post_init__(self) -> None:
        if self.prompt_tokens < 0 or self.max_tokens < 1:
            raise ValueError("prompt_tokens must be >= 0 and max_tokens >= 1")


@dataclass(frozen=True)
class Chunk:
    text: str  # new text since the previous chunk, possibly empty on the last one
    completion_tokens: int  # tokens generated so far
    finish_reason: str | None = None  # "stop" or "length" on the last chunk only


@dataclass
class EngineStats:
    requests_total: int = 0
    completed: int = 0
    kv_exhaustion_events: int = 0  # requests that had to wait to be scheduled
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0


@dataclass
class _Waiter:
    request_id: int
    tokens: int
    admitted: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class SimEngine:
    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.kv = PagedKVCache(config.kv_blocks, config.tokens_per_block)
        self.latency = LatencyModel.from_config(config)
        self.stats = EngineStats()
        self._queue: deque[_Waiter] = deque()
        self._running = 0
        self._in_context = 0
        self._ids = itertools.count()

    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        return len(self._queue)

    @property
    def context(self) -> int:
        """Scheduled requests still in their context (prefill) phase, before their first token."""
        return self._in_context

    async def generate(self, request: GenRequest) -> AsyncIterator[Chunk]:
        """Schedules the request, then yields its text as it is decoded.

        Admission errors (EngineFull, RequestTooLarge) surface on the first
        iteration, before any chunk. Blocks are freed when the generator
        finishes, is closed or is cancelled; close it (contextlib.aclosing)
        when abandoning it early.
        """
        self.stats.requests_total += 1
        request_id = next(self._ids)
        await self._admit(request_id, request.prompt_tokens + request.max_tokens)
        try:
            self._in_context += 1
            try:
                await asyncio.sleep(self.latency.ttft(request.prompt_tokens))
            finally:
                self._in_context -= 1
            self.stats.prompt_tokens_total += request.prompt_tokens
            words = generate_words(self.config.seed, request.key)
            scanner = StopScanner(request.stop)
            for n in range(1, request.max_tokens + 1):
                if n > 1:
                    # sleep(0) still yields, so zero latency cannot starve the loop
                    await asyncio.sleep(self.latency.itl(self._running))
                self.stats.generation_tokens_total += 1
                text, stopped = scanner.feed(next(words) if n == 1 else " " + next(words))
                if stopped or n == request.max_tokens:
                    self.stats.completed += 1
                    tail = "" if stopped else scanner.flush()
                    yield Chunk(text + tail, n, "stop" if stopped else "length")
                    return
                if text:
                    yield Chunk(text, n)
        finally:
            self._release(request_id)

    async def _admit(self, request_id: int, tokens: int) -> None:
        # GUARANTEED_NO_EVICT: reserve the blocks of the whole sequence up front,
        # so a running request never has to be preempted.
        if self.kv.blocks_for(tokens) > self.kv.total_blocks:
            raise RequestTooLarge(
                f"prompt + max_tokens = {tokens} tokens exceed the KV cache "
                f"({self.kv.total_blocks} blocks of {self.kv.tokens_per_block} tokens)"
            )
        if not self._queue and self._try_start(request_id, tokens):
            return
        if self.config.on_full == "fail":
            raise EngineFull(
                f"no capacity: {self.kv.free_blocks} free KV blocks, "
                f"{self._running}/{self.config.max_batch} running"
            )
        self.stats.kv_exhaustion_events += 1
        waiter = _Waiter(request_id, tokens)
        self._queue.append(waiter)
        try:
            await waiter.admitted
        except asyncio.CancelledError:
            if waiter.admitted.done() and not waiter.admitted.cancelled():
                self._release(request_id)  # admitted in the same loop turn as the cancel
            else:
                self._queue.remove(waiter)
                self._schedule()  # the head leaving may let the next one in
            raise

    def _try_start(self, request_id: int, tokens: int) -> bool:
        if self._running >= self.config.max_batch or not self.kv.try_allocate(request_id, tokens):
            return False
        self._running += 1
        return True

    def _release(self, request_id: int) -> None:
        self.kv.free(request_id)
        self._running -= 1
        self._schedule()

    def _schedule(self) -> None:
        # Strict FIFO: a big request at the head blocks smaller ones behind it,
        # which is what makes a full cache a latency cliff.
        while self._queue and self._try_start(self._queue[0].request_id, self._queue[0].tokens):
            self._queue.popleft().admitted.set_result(None)
