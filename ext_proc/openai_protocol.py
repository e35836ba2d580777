"""The OpenAI API (chat and completions) as admission sees it: parse a body, rewrite its output limit,
render errors. Pure functions over bytes; parse errors are `ProtocolError`s naming the OpenAI `param`.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from ext_proc.request import LLMRequest, ProtocolError, Rewrite, at_most, identity_encoding, json_object, positive_int

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
PATHS = frozenset({CHAT_PATH, COMPLETIONS_PATH})

# Caps checked before anything is built from the body, beyond what real clients send: OpenAI's own
# limit on prompts per completions request; five times that many chat messages (long agent traces
# run to a few thousand).
MAX_PROMPTS = 2048
MAX_MESSAGES = 10_000

# Fields that change the prompt an engine renders (vLLM's chat API): counted as their JSON, like tool
# schemas; or refused, when what they render cannot be bounded (docs/clients/openai.md).
_RENDERED = ("tools", "response_format", "documents", "chat_template_kwargs")
_UNCOUNTABLE = {
    "chat_template": "a chat template sent with the request renders a prompt the gateway cannot count; "
                     "the model's own template is used without it",
    "prompt_embeds": "prompt embeddings are not counted by the gateway; send the prompt as text or token ids",
}

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


def _content_pieces(content: Any, i: int) -> list[str]:
    """Message i's content: null, a string, or content parts. A text part is {"type": "text", "text":
    str}; other parts (images, audio) are counted as their JSON, which bounds the bytes they carry
    though not the tokens a multimodal model gives them. Anything else is refused: the engine would
    refuse it after admission, or render it as something the gateway did not count."""
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    param = f"messages[{i}].content"
    if not isinstance(content, list):
        raise ProtocolError(f"'{param}' must be a string or an array of content parts, got "
                            f"{type(content).__name__}", param)
    pieces = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise ProtocolError(f"'{param}[{j}]' must be a content part: an object with a string 'type'", param)
        if part["type"] != "text":
            pieces.append(_json_text(part))
        elif isinstance(part.get("text"), str):
            pieces.append(part["text"])
        else:
            raise ProtocolError(f"'{param}[{j}].text' must be a string", param)
    return pieces


def _message_pieces(m: dict[str, Any], i: int) -> list[str]:
    pieces = [] if m["role"] in _TEMPLATE_ROLES else [m["role"]]
    pieces += _content_pieces(m.get("content"), i)
    # name, tool_calls, tool_call_id...: rendered into the prompt by templates that use them.
    if len(m) > 2 or "content" not in m:
        rest = {k: v for k, v in m.items() if k not in ("role", "content") and v is not None}
        if rest:
            pieces.append(_json_text(rest))
    return pieces


def _chat_prompt(body: dict[str, Any]) -> _Prompt:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ProtocolError("'messages' must be a non-empty array", "messages")
    at_most(len(messages), MAX_MESSAGES, "messages", "messages")
    pieces: list[str] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ProtocolError(f"'messages[{i}]' must be an object with a string 'role'", f"messages[{i}]")
        pieces += _message_pieces(m, i)
    _typed(body, "chat_template_kwargs", dict, "an object")
    _typed(body, "documents", list, "an array")
    for key in ("add_generation_prompt", "continue_final_message"):
        _typed(body, key, bool, "a boolean")
    # Templates render the tool schemas into the prompt, and vLLM's documents and template kwargs;
    # response_format is counted too, for the servers that put the schema into the prompt (a bound
    # must not miss it).
    pieces += [_json_text(body[k]) for k in _RENDERED if body.get(k) is not None]
    return (tuple(pieces),), (), len(messages)


def _token_ids(prompt: list[Any]) -> bool:
    # Exactly int, not bool (type(True) is bool); counted in C: a prompt may hold 262,144 ids.
    return bool(prompt) and operator.countOf(map(type, prompt), int) == len(prompt)


def _completion_prompt(body: dict[str, Any]) -> _Prompt:
    prompt = body.get("prompt")
    # A suffix (insertion) is rendered with the prompt by the engines that take one.
    _typed(body, "suffix", str, "a string")
    suffix = (body["suffix"],) if body.get("suffix") else ()
    if isinstance(prompt, str):
        return ((prompt, *suffix),), (), 0
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt[:MAX_PROMPTS + 1]):
            at_most(len(prompt), MAX_PROMPTS, "prompts", "prompt")
            return tuple((p, *suffix) for p in prompt), (), 0
        if _token_ids(prompt) and not suffix:
            return (), (len(prompt),), 0
        if isinstance(prompt[0], list) and not suffix:
            at_most(len(prompt), MAX_PROMPTS, "prompts", "prompt")
            if all(isinstance(p, list) and _token_ids(p) for p in prompt):
                return (), tuple(len(p) for p in prompt), 0
    raise ProtocolError("'prompt' must be a string, an array of strings, or token ids" +
                        (" (a suffix goes with text prompts)" if suffix else ""), "prompt")


def _typed(body: dict[str, Any], key: str, kind: type, name: str) -> None:
    """Absent, null, or of its type: a field the engine would read some other way is refused here."""
    if body.get(key) is not None and not isinstance(body[key], kind):
        raise ProtocolError(f"'{key}' must be {name}, got {type(body[key]).__name__}", key)


def _sequences(body: dict[str, Any]) -> int:
    """Sequences generated per prompt: `n`, or `best_of` when larger (trtllm-serve and older vLLM
    generate best_of and return the n best)."""
    n = positive_int(body.get("n"), "n") or 1
    best_of = positive_int(body.get("best_of"), "best_of")
    if best_of is not None and best_of < n:
        raise ProtocolError(f"'best_of' must be at least 'n' ({n}), got {best_of}", "best_of")
    return max(n, best_of or 1)


def parse_request(path: str, raw: bytes, headers: Mapping[str, str] | None = None) -> OpenAIRequest:
    identity_encoding(headers or {})
    body = json_object(raw)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ProtocolError("'model' must be a non-empty string", "model")
    for key, why in _UNCOUNTABLE.items():
        if body.get(key) is not None:
            raise ProtocolError(f"'{key}' is not supported by the gateway: {why}", key)
    _typed(body, "stream", bool, "a boolean")
    chat = path == CHAT_PATH
    prompts, token_ids, messages = _chat_prompt(body) if chat else _completion_prompt(body)
    keys = _CHAT_LIMIT_KEYS if chat else _COMPLETION_LIMIT_KEYS
    limits = [v for v in (positive_int(body.get(k), k) for k in keys) if v is not None]
    request = LLMRequest(model=model, prompts=prompts, exact_prompt_tokens=token_ids,
                         prompt_param="messages" if chat else "prompt", messages=messages,
                         sequences_per_prompt=_sequences(body),
                         requested_max_tokens=min(limits) if limits else None, chat=body if chat else None)
    return OpenAIRequest(request, body, keys)


def error_body(message: str, *, type_: str, code: str, param: str | None = None) -> bytes:
    """OpenAI's error shape, which the openai SDK turns into its typed exceptions."""
    return orjson.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}})
