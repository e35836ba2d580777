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
from ext_proc.request import LLMRequest, ProtocolError, Rewrite, at_most, identity_encoding

_FRAME = struct.Struct(">BI")
FRAME_HEADER = _FRAME.size


class CompressedMessage(ProtocolError):
    """A compressed gRPC message: we would have to decompress and recompress it to read max_tokens."""


# --- bounded decoding ---------------------------------------------------------------------------
#
# upb decodes a 4 MiB message in 50-300 ms when it is made of tiny fields (2 million empty inputs,
# 200,000 parameters). A scan of the wire format first counts the fields, descending only into the
# messages that repeat, and refuses past the caps: every such message is then decoded in a few ms.
#
# Protobuf itself leaves no room for a differential: a scalar field repeated on the wire is
# last-wins in every implementation (upb here, the C++ runtime in Triton), a repeated field
# concatenates, and a map's repeated key is last-wins by the spec. What is ours to check is what the
# message means: inputs repeated by name (refused in _infer), contents beside raw_input_contents.
MAX_WIRE_FIELDS = 4096  # fields of all the levels scanned: a batch of 2048 prompts in bytes_contents fits
MAX_PACKED_VARINTS = 1 << 19  # packed varint elements (shape, int_contents...): upb decodes ~8 ns each
_SCAN_ABOVE = 2048  # a smaller message cannot hold enough fields to be slow (map entries cost ~1.5 us)
_VARINTS, _FIXED32, _FIXED64 = "varints", 4, 8  # packed repeated fields; fixed-size ones decode as a copy
_PARAMETER_ENTRY: dict[int, object] = {}  # map<string, InferParameter> entry: key 1, value 2 (scalars)
_CONTENTS = {1: _VARINTS, 2: _VARINTS, 3: _VARINTS, 4: _VARINTS, 5: _VARINTS, 6: _FIXED32, 7: _FIXED64}
_INPUT = {3: _VARINTS, 4: _PARAMETER_ENTRY, 5: _CONTENTS}  # shape, parameters, contents
_OUTPUT = {2: _PARAMETER_ENTRY}
_MODEL_INFER = {4: _PARAMETER_ENTRY, 5: _INPUT, 6: _OUTPUT}
_HIGH_BYTES = bytes(range(0x80))  # deleted by translate: what is left are the varints' continuation bytes


class _Budget:
    def __init__(self) -> None:
        self.fields = MAX_WIRE_FIELDS
        self.varints = MAX_PACKED_VARINTS


def _varint(data: bytes, pos: int, end: int, what: str) -> tuple[int, int]:
    value = shift = 0
    while pos < end and shift < 64:
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if byte < 0x80:
            return value, pos
        shift += 7
    raise ProtocolError(f"malformed {what}: truncated or overlong varint")


def _scan(data: bytes, pos: int, end: int, schema: dict[int, object], budget: _Budget, what: str) -> None:
    while pos < end:
        budget.fields -= 1
        if budget.fields < 0:
            raise ProtocolError(f"{what} has more than {MAX_WIRE_FIELDS} fields")
        key, pos = _varint(data, pos, end, what)
        wire_type, field = key & 7, key >> 3
        if wire_type == 0:
            _, pos = _varint(data, pos, end, what)
        elif wire_type in (1, 5):
            pos += 8 if wire_type == 1 else 4
        elif wire_type == 2:
            length, pos = _varint(data, pos, end, what)
            start, pos = pos, pos + length
            if pos > end:
                break
            inner = schema.get(field)
            if inner == _VARINTS:
                budget.varints -= length - len(data[start:pos].translate(None, _HIGH_BYTES))
                if budget.varints < 0:
                    raise ProtocolError(f"{what} has more than {MAX_PACKED_VARINTS} packed integers")
            elif isinstance(inner, dict):
                _scan(data, start, pos, inner, budget, what)
        else:  # groups (deprecated, absent from proto3) or no wire type at all
            raise ProtocolError(f"malformed {what}: wire type {wire_type}")
    if pos > end:
        raise ProtocolError(f"malformed {what}: truncated field")


