"""Anthropic's Messages API through the real Envoy with the anthropic SDK: tenants' keys in `x-api-key`,
routing by model with the engine's name written in, the clamp, streams, count_tokens routed; every
refusal in Anthropic's shape, the SDK's typed exceptions, whether ext_proc or Envoy answers."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import pytest

from kvgate.api_keys import key_hash
from kvgate.catalog import parse_catalog
from kvgate.cli.gateway import Gateway
from kvgate.wire import MAX_TOKENS_HEADER
from tests.integration.conftest import TEST_CATALOG, reserved, sim_requests, start_gateway, wait_for

AGENT, OTHER = "kvg-agent-key-0123456789", "kvg-other-key-9876543210"
HELLO = [{"role": "user", "content": "Hello"}]
# org/tiny: 300 bytes + 8 for the message + 8 for the request = 316 prompt tokens, + 128 output = 444 tokens
# -> 28 blocks of 16 x 1 KiB: 448 KiB of its 640.
HOLDING = 448 * 1024


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    fast, tiny = TEST_CATALOG["models"]
    catalog = {
        **TEST_CATALOG,
        # A name of the gateway's for fast's engine, which knows only `fast`.
        "models": [fast, tiny, {**fast, "name": "claude-fast", "backend_model": "fast"}],
        "tenants": [{"name": "agent", "api_key_sha256": [key_hash(AGENT)]},
                    {"name": "other", "api_key_sha256": [key_hash(OTHER)], "models": ["fast"]}],
    }
    gw = start_gateway(parse_catalog(catalog), Path(tmp_path_factory.mktemp("anthropic")),
                       probe_headers={"x-api-key": AGENT})
    yield gw
    gw.stop()


def client(gw: Gateway, key: str = AGENT) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url, api_key=key, max_retries=0)


def received(gw: Gateway, model: str, marker: str) -> list[dict]:
    """What the model's engine received with `marker` in the body: path, headers, body."""
    return [r for r in sim_requests(gw, model) if marker in str(r["body"])]


def test_a_message_is_clamped_and_reaches_the_engine_under_its_own_name(gateway: Gateway) -> None:
    marker = uuid.uuid4().hex
    raw = client(gateway).messages.with_raw_response.create(
        model="claude-fast", max_tokens=5000, system="Be terse.", messages=[{"role": "user", "content": marker}])
    assert raw.headers[MAX_TOKENS_HEADER] == "256"
    message = raw.parse()
    assert (message.usage.output_tokens, message.stop_reason) == (256, "max_tokens")
    assert message.content[0].text
    (seen,) = received(gateway, "claude-fast", marker)
    assert seen["path"] == "/v1/messages"
    assert (seen["body"]["model"], seen["body"]["max_tokens"]) == ("fast", 256)
    sent = raw.http_request.headers
    assert seen["headers"]["anthropic-version"] == sent["anthropic-version"]  # passed on as the SDK sent it


