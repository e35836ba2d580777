"""The OpenAI Responses API (`POST /v1/responses`, streamed or not) as admission sees it: parse a body,
rewrite its output limit (`max_output_tokens`) and model. Pure functions over bytes; parse errors are
`ProtocolError`s naming the field.

The prompt is `instructions` and `input` (a string, or items: messages with content parts, function
calls and their outputs, reasoning), plus the tool schemas, as vLLM renders them: into an OpenAI chat
(`LLMRequest.chat`, built the way vLLM 0.32 builds it, construct_input_messages) that the model's chat
template renders exactly, and into text pieces for the upper bound.

What the gateway cannot see it cannot count, so it refuses it (docs/clients/responses.md): a
`previous_response_id`, a `conversation`, a stored `prompt`, an `item_reference`. And a `background`
response outlives the HTTP request whose end releases its reservation, so it is refused too. `store`
is passed on: storing a response holds no KV cache.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from ext_proc.openai_protocol import MAX_MESSAGES
from ext_proc.request import (LLMRequest, ProtocolError, Rewrite, at_most, identity_encoding, json_object, json_text,
                              model_name, positive_int, typed)

LIMIT_KEY = "max_output_tokens"

# Fields that name a prompt only the server holds. The gateway admits by counting the prompt; these
# would add one it never sees.
_UNSEEN = {
    "previous_response_id": "the earlier turns it names are held by the engine that answered them, where the "
                            "gateway can neither count them nor route this request (vLLM keeps none unless "
                            "started with VLLM_ENABLE_RESPONSES_API_STORE=1). Send the conversation itself: the "
                            "earlier input and output items, then the new ones, in 'input'",
    "conversation": "its items are held by the server, where the gateway cannot count them; send them in 'input'",
    "prompt": "a stored prompt template is held by OpenAI, not by the engine; send its text as 'instructions'",
}

# Roles the chat templates render in their per-message markup (the estimate's per_message_tokens);
# any other role string is rendered as text and counted.
_TEMPLATE_ROLES = frozenset({"system", "developer", "user", "assistant"})
# Content parts whose text the templates render, and the key holding it; other parts (images, files)
# are counted as their JSON.
_TEXT_KEYS = {"input_text": "text", "output_text": "text", "text": "text", "refusal": "refusal",
              "summary_text": "text", "reasoning_text": "text"}
# Item fields no template renders.
_BOOKKEEPING = frozenset({"type", "id", "status"})


@dataclass(frozen=True)
class ResponsesRequest:
    request: LLMRequest
    body: dict[str, Any]

    def rewrite(self, max_tokens: int | None, engine_model: str) -> Rewrite | None:
        """The body with `max_output_tokens` and the model set; None when it already says so. Without a
        limit of its own the engine would default to the rest of the context: the clamp is always written."""
        updates: dict[str, Any] = {}
        if max_tokens is not None and self.body.get(LIMIT_KEY) != max_tokens:
            updates[LIMIT_KEY] = max_tokens
        if engine_model != self.request.model:
            updates["model"] = engine_model
        return Rewrite(orjson.dumps({**self.body, **updates})) if updates else None


# --- the text pieces (the bound) --------------------------------------------------------------------

def _content_pieces(content: Any, param: str) -> list[str]:
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        raise ProtocolError(f"'{param}' must be a string or an array of content parts, got {type(content).__name__}",
                            param)
    pieces = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise ProtocolError(f"'{param}[{j}]' must be a content part: an object with a string 'type'", param)
        key = _TEXT_KEYS.get(part["type"])
        if key is None:
            pieces.append(json_text(part))
        elif isinstance(part.get(key), str):
            pieces.append(part[key])
        else:
            raise ProtocolError(f"'{param}[{j}].{key}' must be a string", param)
    return pieces


def _item_pieces(item: Any, i: int) -> list[str]:
    """Input item i's text: a message's role (unless the template's own) and content; any other item
    (function calls and outputs, reasoning) as the JSON of what a template may render of it."""
    param = f"input[{i}]"
    if not isinstance(item, dict) or not isinstance(item.get("type", "message"), str):
        raise ProtocolError(f"'{param}' must be an object with a string 'type'", param)
    if item.get("type") == "item_reference":
        raise ProtocolError(f"'{param}' references a stored item, which the gateway cannot count; send the item "
                            "itself", param)
    pieces: list[str] = []
    rest = {k: v for k, v in item.items() if k not in _BOOKKEEPING and v is not None}
    if "role" in item:
        role = item["role"]
        if not isinstance(role, str):
            raise ProtocolError(f"'{param}.role' must be a string", param)
        pieces += [] if role in _TEMPLATE_ROLES else [role]
        pieces += _content_pieces(item.get("content"), f"{param}.content")
        rest = {k: v for k, v in rest.items() if k not in ("role", "content")}
    if rest:
        pieces.append(json_text(rest))
    return pieces


# --- the chat vLLM renders (construct_input_messages) ---------------------------------------------

class _NotConverted(Exception):
    """An item vLLM converts in a way not reproduced here (or refuses): the estimate counts the request."""


def _text_of_assistant(item: dict[str, Any]) -> str | None:
    content = item.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content and isinstance(content[0], dict):
        text = content[0].get("text")
        return text if isinstance(text, str) else None
    return None


def _reasoning_text(item: dict[str, Any]) -> str:
    if item.get("encrypted_content"):
        raise _NotConverted  # vLLM refuses it
    for key in ("content", "summary"):
        parts = item.get(key)
        if isinstance(parts, list) and parts and isinstance(parts[0], dict) and isinstance(parts[0].get("text"), str):
            return parts[0]["text"]
    return ""


def _add_item(messages: list[dict[str, Any]], item: dict[str, Any]) -> None:
    """Item -> chat message, as vLLM's _construct_message_from_response_item: calls, reasoning and text of
    the assistant join the assistant message before them while its slot is free."""
    last = messages[-1] if messages and messages[-1].get("role") == "assistant" else None
    kind = item.get("type", "message")
    text = _text_of_assistant(item) if item.get("role") == "assistant" else None
    if kind == "function_call":
        call = {"id": item.get("call_id"), "type": "function",
                "function": {"name": item.get("name"), "arguments": item.get("arguments")}}
        calls = None if last is None else last.get("tool_calls")
        if last is not None and (calls is None or isinstance(calls, list)):
            last["tool_calls"] = [*(calls or ()), call]  # a new list: the body's own stays as sent
        else:
            messages.append({"role": "assistant", "tool_calls": [call]})
    elif kind == "function_call_output":
        messages.append({"role": "tool", "content": item.get("output"), "tool_call_id": item.get("call_id")})
    elif kind == "reasoning":
        _join_assistant(messages, last, "reasoning", _reasoning_text(item))
    elif text is not None:
        _join_assistant(messages, last, "content", text)
    elif "role" in item:
        messages.append(dict(item))  # a copy: a later item may join it
    else:
        raise _NotConverted


def _join_assistant(messages: list[dict[str, Any]], last: dict[str, Any] | None, key: str, value: Any) -> None:
    if last is not None and last.get(key) is None:
        last[key] = value
    else:
        messages.append({"role": "assistant", key: value})


def _continues_final(items: Any) -> bool:
    """vLLM continues a final assistant message (or reasoning) left in progress instead of starting a new one."""
    if not isinstance(items, list) or not items or not isinstance(items[-1], dict):
        return False
    last = items[-1]
    return last.get("type", "message") in ("message", "reasoning") and last.get("status") in ("in_progress",
                                                                                            "incomplete")


def _chat_tools(tools: list[Any]) -> list[dict[str, Any]]:
    """Function tools as chat tools (vLLM renders no other kind into the prompt)."""
    return [{"type": "function", "function": {k: v for k, v in t.items() if k != "type"}}
            for t in tools if isinstance(t, dict) and t.get("type") == "function"]


def _chat(body: dict[str, Any], items: Any) -> dict[str, Any] | None:
    """The OpenAI chat body vLLM renders for this request; None when it cannot be reproduced."""
    instructions = body.get("instructions")
    messages: list[dict[str, Any]] = [{"role": "system", "content": instructions}] if instructions else []
    if isinstance(items, str):
        messages.append({"role": "user", "content": items})
    else:
        try:
            for item in items:
                _add_item(messages, item)
        except _NotConverted:
            return None
    continues = _continues_final(items)
    # vLLM 0.32 tokenizes a Responses prompt with the tokenizer's special tokens added: Llama's BOS twice,
    # once from the template and once more (measured: one token more than the same chat). tokens.py
    # counts them when the chat asks for them.
    chat: dict[str, Any] = {"messages": messages, "add_generation_prompt": not continues,
                            "continue_final_message": continues, "add_special_tokens": True}
    tools = _chat_tools(body.get("tools") or [])
    if tools:
        chat["tools"] = tools
    reasoning = body.get("reasoning")
    if isinstance(reasoning, dict) and reasoning.get("effort") is not None:
        chat["reasoning_effort"] = reasoning["effort"]
    if body.get("chat_template_kwargs") is not None:
        chat["chat_template_kwargs"] = body["chat_template_kwargs"]
    return chat


# --- parse ------------------------------------------------------------------------------------------

def _refuse_unseen(body: dict[str, Any]) -> None:
    for key, why in _UNSEEN.items():
        if body.get(key) is not None:
            raise ProtocolError(f"'{key}' is not supported by the gateway: {why}.", key)
    if typed(body, "background", bool, "a boolean"):
        raise ProtocolError("'background' is not supported by the gateway: a background response runs on after its "
                            "HTTP request ends, and that end is what releases the KV cache it was admitted with. "
                            "Stream the response instead.", "background")


def parse_request(raw: bytes, headers: Mapping[str, str] | None = None) -> ResponsesRequest:
    identity_encoding(headers or {})
    body = json_object(raw)
    model = model_name(body)
    _refuse_unseen(body)
    for key in ("stream", "store"):
        typed(body, key, bool, "a boolean")
    instructions = typed(body, "instructions", str, "a string")
    items = body.get("input")
    pieces = [instructions] if instructions else []
    if isinstance(items, str):
        pieces.append(items)
    elif isinstance(items, list):
        at_most(len(items), MAX_MESSAGES, "input items", "input")
        for i, item in enumerate(items):
            pieces += _item_pieces(item, i)
    else:
        raise ProtocolError("'input' must be a string or an array of input items", "input")
    typed(body, "tools", list, "an array")
    typed(body, "reasoning", dict, "an object")
    typed(body, "chat_template_kwargs", dict, "an object")
    # Tool schemas render into the prompt; a text format's schema is counted too, for the servers that
    # put it there (a bound must not miss it); chat_template_kwargs as in chat.
    pieces += [json_text(body[k]) for k in ("tools", "text", "chat_template_kwargs", "previous_input_messages")
               if body.get(k)]
    chat = _chat(body, items)
    # The estimate's per-message overhead: the chat's messages, else one per item.
    messages = len(chat["messages"]) if chat is not None else len(items) + bool(instructions)
    request = LLMRequest(model=model, prompts=(tuple(pieces),), prompt_param="input", messages=messages,
                         requested_max_tokens=positive_int(body.get(LIMIT_KEY), LIMIT_KEY), chat=chat)
    return ResponsesRequest(request, body)
