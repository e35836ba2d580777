"""One fuzz target per parser of ext_proc: each takes arbitrary bytes and checks the property every parser
must hold. For any input it returns a result or raises ProtocolError, and nothing else escapes (the
servicer turns anything else into a 500); and a result's rewrite, at the limits admission would pass,
is itself parseable and says the same thing (same prompts and sequences, the new limit, the engine's
model name). A target that returns has passed; a `Failure` (or any other exception) is a finding.

Each returns what it came to (for the fuzzer's feedback): "parsed", or the kind of refusal.

The parsers that hand admission a chat for the model's template (Responses, Anthropic's Messages) must
hand one the template renders or refuses as Unrenderable, which tokens.py falls back on: anything else
would escape ext_proc. Their targets render it with Llama 3's template.

The inputs are the raw bytes a client controls: the body, and for the binary extension and the header
reader, the header values too (the first bytes of the input, cut at a newline).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue
from envoy.service.ext_proc.v3.external_processor_pb2 import HttpHeaders
from bench.tokens import LLAMA3_TEMPLATE
from ext_proc import (anthropic_protocol, apis, embeddings, openai_protocol, responses_api, routed_calls, triton_grpc,
                      triton_http)
from ext_proc.exchange import read_headers
from ext_proc.request import LLMRequest, Parsed, ProtocolError, identity_encoding
from ext_proc.tenants import Tenant, TenantTable
from kvgate.api_keys import key_hash
from kvgate.chat_template import ChatTemplate, TemplateSource, Unrenderable
from kvgate.v1 import policy_pb2

ENGINE = "engine-name"
MODEL = "m"  # the model a Triton HTTP path names


class Failure(AssertionError):
    """The property does not hold for this input."""


@dataclass(frozen=True)
class Target:
    name: str
    run: Callable[[bytes], str]
    corpus: str  # tests/fuzz/corpus/<corpus>/ seeds it


def refused(e: ProtocolError) -> str:
    """The kind of a refusal: its message without the client's values."""
    return "refused: " + re.sub(r"\d+|'[^']*'|\"[^\"]*\"", "#", str(e))[:60]


def _split(data: bytes) -> tuple[bytes, bytes]:
    """A header value (before the first newline) and a body (after it); no newline: all body."""
    head, sep, body = data.partition(b"\n")
    return (head, body) if sep else (b"", data)


def _same(before: LLMRequest, after: LLMRequest, max_tokens: int, model: str) -> None:
    """The rewritten body must admit as the original did, with the new limit and model."""
    checks = {
        "model": (after.model, model),
        "prompts": (after.prompts, before.prompts),
        "token ids": (after.exact_prompt_tokens, before.exact_prompt_tokens),
        "messages": (after.messages, before.messages),
        "sequences": (after.sequences_per_prompt, before.sequences_per_prompt),
        "max_tokens": (after.requested_max_tokens, max_tokens),
    }
    for what, (got, want) in checks.items():
        if got != want:
            raise Failure(f"rewrite changed {what}: {str(got)[:200]} != {str(want)[:200]}")


def _limits(request: LLMRequest) -> list[int]:
    """Output limits admission may pass: at most what was asked (it never raises one)."""
    asked = request.requested_max_tokens
    return sorted({1, 7} | ({asked, max(1, asked - 1)} if asked else {4096}))


def _check_rewrites(parsed: Parsed, reparse: Callable[[bytes, Mapping[str, str]], Parsed], headers: Mapping[str, str],
                    renames: bool) -> None:
    before = parsed.request
    if not before.admit:
        return
    for limit in _limits(before):
        if before.requested_max_tokens and limit > before.requested_max_tokens:
            continue
        rewrite = parsed.rewrite(limit, ENGINE if renames else before.model)
        if rewrite is None:
            if before.requested_max_tokens != limit or (renames and before.model != ENGINE):
                raise Failure(f"no rewrite for limit {limit}, asked {before.requested_max_tokens}")
            continue
        try:
            after = reparse(rewrite.body, {**headers, **dict(rewrite.headers)}).request
        except ProtocolError as e:
            raise Failure(f"the rewrite for limit {limit} does not parse: {e}") from e
        _same(before, after, limit, ENGINE if renames else before.model)


