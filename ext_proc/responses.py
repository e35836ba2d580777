"""ProcessingResponse messages Envoy understands: continue, admit (mutate), refuse (immediate)."""

from __future__ import annotations

import orjson
from google.protobuf.duration_pb2 import Duration

from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption
from envoy.service.ext_proc.v3.external_processor_pb2 import (
    BodyMutation,
    BodyResponse,
    CommonResponse,
    GrpcStatus,
    HeaderMutation,
    HeadersResponse,
    ImmediateResponse,
    ProcessingResponse,
)
from envoy.type.v3.http_status_pb2 import HttpStatus
from ext_proc import anthropic_protocol
from ext_proc.admission import Refusal
from ext_proc.apis import Convention
from ext_proc.openai_protocol import error_body
from ext_proc.request import Rewrite
from kvgate.wire import MODEL_HEADER

_OVERWRITE = HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_JSON = HeaderValueOption(header=HeaderValue(key="content-type", raw_value=b"application/json"),
                          append_action=_OVERWRITE)


def continue_headers() -> ProcessingResponse:
    """A new message each time: the caller attaches the request's decision to what it is given."""
    return ProcessingResponse(request_headers=HeadersResponse())


def _set(key: str, value: str) -> HeaderValueOption:
    return HeaderValueOption(header=HeaderValue(key=key, raw_value=value.encode()), append_action=_OVERWRITE)


def admit(model: str, rewrite: Rewrite | None) -> ProcessingResponse:
    """Admitted: the decision's dynamic metadata, which the caller attaches, routes it (docs/architecture.md,
    "One exchange per request"). The route cache is cleared in the same response, with a header
    mutation, or Envoy ignores the clear. A rewritten body goes with its content-length and any header
    its format ties to it (applied where the headers still wait for this answer: a two-message exchange;
    elsewhere the buffer filter sets content-length)."""
    headers = [_set(MODEL_HEADER, model)]
    common = CommonResponse(clear_route_cache=True)
    if rewrite is not None:
        headers.append(_set("content-length", str(len(rewrite.body))))
        headers.extend(_set(k, v) for k, v in rewrite.headers)
        common.body_mutation.CopyFrom(BodyMutation(body=rewrite.body))
    common.header_mutation.CopyFrom(HeaderMutation(set_headers=headers))
    return ProcessingResponse(request_body=BodyResponse(response=common))


def wait_longer(seconds: float) -> ProcessingResponse:
    """Extends Envoy's wait for the pending answer (bounded by the filter's max_message_timeout)."""
    return ProcessingResponse(override_message_timeout=Duration(seconds=int(seconds)))


def route_headers(model: str) -> ProcessingResponse:
    """The answer to a stream's headers, sent once its first message named the model (its decision's
    metadata, attached by the caller, routes it; the header mutation makes the route-cache clear count)."""
    return ProcessingResponse(request_headers=HeadersResponse(response=CommonResponse(
        header_mutation=HeaderMutation(set_headers=[_set(MODEL_HEADER, model)]), clear_route_cache=True)))


def stream_chunk(data: bytes) -> ProcessingResponse:
    """What replaces one STREAMED body chunk upstream: the whole messages it completed, maybe none."""
    return ProcessingResponse(request_body=BodyResponse(response=_replaced(data)))


def response_chunk(data: bytes | None) -> ProcessingResponse:
    """What replaces one STREAMED response body chunk: None leaves it as it came."""
    if data is None:
        return ProcessingResponse(response_body=BodyResponse())
    return ProcessingResponse(response_body=BodyResponse(response=_replaced(data)))


def _replaced(data: bytes) -> CommonResponse:
    return CommonResponse(body_mutation=BodyMutation(body=data) if data else BodyMutation(clear_body=True))


# gRPC status codes by the HTTP status a refusal would have.
# INVALID_ARGUMENT, UNAUTHENTICATED, PERMISSION_DENIED, NOT_FOUND, ...
_GRPC_CODES = {400: 3, 401: 16, 403: 7, 404: 5, 405: 12, 413: 8, 415: 3, 429: 8, 500: 13, 503: 14, 504: 4}
_UNIMPLEMENTED = 12


def grpc_code(r: Refusal) -> int:
    return _UNIMPLEMENTED if r.code == "unknown_url" else _GRPC_CODES.get(r.status, 2)  # 2: UNKNOWN


def _grpc(r: Refusal) -> ImmediateResponse:
    code = grpc_code(r)
    headers = [_set("content-type", "application/grpc")]
    if r.retry_after is not None:
        # gRPC's own retry hint (gRFC A6); clients that ignore it still get RESOURCE_EXHAUSTED.
        headers.append(_set("grpc-retry-pushback-ms", str(r.retry_after * 1000)))
    return ImmediateResponse(status=HttpStatus(code=200), grpc_status=GrpcStatus(status=code),
                             headers=HeaderMutation(set_headers=headers), body=r.message.encode(),
                             details=f"kvgate_{r.code}")


def _http(r: Refusal, body: bytes) -> ImmediateResponse:
    headers = [_JSON]
    if r.retry_after is not None:
        headers.append(_set("retry-after", str(r.retry_after)))
    return ImmediateResponse(status=HttpStatus(code=r.status), headers=HeaderMutation(set_headers=headers),
                             body=body, details=f"kvgate_{r.code}")


def answer(body: bytes) -> ProcessingResponse:
    """A lookup ext_proc answers itself (200, JSON); its details keep Envoy's local replies off it."""
    return ProcessingResponse(immediate_response=ImmediateResponse(
        status=HttpStatus(code=200), headers=HeaderMutation(set_headers=[_JSON]), body=body, details="kvgate_lookup"))


def refuse(r: Refusal, convention: Convention) -> ProcessingResponse:
    """The refusal in the client's own convention."""
    if convention is Convention.GRPC:
        immediate = _grpc(r)
    elif convention is Convention.TRITON_HTTP:
        immediate = _http(r, orjson.dumps({"error": r.message}))
    elif convention is Convention.ANTHROPIC:
        immediate = _http(r, anthropic_protocol.error_body(r.status, r.code, r.message))
    else:
        immediate = _http(r, error_body(r.message, type_=r.type_, code=r.code, param=r.param))
    return ProcessingResponse(immediate_response=immediate)
