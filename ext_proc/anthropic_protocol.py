"""Anthropic's Messages API (`POST /v1/messages`, streamed or not) as admission sees it: parse a body,
rewrite its output limit and model, render errors in Anthropic's shape. Pure functions over bytes; parse
errors are `ProtocolError`s naming the field.

`max_tokens` is required, as Anthropic's API and vLLM require it. The prompt is `system` (a string or
text blocks) and the messages' content (a string or blocks: text, images, tool calls and results,
thinking), plus the tool schemas, as vLLM 0.32 renders them: converted into an OpenAI chat
(`LLMRequest.chat`, as vLLM's AnthropicServingMessages.to_chat_completion_request converts it) that the
model's chat template renders exactly, and into text pieces for the upper bound.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from ext_proc.openai_protocol import MAX_MESSAGES
from ext_proc.request import (LLMRequest, ProtocolError, Rewrite, at_most, identity_encoding, is_int, json_object,
                              json_text, model_name, positive_int, typed)
from kvgate.wire import anthropic_error_type

LIMIT_KEY = "max_tokens"
# vLLM takes these roles (Anthropic's API only the first two; system ones are vLLM's extension).
_ROLES = ("user", "assistant", "system")
# Block fields no template renders.
_BOOKKEEPING = frozenset({"type", "cache_control"})
# Claude Code's per-request attribution text: vLLM drops it from system prompts (it defeats prefix caching).
_BILLING_HEADER = "x-anthropic-billing-header"


@dataclass(frozen=True)
class MessagesRequest:
    request: LLMRequest
    body: dict[str, Any]

    def rewrite(self, max_tokens: int | None, engine_model: str) -> Rewrite | None:
        """The body with `max_tokens` and the model set; None when it already says so. A thinking budget
        must stay below max_tokens (Anthropic's rule, and vLLM's): a clamp under it lowers it too."""
        updates: dict[str, Any] = {}
        if max_tokens is not None and self.body.get(LIMIT_KEY) != max_tokens:
            updates[LIMIT_KEY] = max_tokens
            thinking = self.body.get("thinking")
            if isinstance(thinking, dict) and is_int(thinking.get("budget_tokens")) \
                    and thinking["budget_tokens"] >= max_tokens:
                updates["thinking"] = {**thinking, "budget_tokens": max_tokens - 1}
        if engine_model != self.request.model:
            updates["model"] = engine_model
        return Rewrite(orjson.dumps({**self.body, **updates})) if updates else None


def error_body(status: int, code: str, message: str) -> bytes:
    """Anthropic's error shape; kvgate's own code where Anthropic puts a finer one (`details.error_code`,
    the SDK's `e.error_code`)."""
    return orjson.dumps({"type": "error", "error": {"type": anthropic_error_type(status), "message": message,
                                                    "details": {"error_code": code}}})


# --- the text pieces (the bound) --------------------------------------------------------------------

def _blocks(content: Any, param: str) -> list[dict[str, Any]]:
    """Content as blocks: a string is one text block; else an array of objects with a string `type`."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise ProtocolError(f"'{param}' must be a string or an array of content blocks", param)
    for j, block in enumerate(content):
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise ProtocolError(f"'{param}[{j}]' must be a content block: an object with a string 'type'", param)
    return content


def _block_pieces(blocks: list[dict[str, Any]], param: str) -> list[str]:
    """Text and thinking as their text; any other block (images, tool calls and results) as the JSON of
    what a template may render of it, which is never fewer bytes than the text in it."""
    pieces = []
    for j, block in enumerate(blocks):
        key = {"text": "text", "thinking": "thinking"}.get(block["type"])
        if key is None:
            rest = {k: v for k, v in block.items() if k not in _BOOKKEEPING and v is not None}
            pieces += [json_text(rest)] if rest else []
        elif isinstance(block.get(key), str):
            pieces.append(block[key])
        else:
            raise ProtocolError(f"'{param}[{j}].{key}' must be a string", param)
    return pieces


# --- the chat vLLM renders (AnthropicServingMessages.to_chat_completion_request) -------------------

class _NotConverted(Exception):
    """A block vLLM converts in a way not reproduced here, or refuses: the estimate counts the request."""


def _system_text(blocks: list[dict[str, Any]]) -> str:
    return "".join(b["text"] for b in blocks if b["type"] == "text" and b.get("text")
                   and not b["text"].startswith(_BILLING_HEADER))


def _tool_result_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    if any(isinstance(c, dict) and c.get("type") not in ("text", None) for c in content):
        raise _NotConverted  # images and tool references become messages of their own
    texts = [c.get("text", "") for c in content if isinstance(c, dict) and c.get("type") == "text"]
    if not all(isinstance(t, str) for t in texts):
        raise _NotConverted  # vLLM fails on it
    return "\n".join(texts)


def _add_message(messages: list[dict[str, Any]], role: str, content: Any) -> None:
    if role == "system":
        if isinstance(content, str):
            text = "" if content.startswith(_BILLING_HEADER) else content
        elif any(b["type"] in ("tool_addition", "tool_removal") for b in content):
            raise _NotConverted  # they change the tools vLLM renders
        else:
            text = _system_text(content)
        if text:
            messages.append({"role": "system", "content": text})
        return
    message: dict[str, Any] = {"role": role}
    if isinstance(content, str):
        messages.append({**message, "content": content})
        return
    parts: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    reasoning: list[str] = []
    for block in content:
        kind = block["type"]
        if kind == "text" and block.get("text"):
            parts.append({"type": "text", "text": block["text"]})
        elif kind == "thinking" and block.get("thinking") is not None:
            reasoning.append(block["thinking"])
        elif kind == "tool_use":
            # json.dumps, as vLLM: the template prints the arguments it parses back, not this text.
            arguments = json.dumps(block.get("input") or {})
            calls.append({"id": block.get("id") or "", "type": "function",
                          "function": {"name": block.get("name") or "", "arguments": arguments}})
        elif kind == "tool_result" and role == "user":
            # Joins the conversation before the message that carries it, as in vLLM.
            messages.append({"role": "tool", "tool_call_id": block.get("tool_use_id") or "",
                             "content": _tool_result_text(block.get("content"))})
        elif kind == "tool_result":  # in an assistant message: vLLM prints the content's Python repr
            result = str(block["content"]) if block.get("content") else ""
            parts.append({"type": "text", "text": f"Tool result: {result}"})
        elif kind not in ("text", "thinking", "redacted_thinking", "tool_reference"):
            raise _NotConverted
    if reasoning:
        message["reasoning"] = "".join(reasoning)
    if calls:
        message["tool_calls"] = calls
    if parts:
        message["content"] = parts[0]["text"] if len(parts) == 1 else parts
    if role != "user" or "content" in message:
        messages.append(message)


def _chat_tools(tools: list[Any]) -> list[dict[str, Any]]:
    out = []
    for t in tools:
        if not isinstance(t, dict) or not isinstance(t.get("input_schema"), dict):
            raise _NotConverted  # vLLM refuses it
        # vLLM adds a missing schema type at the end; templates print the schema as it is ordered.
        schema = t["input_schema"] if "type" in t["input_schema"] else {**t["input_schema"], "type": "object"}
        out.append({"type": "function", "function": {
            "name": t.get("name"), "description": t.get("description"), "parameters": schema,
            **{k: t[k] for k in ("strict", "defer_loading") if t.get(k) is not None}}})
    return out


def _chat(body: dict[str, Any], conversation: list[tuple[str, Any]]) -> dict[str, Any] | None:
    """The OpenAI chat body vLLM renders for this request; None when it cannot be reproduced."""
    messages: list[dict[str, Any]] = []
    system = body.get("system")
    # The top-level system prompt: a string as it is, the text of blocks joined; first, when not empty.
    text = system if isinstance(system, str) else _system_text(system or [])
    if text:
        messages.append({"role": "system", "content": text})
    try:
        for role, content in conversation:
            _add_message(messages, role, content)
        tools = _chat_tools(body["tools"]) if body.get("tools") is not None else None
    except _NotConverted:
        return None
    chat: dict[str, Any] = {"messages": messages}
    if tools is not None:
        chat["tools"] = tools
    effort = (body.get("output_config") or {}).get("effort")
    if (body.get("thinking") or {}).get("type") == "disabled":
        effort = "none"  # vLLM's default for a disabled thinking; it probes some templates for another
    if effort is not None:
        chat["reasoning_effort"] = effort
    if body.get("chat_template_kwargs") is not None:
        chat["chat_template_kwargs"] = body["chat_template_kwargs"]
    return chat


# --- parse ------------------------------------------------------------------------------------------

def _conversation(body: dict[str, Any]) -> list[tuple[str, Any]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ProtocolError("'messages' must be a non-empty array", "messages")
    at_most(len(messages), MAX_MESSAGES, "messages", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in _ROLES:
            raise ProtocolError(f"'messages[{i}]' must be an object with a 'role' of {', '.join(_ROLES)}",
                                f"messages[{i}]")
        if "content" not in m:
            raise ProtocolError(f"'messages[{i}].content' is required", f"messages[{i}].content")
        content = m["content"]
        out.append((m["role"], content if isinstance(content, str) else _blocks(content, f"messages[{i}].content")))
    return out


def parse_request(raw: bytes, headers: Mapping[str, str] | None = None) -> MessagesRequest:
    identity_encoding(headers or {})
    body = json_object(raw)
    model = model_name(body)
    max_tokens = positive_int(body.get(LIMIT_KEY), LIMIT_KEY)
    if max_tokens is None:
        raise ProtocolError(f"'{LIMIT_KEY}' is required", LIMIT_KEY)
    typed(body, "stream", bool, "a boolean")
    for key in ("thinking", "output_config", "chat_template_kwargs"):
        typed(body, key, dict, "an object")
    typed(body, "tools", list, "an array")
    system = None if body.get("system") is None else _blocks(body["system"], "system")
    conversation = _conversation(body)
    pieces = _block_pieces(system, "system") if system is not None else []
    for i, (_, content) in enumerate(conversation):
        pieces += [content] if isinstance(content, str) else _block_pieces(content, f"messages[{i}].content")
    # Tool schemas render into the prompt, and template kwargs as in chat.
    pieces += [json_text(body[k]) for k in ("tools", "chat_template_kwargs") if body.get(k)]
    chat = _chat(body, conversation)
    # The estimate's per-message overhead: the chat's messages (tool results add some), else one each.
    messages = len(chat["messages"]) if chat is not None else len(conversation) + (system is not None)
    request = LLMRequest(model=model, prompts=(tuple(pieces),), prompt_param="messages", messages=messages,
                         requested_max_tokens=max_tokens, chat=chat)
    return MessagesRequest(request, body)
