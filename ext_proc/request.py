"""What admission knows of a request, whatever protocol carried it, and how a protocol answers back.

Each protocol module (openai_protocol, triton_http, triton_grpc) parses its wire format into a
`Parsed`: the neutral `LLMRequest` that admission reads, plus how to rewrite the body once the
output limit and the engine's model name are decided.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import orjson


class ProtocolError(ValueError):
    """The request is malformed for its protocol; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


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
    sequences_per_prompt: int = 1  # OpenAI's `n`
    requested_max_tokens: int | None = None
    # False for calls that only name a model (Triton's ModelReady): routed, not admitted.
    admit: bool = True

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


def json_object(raw: bytes) -> dict[str, Any]:
    if not raw:
        raise ProtocolError("request body is empty")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise ProtocolError(f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ProtocolError("request body must be a JSON object")
    return body


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
