"""ext_proc/responses.py: refusals in each client convention (docs/reference.md) and the admit mutation."""

from __future__ import annotations

import orjson
import pytest

from envoy.config.core.v3.base_pb2 import HeaderValueOption
from envoy.service.ext_proc.v3.external_processor_pb2 import ImmediateResponse, ProcessingResponse
from ext_proc.admission import Refusal
from ext_proc.apis import Convention
from ext_proc.request import Rewrite
from ext_proc.responses import admit, refuse
from kvgate.wire import MODEL_HEADER

RATE_LIMITED = Refusal(429, "rate_limit_exceeded", "no KV budget free", type_="rate_limit_error", retry_after=3)
TOO_LONG = Refusal(400, "context_length_exceeded", "prompt too long", param="messages")
NOT_FOUND = Refusal(404, "model_not_found", "no such model", param="model")
NOT_LOADED = Refusal(503, "policies_not_loaded", "not yet", type_="service_unavailable", retry_after=1)
UNKNOWN_URL = Refusal(404, "unknown_url", "Unknown request URL: /x")


def immediate(r: Refusal, convention: Convention) -> ImmediateResponse:
    resp = refuse(r, convention)
    assert resp.WhichOneof("response") == "immediate_response"
    return resp.immediate_response


def header_map(options) -> dict[str, str]:  # noqa: ANN001 - repeated HeaderValueOption
    out = {}
    for o in options:
        assert o.append_action == HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
        assert o.header.key not in out, o.header.key
        out[o.header.key] = o.header.raw_value.decode()
    return out


def admit_headers(resp: ProcessingResponse) -> dict[str, str]:
    return header_map(resp.request_body.response.header_mutation.set_headers)


# --- OpenAI ------------------------------------------------------------------------------------

def test_openai_status_and_error_object() -> None:
    ir = immediate(TOO_LONG, Convention.OPENAI)
    assert ir.status.code == 400
    assert orjson.loads(ir.body) == {"error": {"message": "prompt too long", "type": "invalid_request_error",
                                               "param": "messages", "code": "context_length_exceeded"}}
    assert header_map(ir.headers.set_headers) == {"content-type": "application/json"}


def test_openai_429_has_retry_after() -> None:
    ir = immediate(RATE_LIMITED, Convention.OPENAI)
    assert ir.status.code == 429
    error = orjson.loads(ir.body)["error"]
    assert (error["code"], error["type"], error["param"]) == ("rate_limit_exceeded", "rate_limit_error", None)
    assert header_map(ir.headers.set_headers)["retry-after"] == "3"


def test_openai_404_model_not_found() -> None:
    ir = immediate(NOT_FOUND, Convention.OPENAI)
    assert ir.status.code == 404
    assert orjson.loads(ir.body)["error"]["code"] == "model_not_found"
    assert "retry-after" not in header_map(ir.headers.set_headers)


def test_openai_503_retry_after() -> None:
    ir = immediate(NOT_LOADED, Convention.OPENAI)
    assert ir.status.code == 503
    assert header_map(ir.headers.set_headers)["retry-after"] == "1"


def test_http_refusal_has_no_grpc_status() -> None:
    for convention in (Convention.OPENAI, Convention.TRITON_HTTP, Convention.ANTHROPIC):
        assert not immediate(RATE_LIMITED, convention).HasField("grpc_status")


def test_details_name_the_code() -> None:
    for convention in Convention:
        assert immediate(TOO_LONG, convention).details == "kvgate_context_length_exceeded"


# --- Anthropic ---------------------------------------------------------------------------------

@pytest.mark.parametrize("r,anthropic_type", [
    (TOO_LONG, "invalid_request_error"),
    (Refusal(401, "invalid_api_key", "no key"), "authentication_error"),
    (Refusal(403, "permission_denied", "not yours"), "permission_error"),
    (NOT_FOUND, "not_found_error"),
    (UNKNOWN_URL, "not_found_error"),
    (Refusal(405, "method_not_allowed", "POST only"), "invalid_request_error"),  # other 4xx: the general one
    (Refusal(413, "body_too_large", "big"), "request_too_large"),
    (Refusal(415, "unsupported_media_type", "gzip"), "invalid_request_error"),
    (RATE_LIMITED, "rate_limit_error"),
    (Refusal(500, "internal_error", "boom"), "api_error"),
    (NOT_LOADED, "overloaded_error"),
    (Refusal(504, "engine_timeout", "slow"), "timeout_error"),
])
def test_anthropic_error_shape_and_type(r: Refusal, anthropic_type: str) -> None:
    """Anthropic's shape, with its error type for the status; the status itself stays the gateway's (a full
    KV budget is 429 over every API), and kvgate's code goes where Anthropic puts finer codes."""
    ir = immediate(r, Convention.ANTHROPIC)
    assert ir.status.code == r.status
    assert orjson.loads(ir.body) == {"type": "error", "error": {"type": anthropic_type, "message": r.message,
                                                                "details": {"error_code": r.code}}}
    assert header_map(ir.headers.set_headers)["content-type"] == "application/json"
    assert ir.details == f"kvgate_{r.code}"


