"""Bad input through the real Envoy: every one refused in the client's own convention (OpenAI JSON, Triton's
{"error": ...}), never a 500, and nothing left reserved. Duplicate keys (a parser differential), a
compressed body, header bytes that are not UTF-8, deep nesting, content of the wrong type, too many
elements; and best_of, which the engine runs as that many sequences, reserved as that many."""

from __future__ import annotations

import struct
import uuid
from collections.abc import Iterator

import httpx
import openai
import pytest

from kvgate.api_keys import key_hash
from kvgate.catalog import parse_catalog
from kvgate.cli.gateway import Gateway
from kvgate.wire import PRIORITY_HEADER
from tests.integration.conftest import TEST_CATALOG, reserved, sim_requests, wait_for

MODELS = ["fast", "org/tiny"]
KEY = "kvg-bad-inputs-0123456789"


def post(gw: Gateway, path: str, body: bytes, **headers: str | bytes) -> httpx.Response:
    return httpx.post(f"{gw.url}{path}", content=body, headers={"content-type": "application/json", **headers},
                      timeout=30)


def openai_error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error"
    return error


def triton_error(resp: httpx.Response, status: int) -> str:
    assert resp.status_code == status, resp.text
    return resp.json()["error"]


def engine_saw(gw: Gateway, marker: str) -> bool:
    return any(marker in str(r["body"]) for model in MODELS for r in sim_requests(gw, model))


@pytest.fixture(autouse=True)
def nothing_left_reserved(gateway: Gateway) -> Iterator[None]:
    yield
    for model in MODELS:
        wait_for(lambda m=model: reserved(gateway, m) == 0, what=f"{model}'s reservations released")


# --- duplicate keys --------------------------------------------------------------------------------

def test_duplicate_keys_are_refused_on_the_openai_api(gateway: Gateway) -> None:
    marker = uuid.uuid4().hex
    body = b'{"model":"fast","prompt":"' + marker.encode() + b'","max_tokens":100000,"max_tokens":10}'
    error = openai_error(post(gateway, "/v1/completions", body), 400)
    assert (error["code"], error["param"]) == ("invalid_request", "max_tokens")
    nested = (b'{"model": "fast", "messages": [{"role": "user", "content": "' + b"x" * 50_000
              + b'", "content": "' + marker.encode() + b'"}]}')
    assert openai_error(post(gateway, "/v1/chat/completions", nested), 400)["param"] == "content"
    assert not engine_saw(gateway, marker)


def test_duplicate_keys_are_refused_on_triton_http(gateway: Gateway) -> None:
    """Triton's reader takes the first key: 100 KB and 100,000 tokens would run, 2 bytes and 10 admitted."""
    body = b'{"text_input":"' + b"x" * 100_000 + b'","text_input":"hi","max_tokens":100000,"max_tokens":10}'
    assert "twice" in triton_error(post(gateway, "/v2/models/fast/generate", body), 400)
    infer = b'{"inputs":[{"name":"text_input","datatype":"BYTES","shape":[1],"data":["a"],"data":["b"]}]}'
    assert "twice" in triton_error(post(gateway, "/v2/models/fast/infer", infer), 400)


# --- Content-Encoding ------------------------------------------------------------------------------

@pytest.mark.parametrize("encoding", ["gzip", "br"])
def test_a_compressed_body_is_refused_415(gateway: Gateway, encoding: str) -> None:
    marker = uuid.uuid4().hex
    chat = b'{"model":"fast","messages":[{"role":"user","content":"' + marker.encode() + b'"}]}'
    error = openai_error(post(gateway, "/v1/chat/completions", chat, **{"content-encoding": encoding}), 415)
    assert error["code"] == "unsupported_media_type" and encoding in error["message"]
    generate = b'{"text_input":"' + marker.encode() + b'"}'
    assert "uncompressed" in triton_error(
        post(gateway, "/v2/models/fast/generate", generate, **{"content-encoding": encoding}), 415)
    assert not engine_saw(gateway, marker)


# --- header bytes that are not UTF-8 ---------------------------------------------------------------

def test_header_bytes_that_are_not_utf8_are_a_400_not_a_500(gateway: Gateway) -> None:
    body = b'{"model":"fast","prompt":"hi","max_tokens":2}'
    error = openai_error(post(gateway, "/v1/completions", body, **{PRIORITY_HEADER: b"\xff\xfe"}), 400)
    assert error["param"] == PRIORITY_HEADER