_LLAMA3 = ChatTemplate(TemplateSource(LLAMA3_TEMPLATE, (("bos_token", "<s>"), ("eos_token", "</s>"))))


def _renders(request: LLMRequest) -> None:
    if request.chat is None:
        return
    try:
        _LLAMA3.render(request.chat)
    except Unrenderable:
        pass
    except Exception as e:
        raise Failure(f"the chat made the template raise {type(e).__name__}: {e}") from e


def _body_parser(parse: Callable[[bytes, Mapping[str, str]], Parsed], render: bool = False) -> Callable[[bytes], str]:
    """A parser of a JSON body whose model the rewrite renames."""
    def run(data: bytes) -> str:
        try:
            parsed = parse(data, {})
        except ProtocolError as e:
            return refused(e)
        if render:
            _renders(parsed.request)
        _check_rewrites(parsed, lambda body, h: parse(body, h), {}, renames=True)
        return "parsed"
    return run


def _openai(path: str) -> Callable[[bytes], str]:
    return _body_parser(lambda raw, headers: openai_protocol.parse_request(path, raw, headers))


def _routed(data: bytes) -> str:
    """Routed, not admitted: the rewrite names the engine's model and changes nothing else."""
    try:
        parsed = routed_calls.parse(None, {}, data)
    except ProtocolError as e:
        return refused(e)
    rewrite = parsed.rewrite(None, ENGINE)
    again = parsed if rewrite is None else routed_calls.parse(None, {}, rewrite.body)
    if again.request.model != ENGINE or {**again.body, "model": ""} != {**parsed.body, "model": ""}:
        raise Failure(f"the rewrite made {str(again.body)[:200]} of {str(parsed.body)[:200]}")
    return "parsed"


def _triton_http(parse: Callable[[str | None, Mapping[str, str], bytes], Parsed],
                 binary: bool) -> Callable[[bytes], str]:
    def run(data: bytes) -> str:
        headers: dict[str, str] = {}
        if binary:
            declared, data = _split(data)
            headers[triton_http.BINARY_HEADER] = declared.decode("latin-1")
        try:
            parsed = parse(MODEL, headers, data)
        except ProtocolError as e:
            return refused(e)
        _check_rewrites(parsed, lambda body, h: parse(MODEL, h, body), headers, renames=False)
        return "parsed"
    return run


def _grpc_infer(data: bytes) -> str:
    outcomes = []
    for body in (data, triton_grpc.frame(data)):  # as sent, and framed (to reach the protobuf)
        try:
            parsed = triton_grpc.parse_infer(None, {}, body)
        except ProtocolError as e:
            outcomes.append(refused(e))
            continue
        _check_rewrites(parsed, lambda raw, h: triton_grpc.parse_infer(None, h, raw), {}, renames=True)
        outcomes.append("parsed")
    return " / ".join(outcomes)


def _grpc_stream(data: bytes) -> str:
    try:
        parsed = triton_grpc.parse_stream_message(None, {}, data)
    except ProtocolError as e:
        return refused(e)
    # A stream's rewrite is a framed message again, as the exchange sends it on.
    _check_rewrites(parsed, lambda raw, h: triton_grpc.parse_infer(None, h, raw), {}, renames=True)
    return "parsed"


