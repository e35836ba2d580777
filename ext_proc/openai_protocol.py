"""The OpenAI request protocol as admission sees it: parse a body, rewrite its max_tokens, render errors.

Pure functions over bytes; no I/O. Parse errors are `ProtocolError`s carrying the OpenAI `param`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
PATHS = frozenset({CHAT_PATH, COMPLETIONS_PATH})

# Chat accepts both; trtllm-serve and vLLM treat max_tokens as an alias of max_completion_tokens.
_CHAT_LIMIT_KEYS = ("max_completion_tokens", "max_tokens")
_COMPLETION_LIMIT_KEYS = ("max_tokens",)


class ProtocolError(ValueError):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class LLMRequest:
    """What admission needs to know of one request, whatever the protocol."""

    model: str
    # UTF-8 bytes of each prompt's text (one entry per prompt of a batched completion).
    prompt_bytes: tuple[int, ...]
    # Prompts sent as token ids (completions allow it): exact counts, no estimate needed.
    exact_prompt_tokens: tuple[int, ...]
    prompt_param: str  # the field holding the prompt, named in context errors
    messages: int  # chat messages, for the chat template's per-message overhead
    sequences_per_prompt: int  # `n`
    requested_max_tokens: int | None
    limit_keys: tuple[str, ...]  # keys holding the output limit, to rewrite
    body: dict[str, Any]


def _text_bytes(value: Any) -> int:
    """UTF-8 bytes of every string inside a JSON value, keys included: chat templates render tool
    schemas (property names and all) into the prompt."""
    if isinstance(value, str):
        return len(value.encode())
    if isinstance(value, dict):
        return sum(len(k.encode()) + _text_bytes(v) for k, v in value.items())
    if isinstance(value, list):
        return sum(_text_bytes(v) for v in value)
    return 0


def _positive_int(body: dict[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"'{key}' must be an integer, got {type(value).__name__}", key)
    if value < 1:
        raise ProtocolError(f"'{key}' must be at least 1, got {value}", key)
    return value


def _chat_prompt(body: dict[str, Any]) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ProtocolError("'messages' must be a non-empty array", "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ProtocolError(f"'messages[{i}]' must be an object with a string 'role'", f"messages[{i}]")
    return (_text_bytes(messages) + _text_bytes(body.get("tools"))
            + _text_bytes(body.get("response_format")),), (), len(messages)


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _completion_prompt(body: dict[str, Any]) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return (len(prompt.encode()),), (), 0
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return tuple(len(p.encode()) for p in prompt), (), 0
        if all(_is_token_id(t) for t in prompt):
            return (), (len(prompt),), 0
        if all(isinstance(p, list) and p and all(_is_token_id(t) for t in p) for p in prompt):
            return (), tuple(len(p) for p in prompt), 0
    raise ProtocolError("'prompt' must be a string, an array of strings, or token ids", "prompt")


def parse_request(path: str, raw: bytes) -> LLMRequest:
    if not raw:
        raise ProtocolError("request body is empty")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise ProtocolError(f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ProtocolError("request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ProtocolError("'model' must be a non-empty string", "model")
    chat = path == CHAT_PATH
    prompt_bytes, token_ids, messages = _chat_prompt(body) if chat else _completion_prompt(body)
    keys = _CHAT_LIMIT_KEYS if chat else _COMPLETION_LIMIT_KEYS
    limits = [v for v in (_positive_int(body, k) for k in keys) if v is not None]
    n = _positive_int(body, "n") or 1
    return LLMRequest(model=model, prompt_bytes=prompt_bytes, exact_prompt_tokens=token_ids,
                      prompt_param="messages" if chat else "prompt", messages=messages,
                      sequences_per_prompt=n, requested_max_tokens=min(limits) if limits else None,
                      limit_keys=keys, body=body)


def with_max_tokens(req: LLMRequest, max_tokens: int) -> bytes | None:
    """The body with its output limit set to `max_tokens`; None when the body already says so."""
    present = [k for k in req.limit_keys if k in req.body and req.body[k] is not None]
    if present and all(req.body[k] == max_tokens for k in present):
        return None
    # Rewrite every key the client used; with none, `max_tokens` is the one every engine reads.
    updated = {**req.body, **{k: max_tokens for k in (present or ("max_tokens",))}}
    return orjson.dumps(updated)


def error_body(message: str, *, type_: str, code: str, param: str | None = None) -> bytes:
    """OpenAI's error shape, which the openai SDK turns into its typed exceptions."""
    return orjson.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}})