def test_a_streamed_message(gateway: Gateway) -> None:
    marker = uuid.uuid4().hex
    with client(gateway).messages.stream(model="org/tiny", max_tokens=5,
                                         messages=[{"role": "user", "content": f"hi {marker}"}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert len(text.split()) == 5 and final.usage.output_tokens == 5
    (seen,) = received(gateway, "org/tiny", marker)
    assert seen["body"]["stream"] is True and seen["body"]["max_tokens"] == 5


def test_count_tokens_is_routed_by_model_and_reserves_nothing(gateway: Gateway) -> None:
    marker = uuid.uuid4().hex
    counted = client(gateway).messages.count_tokens(model="claude-fast", system="Be terse.",
                                                    messages=[{"role": "user", "content": f"one two {marker}"}])
    assert counted.input_tokens > 3
    (seen,) = received(gateway, "claude-fast", marker)
    assert (seen["path"], seen["body"]["model"]) == ("/v1/messages/count_tokens", "fast")
    assert reserved(gateway, "fast") == 0


# --- refusals, in Anthropic's shape ------------------------------------------------------------------

def test_an_unknown_model_is_not_found_error(gateway: Gateway) -> None:
    with pytest.raises(anthropic.NotFoundError) as e:
        client(gateway).messages.create(model="claude-9", max_tokens=8, messages=HELLO)
    assert (e.value.type, e.value.error_code) == ("not_found_error", "model_not_found")
    assert e.value.api_message == "The model 'claude-9' does not exist."


def test_a_prompt_longer_than_the_context_is_invalid_request_error(gateway: Gateway) -> None:
    with pytest.raises(anthropic.BadRequestError) as e:
        client(gateway).messages.create(model="org/tiny", max_tokens=8,
                                        messages=[{"role": "user", "content": "y" * 600}])
    assert (e.value.type, e.value.error_code) == ("invalid_request_error", "context_length_exceeded")


def test_max_tokens_is_required(gateway: Gateway) -> None:
    reply = httpx.post(f"{gateway.url}/v1/messages", headers={"x-api-key": AGENT},
                       json={"model": "fast", "messages": HELLO})
    assert reply.status_code == 400
    assert reply.json() == {"type": "error", "error": {"type": "invalid_request_error",
                                                       "message": "'max_tokens' is required",
                                                       "details": {"error_code": "invalid_request"}}}


def test_a_wrong_key_is_authentication_error_and_another_tenants_model_permission_error(gateway: Gateway) -> None:
    with pytest.raises(anthropic.AuthenticationError) as e:
        client(gateway, "kvg-not-a-key").messages.create(model="fast", max_tokens=8, messages=HELLO)
    assert (e.value.type, e.value.error_code) == ("authentication_error", "invalid_api_key")
    no_key = httpx.post(f"{gateway.url}/v1/messages", json={"model": "fast", "max_tokens": 8, "messages": HELLO})
    assert no_key.status_code == 401 and no_key.json()["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.PermissionDeniedError) as denied:
        client(gateway, OTHER).messages.create(model="org/tiny", max_tokens=8, messages=HELLO)
    assert (denied.value.type, denied.value.error_code) == ("permission_error", "permission_denied")
    assert client(gateway, OTHER).messages.create(model="fast", max_tokens=2, messages=HELLO).usage.output_tokens == 2


@pytest.fixture
def holder(gateway: Gateway) -> Iterator[anthropic.Stream]:
    """A streamed message on org/tiny holding 448 KiB of its 640 KiB until closed."""
    stream = client(gateway).messages.create(model="org/tiny", max_tokens=128, stream=True,
                                             messages=[{"role": "user", "content": "p" * 300}])
    wait_for(lambda: reserved(gateway, "org/tiny") == HOLDING, what="the message's reservation")
    yield stream
    stream.close()
    wait_for(lambda: reserved(gateway, "org/tiny") == 0, what="the release when the stream closed")


def test_a_message_that_does_not_fit_is_rate_limit_error_with_retry_after(gateway: Gateway,
                                                                         holder: anthropic.Stream) -> None:
    with pytest.raises(anthropic.RateLimitError) as e:
        client(gateway).messages.create(model="org/tiny", max_tokens=128,
                                        messages=[{"role": "user", "content": "q" * 300}])
    assert (e.value.type, e.value.error_code) == ("rate_limit_error", "rate_limit_exceeded")
    assert 1 <= int(e.value.response.headers["retry-after"]) <= 60


def test_the_sdk_waits_retry_after_and_gets_through_once_budget_frees(gateway: Gateway,
                                                                   holder: anthropic.Stream) -> None:
    """The holder's generation ends on its own (128 tokens at 25 ms), and with it its reservation: the SDK's
    retry, Retry-After seconds after the 429, is admitted."""
    retrying = anthropic.Anthropic(base_url=gateway.url, api_key=AGENT, max_retries=5)
    raw = retrying.messages.with_raw_response.create(model="org/tiny", max_tokens=128,
                                                     messages=[{"role": "user", "content": "q" * 300}])
    assert raw.retries_taken >= 1
    assert raw.parse().usage.output_tokens == 128


@pytest.mark.parametrize("method,path,status,anthropic_type", [
    ("POST", "/v1/messages", 400, "invalid_request_error"),  # no body
    ("GET", "/v1/messages", 405, "invalid_request_error"),
    ("GET", "/v1/messages/count_tokens", 405, "invalid_request_error"),
    ("GET", "/v1/messages/batches", 404, "not_found_error"),
])
def test_envoy_answers_what_ext_proc_never_sees_in_anthropics_shape(gateway: Gateway, method: str, path: str,
                                                                    status: int, anthropic_type: str) -> None:
    reply = httpx.request(method, f"{gateway.url}{path}", headers={"x-api-key": AGENT})
    assert reply.status_code == status
    error = reply.json()
    assert error["type"] == "error" and error["error"]["type"] == anthropic_type and error["error"]["message"]


def test_an_unknown_path_under_messages_with_a_body_is_refused_by_ext_proc_in_anthropics_shape(
        gateway: Gateway) -> None:
    reply = httpx.post(f"{gateway.url}/v1/messages/batches", headers={"x-api-key": AGENT},
                       json={"requests": []})
    assert reply.status_code == 404
    assert reply.json()["error"] | {"message": ""} == {"type": "not_found_error", "message": "",
                                                      "details": {"error_code": "unknown_url"}}
