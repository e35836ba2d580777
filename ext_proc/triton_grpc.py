"""Triton's gRPC API (inference.GRPCInferenceService) as admission sees it.

Envoy hands ext_proc the raw HTTP/2 body: gRPC frames of 1 flag byte (compressed or not), a 4-byte
big-endian length and the protobuf. ModelInfer carries the model name and the tensors; the lookups
(ModelReady, ModelMetadata, ModelConfig, ModelStatistics) only name a model. Pure functions.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass

from google.protobuf.message import DecodeError, Message
from tritonclient.grpc import service_pb2

from ext_proc import kserve
from ext_proc.kserve import MAX_TOKENS, TEXT_INPUT
from ext_proc.request import LLMRequest, ProtocolError, Rewrite

_FRAME = struct.Struct(">BI")


class CompressedMessage(ProtocolError):
    """A compressed gRPC message: we would have to decompress and recompress it to read max_tokens."""


def split_frames(data: bytes) -> tuple[list[bytes], bytes]:
    """The complete messages at the front of `data`, and the bytes of a frame still arriving."""
    messages, pos = [], 0
    while len(data) - pos >= _FRAME.size:
        compressed, length = _FRAME.unpack_from(data, pos)
        if compressed:
            raise CompressedMessage("compressed gRPC messages are not supported by the gateway; "
                                    "send them uncompressed")
        if len(data) - pos - _FRAME.size < length:
            break
        messages.append(data[pos + _FRAME.size:pos + _FRAME.size + length])
        pos += _FRAME.size + length
    return messages, data[pos:]


def deframe(body: bytes) -> list[bytes]:
    """A whole body's messages; a frame cut short is the client's error."""
    messages, rest = split_frames(body)
    if len(rest) >= _FRAME.size:
        (length,) = struct.unpack_from(">I", rest, 1)
        raise ProtocolError(f"truncated gRPC message: frame says {length} bytes, {len(rest) - _FRAME.size} arrived")
    if rest:
        raise ProtocolError("truncated gRPC frame header")
    return messages


def frame(message: bytes) -> bytes:
    return _FRAME.pack(0, len(message)) + message


def _one_message(body: bytes, cls: type[Message]) -> Message:
    messages = deframe(body)
    if len(messages) != 1:
        raise ProtocolError(f"a unary call carries one message, got {len(messages)}")
    try:
        return cls.FromString(messages[0])
    except DecodeError as e:
        raise ProtocolError(f"malformed {cls.DESCRIPTOR.name}: {e}") from None


# --- ModelInfer ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class InferRequest:
    request: LLMRequest
    message: service_pb2.ModelInferRequest

    def rewrite(self, max_tokens: int | None, engine_model: str) -> Rewrite | None:
        asked = self.request.requested_max_tokens
        limit_kept = max_tokens is None or (asked is not None and asked <= max_tokens)
        if engine_model == self.message.model_name and limit_kept:
            return None  # the common case: nothing to change, so no copy of the message
        msg = service_pb2.ModelInferRequest()
        msg.CopyFrom(self.message)
        msg.model_name = engine_model
        if max_tokens is not None:
            _set_max_tokens(msg, max_tokens, batch=len(self.request.prompts))
        if msg == self.message:
            return None
        return Rewrite(frame(msg.SerializeToString()))


def _uses_raw(msg: service_pb2.ModelInferRequest) -> bool:
    # The protocol: raw_input_contents, when used, carries every input, in input order.
    return len(msg.raw_input_contents) > 0


def _set_max_tokens(msg: service_pb2.ModelInferRequest, max_tokens: int, batch: int) -> None:
    for i, t in enumerate(msg.inputs):
        if t.name == MAX_TOKENS:
            if _uses_raw(msg):
                values = kserve.decode_raw_ints(msg.raw_input_contents[i], t.datatype)
                msg.raw_input_contents[i] = kserve.encode_raw_ints(kserve.clamped(values, max_tokens), t.datatype)
            else:
                field = t.contents.int_contents if t.datatype == "INT32" else t.contents.int64_contents
                field[:] = kserve.clamped(list(field), max_tokens)
            return
    added = msg.inputs.add(name=MAX_TOKENS, datatype="INT32", shape=[batch, 1])
    if _uses_raw(msg):
        msg.raw_input_contents.append(kserve.encode_raw_ints([max_tokens] * batch, "INT32"))
    else:
        added.contents.int_contents.extend([max_tokens] * batch)


def _tensor_values(msg: service_pb2.ModelInferRequest, i: int) -> tuple[list[bytes] | list[int], int]:
    t = msg.inputs[i]
    count = kserve.elements(list(t.shape), t.name)
    if t.name == TEXT_INPUT:
        if t.datatype != "BYTES":
            raise ProtocolError(f"input '{TEXT_INPUT}' must be BYTES, got {t.datatype}", TEXT_INPUT)
        if _uses_raw(msg):
            return kserve.decode_raw_bytes(msg.raw_input_contents[i], TEXT_INPUT), count
        return list(t.contents.bytes_contents), count
    kserve.int_format(t.datatype)
    if _uses_raw(msg):
        return kserve.decode_raw_ints(msg.raw_input_contents[i], t.datatype), count
    return list(t.contents.int_contents if t.datatype == "INT32" else t.contents.int64_contents), count


def parse_infer(model: str | None, headers: Mapping[str, str], body: bytes) -> InferRequest:
    return _infer(_one_message(body, service_pb2.ModelInferRequest))


def parse_stream_message(model: str | None, headers: Mapping[str, str], message: bytes) -> InferRequest:
    """One message of a ModelStreamInfer stream, already cut out of its frame by the caller."""
    try:
        return _infer(service_pb2.ModelInferRequest.FromString(message))
    except DecodeError as e:
        raise ProtocolError(f"malformed ModelInferRequest: {e}") from None


def _infer(msg: service_pb2.ModelInferRequest) -> InferRequest:
    if not msg.model_name:
        raise ProtocolError("model_name is required", "model_name")
    if _uses_raw(msg) and len(msg.raw_input_contents) != len(msg.inputs):
        raise ProtocolError(f"{len(msg.raw_input_contents)} raw_input_contents for {len(msg.inputs)} inputs")
    names = [t.name for t in msg.inputs]
    if len(set(names)) != len(names):
        raise ProtocolError("an input appears twice", "inputs")
    if TEXT_INPUT not in names:
        raise kserve.missing_text_input()
    texts, count = _tensor_values(msg, names.index(TEXT_INPUT))
    if len(texts) != count or not texts:
        raise ProtocolError(f"input '{TEXT_INPUT}' has {len(texts)} elements, its shape says {count}", TEXT_INPUT)
    limits = None
    if MAX_TOKENS in names:
        values, count = _tensor_values(msg, names.index(MAX_TOKENS))
        limits = kserve.check_max_tokens(values, count)
    return InferRequest(kserve.text_request(msg.model_name, [kserve.text(t) for t in texts], limits), msg)


# --- calls that only name a model -------------------------------------------------------------

_LOOKUPS: dict[str, type[Message]] = {
    "ModelReady": service_pb2.ModelReadyRequest,
    "ModelMetadata": service_pb2.ModelMetadataRequest,
    "ModelConfig": service_pb2.ModelConfigRequest,
    "ModelStatistics": service_pb2.ModelStatisticsRequest,
}
LOOKUP_METHODS = frozenset(_LOOKUPS)


@dataclass(frozen=True)
class LookupRequest:
    request: LLMRequest
    message: Message

    def rewrite(self, max_tokens: int | None, engine_model: str) -> Rewrite | None:
        if engine_model == self.message.name:
            return None
        msg = type(self.message)()
        msg.CopyFrom(self.message)
        msg.name = engine_model
        return Rewrite(frame(msg.SerializeToString()))


def lookup_parser(method: str):  # noqa: ANN201 - returns a parser like parse_infer
    cls = _LOOKUPS[method]

    def parse(model: str | None, headers: Mapping[str, str], body: bytes) -> LookupRequest:
        msg = _one_message(body, cls)
        if not msg.name:
            raise ProtocolError("name is required", "name")
        return LookupRequest(LLMRequest(model=msg.name, admit=False), msg)

    return parse
