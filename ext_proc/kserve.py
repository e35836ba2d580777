"""KServe v2 tensors as Triton's TensorRT-LLM ensemble takes them: `text_input` (BYTES) and
`max_tokens` (INT32). Shared by the HTTP (JSON, binary extension) and gRPC parsers; pure functions.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import Any

from ext_proc.request import LLMRequest, ProtocolError, at_most, is_int

TEXT_INPUT = "text_input"
MAX_TOKENS = "max_tokens"
# TensorRT-LLM's ensemble declares max_tokens INT32; INT64 is accepted and kept as sent.
INT_FORMATS = {"INT32": "<i", "INT64": "<q"}

# Caps checked before a tensor's elements are decoded, far above what a client sends:
# - prompts in one request (text_input elements, and max_tokens elements with them): OpenAI's own
#   limit on prompts per completions request; Triton's max_batch_size is usually 8 to 256.
MAX_BATCH = 2048
# - dimensions of a shape: TensorRT's limit is 8; numpy's was 32.
MAX_RANK = 32
# - inputs of one request: TensorRT-LLM's ensemble declares about 40.
MAX_TENSORS = 256


def elements(shape: Sequence[Any], name: str) -> int:
    if not isinstance(shape, (list, tuple)) or len(shape) > MAX_RANK or not all(is_int(d) and d >= 0 for d in shape):
        raise ProtocolError(f"input '{name}' has an invalid shape {_short(shape)}", name)
    return math.prod(shape)


def batch_elements(shape: Sequence[Any], name: str) -> int:
    """The elements of a text_input or max_tokens tensor, at most MAX_BATCH."""
    count = elements(shape, name)
    at_most(count, MAX_BATCH, f"input '{name}' elements", name)
    return count


def _short(value: Any) -> str:
    """A client's value in a message, cut short before it is turned into text."""
    if isinstance(value, (list, tuple)) and len(value) > 8:
        return repr(list(value[:8]))[:-1] + f", ... ({len(value)} in all)]"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def decode_raw_bytes(raw: bytes, name: str, limit: int = MAX_BATCH) -> list[bytes]:
    """BYTES elements in raw form: each is a 4-byte little-endian length, then the bytes. More than
    `limit` elements (what the shape said) is refused before they are all cut out."""
    out: list[bytes] = []
    pos = 0
    while pos < len(raw):
        if len(out) == limit:
            raise ProtocolError(f"input '{name}' holds more than the {limit} elements its shape says", name)
        if pos + 4 > len(raw):
            raise ProtocolError(f"input '{name}': truncated BYTES element", name)
        (n,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + n > len(raw):
            raise ProtocolError(f"input '{name}': truncated BYTES element", name)
        out.append(raw[pos:pos + n])
        pos += n
    return out


def text(raw: bytes) -> str:
    """A BYTES element as the text its tokens are counted from. Invalid UTF-8 is not refused (Triton
    passes the bytes on), it becomes U+FFFD: Python replaces each invalid run of 1-3 bytes with that
    one 3-byte character, so the text's UTF-8 size, the upper bound's input, never drops below the
    bytes sent. The bound then holds whether the engine tokenizes the raw bytes (byte-level BPE: at
    most one token per byte) or the replaced text; an exact count is of the replaced text."""
    return raw.decode("utf-8", errors="replace")


def text_request(model: str, texts: Sequence[str], limits: Sequence[int] | None) -> LLMRequest:
    """The request of a text_input batch (one prompt per element) and its max_tokens elements."""
    return LLMRequest(model=model, prompts=tuple((t,) for t in texts), prompt_param=TEXT_INPUT,
                      requested_max_tokens=max(limits) if limits else None)


def int_format(datatype: str) -> str:
    try:
        return INT_FORMATS[datatype]
    except KeyError:
        raise ProtocolError(f"input '{MAX_TOKENS}' must be INT32, got {datatype}", MAX_TOKENS) from None


def decode_raw_ints(raw: bytes, datatype: str, limit: int = MAX_BATCH) -> list[int]:
    fmt = int_format(datatype)
    size = struct.calcsize(fmt)
    if len(raw) % size:
        raise ProtocolError(f"input '{MAX_TOKENS}': {len(raw)} bytes is not a whole number of {datatype}",
                            MAX_TOKENS)
    at_most(len(raw) // size, limit, f"input '{MAX_TOKENS}' elements", MAX_TOKENS)
    return [v for (v,) in struct.iter_unpack(fmt, raw)]


def encode_raw_ints(values: Sequence[int], datatype: str) -> bytes:
    fmt = int_format(datatype)
    return b"".join(struct.pack(fmt, v) for v in values)


def check_max_tokens(values: Sequence[Any], count: int) -> list[int]:
    """max_tokens elements: as many as the shape says, each an integer of at least 1."""
    at_most(len(values), MAX_BATCH, f"input '{MAX_TOKENS}' elements", MAX_TOKENS)
    if len(values) != count:
        raise ProtocolError(f"input '{MAX_TOKENS}' has {len(values)} elements, its shape says {count}", MAX_TOKENS)
    if not values:
        raise ProtocolError(f"input '{MAX_TOKENS}' is empty", MAX_TOKENS)
    for v in values:
        if not is_int(v) or v < 1:
            raise ProtocolError(f"input '{MAX_TOKENS}' must hold integers of at least 1, got {v!r}", MAX_TOKENS)
    return list(values)


def clamped(values: Sequence[int], max_tokens: int) -> list[int]:
    return [min(v, max_tokens) for v in values]


def missing_text_input() -> ProtocolError:
    return ProtocolError(f"input '{TEXT_INPUT}' (BYTES) is required", TEXT_INPUT)
