from __future__ import annotations

import asyncio
from contextlib import aclosing

import pytest

from engines.sim.config import SimConfig
from engines.sim.engine import Chunk, EngineFull, GenRequest, RequestTooLarge, SimEngine
from engines.sim.text import generate_words


def engine(**overrides: object) -> SimEngine:
    return SimEngine(SimConfig.zero_latency(**overrides))


async def run(eng: SimEngine, request: GenRequest) -> list[Chunk]:
    return [chunk async for chunk in eng.generate(request)]


async def settle() -> None:
    """Lets every ready task run until it blocks."""
    for _ in range(5):
        await asyncio.sleep(0)


@pytest.mark.asyncio
async def test_emits_exactly_max_tokens() -> None:
    eng = engine()
    chunks = await run(eng, GenRequest(prompt_tokens=10, max_tokens=25, key="k"))
    text = "".join(c.text for c in chunks)
    words = generate_words(0, "k")
    assert text == " ".join(next(words) for _ in range(25))
    assert (chunks[-1].finish_reason, chunks[-1].completion_tokens) == ("length", 25)
    assert all(c.finish_reason is None for c in chunks[:-1])
    assert (
        eng.stats.completed,
        eng.stats.generation_tokens_total,
        eng.stats.prompt_tokens_total,
    ) == (1, 25, 10)
    assert eng.kv.used_blocks == 0 and eng.running == 0


@pytest.mark.asyncio
async def test_stop_string_truncates_before_it() -> None:
    words = generate_words(0, "k")
    full = " ".join(next(words) for _ in range(30))
    stop = full.split(" ")[5]
    chunks = await run(engine(), GenRequest(prompt_tokens=1, max_tokens=30, stop=(stop,), key="k"))
    assert "".join(c.text for c in chunks) == full[: full.find(stop)]
    assert chunks[-1].finish_reason == "stop"
    assert chunks[-1].completion_tokens <= 6


@pytest.mark.asyncio
async def test_queues_fifo_when_cache_is_full() -> None:
    eng = engine(kv_blocks=4, tokens_per_block=4)
    holder = eng.generate(GenRequest(prompt_tokens=8, max_tokens=4))  # 3 blocks
    await anext(holder)  # admitted, suspended while holding its blocks
    big = asyncio.create_task(run(eng, GenRequest(prompt_tokens=8, max_tokens=8)))  # 4 blocks
    small = asyncio.create_task(
        run(eng, GenRequest(prompt_tokens=1, max_tokens=1))
    )  # 1 block, fits
    await settle()
    # The small one fits, but waits behind the head of the queue.
    assert (eng.waiting, eng.running, eng.stats.kv_exhaustion_events) == (2, 1, 2)
    assert not big.done() and not small.done()
    await holder.aclose()
    assert (await big)[-1].completion_tokens == 8
    assert (await small)[-1].completion_tokens == 1
    assert (eng.waiting, eng.running, eng.kv.used_blocks) == (0, 0, 0)


@pytest.mark.asyncio
async def test_max_batch_limits_running_requests() -> None:
    eng = engine(max_batch=1)
    holder = eng.generate(GenRequest(prompt_tokens=1, max_tokens=4))
    await anext(holder)
    waiter = asyncio.create_task(run(eng, GenRequest(prompt_tokens=1, max_tokens=1)))
    await settle()
    assert (eng.running, eng.waiting) == (1, 1)
    await holder.aclose()
    assert len(await waiter) == 1


@pytest.mark.asyncio
async def test_fail_mode_rejects_at_once() -> None:
    eng = engine(kv_blocks=1, tokens_per_block=8, on_full="fail")
    async with aclosing(eng.generate(GenRequest(prompt_tokens=4, max_tokens=4))) as holder:
        await anext(holder)
        with pytest.raises(EngineFull):
            await run(eng, GenRequest(prompt_tokens=1, max_tokens=1))
        assert (eng.waiting, eng.running, eng.stats.kv_exhaustion_events) == (0, 1, 0)
    assert eng.kv.used_blocks == 0


@pytest.mark.asyncio
async def test_request_larger_than_cache_is_rejected() -> None:
    with pytest.raises(RequestTooLarge):
        await run(
            engine(kv_blocks=2, tokens_per_block=4), GenRequest(prompt_tokens=5, max_tokens=4)
        )


@pytest.mark.asyncio
async def test_cancellation_frees_blocks_and_wakes_waiters() -> None:
    eng = SimEngine(SimConfig(kv_blocks=2, tokens_per_block=4, ttft_base_ms=0, itl_ms=10_000))
    running = asyncio.create_task(run(eng, GenRequest(prompt_tokens=4, max_tokens=4)))
    await settle()
    queued = asyncio.create_task(run(eng, GenRequest(prompt_tokens=4, max_tokens=4)))
    also_queued = asyncio.create_task(run(eng, GenRequest(prompt_tokens=1, max_tokens=1)))
    await settle()
    assert (eng.running, eng.waiting, eng.kv.used_blocks) == (1, 2, 2)

    queued.cancel()  # a waiter leaving the queue
    await settle()
    assert eng.waiting == 1
    running.cancel()  # a running request's client went away
    await settle()
    assert running.cancelled() and queued.cancelled()
    assert (await also_queued)[-1].finish_reason == "length"
    assert (eng.running, eng.waiting, eng.kv.used_blocks) == (0, 0, 0)
    assert eng.stats.completed == 1


@pytest.mark.asyncio
async def test_zero_latency_still_yields_to_the_loop() -> None:
    eng = engine()
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    await run(eng, GenRequest(prompt_tokens=1, max_tokens=500))
    task.cancel()
    assert ticks >= 400


@pytest.mark.asyncio
async def test_context_counts_requests_still_prefilling() -> None:
    eng = SimEngine(SimConfig(ttft_base_ms=10_000, itl_ms=0))
    prefilling = asyncio.create_task(run(eng, GenRequest(prompt_tokens=4, max_tokens=4)))
    await settle()
    assert (eng.context, eng.running) == (1, 1)
    prefilling.cancel()
    await settle()
    assert (eng.context, eng.running, eng.kv.used_blocks) == (0, 0, 0)
    await run(eng := engine(), GenRequest(prompt_tokens=1, max_tokens=2))
    assert eng.context == 0
