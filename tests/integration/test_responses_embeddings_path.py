"""OpenAI's Responses API (openai SDK), embeddings (openai SDK) and vLLM's tokenizer calls through the real
Envoy: routed by model, clamped, admitted and released; refused in OpenAI's shape, by ext_proc and by Envoy."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import httpx
import openai
import pytest

from kvgate.cli.gateway import Gateway
from kvgate.wire import MAX_TOKENS_HEADER
from tests.integration.conftest import ledger_metrics, reserved, sim_requests, wait_for
from tests.integration.test_openai_path import client, received_with

# org/tiny: 300 bytes + 8 for the message + 8 for the request = 316 prompt tokens, + 128 output = 444 tokens
# -> 28 blocks of 16 x 1 KiB: 448 KiB of its 640.
HOLDING = 448 * 1024


def test_a_response_is_routed_to_its_model_and_clamped(gateway: Gateway) -> None:
    marker = uuid.uuid4().hex
    raw = client(gateway).responses.with_raw_response.create(
        model="fast", input=f"say {marker}", instructions="Be terse.", max_output_tokens=100_000)
    assert raw.headers[MAX_TOKENS_HEADER] == "256"
    response = raw.parse()
    assert response.usage is not None and response.usage.output_tokens == 256
    assert response.output_text and response.status == "incomplete"
    (body,) = received_with(gateway, "fast", marker)
    assert body["max_output_tokens"] == 256 and body["instructions"] == "Be terse."
    assert received_with(gateway, "org/tiny", marker) == []


def test_a_streamed_response_with_items_and_no_limit_gets_the_clamp(gateway: Gateway) -> None:
    marker = uuid.uuid4().hex
    items = [{"role": "user", "content": [{"type": "input_text", "text": f"hello {marker}"}]},
             {"type": "function_call", "call_id": "c1", "name": "lookup", "arguments": "{}"},
             {"type": "function_call_output", "call_id": "c1", "output": "found"}]
    with client(gateway).responses.stream(model="org/tiny", input=items) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert final.usage is not None and final.usage.output_tokens == 128 == len(deltas)
    (body,) = received_with(gateway, "org/tiny", marker)
    assert body["max_output_tokens"] == 128 and body["stream"] is True and body["input"] == items


def test_an_unknown_model_is_404(gateway: Gateway) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        client(gateway).responses.create(model="gpt-9", input="hi")
    assert e.value.code == "model_not_found"


def test_input_longer_than_the_context_is_a_400_naming_input(gateway: Gateway) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client(gateway).responses.create(model="org/tiny", input="y" * 600)
    assert (e.value.code, e.value.param) == ("context_length_exceeded", "input")


@pytest.mark.parametrize("fields,param", [
    ({"previous_response_id": "resp_abc"}, "previous_response_id"),
    ({"background": True}, "background"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0]"),
])
def test_what_the_gateway_cannot_count_or_hold_is_refused(gateway: Gateway, fields: dict, param: str) -> None:
    before = len(sim_requests(gateway, "fast"))
    with pytest.raises(openai.BadRequestError) as e:
        client(gateway).responses.create(model="fast", **{"input": "next", **fields})
    assert (e.value.code, e.value.param) == ("invalid_request", param)
    assert "not supported by the gateway" in e.value.message or param == "input[0]"
    assert len(sim_requests(gateway, "fast")) == before


@pytest.fixture
def holder(gateway: Gateway) -> Iterator[openai.Stream]:
    """A streamed response on org/tiny holding 448 KiB of its 640 KiB until closed."""
    stream = client(gateway).responses.create(model="org/tiny", input="p" * 300, max_output_tokens=128, stream=True)
    wait_for(lambda: reserved(gateway, "org/tiny") == HOLDING, what="the response's reservation")
    yield stream
    stream.close()
    wait_for(lambda: reserved(gateway, "org/tiny") == 0, what="the release when the stream closed")


def test_a_response_that_does_not_fit_is_429_with_retry_after(gateway: Gateway, holder: openai.Stream) -> None:
    with pytest.raises(openai.RateLimitError) as e:
        client(gateway).responses.create(model="org/tiny", input="q" * 300, max_output_tokens=128)
    assert e.value.code == "rate_limit_exceeded"
    assert 1 <= int(e.value.response.headers["retry-after"]) <= 60


def test_envoy_answers_a_bodiless_or_non_post_call_in_openais_shape(gateway: Gateway) -> None:
    for path in ("/v1/responses", "/v1/embeddings", "/tokenize", "/detokenize"):
        empty = httpx.post(f"{gateway.url}{path}")
        assert empty.status_code == 400 and empty.json()["error"]["code"] == "invalid_request"
        got = httpx.get(f"{gateway.url}{path}")
        assert got.status_code == 405 and got.json()["error"]["code"] == "method_not_allowed"
    stored = httpx.get(f"{gateway.url}/v1/responses/resp_abc")  # a stored response lives in one engine
    assert stored.status_code == 404 and stored.json()["error"]["code"] == "unknown_url"


# --- embeddings ------------------------------------------------------------------------------------

def test_embeddings_are_admitted_for_their_prefill_and_released(gateway: Gateway) -> None:
    marker = uuid.uuid4().hex
    decisions = ledger_metrics(gateway).get(("kvgate_admission_decisions_total", "fast"), 0.0)
    result = client(gateway).embeddings.create(model="fast", input=[f"one {marker}", "two"])
    assert [d.index for d in result.data] == [0, 1] and result.data[0].embedding
    (body,) = received_with(gateway, "fast", marker)
    assert body == {"model": "fast", "input": [f"one {marker}", "two"], "encoding_format": "base64"}
    assert ledger_metrics(gateway)[("kvgate_admission_decisions_total", "fast")] == decisions + 1
    wait_for(lambda: reserved(gateway, "fast") == 0, what="the embedding's release")


def test_an_embedding_longer_than_the_context_is_400(gateway: Gateway) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client(gateway).embeddings.create(model="org/tiny", input="z" * 600)
    assert (e.value.code, e.value.param) == ("context_length_exceeded", "input")


def test_an_embedding_waits_its_turn_for_kv_like_any_request(gateway: Gateway, holder: openai.Stream) -> None:
    # 300 bytes + 8 = 308 tokens, + 1 for the prefill's sampled token: 20 blocks, 320 KiB; 192 KiB are free.
    with pytest.raises(openai.RateLimitError):
        client(gateway).embeddings.create(model="org/tiny", input="e" * 300)
    assert client(gateway).embeddings.create(model="org/tiny", input="small").data


# --- tokenize ---------------------------------------------------------------------------------------

def test_tokenize_and_detokenize_are_routed_by_model_and_reserve_nothing(gateway: Gateway) -> None:
    marker = uuid.uuid4().hex
    tokenized = httpx.post(f"{gateway.url}/tokenize", json={"model": "org/tiny", "prompt": f"the cache {marker}"})
    assert tokenized.status_code == 200 and tokenized.json()["count"] == 3
    assert [r["path"] for r in sim_requests(gateway, "org/tiny") if marker in str(r["body"])] == ["/tokenize"]
    words = httpx.post(f"{gateway.url}/detokenize", json={"model": "fast", "tokens": tokenized.json()["tokens"][:2]})
    assert words.status_code == 200 and words.json() == {"prompt": "the cache"}
    assert reserved(gateway, "org/tiny") == 0


@pytest.mark.parametrize("body,status,code", [({"model": "gpt-9", "prompt": "x"}, 404, "model_not_found"),
                                              ({"prompt": "x"}, 400, "invalid_request")])
def test_tokenize_needs_a_known_model(gateway: Gateway, body: dict, status: int, code: str) -> None:
    reply = httpx.post(f"{gateway.url}/tokenize", json=body)
    assert reply.status_code == status and reply.json()["error"]["code"] == code
