"""ProcessingResponse messages Envoy understands: continue, admit (mutate), refuse (immediate)."""

from __future__ import annotations

from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption
from envoy.service.ext_proc.v3.external_processor_pb2 import (
    BodyMutation,
    BodyResponse,
    CommonResponse,
    HeaderMutation,
    HeadersResponse,
    ImmediateResponse,
    ProcessingResponse,
)
from envoy.type.v3.http_status_pb2 import HttpStatus
from ext_proc.admission import Refusal
from ext_proc.openai_protocol import error_body
from kvgate.headers import MAX_TOKENS_HEADER, MODEL_HEADER

_OVERWRITE = HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_JSON = HeaderValueOption(header=HeaderValue(key="content-type", raw_value=b"application/json"),
                          append_action=_OVERWRITE)

CONTINUE_HEADERS = ProcessingResponse(request_headers=HeadersResponse())


def _set(key: str, value: str) -> HeaderValueOption:
    return HeaderValueOption(header=HeaderValue(key=key, raw_value=value.encode()), append_action=_OVERWRITE)


def admit(model: str, max_tokens: int, new_body: bytes | None) -> ProcessingResponse:
    """Route by model (header + route-cache clear in one response, or Envoy ignores the clear) and
    rewrite the body with a matching content-length, or Envoy answers 500."""
    headers = [_set(MODEL_HEADER, model), _set(MAX_TOKENS_HEADER, str(max_tokens))]
    common = CommonResponse(clear_route_cache=True)
    if new_body is not None:
        headers.append(_set("content-length", str(len(new_body))))
        common.body_mutation.CopyFrom(BodyMutation(body=new_body))
    common.header_mutation.CopyFrom(HeaderMutation(set_headers=headers))
    return ProcessingResponse(request_body=BodyResponse(response=common))


def refuse(r: Refusal) -> ProcessingResponse:
    headers = [_JSON]
    if r.retry_after is not None:
        headers.append(_set("retry-after", str(r.retry_after)))
    return ProcessingResponse(immediate_response=ImmediateResponse(
        status=HttpStatus(code=r.status),
        headers=HeaderMutation(set_headers=headers),
        body=error_body(r.message, type_=r.type_, code=r.code, param=r.param),
        details=f"kvgate_{r.code}",
    ))
