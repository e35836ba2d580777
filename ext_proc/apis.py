"""Which API a request speaks, from its method, path and content-type: the parser for its body and the
convention its errors must follow. Pure; the table is the whole list of what the gateway admits.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ext_proc import (anthropic_protocol, embeddings, openai_protocol, responses_api, routed_calls, triton_grpc,
                      triton_http)
from ext_proc.request import Parsed
from kvgate.openai_models import MODELS_PATH
from kvgate.triton_index import REPOSITORY_INDEX_PATH
from kvgate.wire import (ANTHROPIC_COUNT_TOKENS_PATH, ANTHROPIC_MESSAGES_PATH, DETOKENIZE_PATH, OPENAI_EMBEDDINGS_PATH,
                         OPENAI_RESPONSES_PATH, TOKENIZE_PATH, TRITON_GRPC_SERVICE)

Parser = Callable[[str | None, Mapping[str, str], bytes], Parsed]


class Convention(enum.Enum):
    """How the client expects to hear an error."""

    OPENAI = "openai"  # {"error": {"message", "type", "param", "code"}}
    ANTHROPIC = "anthropic"  # {"type": "error", "error": {"type", "message"}}
    TRITON_HTTP = "triton_http"  # {"error": "message"}
    GRPC = "grpc"  # grpc-status and grpc-message


@dataclass(frozen=True)
class Api:
    name: str
    protocol: str  # the catalog protocol of the models it reaches
    convention: Convention
    parse: Parser
    # A bidi gRPC stream: each message is its own request, and the first one picks the route.
    streaming: bool = False


@dataclass(frozen=True)
class Call:
    api: Api
    model: str | None  # named by the path (Triton HTTP); else the body names it


def _openai(path: str) -> Parser:
    return lambda model, headers, raw: openai_protocol.parse_request(path, raw, headers)


def _body_only(parse: Callable[[bytes, Mapping[str, str]], Parsed]) -> Parser:
    return lambda model, headers, raw: parse(raw, headers)


_OPENAI = {
    **{p: Api(f"openai {p}", "openai", Convention.OPENAI, _openai(p)) for p in openai_protocol.PATHS},
    OPENAI_RESPONSES_PATH: Api("openai responses", "openai", Convention.OPENAI,
                               _body_only(responses_api.parse_request)),
    OPENAI_EMBEDDINGS_PATH: Api("openai embeddings", "openai", Convention.OPENAI,
                                _body_only(embeddings.parse_request)),
    TOKENIZE_PATH: Api("vllm tokenize", "openai", Convention.OPENAI, routed_calls.parse),
    DETOKENIZE_PATH: Api("vllm detokenize", "openai", Convention.OPENAI, routed_calls.parse),
    ANTHROPIC_MESSAGES_PATH: Api("anthropic messages", "openai", Convention.ANTHROPIC,
                                 _body_only(anthropic_protocol.parse_request)),
    ANTHROPIC_COUNT_TOKENS_PATH: Api("anthropic count_tokens", "openai", Convention.ANTHROPIC, routed_calls.parse),
}
_TRITON_HTTP = {
    "generate": Api("triton generate", "triton", Convention.TRITON_HTTP, triton_http.parse_generate),
    "generate_stream": Api("triton generate_stream", "triton", Convention.TRITON_HTTP, triton_http.parse_generate),
    "infer": Api("kserve infer", "triton", Convention.TRITON_HTTP, triton_http.parse_infer),
}
_TRITON_GRPC = {
    "ModelInfer": Api("grpc ModelInfer", "triton", Convention.GRPC, triton_grpc.parse_infer),
    "ModelStreamInfer": Api("grpc ModelStreamInfer", "triton", Convention.GRPC, triton_grpc.parse_stream_message,
                            streaming=True),
    **{m: Api(f"grpc {m}", "triton", Convention.GRPC, triton_grpc.lookup_parser(m))
       for m in triton_grpc.LOOKUP_METHODS},
}
_TRITON_PATH = re.compile(r"^/v2/models/(?P<model>.+?)(?:/versions/[^/]+)?/(?P<op>generate|generate_stream|infer)$")


def convention_for(path: str, content_type: str) -> Convention:
    if content_type.startswith("application/grpc"):
        return Convention.GRPC
    if path == ANTHROPIC_MESSAGES_PATH or path.startswith(f"{ANTHROPIC_MESSAGES_PATH}/"):
        return Convention.ANTHROPIC
    return Convention.TRITON_HTTP if path.startswith("/v2") else Convention.OPENAI


def is_lookup(method: str, path: str, content_type: str) -> bool:
    """What Envoy answers or routes by path without admission (models list, Triton server and model
    metadata, the repository index, server-level gRPC calls): ext_proc sees only their headers, to
    check the API key (and answers a tenant's lists)."""
    if content_type.startswith("application/grpc"):
        return method == "POST" and (path.startswith(TRITON_GRPC_SERVICE + "Server")
                                     or path == TRITON_GRPC_SERVICE + "RepositoryIndex")
    if method == "POST":
        return path == REPOSITORY_INDEX_PATH
    return method == "GET" and (path in (MODELS_PATH, "/v2") or path.startswith((f"{MODELS_PATH}/", "/v2/models/",
                                                                                 "/v2/health/")))


def match(path: str, content_type: str) -> Call | None:
    """The API of a POST to `path`; None when the gateway admits nothing there."""
    if path in _OPENAI:
        return Call(_OPENAI[path], None)
    if path.startswith(TRITON_GRPC_SERVICE):
        api = _TRITON_GRPC.get(path[len(TRITON_GRPC_SERVICE):])
        return Call(api, None) if api else None
    m = _TRITON_PATH.match(path)
    return Call(_TRITON_HTTP[m["op"]], m["model"]) if m else None