def _grpc_lookups(data: bytes) -> str:
    outcomes = []
    for method in sorted(triton_grpc.LOOKUP_METHODS):
        try:
            parsed = triton_grpc.lookup_parser(method)(None, {}, triton_grpc.frame(data))
        except ProtocolError as e:
            outcomes.append(refused(e))
            continue
        rewrite = parsed.rewrite(None, ENGINE)
        again = parsed if rewrite is None else triton_grpc.lookup_parser(method)(None, {}, rewrite.body)
        if again.request.model != ENGINE:
            raise Failure(f"{method} rewrite names {again.request.model!r}")
        outcomes.append("parsed")
    return " / ".join(outcomes)


def _grpc_frames(data: bytes) -> str:
    for cut in (len(data), len(data) // 2):
        try:
            messages, rest = triton_grpc.split_frames(data[:cut])
        except ProtocolError:
            continue
        if b"".join(triton_grpc.frame(m) for m in messages) + rest != data[:cut]:
            raise Failure("split_frames lost or added bytes")
    try:
        return f"{len(triton_grpc.deframe(data))} messages"
    except ProtocolError as e:
        return refused(e)


_KEY = "kvg-fuzz-key-0123456789"
_TENANTS = TenantTable()
_TENANTS.replace([policy_pb2.Tenant(name="t", api_key_sha256=[key_hash(_KEY)], models=["*"])])
_HEADER_NAMES = [":path", ":method", "content-type", "content-encoding", "authorization", "api-key",
                 "inference-header-content-length", "x-kvgate-priority", "x-request-id", "other"]


def _headers(data: bytes) -> str:
    """Header lines: a byte naming the header, then the raw value; as Envoy sends them."""
    values = [HeaderValue(key=_HEADER_NAMES[line[0] % len(_HEADER_NAMES)], raw_value=line[1:])
              for line in data.split(b"\n") if line]
    headers = read_headers(HttpHeaders(headers=HeaderMap(headers=values)))
    if any(not isinstance(k, str) or not isinstance(v, str) for k, v in headers.items()):
        raise Failure("read_headers returned something other than text")
    path, content_type = headers.get(":path", ""), headers.get("content-type", "")
    apis.convention_for(path, content_type)
    apis.match(path, content_type)
    apis.is_lookup(headers.get(":method", ""), path, content_type)
    tenant = _TENANTS.authenticate(headers)
    if isinstance(tenant, Tenant):
        # Authenticated: only the exact key may do that, however its bytes were sent.
        sent = [v.raw_value for v in values if v.key in ("authorization", "api-key")]
        if not any(_KEY.encode() in s for s in sent):
            raise Failure(f"authenticated without the key: {sent!r}")
    try:
        identity_encoding(headers)
    except ProtocolError as e:
        return refused(e)
    return "authenticated" if isinstance(tenant, Tenant) else "not authenticated"


TARGETS = {t.name: t for t in [
    Target("openai_chat", _openai(openai_protocol.CHAT_PATH), "openai_chat"),
    Target("openai_completions", _openai(openai_protocol.COMPLETIONS_PATH), "openai_completions"),
    Target("openai_responses", _body_parser(responses_api.parse_request, render=True), "openai_responses"),
    Target("anthropic_messages", _body_parser(anthropic_protocol.parse_request, render=True), "anthropic_messages"),
    Target("openai_embeddings", _body_parser(embeddings.parse_request), "openai_embeddings"),
    Target("routed_calls", _routed, "routed_calls"),
    Target("triton_generate", _triton_http(triton_http.parse_generate, binary=False), "triton_generate"),
    Target("kserve_json", _triton_http(triton_http.parse_infer, binary=False), "kserve_json"),
    Target("kserve_binary", _triton_http(triton_http.parse_infer, binary=True), "kserve_binary"),
    Target("grpc_frames", _grpc_frames, "grpc_frames"),
    Target("grpc_infer", _grpc_infer, "grpc_infer"),
    Target("grpc_stream", _grpc_stream, "grpc_infer"),
    Target("grpc_lookups", _grpc_lookups, "grpc_lookups"),
    Target("headers", _headers, "headers"),
]}
