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


# Roles every chat template renders in its per-message markup, which the catalog's per_message_tokens
# cover; any other role string (vLLM accepts custom roles) is rendered as text and counted.
_TEMPLATE_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function", "ipython"})

# What the prompt-side of a parse yields: the prompts' text pieces, token-id counts, chat messages.
_Prompt = tuple[tuple[tuple[str, ...], ...], tuple[int, ...], int]


def _json_text(value: Any) -> str:
    """Structured values (tool schemas, tool calls) as chat templates render them: as JSON, keys included."""
    return orjson.dumps(value).decode()


def _content_pieces(content: Any) -> list[str]:
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        # Text parts are text; other parts (images, audio) are counted as their JSON, which bounds the
        # bytes they carry though not the tokens a multimodal model gives them.
        return [p["text"] if isinstance(p, dict) and isinstance(p.get("text"), str) else _json_text(p)
                for p in content]
    return [_json_text(content)]


def _message_pieces(m: dict[str, Any]) -> list[str]:
    pieces = [] if m["role"] in _TEMPLATE_ROLES else [m["role"]]
    pieces += _content_pieces(m.get("content"))
    # name, tool_calls, tool_call_id...: rendered into the prompt by templates that use them.
    rest = {k: v for k, v in m.items() if k not in ("role", "content") and v is not None}
    return [*pieces, _json_text(rest)] if rest else pieces


def _chat_prompt(body: dict[str, Any]) -> _Prompt:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ProtocolError("'messages' must be a non-empty array", "messages")
    pieces: list[str] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ProtocolError(f"'messages[{i}]' must be an object with a string 'role'", f"messages[{i}]")
        pieces += _message_pieces(m)
    # Templates render the tool schemas into the prompt; response_format is counted too, for the
    # servers that put the schema into the prompt (a bound must not miss it).
    pieces += [_json_text(body[k]) for k in ("tools", "response_format") if body.get(k) is not None]
    return (tuple(pieces),), (), len(messages)


def _completion_prompt(body: dict[str, Any]) -> _Prompt:
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return ((prompt,),), (), 0
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return tuple((p,) for p in prompt), (), 0
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
    prompts, token_ids, messages = _chat_prompt(body) if chat else _completion_prompt(body)
    keys = _CHAT_LIMIT_KEYS if chat else _COMPLETION_LIMIT_KEYS
    limits = [v for v in (positive_int(body.get(k), k) for k in keys) if v is not None]
    request = LLMRequest(model=model, prompts=prompts, exact_prompt_tokens=token_ids,
                         prompt_param="messages" if chat else "prompt", messages=messages,
                         sequences_per_prompt=positive_int(body.get("n"), "n") or 1,
                         requested_max_tokens=min(limits) if limits else None)
    return OpenAIRequest(request, body, keys)


def error_body(message: str, *, type_: str, code: str, param: str | None = None) -> bytes:
    """OpenAI's error shape, which the openai SDK turns into its typed exceptions."""
    return orjson.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}})
