"""ext_proc/apis.py: which API a POST speaks (path, gRPC method) and the error convention it expects."""

from __future__ import annotations

import orjson
import pytest

from ext_proc import openai_protocol, triton_grpc, triton_http
from ext_proc.apis import Call, Convention, convention_for, match
from ext_proc.openai_protocol import CHAT_PATH, COMPLETIONS_PATH
from ext_proc.request import ProtocolError
from kvgate.wire import (
    ANTHROPIC_COUNT_TOKENS_PATH,
    ANTHROPIC_MESSAGES_PATH,
    DETOKENIZE_PATH,
    OPENAI_EMBEDDINGS_PATH,
    OPENAI_RESPONSES_PATH,
    TOKENIZE_PATH,
)

GRPC = "application/grpc"
JSON = "application/json"
SERVICE = "/inference.GRPCInferenceService/"


def call(path: str, content_type: str = JSON) -> Call:
    c = match(path, content_type)
    assert c is not None, path
    return c


# --- OpenAI ------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", [CHAT_PATH, COMPLETIONS_PATH])
def test_openai_paths(path: str) -> None:
    c = call(path)
    assert c.model is None  # the body names the model
    assert c.api.protocol == "openai"
    assert c.api.convention is Convention.OPENAI
    assert path in c.api.name


def test_openai_parser_is_bound_to_its_path() -> None:
    chat = call(CHAT_PATH).api.parse(None, {}, orjson.dumps({"model": "m", "messages": [{"role": "user"}]}))
    assert isinstance(chat, openai_protocol.OpenAIRequest)
    assert chat.request.prompt_param == "messages"
    done = call(COMPLETIONS_PATH).api.parse(None, {}, orjson.dumps({"model": "m", "prompt": "hi"}))
    assert done.request.prompt_param == "prompt"


# --- the other APIs vLLM serves: Responses, Anthropic's Messages, embeddings, tokenize ------------

@pytest.mark.parametrize("path,convention,prompt_param,admit,limit", [
    (OPENAI_RESPONSES_PATH, Convention.OPENAI, "input", True, None),
    (OPENAI_EMBEDDINGS_PATH, Convention.OPENAI, "input", True, 1),  # the prefill's KV only
    (TOKENIZE_PATH, Convention.OPENAI, "prompt", False, None),
    (DETOKENIZE_PATH, Convention.OPENAI, "prompt", False, None),
    (ANTHROPIC_MESSAGES_PATH, Convention.ANTHROPIC, "messages", True, 3),
    (ANTHROPIC_COUNT_TOKENS_PATH, Convention.ANTHROPIC, "prompt", False, None),
])
def test_vllm_apis_reach_openai_models_in_their_convention(path: str, convention: Convention, prompt_param: str,
                                                           admit: bool, limit: int | None) -> None:
    c = call(path)
    assert c.model is None  # the body names the model
    assert c.api.protocol == "openai"  # the catalog's models served by OpenAI-compatible engines
    assert c.api.convention is convention is convention_for(path, JSON)
    body = {"model": "m", "input": "x", "messages": [{"role": "user", "content": "x"}], "max_tokens": 3}
    request = c.api.parse(None, {}, orjson.dumps(body)).request
    assert (request.model, request.prompt_param, request.admit, request.requested_max_tokens) == (
        "m", prompt_param, admit, limit)


@pytest.mark.parametrize("path", [TOKENIZE_PATH, DETOKENIZE_PATH, ANTHROPIC_COUNT_TOKENS_PATH])
def test_tokenizer_calls_are_routed_not_admitted(path: str) -> None:
    parsed = call(path).api.parse(None, {}, b'{"model": "m", "prompt": "x"}')
    assert parsed.request.admit is False
    assert orjson.loads(parsed.rewrite(None, "engine").body) == {"model": "engine", "prompt": "x"}
    assert parsed.rewrite(None, "m") is None


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/messages/count_tokens", "/v1/messages/batches",
                                  "/v1/messages/batches/b1/results"])
def test_anthropic_convention_for_everything_under_messages(path: str) -> None:
    assert convention_for(path, JSON) is Convention.ANTHROPIC
    assert convention_for(path, "") is Convention.ANTHROPIC


@pytest.mark.parametrize("path", ["/v1/messagesx", "/v1/message", "/x/v1/messages"])
def test_not_anthropic_paths_keep_openai_convention(path: str) -> None:
    assert convention_for(path, JSON) is Convention.OPENAI


# --- Triton HTTP -------------------------------------------------------------------------------

@pytest.mark.parametrize("op,name,parser", [
    ("generate", "triton generate", triton_http.parse_generate),
    ("generate_stream", "triton generate_stream", triton_http.parse_generate),
    ("infer", "kserve infer", triton_http.parse_infer),
])
def test_triton_http_ops(op: str, name: str, parser) -> None:  # noqa: ANN001
    c = call(f"/v2/models/llama/{op}")
    assert c.model == "llama"
    assert c.api.name == name
    assert c.api.parse is parser
    assert c.api.protocol == "triton"
    assert c.api.convention is Convention.TRITON_HTTP


@pytest.mark.parametrize("op", ["generate", "generate_stream", "infer"])
def test_triton_http_with_version(op: str) -> None:
    c = call(f"/v2/models/llama/versions/3/{op}")
    assert c.model == "llama"
    assert c.api is call(f"/v2/models/llama/{op}").api


