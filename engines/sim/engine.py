"""Request scheduler modelled on TensorRT-LLM's GUARANTEED_NO_EVICT policy, or on vLLM's paged one."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import deque
from collections.abc import AsyncIterator, Hashable
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
    # The chained hashes of the prompt's whole blocks (text.block_hashes), for prefix caching.
    prefix: tuple[Hashable, ...] = field(default=(), repr=False)

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
    prompt_tokens_total: int = 0  # counted once per request, when its first token is out
    generation_tokens_total: int = 0
    preemptions: int = 0  # running requests that lost their blocks to a growing one (vLLM flavor)
    # Prompt tokens looked up in the prefix cache at each scheduling, and those found (vLLM's counters).
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0


@dataclass
class _Waiter:
    request_id: int
    tokens: int
    prefix: tuple[Hashable, ...]
    admitted: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


@dataclass
class _Live:
    """A scheduled request; `preempted` once a growing one took its blocks (vLLM flavor)."""

    order: int  # when it was (last) scheduled: the newest is preempted first
    preempted: bool = False


class SimEngine:
    """TensorRT-LLM's GUARANTEED_NO_EVICT (flavor trtllm): a request holds the blocks of prompt +
    max_tokens from the moment it is scheduled, and waits in a strict FIFO until they are free.

    vLLM's (flavor vllm, as measured on vLLM 0.32, docs/vllm.md): one block of the cache is its null
    block; a request is scheduled when its prompt's blocks are free and takes more as its tokens are
    computed (the last token sampled is never written: prompt + max_tokens - 1 at most); when a running
    request needs a block and none is free, the most recently scheduled one is preempted (its blocks
    freed), goes back to the head of the queue and recomputes its prompt and output when scheduled
    again.

    With prefix caching, a prompt's leading blocks found in the cache are shared, not computed: its
    prefill takes the time of the rest only. With prefill lanes, prefills queue for them (a GPU computes
    one prefill batch at a time), so the time one saves is also saved for those behind it."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.paged = config.flavor == "vllm"
        self.kv = PagedKVCache(config.kv_blocks, config.tokens_per_block, reserved_blocks=1 if self.paged else 0,
                               prefix_caching=config.prefix_caching)
        self._lanes = asyncio.Semaphore(config.prefill_lanes) if config.prefill_lanes else None
        self.latency = LatencyModel.from_config(config)
        self.stats = EngineStats()
        self._queue: deque[_Waiter] = deque()
        self._live: dict[int, _Live] = {}
        self._in_context = 0
        self._ids = itertools.count()
        self._order = itertools.count()

    @property
    def running(self) -> int:
        return len(self._live)

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
        longest = request.prompt_tokens + request.max_tokens - (1 if self.paged else 0)
        if self.kv.blocks_for(longest) > self.kv.usable_blocks:
            raise RequestTooLarge(
                f"prompt + max_tokens = {request.prompt_tokens + request.max_tokens} tokens exceed the KV cache "
                f"({self.kv.usable_blocks} blocks of {self.kv.tokens_per_block} tokens)"
            )
        # The prompt's last token is always computed (it yields the first output token), so a cached
        # prefix stops at the last whole block before it, as in vLLM.
        prefix = request.prefix[:max(0, request.prompt_tokens - 1) // self.kv.tokens_per_block]
        # GUARANTEED_NO_EVICT reserves the blocks of the whole sequence up front, so a running request
        # never has to be preempted; vLLM takes the prompt's and grows.
        await self._admit(request_id, request.prompt_tokens if self.paged else longest, prefix)
        try:
            await self._prefill(request_id, request.prompt_tokens, prefix)
            self.stats.prompt_tokens_total += request.prompt_tokens
            words = generate_words(self.config.seed, request.key)
            scanner = StopScanner(request.stop)
            for n in range(1, request.max_tokens + 1):
                if n > 1:
                    # sleep(0) still yields, so zero latency cannot starve the loop
                    await asyncio.sleep(self.latency.itl(self.running))
                    if self.paged:  # computing token n writes the KV of token n - 1
                        await self._grow(request_id, request.prompt_tokens + n - 1, prefix)
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

    async def _prefill(self, request_id: int, tokens: int, prefix: tuple[Hashable, ...]) -> None:
        """The time to compute `tokens` tokens of context but the cached ones (in a prefill lane when
        they are limited); a request preempted meanwhile starts over."""
        while True:
            cached = min(tokens, self.kv.hit_blocks(request_id) * self.kv.tokens_per_block)
            self.stats.prefix_cache_queries += tokens
            self.stats.prefix_cache_hits += cached
            self._in_context += 1
            try:
                async with self._lanes or contextlib.nullcontext():
                    await asyncio.sleep(self.latency.ttft(tokens - cached))
            finally:
                self._in_context -= 1
            if not self._preempted(request_id):
                return
            await self._admit(request_id, tokens, prefix, resumed=True)

    def _preempted(self, request_id: int) -> bool:
        live = self._live.get(request_id)
        return live is None or live.preempted

    async def _grow(self, request_id: int, tokens: int, prefix: tuple[Hashable, ...]) -> None:
        """Blocks for `tokens` tokens (vLLM flavor): preempt the newest running request until they are
        free; preempted itself (or meanwhile), wait to be scheduled again and recompute."""
        while self._preempted(request_id) or not self.kv.grow(request_id, tokens):
            if self._preempted(request_id):
                await self._admit(request_id, tokens, prefix, resumed=True)
                await self._prefill(request_id, tokens, prefix)
                return
            newest = max(self._live, key=lambda rid: self._live[rid].order)
            self._preempt(newest)

    def _preempt(self, request_id: int) -> None:
        self.kv.free(request_id)
        self._live.pop(request_id).preempted = True
        self.stats.preemptions += 1

    async def _admit(self, request_id: int, tokens: int, prefix: tuple[Hashable, ...], resumed: bool = False) -> None:
        """Scheduled with the blocks of `tokens` tokens: at once when nothing waits ahead, else in FIFO
        order (a preempted request goes back to the head of the queue)."""
        if not self._queue and self._try_start(request_id, tokens, prefix):
            return
        if self.config.on_full == "fail" and not resumed:
            raise EngineFull(
                f"no capacity: {self.kv.free_blocks} free KV blocks, "
                f"{self.running}/{self.config.max_batch} running"
            )
        self.stats.kv_exhaustion_events += not resumed
        waiter = _Waiter(request_id, tokens, prefix)
        if resumed:
            self._queue.appendleft(waiter)
        else:
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

    def _try_start(self, request_id: int, tokens: int, prefix: tuple[Hashable, ...]) -> bool:
        if self.running >= self.config.max_batch or not self.kv.try_allocate(request_id, tokens, prefix):
            return False
        self._live[request_id] = _Live(next(self._order))
        return True

    def _release(self, request_id: int) -> None:
        self.kv.free(request_id)
        self._live.pop(request_id, None)
        self._schedule()

    def _schedule(self) -> None:
        # Strict FIFO: a big request at the head blocks smaller ones behind it,
        # which is what makes a full cache a latency cliff.
        while self._queue and self._try_start(self._queue[0].request_id, self._queue[0].tokens, self._queue[0].prefix):
            self._queue.popleft().admitted.set_result(None)
