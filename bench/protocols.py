"""What the benchmark sends, per protocol: the request (the same bytes every time), the client that
sends it and a line saying what it is. Both carry the same ~2 KB of prompt text and ask for the
model's max_tokens, so ext_proc admits them as they are (no rewrite)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

import orjson
from tritonclient.grpc import service_pb2

from bench.clients import Client, grpc_unary, http_post
from bench.targets import MAX_OUTPUT_TOKENS, OPENAI_MODEL, TRITON_MODEL

CHAT_PATH = "/v1/chat/completions"
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"

# ~2 KB of chat: a system prompt and a short conversation.
_SENTENCE = "The gateway admits a request only when the KV-cache bytes it may claim fit the model's budget. "
_TURNS = (("system", 6), ("user", 8), ("assistant", 5), ("user", 4))


@dataclass(frozen=True)
class Protocol:
    name: str  # as --protocols and the tables name it
    model: str  # the gateway's model it calls
    request: bytes
    client: Client
    description: str


def chat_body() -> bytes:
    return orjson.dumps({"model": OPENAI_MODEL, "stream": False, "max_tokens": MAX_OUTPUT_TOKENS,
                         "messages": [{"role": role, "content": _SENTENCE * n} for role, n in _TURNS]})


def model_infer_request() -> bytes:
    """A ModelInferRequest as tritonclient builds one: every input in raw_input_contents, a BYTES
    element as its 4-byte little-endian length and its bytes."""
    text = "".join(_SENTENCE * n for _, n in _TURNS).encode()
    msg = service_pb2.ModelInferRequest(model_name=TRITON_MODEL)
    msg.inputs.add(name="text_input", datatype="BYTES", shape=[1, 1])
    msg.inputs.add(name="max_tokens", datatype="INT32", shape=[1, 1])
    msg.raw_input_contents.extend([struct.pack("<I", len(text)) + text, struct.pack("<i", MAX_OUTPUT_TOKENS)])
    return msg.SerializeToString()


def _protocols() -> dict[str, Protocol]:
    body, infer = chat_body(), model_infer_request()
    return {p.name: p for p in (
        Protocol("openai", OPENAI_MODEL, body, http_post(CHAT_PATH),
                 f"POST {CHAT_PATH} (HTTP/1.1), non-streaming, a {len(body)}-byte JSON body, "
                 f"max_tokens {MAX_OUTPUT_TOKENS}"),
        Protocol("grpc", TRITON_MODEL, infer, grpc_unary(MODEL_INFER),
                 f"gRPC {MODEL_INFER} (h2c), a {len(infer)}-byte ModelInferRequest (text_input BYTES [1,1] "
                 f"and max_tokens INT32 [1,1] = {MAX_OUTPUT_TOKENS} in raw_input_contents), model_name "
                 f"{TRITON_MODEL!r}"),
    )}


PROTOCOLS = _protocols()
