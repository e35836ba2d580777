"""KServe v2 tensors on the wire, as Triton reads and writes them. Pure: no I/O.

Three encodings carry the same tensors:
- HTTP JSON: `{"name", "datatype", "shape", "data"}`, data flat or nested row-major.
- HTTP binary extension: the header `Inference-Header-Content-Length: N` says the
  first N body bytes are the JSON; tensors whose `parameters.binary_data_size` is
  K carry no "data", their K raw bytes follow the JSON in tensor order.
- gRPC: typed `contents` fields, or `raw_input_contents[i]` for input i.
Raw bytes are little-endian; BOOL is 1 byte; a BYTES element is a 4-byte
little-endian length followed by that many bytes.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from tritonclient.grpc import service_pb2

HEADER_LENGTH = "Inference-Header-Content-Length"


class TensorError(ValueError):
    """A malformed tensor or inference request: Triton answers 400 / INVALID_ARGUMENT."""


@dataclass(frozen=True)
class _Kind:
    fmt: str  # struct format of one raw element, "" for BYTES
    python: type  # JSON / python type of one element
    grpc_field: str | None  # InferTensorContents field; None: raw contents only
    bits: int = 0  # integer range check; 0 for non-integers
    signed: bool = True


DTYPES: dict[str, _Kind] = {
    "BOOL": _Kind("?", bool, "bool_contents"),
    "INT8": _Kind("b", int, "int_contents", 8),
    "INT16": _Kind("h", int, "int_contents", 16),
    "INT32": _Kind("i", int, "int_contents", 32),
    "INT64": _Kind("q", int, "int64_contents", 64),
    "UINT8": _Kind("B", int, "uint_contents", 8, signed=False),
    "UINT16": _Kind("H", int, "uint_contents", 16, signed=False),
    "UINT32": _Kind("I", int, "uint_contents", 32, signed=False),
    "UINT64": _Kind("Q", int, "uint64_contents", 64, signed=False),
    "FP16": _Kind("e", float, None),
    "FP32": _Kind("f", float, "fp32_contents"),
    "FP64": _Kind("d", float, "fp64_contents"),
    "BYTES": _Kind("", bytes, "bytes_contents"),
}


@dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: tuple[Any, ...]  # flat, row-major; BYTES elements are bytes

    @property
    def value(self) -> Any:
        """Python value(s): one element as a scalar, more as a flat list; BYTES as str."""
        items = [
            d.decode(errors="replace") if isinstance(d, bytes) else d for d in self.data
        ]
        return items[0] if len(items) == 1 else items


def as_values(tensors: Iterable[Tensor]) -> dict[str, Any]:
    """Input name -> python value(s), see Tensor.value."""
    return {t.name: t.value for t in tensors}


# --- raw encoding ------------------------------------------------------------------


def _element_count(shape: Sequence[int]) -> int:
    return math.prod(shape)


def serialize_raw(datatype: str, data: Sequence[Any]) -> bytes:
    kind = DTYPES[datatype]
    if datatype == "BYTES":
        return b"".join(struct.pack("<I", len(b)) + b for b in data)
    return struct.pack(f"<{len(data)}{kind.fmt}", *data)


def deserialize_raw(name: str, datatype: str, raw: bytes, count: int) -> tuple[Any, ...]:
    """`count` elements of `datatype` from raw bytes, which must hold exactly those."""
    kind = _kind(name, datatype)
    if datatype != "BYTES":
        size = struct.calcsize("<" + kind.fmt) * count
        if len(raw) != size:
            raise TensorError(
                f"unexpected size {len(raw)} for input '{name}', expecting {size}"
            )
        return struct.unpack(f"<{count}{kind.fmt}", raw)
    items: list[bytes] = []
    offset = 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise TensorError(f"truncated element length in BYTES input '{name}'")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise TensorError(f"truncated element in BYTES input '{name}'")
        items.append(raw[offset : offset + length])
        offset += length
    if len(items) != count:
        raise TensorError(
            f"unexpected number of string elements {len(items)} for input '{name}', "
            f"expecting {count}"
        )
    return tuple(items)


# --- validation shared by the encodings ---------------------------------------------


def _kind(name: str, datatype: str) -> _Kind:
    kind = DTYPES.get(datatype)
    if kind is None:
        raise TensorError(f"invalid datatype '{datatype}' for input '{name}'")
    return kind


def _shape(name: str, shape: Any) -> tuple[int, ...]:
    if not isinstance(shape, list | tuple) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise TensorError(f"input '{name}': shape must be an array of non-negative integers")
    return tuple(shape)


def _check_count(name: str, shape: tuple[int, ...], count: int) -> None:
    expected = _element_count(shape)
    if count != expected:
        raise TensorError(
            f"unexpected number of elements {count} for input '{name}', "
            f"shape [{','.join(map(str, shape))}] holds {expected}"
        )


def _check_json_element(name: str, datatype: str, kind: _Kind, value: Any) -> Any:
    if datatype == "BYTES":
        if not isinstance(value, str):
            raise TensorError(f"input '{name}': BYTES data must be strings")
        return value.encode()
    if kind.python is bool:
        if not isinstance(value, bool):
            raise TensorError(f"input '{name}': BOOL data must be true or false")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TensorError(f"input '{name}': {datatype} data must be numbers")
    if kind.python is int:
        if not isinstance(value, int):
            raise TensorError(f"input '{name}': {datatype} data must be integers")
        low = -(2 ** (kind.bits - 1)) if kind.signed else 0
        high = 2 ** (kind.bits - 1) - 1 if kind.signed else 2**kind.bits - 1
        if not low <= value <= high:
            raise TensorError(f"input '{name}': {value} is out of range for {datatype}")
        return value
    return float(value)


def _flatten(value: Any) -> list[Any]:
    if isinstance(value, list):
        return [item for v in value for item in _flatten(v)]
    return [value]


# --- HTTP ----------------------------------------------------------------------------


@dataclass(frozen=True)
class HttpInferRequest:
    header: dict[str, Any]  # the JSON part, as sent
    inputs: tuple[Tensor, ...]

    @property
    def id(self) -> str | None:
        request_id = self.header.get("id")
        return request_id if isinstance(request_id, str) else None


def split_http_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    """The JSON header and the binary tensor data that follows it, if any."""
    if header_length is None:
        json_part, binary = body, b""
    else:
        try:
            length = int(header_length)
        except ValueError:
            raise TensorError(f"invalid {HEADER_LENGTH} '{header_length}'") from None
        if not 0 <= length <= len(body):
            raise TensorError(
                f"{HEADER_LENGTH} {length} exceeds the request body of {len(body)} bytes"
            )
        json_part, binary = body[:length], body[length:]
    try:
        header = orjson.loads(json_part)
    except orjson.JSONDecodeError as e:
        raise TensorError(f"failed to parse the request JSON buffer: {e}") from None
    if not isinstance(header, dict):
        raise TensorError("the inference request must be a JSON object")
    return header, binary


def decode_http_request(body: bytes, header_length: str | None) -> HttpInferRequest:
    """Decodes a KServe v2 HTTP inference request, JSON or binary extension."""
    header, binary = split_http_body(body, header_length)
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not all(isinstance(i, dict) for i in inputs):
        raise TensorError("the inference request must have an 'inputs' array of objects")
    offset = 0
    tensors: list[Tensor] = []
    for spec in inputs:
        name = spec.get("name")
        if not isinstance(name, str):
            raise TensorError("each input must have a string 'name'")
        datatype = spec.get("datatype")
        kind = _kind(name, datatype if isinstance(datatype, str) else repr(datatype))
        shape = _shape(name, spec.get("shape"))
        parameters = spec.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise TensorError(f"input '{name}': 'parameters' must be an object")
        size = parameters.get("binary_data_size")
        if size is not None:
            if "data" in spec:
                raise TensorError(f"input '{name}' has both 'data' and 'binary_data_size'")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise TensorError(f"input '{name}': binary_data_size must be an integer >= 0")
            if offset + size > len(binary):
                raise TensorError(
                    f"unexpected end of binary data for input '{name}': needs {size} bytes "
                    f"at offset {offset}, {len(binary)} bytes follow the header"
                )
            count = _element_count(shape)
            data = deserialize_raw(name, datatype, binary[offset : offset + size], count)
            offset += size
        elif "data" in spec:
            values = _flatten(spec["data"])
            data = tuple(_check_json_element(name, datatype, kind, v) for v in values)
        else:
            raise TensorError(f"input '{name}' has neither 'data' nor 'binary_data_size'")
        _check_count(name, shape, len(data))
        tensors.append(Tensor(name, datatype, shape, data))
    if offset != len(binary):
        raise TensorError(
            f"unexpected additional input data: {len(binary) - offset} bytes follow the tensors"
        )
    return HttpInferRequest(header, tuple(tensors))


def requested_outputs(header: Mapping[str, Any]) -> dict[str, dict[str, Any]] | None:
    """Requested output name -> its parameters; None when the request names none (all)."""
    outputs = header.get("outputs")
    if outputs is None:
        return None
    if not isinstance(outputs, list) or not all(
        isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs
    ):
        raise TensorError("'outputs' must be an array of objects with a string 'name'")
    if not all(isinstance(o.get("parameters", {}), dict) for o in outputs):
        raise TensorError("an output's 'parameters' must be an object")
    return {o["name"]: o.get("parameters", {}) for o in outputs}


def wants_binary(header: Mapping[str, Any], output_parameters: Mapping[str, Any]) -> bool:
    """An output's own `binary_data` wins; else the request's `binary_data_output`
    (which tritonclient.http sets when it names no outputs); else JSON."""
    own = output_parameters.get("binary_data")
    if isinstance(own, bool):
        return own
    request_parameters = header.get("parameters")
    if not isinstance(request_parameters, dict):
        return False
    return bool(request_parameters.get("binary_data_output"))


def encode_http_response(
    model_name: str,
    model_version: str,
    request_id: str | None,
    outputs: Sequence[tuple[Tensor, bool]],
) -> tuple[bytes, int | None]:
    """The response body and, when some output is binary, the JSON header's length
    (to send as Inference-Header-Content-Length). `outputs` pairs each tensor with
    whether it goes binary."""
    header: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id:
        header["id"] = request_id
    json_outputs: list[dict[str, Any]] = []
    raw_parts: list[bytes] = []
    for tensor, binary in outputs:
        entry: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": list(tensor.shape),
        }
        if binary:
            raw = serialize_raw(tensor.datatype, tensor.data)
            entry["parameters"] = {"binary_data_size": len(raw)}
            raw_parts.append(raw)
        else:
            entry["data"] = [
                d.decode(errors="replace") if isinstance(d, bytes) else d for d in tensor.data
            ]
        json_outputs.append(entry)
    header["outputs"] = json_outputs
    json_part = orjson.dumps(header)
    if not raw_parts:
        return json_part, None
    return json_part + b"".join(raw_parts), len(json_part)


# --- gRPC ----------------------------------------------------------------------------


def decode_grpc_inputs(request: service_pb2.ModelInferRequest) -> tuple[Tensor, ...]:
    """The inputs of a ModelInferRequest, from raw_input_contents or typed contents."""
    raw_contents = request.raw_input_contents
    if raw_contents and len(raw_contents) != len(request.inputs):
        raise TensorError(
            f"expected {len(request.inputs)} raw input contents, got {len(raw_contents)}; "
            "raw_input_contents must hold every input or none"
        )
    tensors: list[Tensor] = []
    for i, tensor in enumerate(request.inputs):
        name, datatype = tensor.name, tensor.datatype
        kind = _kind(name, datatype)
        shape = _shape(name, list(tensor.shape))
        count = _element_count(shape)
        if raw_contents:
            if tensor.HasField("contents"):
                raise TensorError(f"input '{name}' has both contents and raw_input_contents")
            data = deserialize_raw(name, datatype, raw_contents[i], count)
        else:
            if kind.grpc_field is None:
                raise TensorError(f"{datatype} input '{name}' must be sent in raw_input_contents")
            data = tuple(getattr(tensor.contents, kind.grpc_field))
            _check_count(name, shape, len(data))
            if kind.bits and kind.bits < 32:
                data = tuple(_check_json_element(name, datatype, kind, v) for v in data)
        tensors.append(Tensor(name, datatype, shape, data))
    return tuple(tensors)


def encode_grpc_outputs(
    outputs: Sequence[Tensor],
) -> tuple[list[service_pb2.ModelInferResponse.InferOutputTensor], list[bytes]]:
    """Output tensors and their raw_output_contents, which is where tritonclient.grpc
    reads BYTES outputs from."""
    return (
        [
            service_pb2.ModelInferResponse.InferOutputTensor(
                name=t.name, datatype=t.datatype, shape=list(t.shape)
            )
            for t in outputs
        ],
        [serialize_raw(t.datatype, t.data) for t in outputs],
    )
