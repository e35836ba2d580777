"""Triton's HTTP APIs as admission sees them: the generate extension (JSON) and KServe v2 `infer`
(JSON tensors, or the binary-tensor extension). The model is named in the URL path, which Envoy's
route rewrites to the engine's name; only the body's output limit is ours to rewrite. Pure functions.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from ext_proc import kserve
from ext_proc.kserve import MAX_TOKENS, TEXT_INPUT
from ext_proc.request import LLMRequest, ProtocolError, Rewrite, at_most, identity_encoding, is_int, json_object
from ext_proc.request import positive_int

BINARY_HEADER = "inference-header-content-length"


def _plain_names(names: Iterable[str], what: str) -> None:
    """Triton's C++ reader may end a name at a NUL character (C strings): "max_tokens\\u0000" would be
    max_tokens to the engine and an unknown field to the gateway."""
    for name in names:
        if "\x00" in name:
            raise ProtocolError(f"{what} {name[:40]!r} contains a NUL character", name)


# --- generate / generate_stream ---------------------------------------------------------------

@dataclass(frozen=True)
class GenerateRequest:
    request: LLMRequest
    body: dict[str, Any]

    def rewrite(self, max_tokens: int | None, engine_model: str) -> Rewrite | None:
        if max_tokens is None:
            return None
        given = self.body.get(MAX_TOKENS)
        batch = len(self.request.prompts)
        if given is None:
            # One value per prompt, as Triton matches the inputs' batch sizes.
            limit: int | list[int] = max_tokens if batch == 1 else [max_tokens] * batch
        elif isinstance(given, list):
            values = _flat(given, MAX_TOKENS, kserve.MAX_BATCH)
            if max(values) <= max_tokens:
                return None
            limit = kserve.clamped(values, max_tokens)
        elif given <= max_tokens:
            return None
        else:
            limit = max_tokens
        return Rewrite(orjson.dumps({**self.body, MAX_TOKENS: limit}))


def _generate_values(body: dict[str, Any], name: str) -> list[Any] | None:
    """An input of generate's body as Triton reads it: a scalar is one element, an array (nested or
    not) its elements in order."""
    value = body.get(name)
    if value is None:
        return None
    return _flat(value, name, kserve.MAX_BATCH) if isinstance(value, list) else [value]


def parse_generate(model: str | None, headers: Mapping[str, str], raw: bytes) -> GenerateRequest:
    identity_encoding(headers)
    body = json_object(raw)
    _plain_names(body, "field")  # generate maps each member to the input of that name
    texts = _generate_values(body, TEXT_INPUT)
    if texts is None:
        raise kserve.missing_text_input()
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ProtocolError(f"'{TEXT_INPUT}' must be a string or an array of strings", TEXT_INPUT)
    limits = _generate_values(body, MAX_TOKENS)
    if limits is not None:
        if len(limits) == 1:
            positive_int(limits[0], MAX_TOKENS)  # a scalar's message names the field
        limits = kserve.check_max_tokens(limits, len(texts))
    return GenerateRequest(kserve.text_request(model or "", texts, limits), body)


# --- infer: KServe v2 JSON tensors, optionally with binary data after the JSON header ---------

@dataclass(frozen=True)
class _Tensor:
    index: int  # position in the JSON header's inputs
    spec: dict[str, Any]
    binary: bytes | None  # raw data when sent in the binary extension


@dataclass(frozen=True)
class InferRequest:
    request: LLMRequest
    json_header: bytes  # as received: kept byte for byte when only binary data changes
    header: dict[str, Any]
    tensors: dict[str, _Tensor]
    binary: bool  # the body used the binary extension

    def rewrite(self, max_tokens: int | None, engine_model: str) -> Rewrite | None:
        if max_tokens is None:
            return None
        header, replaced = self.header, {}
        limit = self.tensors.get(MAX_TOKENS)
        if limit is None:
            batch = len(self.request.prompts)
            header = {**header, "inputs": [*header["inputs"], {
                "name": MAX_TOKENS, "datatype": "INT32", "shape": [batch, 1], "data": [max_tokens] * batch}]}
        elif limit.binary is not None:
            values = kserve.decode_raw_ints(limit.binary, limit.spec["datatype"])
            if max(values) <= max_tokens:
                return None
            # Same dtype and count: the binary section keeps its length.
            replaced[MAX_TOKENS] = kserve.encode_raw_ints(kserve.clamped(values, max_tokens), limit.spec["datatype"])
        else:
            values = _flat(limit.spec["data"], MAX_TOKENS, kserve.MAX_BATCH)
            if max(values) <= max_tokens:
                return None
            inputs = list(header["inputs"])
            inputs[limit.index] = {**limit.spec, "data": kserve.clamped(values, max_tokens)}
            header = {**header, "inputs": inputs}
        json_header = self.json_header if header is self.header else orjson.dumps(header)
        binary = [replaced.get(name, t.binary or b"") for name, t in
                  sorted(self.tensors.items(), key=lambda kv: kv[1].index) if t.binary is not None]
        extra = ((BINARY_HEADER, str(len(json_header))),) if self.binary and header is not self.header else ()
        return Rewrite(json_header + b"".join(binary), extra)


def _flat(data: Any, name: str, limit: int) -> list[Any]:
    """A JSON tensor's data, nested or flat, as its elements in order: flattened without recursion, at
    most MAX_RANK levels deep and `limit` elements (what the shape says) long."""
    if not isinstance(data, list):
        return [data]
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                if len(stack) == kserve.MAX_RANK:
                    raise ProtocolError(f"input '{name}': data nests deeper than {kserve.MAX_RANK} levels", name)
                stack.append(iter(item))
                break
            if len(out) == limit:
                raise ProtocolError(f"input '{name}' holds more than the {limit} elements its shape says", name)
            out.append(item)
        else:
            stack.pop()
    return out


def _split_binary(headers: Mapping[str, str], raw: bytes) -> tuple[bytes, bytes | None]:
    declared = headers.get(BINARY_HEADER)
    if declared is None:
        return raw, None
    # At most 10 digits (4 GiB): int() of a longer string costs, and refuses past 4300 digits.
    if not (declared.isascii() and declared.isdigit() and len(declared) <= 10) or int(declared) > len(raw):
        raise ProtocolError(f"{BINARY_HEADER} {declared[:20]!r} does not fit a {len(raw)}-byte body")
    return raw[:int(declared)], raw[int(declared):]


def _tensors(inputs: list[Any], binary: bytes | None) -> dict[str, _Tensor]:
    at_most(len(inputs), kserve.MAX_TENSORS, "inputs", "inputs")
    out, pos = {}, 0
    for i, spec in enumerate(inputs):
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise ProtocolError(f"inputs[{i}] must be an object with a 'name'", "inputs")
        name, params = spec["name"], spec.get("parameters")
        _plain_names([name], "input")
        if params is not None and not isinstance(params, dict):
            raise ProtocolError(f"input '{name}': 'parameters' must be an object", name)
        if name in out:
            # Which one would the engine use? Refused rather than guessed.
            raise ProtocolError(f"input '{name}' appears twice", name)
        size = (params or {}).get("binary_data_size")
        data = None
        if size is not None:
            if not is_int(size) or size < 0:
                raise ProtocolError(f"input '{name}': binary_data_size must be a non-negative integer", name)
            if "data" in spec:
                raise ProtocolError(f"input '{name}' has both 'data' and binary_data_size", name)
            if binary is None or pos + size > len(binary):
                raise ProtocolError(f"input '{name}': binary_data_size {size} runs past the body", name)
            data, pos = binary[pos:pos + size], pos + size
        out[name] = _Tensor(i, spec, data)
    if binary is not None and pos != len(binary):
        raise ProtocolError(f"{len(binary) - pos} bytes of binary data belong to no input")
    return out


def _text_elements(t: _Tensor) -> list[str]:
    if t.spec.get("datatype") != "BYTES":
        raise ProtocolError(f"input '{TEXT_INPUT}' must be BYTES, got {t.spec.get('datatype')!r}", TEXT_INPUT)
    count = kserve.batch_elements(t.spec.get("shape"), TEXT_INPUT)
    if t.binary is not None:
        items = [kserve.text(v) for v in kserve.decode_raw_bytes(t.binary, TEXT_INPUT, count)]
    else:
        items = _flat(t.spec.get("data"), TEXT_INPUT, count)
        if not all(isinstance(v, str) for v in items):
            raise ProtocolError(f"input '{TEXT_INPUT}' must hold strings", TEXT_INPUT)
    if len(items) != count or not items:
        raise ProtocolError(f"input '{TEXT_INPUT}' has {len(items)} elements, its shape says {count}", TEXT_INPUT)
    return items


def _limits(t: _Tensor) -> list[int]:
    dtype = t.spec.get("datatype", "")
    if not isinstance(dtype, str):
        raise ProtocolError(f"input '{MAX_TOKENS}' must be INT32, got {dtype!r}", MAX_TOKENS)
    kserve.int_format(dtype)
    count = kserve.batch_elements(t.spec.get("shape"), MAX_TOKENS)
    values = (kserve.decode_raw_ints(t.binary, dtype, count) if t.binary is not None
              else _flat(t.spec.get("data"), MAX_TOKENS, count))
    return kserve.check_max_tokens(values, count)


def parse_infer(model: str | None, headers: Mapping[str, str], raw: bytes) -> InferRequest:
    identity_encoding(headers)
    json_part, binary = _split_binary(headers, raw)
    header = json_object(json_part)
    inputs = header.get("inputs")
    if not isinstance(inputs, list):
        raise ProtocolError("'inputs' must be an array of tensors", "inputs")
    tensors = _tensors(inputs, binary)
    if TEXT_INPUT not in tensors:
        raise kserve.missing_text_input()
    texts = _text_elements(tensors[TEXT_INPUT])
    limits = _limits(tensors[MAX_TOKENS]) if MAX_TOKENS in tensors else None
    request = kserve.text_request(model or "", texts, limits)
    return InferRequest(request, json_part, header, tensors, binary is not None)