def test_anthropic_429_and_503_have_retry_after() -> None:
    assert header_map(immediate(RATE_LIMITED, Convention.ANTHROPIC).headers.set_headers)["retry-after"] == "3"
    assert header_map(immediate(NOT_LOADED, Convention.ANTHROPIC).headers.set_headers)["retry-after"] == "1"
    assert "retry-after" not in header_map(immediate(TOO_LONG, Convention.ANTHROPIC).headers.set_headers)


# --- Triton HTTP -------------------------------------------------------------------------------

@pytest.mark.parametrize("r", [TOO_LONG, NOT_FOUND, RATE_LIMITED, NOT_LOADED])
def test_triton_http_status_and_error_string(r: Refusal) -> None:
    ir = immediate(r, Convention.TRITON_HTTP)
    assert ir.status.code == r.status
    assert orjson.loads(ir.body) == {"error": r.message}
    assert header_map(ir.headers.set_headers)["content-type"] == "application/json"


def test_triton_http_429_retry_after() -> None:
    assert header_map(immediate(RATE_LIMITED, Convention.TRITON_HTTP).headers.set_headers)["retry-after"] == "3"


def test_triton_http_400_no_retry_after() -> None:
    assert "retry-after" not in header_map(immediate(TOO_LONG, Convention.TRITON_HTTP).headers.set_headers)


# --- gRPC --------------------------------------------------------------------------------------

@pytest.mark.parametrize("r,code", [
    (RATE_LIMITED, 8),  # RESOURCE_EXHAUSTED
    (TOO_LONG, 3),  # INVALID_ARGUMENT
    (NOT_FOUND, 5),  # NOT_FOUND
    (NOT_LOADED, 14),  # UNAVAILABLE
    (UNKNOWN_URL, 12),  # UNIMPLEMENTED, although its HTTP status is 404
    (Refusal(405, "method_not_allowed", "POST only"), 12),
    (Refusal(500, "internal", "boom"), 13),  # INTERNAL
    (Refusal(504, "upstream_timeout", "slow"), 4),  # DEADLINE_EXCEEDED
    (Refusal(415, "unsupported_media_type", "gzip"), 3),  # INVALID_ARGUMENT
    (Refusal(418, "teapot", "?"), 2),  # UNKNOWN: a status with no gRPC meaning
])
def test_grpc_status_mapping(r: Refusal, code: int) -> None:
    ir = immediate(r, Convention.GRPC)
    assert ir.status.code == 200
    assert ir.grpc_status.status == code


def test_grpc_body_is_the_message() -> None:
    ir = immediate(TOO_LONG, Convention.GRPC)
    assert ir.body == b"prompt too long"
    assert header_map(ir.headers.set_headers)["content-type"] == "application/grpc"


def test_grpc_429_retry_pushback_ms() -> None:
    headers = header_map(immediate(RATE_LIMITED, Convention.GRPC).headers.set_headers)
    assert headers["grpc-retry-pushback-ms"] == "3000"
    assert "retry-after" not in headers


def test_grpc_400_no_pushback() -> None:
    headers = header_map(immediate(TOO_LONG, Convention.GRPC).headers.set_headers)
    assert "grpc-retry-pushback-ms" not in headers


def test_grpc_unicode_message_utf8() -> None:
    assert immediate(Refusal(400, "x", "modèle"), Convention.GRPC).body == "modèle".encode()


# --- admit -------------------------------------------------------------------------------------

def test_admit_without_rewrite_clears_the_route_cache_with_a_header_mutation() -> None:
    """Envoy ignores a route-cache clear that comes without a header mutation."""
    resp = admit("llama", None)
    common = resp.request_body.response
    assert common.clear_route_cache
    assert not common.HasField("body_mutation")
    assert admit_headers(resp) == {MODEL_HEADER: "llama"}


def test_admit_with_rewrite_sets_body_and_content_length() -> None:
    body = '{"prompt": "héllo"}'.encode()
    resp = admit("llama", Rewrite(body))
    common = resp.request_body.response
    assert common.clear_route_cache
    assert common.body_mutation.body == body
    assert admit_headers(resp) == {MODEL_HEADER: "llama", "content-length": str(len(body))}


def test_admit_with_rewrite_extra_headers() -> None:
    body = b'{"inputs":[]}' + b"\x00" * 6
    resp = admit("llama", Rewrite(body, (("inference-header-content-length", "13"),)))
    headers = admit_headers(resp)
    assert headers["content-length"] == str(len(body))
    assert headers["inference-header-content-length"] == "13"


def test_admit_is_a_body_response() -> None:
    assert admit("m", None).WhichOneof("response") == "request_body"