def test_an_api_key_that_is_not_utf8_is_a_401_not_a_500(gateway: Gateway) -> None:
    body = b'{"model":"fast","prompt":"hi","max_tokens":2}'
    keyed = parse_catalog({**TEST_CATALOG, "tenants": [{"name": "t", "api_key_sha256": [key_hash(KEY)],
                                                        "models": ["*"]}]})
    gateway.reload(keyed)
    try:
        wait_for(lambda: post(gateway, "/v1/completions", body).status_code == 401, what="keys required")
        assert post(gateway, "/v1/completions", body, authorization=f"Bearer {KEY}").status_code == 200
        for sent in (b"Bearer \xff\xfe", KEY.encode() + b"\xff", b"Bearer " + KEY.encode() + b"\xc3"):
            error = openai_error(post(gateway, "/v1/completions", body, authorization=sent), 401)
            assert error["code"] == "invalid_api_key"
    finally:
        gateway.reload(parse_catalog(TEST_CATALOG))
        wait_for(lambda: post(gateway, "/v1/completions", body).status_code == 200, what="the gateway open again")


# --- deep nesting, wrong types, too many elements --------------------------------------------------

def test_deep_nesting_is_a_400(gateway: Gateway) -> None:
    deep = b"[" * 1000 + b"]" * 1000
    chat = b'{"model":"fast","messages":[{"role":"user","content":"hi"}],"metadata":' + deep + b"}"
    assert "deep" in openai_error(post(gateway, "/v1/chat/completions", chat), 400)["message"]
    data = b"[" * 200 + b'"x"' + b"]" * 200
    infer = b'{"inputs":[{"name":"text_input","datatype":"BYTES","shape":[1],"data":' + data + b"}]}"
    assert "deeper" in triton_error(post(gateway, "/v2/models/fast/infer", infer), 400)


@pytest.mark.parametrize(("fields", "param"), [
    ({"messages": [{"role": "user", "content": 42}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": {"text": "hi"}}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [42]}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 42}]}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, "stream"),
    ({"messages": [{"role": "user", "content": "hi"}], "extra_body": {"chat_template": "{{ messages * 100 }}"}},
     "chat_template"),
])
def test_wrong_content_types_are_refused_by_the_sdk_client(gateway: Gateway, fields: dict, param: str) -> None:
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="fast", **fields)
    assert (e.value.status_code, e.value.param) == (400, param)


def test_too_many_elements_are_refused_before_they_are_decoded(gateway: Gateway) -> None:
    elements = 50_000
    raw = struct.pack("<I", 0) * elements
    header = (b'{"inputs":[{"name":"text_input","datatype":"BYTES","shape":[%d],'
              b'"parameters":{"binary_data_size":%d}}]}' % (elements, len(raw)))
    resp = post(gateway, "/v2/models/fast/infer", header + raw, **{"inference-header-content-length": str(len(header))})
    assert "more than the gateway admits" in triton_error(resp, 400)
    prompts = b'{"model":"fast","prompt":[' + b",".join([b'""'] * 5000) + b"]}"
    assert openai_error(post(gateway, "/v1/completions", prompts), 400)["param"] == "prompt"


# --- best_of ---------------------------------------------------------------------------------------

def held_while_streaming(gw: Gateway, **fields: object) -> float:
    """The model's reservation while one streamed completion of org/tiny (a slow engine) runs."""
    req = httpx.Client(timeout=30).build_request(
        "POST", f"{gw.url}/v1/completions",
        json={"model": "org/tiny", "prompt": "p" * 20, "max_tokens": 64, "stream": True, **fields})
    with httpx.Client(timeout=30) as http:
        resp = http.send(req, stream=True)
        assert resp.status_code == 200
        wait_for(lambda: reserved(gw, "org/tiny") > 0, what="the reservation")
        held = reserved(gw, "org/tiny")
        resp.close()
    wait_for(lambda: reserved(gw, "org/tiny") == 0, what="the release")
    return held


def test_best_of_is_reserved_for_every_sequence(gateway: Gateway) -> None:
    one = held_while_streaming(gateway)
    assert held_while_streaming(gateway, best_of=4) == 4 * one
    error = openai_error(post(gateway, "/v1/completions", b'{"model":"org/tiny","prompt":"x","n":3,"best_of":2}'), 400)
    assert error["param"] == "best_of"
