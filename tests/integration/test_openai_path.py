"""The OpenAI API through the real Envoy: routing, clamp, errors, 429 and release of reservations."""

from __future__ import annotations

import threading
import uuid

import httpx
import openai
import pytest

from kvgate.cli.gateway import Gateway
from kvgate.wire import MAX_TOKENS_HEADER, PRIORITY_HEADER
from tests.integration.conftest import (
    MAX_REQUEST_BYTES,
    ledger_metrics,
    reserved,
    sim_requests,
    sim_url,
    wait_for,
)

MODELS = ["fast", "org/tiny"]


def client(gw: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key="x", max_retries=0)


def received_with(gw: Gateway, model: str, marker: str) -> list[dict]:
    """Bodies the model's engine received whose prompt carries `marker`."""
    return [r["body"] for r in sim_requests(gw, model) if marker in str(r["body"])]


def decisions_total(gw: Gateway) -> float:
    return sum(v for (name, _), v in ledger_metrics(gw).items() if name == "kvgate_admission_decisions_total")


def test_models_list_is_answered_by_envoy_from_the_catalog(gateway: Gateway) -> None:
    before = decisions_total(gateway)
    models = client(gateway).models.list()
    by_id = {m.id: m for m in models.data}
    assert sorted(by_id) == sorted(MODELS)
    assert by_id["fast"].model_extra["max_model_len"] == 4096
    assert by_id["org/tiny"].model_extra["max_output_tokens"] == 128
    assert decisions_total(gateway) == before  # ext_proc never saw it


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("stream", [False, True])
def test_chat_completion_is_routed_to_its_model(gateway: Gateway, model: str, stream: bool) -> None:
    marker = uuid.uuid4().hex
    resp = client(gateway).chat.completions.create(
        model=model, messages=[{"role": "user", "content": f"hello {marker}"}], max_tokens=7, stream=stream,
        **({"stream_options": {"include_usage": True}} if stream else {}))
    if stream:
        chunks = list(resp)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        usage = chunks[-1].usage
        assert chunks[0].model == model
    else:
        text, usage = resp.choices[0].message.content, resp.usage
        assert resp.model == model
    assert usage.completion_tokens == 7 and text
    other = next(m for m in MODELS if m != model)
    assert len(received_with(gateway, model, marker)) == 1
    assert received_with(gateway, other, marker) == []


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("stream", [False, True])
def test_completion_is_routed_to_its_model(gateway: Gateway, model: str, stream: bool) -> None:
    marker = uuid.uuid4().hex
    resp = client(gateway).completions.create(model=model, prompt=f"say {marker}", max_tokens=5, stream=stream)
    text = "".join(c.choices[0].text for c in resp) if stream else resp.choices[0].text
    assert len(text.split()) == 5
    assert len(received_with(gateway, model, marker)) == 1


def test_max_tokens_is_clamped_and_the_engine_sees_the_clamp(gateway: Gateway) -> None:
    marker = uuid.uuid4().hex
    raw = client(gateway).completions.with_raw_response.create(model="fast", prompt=marker, max_tokens=100_000)
    assert raw.headers[MAX_TOKENS_HEADER] == "256"
    assert raw.parse().usage.completion_tokens == 256
    (body,) = received_with(gateway, "fast", marker)
    assert body["max_tokens"] == 256


def test_both_chat_limit_keys_are_clamped(gateway: Gateway) -> None:
    marker = uuid.uuid4().hex
    client(gateway).chat.completions.create(
        model="fast", messages=[{"role": "user", "content": marker}], max_completion_tokens=5000)
    (body,) = received_with(gateway, "fast", marker)
    assert body["max_completion_tokens"] == 256 and "max_tokens" not in body


def test_a_request_without_max_tokens_gets_the_clamp(gateway: Gateway) -> None:
    marker = uuid.uuid4().hex
    raw = client(gateway).chat.completions.with_raw_response.create(
        model="org/tiny", messages=[{"role": "user", "content": marker}])
    assert raw.headers[MAX_TOKENS_HEADER] == "128"
    (body,) = received_with(gateway, "org/tiny", marker)
    assert body["max_tokens"] == 128


def test_clamp_leaves_room_for_the_prompt_in_the_context(gateway: Gateway) -> None:
    # 400 bytes of prompt + 16 template tokens leaves 96 of tiny's 512-token context.
    raw = client(gateway).completions.with_raw_response.create(model="org/tiny", prompt="x" * 400, max_tokens=128)
    assert raw.headers[MAX_TOKENS_HEADER] == str(512 - 400 - 8)


def test_unknown_model_is_a_404_model_not_found(gateway: Gateway) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        client(gateway).chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    assert e.value.code == "model_not_found"


def test_prompt_longer_than_the_context_is_a_400(gateway: Gateway) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client(gateway).completions.create(model="org/tiny", prompt="y" * 600)
    assert e.value.code == "context_length_exceeded"
    assert e.value.param == "prompt"


