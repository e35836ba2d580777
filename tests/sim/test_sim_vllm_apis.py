"""engines/sim/vllm_apis.py: the simulator's Responses, Anthropic Messages, embeddings and tokenize
endpoints, read by the official SDKs as vLLM's are; errors in each API's shape."""

from __future__ import annotations

import anthropic
import httpx
import openai
import pytest

from .helpers import MODEL, StartSim

HELLO = [{"role": "user", "content": "hello there"}]


def anthropic_client(url: str) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=url, api_key="x", max_retries=0)


async def post(url: str, body: dict) -> httpx.Response:
    """The server runs on this test's event loop: an async client, or it would wait on itself."""
    async with httpx.AsyncClient() as http:
        return await http.post(url, json=body)


@pytest.mark.asyncio
async def test_responses_whole_and_streamed(start_sim: StartSim) -> None:
    sim = await start_sim()
    whole = await sim.client.responses.create(model=MODEL, input="one two three", instructions="be terse",
                                              max_output_tokens=5)
    assert whole.usage is not None and whole.usage.output_tokens == 5 and whole.status == "incomplete"
    assert len(whole.output_text.split()) == 5
    async with sim.client.responses.stream(model=MODEL, input=[{"role": "user", "content": "hi"}],
                                           max_output_tokens=4) as stream:
        kinds = [event.type async for event in stream]
        final = await stream.get_final_response()
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert kinds.count("response.output_text.delta") == 4 and final.usage is not None
    assert final.max_output_tokens == 4


@pytest.mark.asyncio
async def test_anthropic_messages_whole_streamed_and_counted(start_sim: StartSim) -> None:
    sim = await start_sim()
    client = anthropic_client(sim.url)
    message = await client.messages.create(model=MODEL, max_tokens=6, system="sys", messages=HELLO)
    assert (message.usage.output_tokens, message.stop_reason) == (6, "max_tokens")
    async with client.messages.stream(model=MODEL, max_tokens=3, messages=HELLO) as stream:
        text = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
    assert len(text.split()) == 3 and final.usage.output_tokens == 3
    counted = await client.messages.count_tokens(model=MODEL, messages=HELLO)
    assert counted.input_tokens == final.usage.input_tokens > 0
    await client.close()


@pytest.mark.asyncio
async def test_errors_come_in_each_apis_shape(start_sim: StartSim) -> None:
    sim = await start_sim()
    client = anthropic_client(sim.url)
    with pytest.raises(anthropic.NotFoundError) as e:
        await client.messages.create(model="other", max_tokens=6, messages=HELLO)
    assert e.value.type == "not_found_error"
    missing = await post(f"{sim.url}/v1/messages", {"model": MODEL, "messages": HELLO})
    assert missing.status_code == 400 and missing.json()["type"] == "error"
    with pytest.raises(openai.NotFoundError):
        await sim.client.responses.create(model="other", input="x")
    await client.close()


@pytest.mark.asyncio
async def test_embeddings_prefill_their_inputs(start_sim: StartSim) -> None:
    sim = await start_sim()
    result = await sim.client.embeddings.create(model=MODEL, input=["a b", "c"], encoding_format="float")
    assert [d.index for d in result.data] == [0, 1] and result.usage.prompt_tokens == 3
    async with httpx.AsyncClient() as http:
        state = (await http.get(f"{sim.url}/sim/state")).json()
    assert state["completed"] == 2 and state["kv_blocks_used"] == 0


@pytest.mark.asyncio
async def test_tokenize_and_detokenize(start_sim: StartSim) -> None:
    sim = await start_sim()
    ids = (await post(f"{sim.url}/tokenize", {"model": MODEL, "prompt": "the cache block"})).json()
    assert ids["count"] == 3
    chat = (await post(f"{sim.url}/tokenize", {"model": MODEL, "messages": HELLO})).json()
    assert chat["count"] == 2
    text = (await post(f"{sim.url}/detokenize", {"model": MODEL, "tokens": ids["tokens"]})).json()
    assert text == {"prompt": "the cache block"}
