"""The OpenAI API (chat and completions) as admission sees it: parse a body, rewrite its output limit,
render errors. Pure functions over bytes; parse errors are `ProtocolError`s naming the OpenAI `param`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from ext_proc.request import LLMRequest, ProtocolError, Rewrite, is_int, json_object, positive_int

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
PATHS = frozenset({CHAT_PATH, COMPLETIONS_PATH})

# Chat accepts both; trtllm-serve and vLLM treat max_tokens as an alias of max_completion_tokens.
_CHAT_LIMIT_KEYS = ("max_completion_tokens", "max_tokens")
_COMPLETION_LIMIT_KEYS = ("max_tokens",)


@dataclass(frozen=True)
class OpenAIRequest:
    request: LLMRequest
    body: dict[str, Any]
    limit_keys: tuple[str, ...]  # keys holding the output limit, to rewrite

    def rewrite(self, max_tokens: int | None, engine_model: str) -> Rewrite | None:
        """The body with its output limit and model set; None when the body already says so."""
        updates: dict[str, Any] = {}
        if max_tokens is not None:
            present = [k for k in self.limit_keys if self.body.get(k) is not None]
            # Rewrite every key the client used; with none, `max_tokens` is the one every engine reads.
            updates = {k: max_tokens for k in (present or ("max_tokens",)) if self.body.get(k) != max_tokens}
        if engine_model != self.request.model:
            updates["model"] = engine_model  # vLLM refuses a model name it does not serve
        return Rewrite(orjson.dumps({**self.body, **updates})) if updates else None


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


def _chat_prompt(body: dict[str, Any]) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ProtocolError("'messages' must be a non-empty array", "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ProtocolError(f"'messages[{i}]' must be an object with a string 'role'", f"messages[{i}]")
    return (_text_bytes(messages) + _text_bytes(body.get("tools"))
            + _text_bytes(body.get("response_format")),), (), len(messages)


def _completion_prompt(body: dict[str, Any]) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return (len(prompt.encode()),), (), 0
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return tuple(len(p.encode()) for p in prompt), (), 0
        if all(is_int(t) for t in prompt):
            return (), (len(prompt),), 0
        if all(isinstance(p, list) and p and all(is_int(t) for t in p) for p in prompt):
            return (), tuple(len(p) for p in prompt), 0
    raise ProtocolError("'prompt' must be a string, an array of strings, or token ids", "prompt")


def parse_request(path: str, raw: bytes) -> OpenAIRequest:
    body = json_object(raw)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ProtocolError("'model' must be a non-empty string", "model")
    chat = path == CHAT_PATH
    prompt_bytes, token_ids, messages = _chat_prompt(body) if chat else _completion_prompt(body)
    keys = _CHAT_LIMIT_KEYS if chat else _COMPLETION_LIMIT_KEYS
    limits = [v for v in (positive_int(body.get(k), k) for k in keys) if v is not None]
    request = LLMRequest(model=model, prompt_bytes=prompt_bytes, exact_prompt_tokens=token_ids,
                         prompt_param="messages" if chat else "prompt", messages=messages,
                         sequences_per_prompt=positive_int(body.get("n"), "n") or 1,
                         requested_max_tokens=min(limits) if limits else None)
    return OpenAIRequest(request, body, keys)


def error_body(message: str, *, type_: str, code: str, param: str | None = None) -> bytes:
    """OpenAI's error shape, which the openai SDK turns into its typed exceptions."""
    return orjson.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}})
