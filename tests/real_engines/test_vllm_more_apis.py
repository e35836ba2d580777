"""OpenAI's Responses API and Anthropic's Messages API (their official SDKs), embeddings and vLLM's tokenize
through the whole gateway in front of the real vLLM (vllm_gateway_fixture.py): the prompt tokens ext_proc
counts (the request turned into the chat vLLM renders, counted with the model's template) equal vLLM's
usage; the clamp is what vLLM generates; a request that does not fit is refused in the API's own shape;
vLLM's answers pass through.

Responses requests that count tokens set ignore_eos (vLLM's extension): random weights can emit an end
token at any step. vLLM's Messages API has no such field, so its outputs are checked against the clamp
as a ceiling.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import anthropic
import httpx
import openai
import pytest

from engines.real.vllm import VllmServer
from kvgate.cli.gateway import Gateway
from tests.integration.conftest import ledger_metrics, reserved, wait_for
from tests.real_engines.test_vllm_gateway import client as openai_client  # noqa: F401 (fixtures)
from tests.real_engines.test_vllm_gateway import gateway, logged_decision  # noqa: F401
from tests.real_engines.vllm_fixture import SETUP_TIMEOUT_S
from tests.real_engines.vllm_gateway_fixture import BLOCK, KV_BYTES_PER_TOKEN, MAX_OUTPUT, MODEL

pytestmark = pytest.mark.timeout(SETUP_TIMEOUT_S)

IGNORE_EOS = {"ignore_eos": True}
TOOL_ITEMS = [
    {"role": "user", "content": [{"type": "input_text", "text": "Weather in Oslo?"}]},
    {"type": "function_call", "call_id": "c1", "name": "weather", "arguments": '{"city": "Oslo"}'},
    {"type": "function_call_output", "call_id": "c1", "output": "Rain."},
]
TOOL_TURNS = [
    {"role": "user", "content": "Weather in Oslo?"},
    {"role": "assistant", "content": [{"type": "text", "text": "Checking."},
                                      {"type": "tool_use", "id": "c1", "name": "weather", "input": {"city": "Oslo"}}]},
    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "c1", "content": "Rain."},
                                 {"type": "text", "text": "And tomorrow?"}]},
]


@pytest.fixture
def anthropic_client(gateway: Gateway) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=gateway.url, api_key="unused", max_retries=0, timeout=300) as c:
        yield c


def counted(gw: Gateway, headers: Mapping[str, str]) -> int:
    """The prompt tokens ext_proc admitted the request answered with `headers` for: Envoy names each
    request in its x-request-id, on the response and in the access log (the APIs' own ids are vLLM's)."""
    decision = logged_decision(gw, headers["x-request-id"])
    assert decision["decision"] == "admitted" and decision["prompt_counted"] is True, decision
    return int(decision["prompt_tokens"])


# --- Responses ------------------------------------------------------------------------------------

@pytest.mark.parametrize("fields", [{"input": "What is a KV cache?", "instructions": "Be terse."},
                                    {"input": TOOL_ITEMS}], ids=["text", "function call items"])
def test_a_response_is_counted_exactly_and_clamped(openai_client: openai.OpenAI, gateway: Gateway,
                                                   vllm_engine: VllmServer, fields: dict[str, Any]) -> None:
    raw = openai_client.responses.with_raw_response.create(model=MODEL, max_output_tokens=5000,
                                                           extra_body=IGNORE_EOS, **fields)
    response = raw.parse()
    assert response.usage is not None and response.status == "incomplete"
    prompt = response.usage.input_tokens
    expected = min(MAX_OUTPUT, vllm_engine.max_model_len - prompt)
    assert int(raw.headers["x-kvgate-max-tokens"]) == response.usage.output_tokens == expected
    assert response.max_output_tokens == expected
    assert counted(gateway, raw.headers) == prompt


def test_a_streamed_response(openai_client: openai.OpenAI, gateway: Gateway) -> None:
    with openai_client.responses.with_streaming_response.create(
            model=MODEL, input="Stream it.", max_output_tokens=6, stream=True, extra_body=IGNORE_EOS) as raw:
        final = [e for e in raw.parse() if e.type == "response.completed"][0].response
    assert final.usage is not None and final.usage.output_tokens == 6
    assert counted(gateway, raw.headers) == final.usage.input_tokens


def test_previous_response_id_never_reaches_vllm(openai_client: openai.OpenAI, gateway: Gateway) -> None:
    """vLLM, which keeps no responses unless told to, would answer 404; the gateway says why first."""
    with pytest.raises(openai.BadRequestError) as e:
        openai_client.responses.create(model=MODEL, input="And then?", previous_response_id="resp_0")
    assert e.value.param == "previous_response_id"
    assert logged_decision(gateway, e.value.response.headers["x-request-id"])["decision"] == "invalid_request"


# --- Anthropic's Messages -------------------------------------------------------------------------

@pytest.mark.parametrize("fields", [{"system": "Be terse.", "messages": [{"role": "user", "content": "Hi!"}]},
                                    {"messages": TOOL_TURNS}], ids=["text", "tool use and result"])
def test_a_message_is_counted_exactly_and_clamped(anthropic_client: anthropic.Anthropic, gateway: Gateway,
                                                  vllm_engine: VllmServer, fields: dict[str, Any]) -> None:
    raw = anthropic_client.messages.with_raw_response.create(model=MODEL, max_tokens=5000, **fields)
    message = raw.parse()
    decision = logged_decision(gateway, raw.headers["x-request-id"])
    assert counted(gateway, raw.headers) == message.usage.input_tokens
    clamp = int(raw.headers["x-kvgate-max-tokens"])
    assert clamp == min(MAX_OUTPUT, vllm_engine.max_model_len - message.usage.input_tokens) == decision["max_tokens"]
    assert message.usage.output_tokens <= clamp
    assert (message.stop_reason == "max_tokens") == (message.usage.output_tokens == clamp)


def test_a_streamed_message_and_count_tokens_agree_with_the_gateway(anthropic_client: anthropic.Anthropic,
                                                                      gateway: Gateway) -> None:
    with anthropic_client.messages.stream(model=MODEL, max_tokens=4, messages=TOOL_TURNS) as stream:
        final = stream.get_final_message()
    by_engine = anthropic_client.messages.count_tokens(model=MODEL, messages=TOOL_TURNS)
    assert counted(gateway, stream.response.headers) == by_engine.input_tokens == final.usage.input_tokens
    assert final.usage.output_tokens <= 4


def test_a_message_that_does_not_fit_is_refused_in_anthropics_shape(openai_client: openai.OpenAI,
                                                                    anthropic_client: anthropic.Anthropic,
                                                                    gateway: Gateway) -> None:
    """A streamed response generating 480 tokens (ignore_eos) holds 16 of vLLM's 31 usable blocks from its
    first event to its last; a message that may take as many, sent meanwhile, is refused at once (the
    default class does not wait) with Anthropic's 429 rate_limit_error and Retry-After."""
    wait_for(lambda: ledger_metrics(gateway)[("kvgate_kv_budget_bytes", MODEL)] == 31 * BLOCK * KV_BYTES_PER_TOKEN,
             "the budget from vLLM's cache_config_info")
    with openai_client.responses.stream(model=MODEL, input="Hold.", max_output_tokens=MAX_OUTPUT,
                                        extra_body=IGNORE_EOS) as holder:
        assert next(iter(holder)).type == "response.created"  # admitted, and generating
        with pytest.raises(anthropic.RateLimitError) as e:
            anthropic_client.messages.create(model=MODEL, max_tokens=MAX_OUTPUT,
                                             messages=[{"role": "user", "content": "Refused?"}])
        assert holder.get_final_response().usage.output_tokens == MAX_OUTPUT  # type: ignore[union-attr]
    assert (e.value.type, e.value.error_code) == ("rate_limit_error", "rate_limit_exceeded")
    assert 1 <= int(e.value.response.headers["retry-after"]) <= 60
    wait_for(lambda: reserved(gateway, MODEL) == 0, "the release")