@pytest.mark.parametrize(("body", "param"), [
    (b"{not json", None),
    (b"[1, 2]", None),
    (b'{"model": 7, "messages": []}', "model"),
    (b'{"model": "fast", "messages": "hello"}', "messages"),
    (b'{"model": "fast", "messages": [{"role": "user", "content": "x"}], "max_tokens": "10"}', "max_tokens"),
    (b'{"model": "fast", "messages": [{"role": "user", "content": "x"}], "max_tokens": -3}', "max_tokens"),
    (b'{"model": "fast", "messages": [{"role": "user", "content": "x"}], "max_tokens": true}', "max_tokens"),
    (b"", None),
])
def test_bad_input_gets_an_openai_400_and_reserves_nothing(gateway: Gateway, body: bytes, param: str | None) -> None:
    resp = httpx.post(f"{gateway.url}/v1/chat/completions", content=body,
                      headers={"content-type": "application/json"})
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]
    assert reserved(gateway, "fast") == 0


def test_unsupported_path_is_an_openai_404(gateway: Gateway) -> None:
    resp = httpx.post(f"{gateway.url}/v1/audio/speech", json={"model": "fast", "input": "x"})
    assert resp.status_code == 404
    assert resp.json()["error"]["code"] == "unknown_url"


def test_body_over_the_limit_is_refused_by_envoy_with_413(gateway: Gateway) -> None:
    resp = httpx.post(f"{gateway.url}/v1/completions",
                      json={"model": "fast", "prompt": "z" * (MAX_REQUEST_BYTES + 1024)})
    assert resp.status_code == 413


def _hold_tiny_budget(gw: Gateway) -> httpx.Response:
    """A streamed completion on org/tiny that holds most of its KV budget until read to the end."""
    # 300 bytes + 8 = 308 prompt tokens, + 128 output = 436 -> 28 blocks of 16 x 1 KiB = 448 KiB of 640.
    req = httpx.Request("POST", f"{gw.url}/v1/completions",
                        json={"model": "org/tiny", "prompt": "p" * 300, "max_tokens": 128, "stream": True})
    resp = httpx.Client(timeout=30).send(req, stream=True)
    assert resp.status_code == 200
    wait_for(lambda: reserved(gw, "org/tiny") == 448 * 1024, what="the first reservation")
    return resp


def test_over_budget_is_a_429_with_retry_after_then_everything_is_released(gateway: Gateway) -> None:
    holder = _hold_tiny_budget(gateway)
    with pytest.raises(openai.RateLimitError) as e:
        client(gateway).completions.create(model="org/tiny", prompt="q" * 300, max_tokens=128)
    assert e.value.code == "rate_limit_exceeded"
    assert 1 <= int(e.value.response.headers["retry-after"]) <= 60
    # A request that still fits is admitted meanwhile.
    assert client(gateway).completions.create(model="org/tiny", prompt="ok", max_tokens=2).usage.completion_tokens == 2
    text = holder.read().decode()
    holder.close()
    assert text.rstrip().endswith("data: [DONE]")
    wait_for(lambda: reserved(gateway, "org/tiny") == 0, what="release after completion")


def test_a_patient_request_waits_for_budget_and_runs_when_it_frees(gateway: Gateway) -> None:
    holder = _hold_tiny_budget(gateway)
    result: dict[str, httpx.Response] = {}
    waiter = threading.Thread(target=lambda: result.setdefault("r", httpx.post(
        f"{gateway.url}/v1/completions", json={"model": "org/tiny", "prompt": "q" * 300, "max_tokens": 128},
        headers={PRIORITY_HEADER: "patient"}, timeout=30)))
    waiter.start()
    wait_for(lambda: ledger_metrics(gateway).get(("kvgate_admission_queue_waiting", "org/tiny")) == 1,
             what="the second request to wait")
    assert "r" not in result
    holder.read()  # the first request completes: its budget goes to the one waiting
    holder.close()
    waiter.join(timeout=20)
    assert result["r"].status_code == 200 and result["r"].json()["usage"]["completion_tokens"] == 128
    wait_for(lambda: reserved(gateway, "org/tiny") == 0, what="release after both completed")


def test_client_disconnect_mid_stream_releases_the_reservation(gateway: Gateway) -> None:
    holder = _hold_tiny_budget(gateway)
    next(holder.iter_raw())  # the stream has started
    holder.close()
    wait_for(lambda: reserved(gateway, "org/tiny") == 0, what="release after disconnect")
    state_url = f"{sim_url(gateway, 'org/tiny')}/sim/state"
    wait_for(lambda: httpx.get(state_url).json()["kv_blocks_used"] == 0, what="the engine to free its blocks")


def test_http2_cleartext_on_the_same_port(gateway: Gateway) -> None:
    with httpx.Client(http1=False, http2=True) as h2:
        ok = h2.post(f"{gateway.url}/v1/completions", json={"model": "fast", "prompt": "h2", "max_tokens": 3})
        too_big = h2.post(f"{gateway.url}/v1/completions",
                          json={"model": "fast", "prompt": "z" * (MAX_REQUEST_BYTES + 1024)})
    assert ok.http_version == "HTTP/2" and ok.status_code == 200
    assert ok.json()["usage"]["completion_tokens"] == 3
    assert too_big.status_code == 413
