"""What admission knows of a request, whatever protocol carried it, and how a protocol answers back.

Each protocol module (openai_protocol, triton_http, triton_grpc) parses its wire format into a
`Parsed`: the neutral `LLMRequest` that admission reads, plus how to rewrite the body once the
output limit and the engine's model name are decided.

Every parser raises `ProtocolError` for a body it refuses, and nothing else, whatever the bytes; and a
body is decided in bounded time: the caps below are checked before anything is built from it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import orjson


class ProtocolError(ValueError):
    """The request is malformed for its protocol; `param` names the offending field. `status` and
    `code` are the HTTP status and error code of the refusal."""

    status = 400
    code = "invalid_request"

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class UnsupportedMediaType(ProtocolError):
    """A body the gateway cannot read as sent (compressed): 415."""

    status = 415
    code = "unsupported_media_type"


@dataclass(frozen=True)
class LLMRequest:
    model: str
    # One entry per prompt of a batch: the text pieces its tokens come from. A chat's are its
    # messages' contents (plus the tool schemas it renders); a completion's, its one prompt string.
    # Counted piece by piece so that pieces repeated across requests (system prompts, earlier turns)
    # hit the token counter's cache; what the chat template adds around them is policy overhead.
    prompts: tuple[tuple[str, ...], ...] = ()
    # Prompts sent as token ids: exact counts, no estimate needed.
    exact_prompt_tokens: tuple[int, ...] = ()
    prompt_param: str = "prompt"  # the field holding the prompt, named in context errors
    messages: int = 0  # chat messages, for the chat template's per-message overhead
    sequences_per_prompt: int = 1  # OpenAI's `n` (or `best_of`, when larger)
    requested_max_tokens: int | None = None
    # False for calls that only name a model (Triton's ModelReady): routed, not admitted.
    admit: bool = True
    # An OpenAI chat body, which the model's chat template renders into the prompt the engine counts
    # (tokens.py); None for every other API.
    chat: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)

    @property
    def prompt_bytes(self) -> tuple[int, ...]:
        """UTF-8 bytes of each prompt's pieces: what the upper bound is taken from. Text that arrived as
        invalid UTF-8 was decoded with U+FFFD (3 bytes) for each invalid run of 1-3 bytes, so this is
        never below the bytes the client sent (kserve.text)."""
        return tuple(sum(len(piece.encode()) for piece in pieces) for pieces in self.prompts)


@dataclass(frozen=True)
class Rewrite:
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()  # besides content-length, which the caller sets


class Parsed(Protocol):
    request: LLMRequest

    def rewrite(self, max_tokens: int | None, engine_model: str) -> Rewrite | None:
        """The body to send upstream, or None to send it unchanged."""


@dataclass(frozen=True)
class ModelOnly:
    """A JSON body with no output limit to write (embeddings, tokenize): only the model is renamed."""

    request: LLMRequest
    body: dict[str, Any]

    def rewrite(self, max_tokens: int | None, engine_model: str) -> Rewrite | None:
        if engine_model == self.request.model:
            return None
        return Rewrite(orjson.dumps({**self.body, "model": engine_model}))


# --- Content-Encoding -----------------------------------------------------------------------------

def identity_encoding(headers: Mapping[str, str], error: type[ProtocolError] = UnsupportedMediaType) -> None:
    """The body must arrive as sent by the client's serializer: a compressed one cannot be read (and the
    engines behind the gateway, vLLM among them, do not decode request bodies either). Repeated headers
    arrive joined with commas (exchange.read_headers), so every coding listed must be identity."""
    value = headers.get("content-encoding", "")
    codings = [c.strip().lower() for c in value.split(",")]
    if any(c not in ("", "identity") for c in codings):
        raise error(f"Content-Encoding {value[:40]!r} is not supported: the gateway reads the body to admit it; "
                    "send it uncompressed")


# --- JSON bodies ----------------------------------------------------------------------------------
#
# Caps, each far above what a real client sends, that bound the time any body up to Envoy's 4 MiB
# limit costs before it is refused (bench/parse_worst.py measures them):
# - orjson serializes at most 254 levels of nesting; a deeper body could not be rewritten, and no API
#   body nests anywhere near that.
MAX_JSON_DEPTH = 254
# - arrays and objects cost orjson (and the garbage collector) 50-300 ns each: 32,768 of them parse in
#   a few ms. A 10,000-message chat with content parts uses 30,000.
MAX_JSON_CONTAINERS = 1 << 15
# - values cost about 20 ns each: 262,144 (the longest token-id prompt it lets through) parse in a few ms.
MAX_JSON_VALUES = 1 << 18
# No body of this size can go over the caps (every array or value takes 2 bytes): counted above it only.
_COUNT_STRUCTURE_ABOVE = 64 * 1024
# Byte counts use bytes.count on small buffers, numpy (vectorized, ~10x faster) on larger ones.
_NUMPY_ABOVE = 8 * 1024


def json_object(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object, refused when it is not one, when it is too large a structure to parse
    in bounded time, or when an object anywhere in it repeats a key (see _no_duplicate_keys)."""
    if not raw:
        raise ProtocolError("request body is empty")
    if len(raw) > _COUNT_STRUCTURE_ABOVE:
        _check_structure(raw)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise ProtocolError(f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ProtocolError("request body must be a JSON object")
    try:
        canonical = orjson.dumps(body)
    except TypeError:  # orjson's recursion limit: the only way dumping what it parsed can fail
        raise ProtocolError(f"request body nests deeper than {MAX_JSON_DEPTH} levels") from None
    # orjson's own output (and a compact json.dumps, as the openai SDK sends) cannot repeat a key.
    if raw != canonical and not _no_duplicate_keys(raw, canonical):
        _refuse_duplicate_keys(raw, canonical)
    return body


def _u8(buf: bytes) -> np.ndarray:
    return np.frombuffer(buf, np.uint8)


def _no_duplicate_keys(raw: bytes, canonical: bytes) -> bool:
    """True when no object of the body repeats a key: the fast, sound check (False may be a false alarm).

    Duplicate keys are a parser differential: orjson (and vLLM's json) keep the last value, Triton's
    reader the first, so an unchanged body forwarded byte for byte would run what was not admitted.

    In valid JSON every ':' outside strings belongs to exactly one key. orjson's own serialization of
    the parsed body (`canonical`) escapes no ':', so its colons are K + P: K keys of all parsed objects,
    P colons inside parsed strings (keys and values). The raw body has S + L: S keys as sent, L colons
    written literally inside strings; the escapes \\u003a / \\u003A put E more colons into parsed
    strings. What a repeated key drops (the key, the value it replaced) only lowers P, so
    L + E >= P and R + E - (K + P) >= S - K >= 0. With E over-counted (every \\u003a sequence, escaped
    or not) equality still forces S == K: no key was repeated."""
    if len(raw) < _NUMPY_ABOVE:
        escaped = raw.count(b"\\u003a") + raw.count(b"\\u003A")
        return raw.count(b":") + escaped == canonical.count(b":")
    a, c = _u8(raw), _u8(canonical)
    return int(np.count_nonzero(a == 0x3A)) + _escaped_colons(a) == int(np.count_nonzero(c == 0x3A))


def _escaped_colons(a: np.ndarray) -> int:
    """How many \\u003a or \\u003A sequences the bytes hold (escaped backslashes included: an over-count)."""
    at = np.flatnonzero(a[:-5] == 0x5C)
    at = at[a[at + 1] == 0x75]  # "\\u"
    return int(np.count_nonzero((a[at + 2] == 0x30) & (a[at + 3] == 0x30) & (a[at + 4] == 0x33)
                                & ((a[at + 5] | 0x20) == 0x61)))


# The exact check names the repeated key when the body has at most this many objects and arrays, and
# values: it parses again with a Python call per object.
_NAME_REPEATED_KEY_BELOW = (4096, 65536)


class _Repeated(Exception):
    def __init__(self, key: str):
        self.key = key


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        raise _Repeated(next(k for k, _ in pairs if k in seen or seen.add(k)))  # type: ignore[func-returns-value]
    return obj


def _refuse_duplicate_keys(raw: bytes, canonical: bytes) -> None:
    """The exact check, when the fast one could not tell: raise when the keys sent outnumber the keys
    parsed (naming the first object's repeated key when that is cheap); return when they do not."""
    opens, commas, keys = _outside_strings(raw)  # type: ignore[misc]  # no most_strings: never None
    if keys == _outside_strings(canonical)[2]:  # type: ignore[index]
        return
    message = ("appears twice in one object of the request body: JSON parsers disagree on which one "
               "counts, so the gateway refuses it")
    if opens <= _NAME_REPEATED_KEY_BELOW[0] and commas <= _NAME_REPEATED_KEY_BELOW[1]:
        try:
            json.loads(raw, object_pairs_hook=_pairs)
        except _Repeated as e:
            raise ProtocolError(f"key {e.key!r} {message}", e.key) from None
    raise ProtocolError(f"a key {message}")


def _check_structure(raw: bytes) -> None:
    """Refuse, before parsing, a body with more arrays and objects or values than the caps allow. The
    counts of '[', '{' and ',' bound them from above; only when that bound is over a cap are the ones
    inside strings (a long prompt has many commas) told apart, exactly."""
    a = _u8(raw)
    opens = int(np.count_nonzero((a | 0x20) == 0x7B))  # '[' is 0x5B, '{' 0x7B
    if opens <= MAX_JSON_CONTAINERS and opens + int(np.count_nonzero(a == 0x2C)) <= MAX_JSON_VALUES:
        return
    counts = _outside_strings(raw, most_strings=2 * MAX_JSON_VALUES)
    if counts is not None and counts[0] > MAX_JSON_CONTAINERS:
        raise ProtocolError(f"request body has more than {MAX_JSON_CONTAINERS} arrays and objects")
    if counts is None or counts[0] + counts[1] > MAX_JSON_VALUES:  # every key has a value: strings <= 2 values
        raise ProtocolError(f"request body has more than {MAX_JSON_VALUES} values")


def _outside_strings(buf: bytes, most_strings: int | None = None) -> tuple[int, int, int] | None:
    """'[' and '{', ',', and ':' outside JSON strings; None when there are more than `most_strings`
    strings. A quote escaped by an odd run of backslashes is no delimiter; every other one opens or
    closes a string, so a byte is inside one when an odd number of them stand before it. Vectorized:
    time linear in the size, whatever the bytes. Garbage in, a count out: an invalid body is refused by
    the parser afterwards, if not by a cap."""
    a = _u8(buf)
    quotes = np.flatnonzero(a == 0x22)
    if quotes.size and b"\\" in buf:
        quotes = quotes[~_escaped(a, quotes)]
    if most_strings is not None and quotes.size // 2 > most_strings:
        return None
    runs = np.diff(quotes, prepend=-1, append=a.size - 1)  # (previous quote, this quote], then the rest
    rest = a[np.repeat(np.arange(runs.size) % 2 == 0, runs)]  # the bytes outside strings
    return (int(np.count_nonzero((rest | 0x20) == 0x7B)), int(np.count_nonzero(rest == 0x2C)),
            int(np.count_nonzero(rest == 0x3A)))


def _escaped(a: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Whether each position in `at` follows a run of backslashes of odd length. Runs are followed back
    a step at a time for all positions at once; past a few steps, from the starts of all runs."""
    odd = np.zeros(at.size, bool)
    live = np.flatnonzero(at > 0)
    for step in range(1, 9):
        live = live[a[at[live] - step] == 0x5C]
        odd[live] ^= True
        live = live[at[live] > step]
        if not live.size:
            return odd
    slashes = np.flatnonzero(a == 0x5C)
    starts = slashes[np.concatenate(([0], np.flatnonzero(np.diff(slashes) != 1) + 1))]
    start = starts[np.searchsorted(starts, at[live] - 1, side="right") - 1]
    odd[live] = (at[live] - start) % 2 == 1
    return odd


# --- field checks ---------------------------------------------------------------------------------

def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def positive_int(value: Any, name: str) -> int | None:
    """None when absent; an int >= 1; anything else is the client's error."""
    if value is None:
        return None
    if not is_int(value):
        raise ProtocolError(f"'{name}' must be an integer, got {type(value).__name__}", name)
    if value < 1:
        raise ProtocolError(f"'{name}' must be at least 1, got {value}", name)
    return value


def at_most(count: int, cap: int, what: str, param: str | None = None) -> None:
    """Refuse a count over its cap, before anything is built from it."""
    if count > cap:
        raise ProtocolError(f"{what}: {count}, more than the gateway admits ({cap})", param)


def typed(body: Mapping[str, Any], key: str, kind: type | tuple[type, ...], name: str) -> Any:
    """body[key] when absent, null, or of its type (None for the first two): a field the engine would read
    some other way is refused here."""
    value = body.get(key)
    if value is not None and not isinstance(value, kind):
        raise ProtocolError(f"'{key}' must be {name}, got {type(value).__name__}", key)
    return value


def model_name(body: Mapping[str, Any]) -> str:
    """The body's `model`: what routes the request, so every API needs it."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ProtocolError("'model' must be a non-empty string", "model")
    return model


def json_text(value: Any) -> str:
    """Structured values (tool schemas, tool calls, non-text parts) as templates render them and as the byte
    bound counts them: as JSON, keys included. Never fewer bytes than the text inside: orjson writes UTF-8
    as it is, without \\u escapes."""
    return orjson.dumps(value).decode()