def decode(message: bytes, cls: type[Message], schema: dict[int, object]) -> Message:
    """The message, refused as malformed or over the caps before upb builds it."""
    what = cls.DESCRIPTOR.name
    if len(message) > _SCAN_ABOVE:
        _scan(message, 0, len(message), schema, _Budget(), what)
    try:
        return cls.FromString(message)
    except DecodeError as e:
        raise ProtocolError(f"malformed {what}: {e}") from None


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


def _one_message(headers: Mapping[str, str], body: bytes, cls: type[Message],
                 schema: dict[int, object]) -> Message:
    identity_encoding(headers, CompressedMessage)  # gRPC compresses messages, not bodies: INVALID_ARGUMENT
    messages = deframe(body)
    if len(messages) != 1:
        raise ProtocolError(f"a unary call carries one message, got {len(messages)}")
    return decode(messages[0], cls, schema)


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
    if len(t.shape) > kserve.MAX_RANK:
        raise ProtocolError(f"input '{t.name}' has {len(t.shape)} dimensions, more than {kserve.MAX_RANK}", t.name)
    count = kserve.batch_elements(list(t.shape), t.name)
    if t.name == TEXT_INPUT:
        if t.datatype != "BYTES":
            raise ProtocolError(f"input '{TEXT_INPUT}' must be BYTES, got {t.datatype}", TEXT_INPUT)
        if _uses_raw(msg):
            return kserve.decode_raw_bytes(msg.raw_input_contents[i], TEXT_INPUT, count), count
        return _contents(t.contents.bytes_contents, t.name, count), count
    kserve.int_format(t.datatype)
    if _uses_raw(msg):
        return kserve.decode_raw_ints(msg.raw_input_contents[i], t.datatype, count), count
    return _contents(t.contents.int_contents if t.datatype == "INT32" else t.contents.int64_contents,
                     t.name, count), count


def _contents(field, name: str, count: int) -> list:  # noqa: ANN001 - a protobuf repeated field
    """A repeated contents field as a list, refused before it is copied when it is over the shape."""
    at_most(len(field), count, f"input '{name}' elements (its shape says {count})", name)
    return list(field)


def parse_infer(model: str | None, headers: Mapping[str, str], body: bytes) -> InferRequest:
    return _infer(_one_message(headers, body, service_pb2.ModelInferRequest, _MODEL_INFER))


def parse_stream_message(model: str | None, headers: Mapping[str, str], message: bytes) -> InferRequest:
    """One message of a ModelStreamInfer stream, already cut out of its frame by the caller."""
    identity_encoding(headers, CompressedMessage)
    return _infer(decode(message, service_pb2.ModelInferRequest, _MODEL_INFER))


def _infer(msg: service_pb2.ModelInferRequest) -> InferRequest:
    if not msg.model_name:
        raise ProtocolError("model_name is required", "model_name")
    at_most(len(msg.inputs), kserve.MAX_TENSORS, "inputs", "inputs")
    if _uses_raw(msg):
        if len(msg.raw_input_contents) != len(msg.inputs):
            raise ProtocolError(f"{len(msg.raw_input_contents)} raw_input_contents for {len(msg.inputs)} inputs")
        both = next((t.name for t in msg.inputs if t.HasField("contents")), None)
        if both is not None:  # Triton refuses it too: which data would it be?
            raise ProtocolError(f"input '{both}' has contents besides raw_input_contents", both)
    names = [t.name for t in msg.inputs]
    if len(set(names)) != len(names):
        # Which one would Triton use? Refused rather than guessed.
        twice = next(n for i, n in enumerate(names) if n in names[:i])
        raise ProtocolError(f"input '{twice}' appears twice", "inputs")
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
        msg = _one_message(headers, body, cls, {})
        if not msg.name:
            raise ProtocolError("name is required", "name")
        return LookupRequest(LLMRequest(model=msg.name, admit=False), msg)

    return parse


# --- ModelStreamInfer: one stream, many requests ------------------------------------------------
#
# Each request on a stream holds its reservation until its last response (stream_exchange.py), found
# by the request id Triton echoes. Ids are set and cleared by appending a field to the serialized
# message rather than re-serializing it: protobuf parsers merge what follows (a singular field's last
# occurrence wins, an embedded message merges field by field), so this costs a few bytes whatever the
# message's size.