# --- embeddings and tokenize ----------------------------------------------------------------------

def test_tokenize_through_the_gateway_is_vllms(gateway: Gateway, vllm_engine: VllmServer) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi!"}]}
    through = httpx.post(f"{gateway.url}/tokenize", json=body, timeout=60)
    direct = httpx.post(f"{vllm_engine.url}/tokenize", json=body, timeout=60)
    assert through.status_code == 200 and through.json() == direct.json()
    text = httpx.post(f"{gateway.url}/detokenize", json={"model": MODEL, "tokens": direct.json()["tokens"]},
                      timeout=60)
    assert text.status_code == 200 and "Hi!" in text.json()["prompt"]


def test_embeddings_of_a_generate_only_model_are_vllms_404_and_release(openai_client: openai.OpenAI,
                                                                       gateway: Gateway) -> None:
    """Admitted for the prefill it would take, then vLLM's own answer: this model embeds nothing."""
    with pytest.raises(openai.NotFoundError) as e:
        openai_client.embeddings.create(model=MODEL, input="Embed me.")
    decision = logged_decision(gateway, e.value.response.headers["x-request-id"])
    assert (decision["decision"], decision["max_tokens"]) == ("admitted", 1)
    wait_for(lambda: reserved(gateway, MODEL) == 0, "the release")
