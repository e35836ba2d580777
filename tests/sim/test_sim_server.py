from __future__ import annotations

import asyncio

import aiohttp
import openai
import orjson
import pytest

from .helpers import MODEL, StartSim, wait_until

CHAT = [{"role": "user", "content": "How big is a KV block?"}]


async def get_json(session: aiohttp.ClientSession, url: str) -> object:
    async with session.get(url) as response:
        assert response.status == 200
        return await response.json()


async def read_sse(response: aiohttp.ClientResponse) -> list[bytes]:
    """Raw `data:` payloads of an SSE response, in order."""
    raw = await response.read()
    events = raw.split(b"\n\n")
    assert events[-1] == b""  # every event is terminated
    assert all(e.startswith(b"data: ") for e in events[:-1])
    return [e[len(b"data: ") :] for e in events[:-1]]


@pytest.mark.asyncio
async def test_chat_and_completions_non_streaming(start_sim: StartSim) -> None:
    client = (await start_sim()).client
    chat = await client.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=7)
    assert chat.object == "chat.completion" and chat.model == MODEL
    assert chat.choices[0].message.role == "assistant"
    assert len(chat.choices[0].message.content.split()) == 7
    assert chat.choices[0].finish_reason == "length"
    assert chat.usage.completion_tokens == 7
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + 7 and chat.usage.prompt_tokens > 0

    text = await client.completions.create(model=MODEL, prompt=["one", "two"], max_tokens=5)
    assert text.object == "text_completion" and text.choices[0].finish_reason == "length"
    assert len(text.choices[0].text.split()) == 5
    assert text.usage.completion_tokens == 5 and text.usage.prompt_tokens == 2

    default = await client.completions.create(model=MODEL, prompt="x")
    assert default.usage.completion_tokens == 16  # OpenAI's default max_tokens


@pytest.mark.asyncio
async def test_stop_string_ends_with_finish_reason_stop(start_sim: StartSim) -> None:
    client = (await start_sim()).client
    full = (await client.completions.create(model=MODEL, prompt="p", max_tokens=30)).choices[0].text
    stop = full.split(" ")[4]
    cut = await client.completions.create(model=MODEL, prompt="p", max_tokens=30, stop=stop)
    assert cut.choices[0].text == full[: full.find(stop)]
    assert cut.choices[0].finish_reason == "stop"


@pytest.mark.asyncio
async def test_chat_streaming_matches_non_streaming(start_sim: StartSim) -> None:
    client = (await start_sim()).client
    whole = await client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=9)
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        max_tokens=9,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.model == MODEL for c in chunks)
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == whole.choices[0].message.content
    )
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 9


@pytest.mark.asyncio
async def test_completions_streaming(start_sim: StartSim) -> None:
    client = (await start_sim()).client
    stream = await client.completions.create(model=MODEL, prompt="hello", max_tokens=6, stream=True)
    chunks = [chunk async for chunk in stream]
    assert all(c.object == "text_completion" for c in chunks)
    assert len("".join(c.choices[0].text for c in chunks).split()) == 6
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks)  # no usage chunk unless asked for


@pytest.mark.asyncio
async def test_raw_sse_ends_with_done(start_sim: StartSim) -> None:
    sim = await start_sim()
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 4, "stream": True}
    url = sim.url + "/v1/chat/completions"
    async with aiohttp.ClientSession() as session, session.post(url, json=body) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        events = await read_sse(response)
    assert events[-1] == b"[DONE]"
    payloads = [orjson.loads(e) for e in events[:-1]]
    assert [p["choices"][0]["finish_reason"] for p in payloads] == [None] * 4 + ["length"]


@pytest.mark.asyncio
async def test_records_received_requests(start_sim: StartSim) -> None:
    sim = await start_sim(record_limit=2)
    for tokens in (1, 2, 3):
        await sim.client.completions.create(
            model=MODEL, prompt="hi", max_tokens=tokens, extra_headers={"X-Trace-Id": f"t{tokens}"}
        )
    async with aiohttp.ClientSession() as session:
        records = await get_json(session, sim.url + "/sim/requests")
        # the last record_limit requests, oldest first
        assert [r["body"]["max_tokens"] for r in records] == [2, 3]
        assert [r["headers"]["x-trace-id"] for r in records] == ["t2", "t3"]
        assert records[0]["path"] == "/v1/completions" and records[0]["body"]["prompt"] == "hi"
        async with session.delete(sim.url + "/sim/requests") as response:
            assert response.status == 204
        assert await get_json(session, sim.url + "/sim/requests") == []


