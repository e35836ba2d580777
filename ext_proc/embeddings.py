"""The OpenAI embeddings API (`POST /v1/embeddings`) as admission sees it. Pure functions over bytes;
parse errors are `ProtocolError`s naming the OpenAI `param`.

An embedding generates nothing, yet its prompt is prefilled: the engine holds the prompt's KV cache
while it runs. So it is admitted for that, and for nothing more: each input is planned as a prompt with
an output limit of 1 token, which is the prompt's own blocks on vLLM (it never writes the KV of the last
token it samples) and one token more on TensorRT-LLM. It waits for budget and is refused 429 like any
request, and counts toward a tenant's tokens per minute with its prompt. The body is never given an
output limit: only the model name is rewritten.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import Any

from ext_proc.request import (LLMRequest, ModelOnly, ProtocolError, at_most, identity_encoding, json_object, json_text,
                              model_name)

# OpenAI's own limit on inputs per request (vLLM takes more; the gateway keeps the cap on every batch).
MAX_INPUTS = 2048
# What the KV of a prefill takes, as an output limit: see the module's docstring.
PREFILL_ONLY = 1


def _is_token_ids(value: Any) -> bool:
    # Exactly int, not bool; counted in C: an input may hold 262,144 ids.
    return isinstance(value, list) and bool(value) and operator.countOf(map(type, value), int) == len(value)


def _is_conversation(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) for m in value)


def _conversations(body: dict[str, Any]) -> list[list[Any]] | None:
    """vLLM's chat embeddings: a conversation (or a batch of them) in `messages`, or in `input`."""
    value = body["messages"] if body.get("messages") is not None else body.get("input")
    if _is_conversation(value):
        return [value]
    if isinstance(value, list) and value and all(_is_conversation(c) for c in value[:MAX_INPUTS + 1]):
        return value
    if body.get("messages") is not None:
        raise ProtocolError("'messages' must be an array of messages, or of conversations", "messages")
    return None


def _prompts(body: dict[str, Any]) -> tuple[tuple[tuple[str, ...], ...], tuple[int, ...], int]:
    """Text prompts, token-id counts, and chat messages (the most of any conversation)."""
    conversations = _conversations(body)
    if conversations is not None:
        at_most(len(conversations), MAX_INPUTS, "conversations", "input")
        # A conversation's JSON bounds the text its template renders, tokens of the template aside.
        return tuple((json_text(c),) for c in conversations), (), max(map(len, conversations))
    value = body.get("input")
    if isinstance(value, str):
        return ((value,),), (), 0
    if _is_token_ids(value):
        return (), (len(value),), 0
    if isinstance(value, list) and value:
        at_most(len(value), MAX_INPUTS, "inputs", "input")
        if all(isinstance(v, str) for v in value):
            return tuple((v,) for v in value), (), 0
        if all(_is_token_ids(v) for v in value):
            return (), tuple(map(len, value)), 0
    raise ProtocolError("'input' must be a string, an array of strings, token ids, or an array of token-id arrays",
                        "input")


def parse_request(raw: bytes, headers: Mapping[str, str] | None = None) -> ModelOnly:
    """The output limit is the gateway's own bookkeeping: the body keeps none (ModelOnly)."""
    identity_encoding(headers or {})
    body = json_object(raw)
    model = model_name(body)
    prompts, token_ids, messages = _prompts(body)
    request = LLMRequest(model=model, prompts=prompts, exact_prompt_tokens=token_ids, prompt_param="input",
                         messages=messages, requested_max_tokens=PREFILL_ONLY)
    return ModelOnly(request, body)
