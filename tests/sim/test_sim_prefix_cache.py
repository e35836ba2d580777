"""The simulator's prefix cache: shared prompt blocks, kept after their requests, evicted when needed;
cached blocks skip prefill; vLLM's prefix-cache counters; prefill lanes."""

from __future__ import annotations

import asyncio
import re
from contextlib import aclosing

import aiohttp
import pytest

from engines.sim.config import SimConfig
from engines.sim.engine import GenRequest, SimEngine
from engines.sim.kv_cache import PagedKVCache
from engines.sim.text import block_hashes, chat_words

from .helpers import StartSim


def prefix(*blocks: str) -> tuple[int, ...]:
    """The hashes of a prompt made of these 4-token blocks."""
    return block_hashes([t for b in blocks for t in (b,) * 4], 4)


def test_block_hashes_are_chained_and_whole_blocks_only() -> None:
    assert len(block_hashes(list("abcdefghij"), 4)) == 2
    assert prefix("a", "x")[1] != prefix("b", "x")[1]
    assert prefix("a", "x")[0] == prefix("a", "y")[0]


def test_chat_words_frame_each_message_in_four_tokens() -> None:
    assert chat_words([("system", "be brief."), ("user", "hi")]) == [
        "<|start|>", "system", "<|sep|>", "be", "brief", ".", "<|end|>", "<|start|>", "user", "<|sep|>", "hi", "<|end|>"]


def test_shared_blocks_are_held_once() -> None:
    kv = PagedKVCache(10, 4, prefix_caching=True)
    assert kv.try_allocate("a", 12, prefix("s", "t", "u"))
    assert (kv.used_blocks, kv.hit_blocks("a")) == (3, 0)
    assert kv.try_allocate("b", 12, prefix("s", "t", "v"))  # shares s and t
    assert (kv.used_blocks, kv.hit_blocks("b")) == (4, 2)
    assert kv.free("a") == 3
    assert (kv.used_blocks, kv.cached_free_blocks) == (3, 1)  # u stays cached, but free
    assert kv.free("b") == 3
    assert (kv.used_blocks, kv.cached_free_blocks) == (0, 4)
    assert kv.try_allocate("c", 16, prefix("s", "t", "u", "w"))  # s, t, u from the cache
    assert (kv.hit_blocks("c"), kv.used_blocks) == (3, 4)


def test_cached_free_blocks_are_evicted_tail_first_when_blocks_are_needed() -> None:
    kv = PagedKVCache(4, 4, prefix_caching=True)
    assert kv.try_allocate("a", 12, prefix("s", "t", "u"))
    kv.free("a")
    assert kv.try_allocate("other", 8)  # two of the four blocks: evicts the two least recently freed
    assert kv.cached_free_blocks == 2
    kv.free("other")
    assert kv.try_allocate("b", 12, prefix("s", "t", "u"))
    assert kv.hit_blocks("b") == 2  # s and t were kept: the tail went first


def test_a_hit_never_lets_a_request_take_blocks_that_are_not_free() -> None:
    kv = PagedKVCache(4, 4, prefix_caching=True)
    assert kv.try_allocate("a", 8, prefix("s", "t"))
    # Shares s and t, needs two more blocks of its own: there are two.
    assert kv.try_allocate("b", 16, prefix("s", "t", "u", "v"))
    assert kv.free_blocks == 0
    # Both its blocks are held by others: it takes no new one.
    assert kv.try_allocate("c", 8, prefix("s", "t")) and kv.used_blocks == 4
    assert not kv.try_allocate("d", 12, prefix("s", "t", "x"))  # one block more than there is


def test_without_prefix_caching_nothing_is_shared() -> None:
    kv = PagedKVCache(10, 4)
    assert kv.try_allocate("a", 8, prefix("s", "t"))
    assert kv.try_allocate("b", 8, prefix("s", "t"))
    assert (kv.used_blocks, kv.hit_blocks("b")) == (4, 0)


@pytest.mark.asyncio
async def test_cached_blocks_skip_prefill_and_are_counted_as_vllm_counts_them() -> None:
    eng = SimEngine(SimConfig.zero_latency(flavor="vllm", tokens_per_block=4, prefix_caching=True))
    shared = prefix("s", "t", "u", "v")
    first = GenRequest(prompt_tokens=16, max_tokens=2, prefix=shared)
    async with aclosing(eng.generate(first)) as chunks:
        async for _ in chunks:
            pass
    assert (eng.stats.prefix_cache_queries, eng.stats.prefix_cache_hits) == (16, 0)
    # The same 16-token prompt: its last token is computed again (vLLM's rule), so 3 blocks hit.
    async with aclosing(eng.generate(first)) as chunks:
        async for _ in chunks:
            pass
    assert (eng.stats.prefix_cache_queries, eng.stats.prefix_cache_hits) == (32, 12)


@pytest.mark.asyncio
async def test_prefill_time_is_that_of_the_uncached_tokens() -> None:
    """Prefill lanes of one: the second prompt's prefill waits for the first's, and the third, all
    cached but its last block, is quicker than a cold one. The clock is the loop's, so sleeps add up
    exactly as the latency model says."""
    config = SimConfig(flavor="vllm", tokens_per_block=4, prefix_caching=True, prefill_lanes=1,
                       ttft_base_ms=0.0, ttft_per_token_ms=10.0, itl_ms=0.0, batch_slowdown=0.0)
    eng = SimEngine(config)
    loop = asyncio.get_running_loop()

    async def ttft(request: GenRequest) -> float:
        start = loop.time()
        async with aclosing(eng.generate(request)) as chunks:
            await anext(chunks)
            return loop.time() - start

    cold = GenRequest(prompt_tokens=40, max_tokens=1, prefix=prefix(*"abcdefghij"))
    other = GenRequest(prompt_tokens=40, max_tokens=1, prefix=prefix(*"klmnopqrst"))
    both = await asyncio.gather(ttft(cold), ttft(other))
    assert both[0] == pytest.approx(0.4, abs=0.05) and both[1] == pytest.approx(0.8, abs=0.05)
    warm = await ttft(cold)  # 9 of its 10 blocks cached: 4 tokens to compute
    assert warm == pytest.approx(0.04, abs=0.03)


@pytest.mark.asyncio
async def test_the_vllm_flavour_reports_prefix_cache_hits_of_a_shared_system_prompt(start_sim: StartSim) -> None:
    sim = await start_sim(flavor="vllm", tokens_per_block=4, prefix_caching=True)
    system = "You are a careful assistant who answers in full sentences. " * 5  # 55 tokens
    for user in ("What is a KV cache?", "Why route by prefix?"):
        await sim.client.chat.completions.create(model="sim-model", max_tokens=2, messages=[
            {"role": "system", "content": system}, {"role": "user", "content": user}])
    async with aiohttp.ClientSession() as session, session.get(sim.url + "/metrics") as r:
        text = await r.text()

    def counter(name: str) -> float:
        match = re.search(rf"^{name}{{[^}}]*}} (\S+)$", text, re.M)
        assert match, name
        return float(match.group(1))

    # The system message (55 tokens framed in 4) and the user message's opening 3: 62 tokens shared, of
    # which 15 whole blocks; the second request found them.
    assert counter("vllm:prefix_cache_hits_total") == 15 * 4
    assert counter("vllm:prefix_cache_queries_total") == (59 + 4 + 6) + (59 + 4 + 5)  # every prompt token