@pytest.mark.asyncio
async def test_info_and_metrics_endpoints(start_sim: StartSim) -> None:
    sim = await start_sim(kv_blocks=64, tokens_per_block=16)
    await sim.client.completions.create(model=MODEL, prompt="a b c", max_tokens=3)
    async with aiohttp.ClientSession() as session:
        async with session.get(sim.url + "/health") as response:
            assert response.status == 200
        models = await get_json(session, sim.url + "/v1/models")
        assert models["object"] == "list" and models["data"][0]["id"] == MODEL
        assert models["data"][0]["owned_by"] == "kvgate-sim"
        assert await get_json(session, sim.url + "/version") == {"version": "kvgate-sim"}

        stats = await get_json(session, sim.url + "/metrics")
        assert stats[0]["kvCacheStats"] == {
            "maxNumBlocks": 64, "freeNumBlocks": 64, "usedNumBlocks": 0, "tokensPerBlock": 16,
        }  # fmt: skip
        assert (stats[0]["numActiveRequests"], stats[0]["numQueuedRequests"]) == (0, 0)
        assert (await get_json(session, sim.url + "/metrics"))[0]["iter"] > stats[0]["iter"]

        async with session.get(sim.url + "/prometheus/metrics") as response:
            assert response.status == 200
            text = await response.text()
    samples = dict(
        line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#")
    )
    assert float(samples["trtllm_kv_cache_max_blocks"]) == 64
    assert float(samples["trtllm_kv_cache_tokens_per_block"]) == 16
    assert float(samples["trtllm_request_success_total"]) == 1
    assert float(samples["trtllm_prompt_tokens_total"]) == 3
    assert float(samples["trtllm_generation_tokens_total"]) == 3
    for name in (
        "trtllm_kv_cache_utilization",
        "trtllm_kv_cache_used_blocks",
        "trtllm_num_requests_waiting",
        "trtllm_num_requests_running",
        "kvgate_sim_kv_exhaustion_events_total",
    ):
        assert float(samples[name]) == 0


@pytest.mark.asyncio
async def test_disconnect_mid_stream_frees_blocks(start_sim: StartSim) -> None:
    sim = await start_sim(itl_ms=20.0)
    body = {"model": MODEL, "prompt": "long", "max_tokens": 1000, "stream": True}
    async with aiohttp.ClientSession() as session:
        response = await session.post(sim.url + "/v1/completions", json=body)
        assert response.status == 200
        assert (await response.content.readline()).startswith(b"data: ")
        state = await get_json(session, sim.url + "/sim/state")
        assert state["kv_blocks_used"] > 0 and state["running"] == 1
        response.close()  # drop the connection mid-stream

        async def freed() -> bool:
            state = await get_json(session, sim.url + "/sim/state")
            return state["kv_blocks_used"] == 0 and state["running"] == 0

        await wait_until(freed)
        assert (await get_json(session, sim.url + "/sim/state"))["completed"] == 0


@pytest.mark.asyncio
async def test_queue_mode_waits_and_a_disconnected_waiter_leaves(start_sim: StartSim) -> None:
    # One 1000-token stream fills the cache; the next request has to queue.
    sim = await start_sim(kv_blocks=40, tokens_per_block=32, itl_ms=20.0)
    hold = {"model": MODEL, "prompt": "long", "max_tokens": 1000, "stream": True}
    async with aiohttp.ClientSession() as session:
        holder = await session.post(sim.url + "/v1/completions", json=hold)
        await holder.content.readline()

        queued = asyncio.create_task(
            sim.client.completions.create(model=MODEL, prompt="x", max_tokens=300)
        )

        async def waiting(count: int) -> bool:
            return (await get_json(session, sim.url + "/sim/state"))["waiting"] == count

        await wait_until(lambda: waiting(1))
        queued.cancel()  # the client gives up while queued: its place is given back
        await wait_until(lambda: waiting(0))
        state = await get_json(session, sim.url + "/sim/state")
        assert state == {
            "kv_blocks_total": 40, "kv_blocks_used": 32, "running": 1, "waiting": 0,
            "kv_exhaustion_events": 1, "completed": 0,
        }  # fmt: skip
        holder.close()


@pytest.mark.asyncio
async def test_fail_mode_answers_503_when_full(start_sim: StartSim) -> None:
    sim = await start_sim(kv_blocks=32, on_full="fail", itl_ms=20.0)
    client = sim.client
    stream = await client.completions.create(model=MODEL, prompt="x", max_tokens=1000, stream=True)
    await anext(aiter(stream))
    with pytest.raises(openai.InternalServerError) as excinfo:
        await client.completions.create(model=MODEL, prompt="x", max_tokens=100)
    assert excinfo.value.status_code == 503
    assert excinfo.value.body["type"] == "server_error"
    await stream.close()


@pytest.mark.asyncio
async def test_request_errors(start_sim: StartSim) -> None:
    sim = await start_sim()
    client = sim.client
    with pytest.raises(openai.NotFoundError) as not_found:
        await client.chat.completions.create(model="other-model", messages=CHAT)
    assert not_found.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad_n:
        await client.chat.completions.create(model=MODEL, messages=CHAT, n=2)
    assert bad_n.value.param == "n"

    bad_bodies = {
        b"{not json": None,
        b"[1, 2]": None,
        orjson.dumps({"model": MODEL, "messages": CHAT, "max_tokens": "5"}): "max_tokens",
        orjson.dumps({"model": MODEL, "messages": CHAT, "max_tokens": 0}): "max_tokens",
        orjson.dumps({"model": MODEL, "messages": "hi"}): "messages",
        orjson.dumps({"model": MODEL, "messages": CHAT, "stop": [1]}): "stop",
        orjson.dumps({"model": MODEL, "messages": CHAT, "stream": "yes"}): "stream",
        orjson.dumps({"messages": CHAT}): "model",
    }
    async with aiohttp.ClientSession() as session:
        for raw, param in bad_bodies.items():
            async with session.post(sim.url + "/v1/chat/completions", data=raw) as response:
                assert response.status == 400, raw
                error = (await response.json())["error"]
                assert error["type"] == "invalid_request_error" and error["message"]
                assert error["param"] == param, raw
        async with session.post(
            sim.url + "/v1/completions", json={"model": MODEL, "prompt": 5}
        ) as response:
            assert response.status == 400