FINAL_RESPONSE = "triton_final_response"  # Triton's flag on a decoupled model's streamed responses
_REQUEST_ID = 3 << 3 | 2  # ModelInferRequest.id and ModelInferResponse.id: field 3, length-delimited
_INFER_RESPONSE = 2 << 3 | 2  # ModelStreamInferResponse.infer_response
# What a refused request becomes: a model Triton does not serve, so Triton answers it at once with
# an error that echoes the id, in order with the stream's other responses (docs/architecture.md).
REFUSED_MODEL = "kvgate-refused-request"


def _length_delimited(tag: int, value: bytes) -> bytes:
    out, n = bytearray([tag]), len(value)
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out) + value


def with_id(message: bytes, request_id: str) -> bytes:
    """A serialized ModelInferRequest whose id is now `request_id`."""
    return message + _length_delimited(_REQUEST_ID, request_id.encode())


# infer_response { id: "" }: the id ext_proc gave a request the client sent without one, taken back.
_NO_ID = _length_delimited(_INFER_RESPONSE, _length_delimited(_REQUEST_ID, b""))


# parameters {"triton_enable_empty_final_response": true}, appended: a later map entry replaces an
# earlier one of the same key. Triton then sends a request's final flag as a response of its own even
# when the model sends the flag alone, with no data (TensorRT-LLM's BLS model ends every streamed
# request so): without it the client, and the gateway, would see no end to that request.
EMPTY_FINAL = "triton_enable_empty_final_response"
_EMPTY_FINAL_ON = service_pb2.ModelInferRequest(
    parameters={EMPTY_FINAL: service_pb2.InferParameter(bool_param=True)}).SerializeToString()


def with_empty_final(message: bytes) -> bytes:
    """A serialized ModelInferRequest that asks Triton for its empty final response."""
    return message + _EMPTY_FINAL_ON


def asks_empty_final(request: service_pb2.ModelInferRequest) -> bool:
    return EMPTY_FINAL in request.parameters and request.parameters[EMPTY_FINAL].bool_param


def without_id(message: bytes) -> bytes:
    """A serialized ModelStreamInferResponse whose infer_response.id is now empty."""
    return message + _NO_ID


def read_stream_request(message: bytes) -> service_pb2.ModelInferRequest:
    """A stream message refused before (or while) it was parsed, for its id and model name: empty
    when unreadable."""
    try:
        return decode(message, service_pb2.ModelInferRequest, _MODEL_INFER)  # type: ignore[return-value]
    except ProtocolError:
        return service_pb2.ModelInferRequest()


def refused_request(request_id: str) -> bytes:
    """The framed stand-in for a refused request."""
    return frame(service_pb2.ModelInferRequest(model_name=REFUSED_MODEL, id=request_id).SerializeToString())


@dataclass(frozen=True)
class StreamResponse:
    """What admission reads of one ModelStreamInferResponse."""

    message: service_pb2.ModelStreamInferResponse
    request_id: str
    last: bool  # the request's last response: an error, the final flag, or a model that is not decoupled

    @property
    def empty(self) -> bool:
        """Only a flag: no error and no output (the empty final response)."""
        infer = self.message.infer_response
        return not (self.message.error_message or infer.outputs or infer.raw_output_contents)

    def with_error(self, error: str, model: str) -> bytes:
        """This response as the client's refusal: `error` for the model it named (the stand-in's name
        and Triton's text about it replaced)."""
        msg = service_pb2.ModelStreamInferResponse()
        msg.CopyFrom(self.message)
        msg.error_message = error
        msg.infer_response.model_name = model
        return msg.SerializeToString()


def read_stream_response(message: bytes) -> StreamResponse:
    msg = decode(message, service_pb2.ModelStreamInferResponse, {})
    params = msg.infer_response.parameters  # type: ignore[attr-defined]
    # Triton flags each response of a decoupled model; one without the flag is a request's only response.
    last = bool(msg.error_message) or FINAL_RESPONSE not in params or params[FINAL_RESPONSE].bool_param  # type: ignore[attr-defined]
    return StreamResponse(msg, msg.infer_response.id, last)  # type: ignore[attr-defined, arg-type]