@pytest.mark.parametrize("path,model", [
    ("/v2/models/meta-llama/Llama-3-8B/generate", "meta-llama/Llama-3-8B"),
    ("/v2/models/org/team/m/infer", "org/team/m"),
    ("/v2/models/meta-llama/Llama-3-8B/versions/1/generate_stream", "meta-llama/Llama-3-8B"),
])
def test_triton_model_with_slash(path: str, model: str) -> None:
    assert call(path).model == model


def test_generate_stream_not_mistaken_for_generate() -> None:
    c = call("/v2/models/m/generate_stream")
    assert c.api.name == "triton generate_stream"
    assert c.model == "m"


# --- Triton gRPC -------------------------------------------------------------------------------

def test_grpc_model_infer() -> None:
    c = call(SERVICE + "ModelInfer", GRPC)
    assert c.model is None
    assert c.api.parse is triton_grpc.parse_infer
    assert c.api.convention is Convention.GRPC
    assert c.api.protocol == "triton"


@pytest.mark.parametrize("method", sorted(triton_grpc.LOOKUP_METHODS))
def test_grpc_lookups(method: str) -> None:
    c = call(SERVICE + method, GRPC)
    assert c.api.name == f"grpc {method}"
    assert c.api.convention is Convention.GRPC
    assert c.model is None


def test_grpc_lookup_parser_reads_its_own_message() -> None:
    from tritonclient.grpc import service_pb2
    body = triton_grpc.frame(service_pb2.ModelMetadataRequest(name="llama").SerializeToString())
    assert call(SERVICE + "ModelMetadata", GRPC).api.parse(None, {}, body).request.model == "llama"


@pytest.mark.parametrize("method", ["ServerLive", "ServerReady", "ServerMetadata",
                                    "RepositoryIndex", "", "modelinfer", "ModelInfer/extra"])
def test_grpc_unknown_methods(method: str) -> None:
    assert match(SERVICE + method, GRPC) is None


# --- unknown -----------------------------------------------------------------------------------

@pytest.mark.parametrize("path", [
    "/", "", "/v1/models", "/v1/chat/completions/", "/v1/completions/x", "/v1/responses/resp_1",
    "/v1/responses/resp_1/cancel", "/v1/messages/batches", "/v1/messages/", "/v1/messagesx", "/tokenize/x",
    "/v2/models/m/ready", "/v2/health/live", "/v2/models/m", "/v2/models//infer", "/v2/models/m/infer/",
    "/v2/models/m/versions/1/ready", "/v2/models/m/generatex", "/x/v2/models/m/infer",
    "/other.Service/ModelInfer", "/inference.GRPCInferenceService",
])
def test_unknown_paths(path: str) -> None:
    assert match(path, JSON) is None


# --- convention_for ----------------------------------------------------------------------------

@pytest.mark.parametrize("content_type", ["application/grpc", "application/grpc+proto"])
@pytest.mark.parametrize("path", [SERVICE + "ModelInfer", "/v2/models/m/infer", CHAT_PATH, "/nowhere"])
def test_convention_grpc_by_content_type(content_type: str, path: str) -> None:
    assert convention_for(path, content_type) is Convention.GRPC


@pytest.mark.parametrize("path", ["/v2/models/m/infer", "/v2/models/m/generate", "/v2/health/ready"])
def test_convention_triton_http_for_v2(path: str) -> None:
    assert convention_for(path, JSON) is Convention.TRITON_HTTP
    assert convention_for(path, "") is Convention.TRITON_HTTP


@pytest.mark.parametrize("path", [CHAT_PATH, COMPLETIONS_PATH, "/v1/models", "/", "/unknown"])
def test_convention_openai_otherwise(path: str) -> None:
    assert convention_for(path, JSON) is Convention.OPENAI
    assert convention_for(path, "") is Convention.OPENAI


@pytest.mark.parametrize("path,content_type", [
    (CHAT_PATH, JSON), ("/v2/models/m/infer", JSON), (SERVICE + "ModelInfer", GRPC),
    (SERVICE + "ModelReady", "application/grpc+proto"),
])
def test_match_convention_agrees_with_convention_for(path: str, content_type: str) -> None:
    assert call(path, content_type).api.convention is convention_for(path, content_type)


# --- every parser hears the headers: Content-Encoding ---------------------------------------------

ALL_APIS = [(CHAT_PATH, JSON), (COMPLETIONS_PATH, JSON), (OPENAI_RESPONSES_PATH, JSON), (OPENAI_EMBEDDINGS_PATH, JSON),
            (TOKENIZE_PATH, JSON), (DETOKENIZE_PATH, JSON), (ANTHROPIC_MESSAGES_PATH, JSON),
            (ANTHROPIC_COUNT_TOKENS_PATH, JSON), ("/v2/models/m/generate", JSON),
            ("/v2/models/m/generate_stream", JSON), ("/v2/models/m/infer", JSON),
            *((SERVICE + m, GRPC) for m in ["ModelInfer", "ModelStreamInfer", *sorted(triton_grpc.LOOKUP_METHODS)])]


@pytest.mark.parametrize("path,content_type", ALL_APIS)
def test_every_api_refuses_a_compressed_body(path: str, content_type: str) -> None:
    """HTTP: 415 in the client's convention; gRPC: INVALID_ARGUMENT, as for compressed messages."""
    c = call(path, content_type)
    with pytest.raises(ProtocolError) as e:
        c.api.parse(c.model, {"content-encoding": "br"}, b'{"model":"m","messages":[],"prompt":"x"}')
    grpc = c.api.convention is Convention.GRPC
    compressed_message = isinstance(e.value, triton_grpc.CompressedMessage)
    assert (e.value.status, compressed_message) == ((400, True) if grpc else (415, False))
    assert "br" in str(e.value)
