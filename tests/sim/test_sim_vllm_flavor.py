"""The simulator's vLLM flavor (engines/sim, --flavor vllm): vLLM's paged scheduling as measured on the
real vLLM 0.32 (tests/real_engines): blocks taken as tokens are computed, one null block, the newest
request preempted when a running one cannot grow; its metrics under vLLM's names; prompts counted with
the model's tokenizer and chat template."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from engines.real import tiny_tokenizer
from engines.sim.config import SimConfig
from engines.sim.engine import Chunk, GenRequest, RequestTooLarge, SimEngine
from engines.sim.kv_cache import PagedKVCache
from engines.sim.metrics import SimMetrics
from engines.sim.text import ModelTokenizer
from ext_proc.engine_metrics import parse_engine_load
from tests.sim.test_sim_engine import run, settle
from tests.unit.test_chat_template import LLAMA3


def vllm(**overrides: object) -> SimEngine:
    return SimEngine(SimConfig.zero_latency(flavor="vllm", **overrides))


def test_a_cache_grows_a_sequence_block_by_block_and_keeps_its_null_block_aside() -> None:
    kv = PagedKVCache(4, 4, reserved_blocks=1)
    assert kv.usable_blocks == 3 and kv.try_allocate("a", 3)  # one block
    assert kv.grow("a", 5) and kv.used_blocks == 2
    assert kv.grow("a", 4) and kv.used_blocks == 2  # never shrinks
    assert not kv.grow("a", 13) and kv.used_blocks == 2  # 4 blocks: more than usable, nothing taken
    assert kv.utilization == pytest.approx(2 / 3)


@pytest.mark.asyncio
async def test_blocks_are_taken_as_tokens_are_computed_the_last_one_never_written() -> None:
    eng = vllm(kv_blocks=8, tokens_per_block=4)
    gen = eng.generate(GenRequest(prompt_tokens=4, max_tokens=9))
    first = await anext(gen)
    assert first.completion_tokens == 1 and eng.kv.used_blocks == 1  # the prompt's block
    held = [eng.kv.used_blocks]
    async for _ in gen:
        held.append(eng.kv.used_blocks)
    # Token n needs the KV of prompt + n - 1 tokens: 4 + 8 = 12 at the last, 3 blocks (not 13 -> 4).
    assert max(held) == 3 and eng.kv.used_blocks == 0


@pytest.mark.asyncio
async def test_the_null_block_bounds_what_fits() -> None:
    with pytest.raises(RequestTooLarge):
        await run(vllm(kv_blocks=4, tokens_per_block=4), GenRequest(prompt_tokens=4, max_tokens=10))  # 13 -> 4 > 3
    assert len(await run(vllm(kv_blocks=4, tokens_per_block=4), GenRequest(prompt_tokens=4, max_tokens=9))) > 0


@pytest.mark.asyncio
async def test_an_overcommitted_cache_preempts_the_newest_and_finishes_everything() -> None:
    eng = vllm(kv_blocks=7, tokens_per_block=4, itl_ms=1)  # 6 usable blocks
    requests = [GenRequest(prompt_tokens=4, max_tokens=12, key=str(i)) for i in range(3)]  # 4 blocks at the end
    done = await asyncio.gather(*(run(eng, r) for r in requests))
    assert [d[-1].completion_tokens for d in done] == [12, 12, 12]
    assert eng.stats.preemptions > 0
    assert eng.stats.prompt_tokens_total == 12  # each prompt counted once, recomputed or not
    assert eng.kv.used_blocks == 0 and eng.running == 0 and eng.waiting == 0


@pytest.mark.asyncio
async def test_what_fits_in_the_cache_is_never_preempted() -> None:
    eng = vllm(kv_blocks=7, tokens_per_block=4, itl_ms=1)
    requests = [GenRequest(prompt_tokens=4, max_tokens=5, key=str(i)) for i in range(3)]  # 2 blocks each
    await asyncio.gather(*(run(eng, r) for r in requests))
    assert eng.stats.preemptions == 0


@pytest.mark.asyncio
async def test_a_request_waits_for_its_prompts_blocks() -> None:
    eng = vllm(kv_blocks=3, tokens_per_block=4)
    holder = eng.generate(GenRequest(prompt_tokens=8, max_tokens=1))  # both usable blocks
    await anext(holder)
    waiting = asyncio.create_task(run(eng, GenRequest(prompt_tokens=4, max_tokens=1)))
    await settle()
    assert (eng.waiting, eng.stats.kv_exhaustion_events) == (1, 1)
    await holder.aclose()
    chunks: list[Chunk] = await waiting
    assert chunks[-1].completion_tokens == 1


def test_metrics_under_vllms_names_read_as_ext_proc_reads_vllm() -> None:
    eng = vllm(kv_blocks=32, tokens_per_block=16, model="tiny")
    eng.stats.prompt_tokens_total, eng.stats.preemptions = 120, 3
    text = SimMetrics(eng).vllm_text().decode()
    load = parse_engine_load(text)
    assert (load.engine, load.kv_max_blocks, load.kv_usable_blocks, load.tokens_per_block, load.prompt_tokens) == (
        "vllm", 32, 31, 16, 120)
    assert 'vllm:num_preemptions_total{engine="0",model_name="tiny"} 3.0' in text
    assert 'vllm:num_requests_waiting_by_reason{engine="0",model_name="tiny",reason="capacity"} 0.0' in text


def test_prompts_are_counted_as_vllm_counts_them(tmp_path: Path) -> None:
    tok = tiny_tokenizer.load()
    tok.add_special_tokens(["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": LLAMA3,
                                                                "bos_token": "<|begin_of_text|>"}))
    counter = ModelTokenizer.load(str(tmp_path / "tokenizer.json"))
    body = {"messages": [{"role": "user", "content": "What is a KV cache?"}]}
    reference = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    rendered = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is a KV cache?<|eot_id|>" \
               "<|start_header_id|>assistant<|end_header_id|>\n\n"
    assert counter.chat(body) == len(reference.encode(rendered, add_special_tokens=False).ids)
    assert counter.text("hello") == len(reference.encode("hello").ids)
