"""ext_proc/anthropic_protocol.py: Anthropic's Messages body as admission reads it (the prompt's text
pieces, the chat vLLM renders, the required max_tokens), what it refuses, the rewrite and the error
shape. The counts against a real vLLM: tests/real_engines/test_vllm_more_apis.py."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from ext_proc.anthropic_protocol import MessagesRequest, error_body, parse_request
from ext_proc.openai_protocol import CHAT_PATH, MAX_MESSAGES
from ext_proc.openai_protocol import parse_request as parse_chat
from ext_proc.request import ProtocolError
from tests.unit.test_chat_template import render

HELLO = [{"role": "user", "content": "Hello"}]


def parse(**fields: Any) -> MessagesRequest:
    return parse_request(orjson.dumps({"model": "m", "max_tokens": 64, **fields}))


def refused(**fields: Any) -> ProtocolError:
    with pytest.raises(ProtocolError) as e:
        parse(**fields)
    return e.value


TOOL_TURNS = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": [
        {"type": "thinking", "thinking": "Use the tool.", "signature": "sig"},
        {"type": "text", "text": "Looking it up."},
        {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"}}]},
    {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "18 C, clear"}]},
        {"type": "text", "text": "And tomorrow?"}]},
]


# --- the prompt -------------------------------------------------------------------------------------

def test_system_and_messages() -> None:
    req = parse(system="Be terse.", messages=HELLO).request
    assert req.prompts == (("Be terse.", "Hello"),)
    assert (req.prompt_param, req.requested_max_tokens, req.messages) == ("messages", 64, 2)
    assert req.chat == {"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hello"}]}


def test_system_blocks_are_joined_and_the_billing_header_left_out_as_vllm_does() -> None:
    system = [{"type": "text", "text": "x-anthropic-billing-header: cc_version=1; hash=abc"},
              {"type": "text", "text": "You are a coding agent.", "cache_control": {"type": "ephemeral"}},
              {"type": "text", "text": " Be careful."}]
    req = parse(system=system, messages=HELLO).request
    assert req.chat is not None
    assert req.chat["messages"][0] == {"role": "system", "content": "You are a coding agent. Be careful."}
    assert "x-anthropic-billing-header: cc_version=1; hash=abc" in req.prompts[0]  # the bound keeps it


def test_tool_use_and_results_become_the_chat_vllm_builds() -> None:
    """vLLM's to_chat_completion_request: a user's tool result is a tool message before that user's text;
    thinking is the assistant's reasoning; tool input is the call's arguments."""
    chat = parse(messages=TOOL_TURNS).request.chat
    assert chat is not None
    assert chat["messages"] == [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "reasoning": "Use the tool.", "content": "Looking it up.",
         "tool_calls": [{"id": "toolu_1", "type": "function",
                         "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "18 C, clear"},
        {"role": "user", "content": "And tomorrow?"},
    ]


def test_the_chat_renders_as_the_same_conversation_sent_to_chat_completions() -> None:
    as_chat = parse_chat(CHAT_PATH, orjson.dumps({"model": "m", "messages": [
        {"role": "system", "content": "Be terse."}, {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Looking it up.", "reasoning": "Use the tool.", "tool_calls": [
            {"id": "toolu_1", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "18 C, clear"},
        {"role": "user", "content": "And tomorrow?"}]})).request
    messages = parse(system="Be terse.", messages=TOOL_TURNS).request
    assert messages.chat is not None and as_chat.chat is not None
    assert render(dict(messages.chat)) == render(dict(as_chat.chat))


def test_every_text_is_in_the_bound() -> None:
    flat = "".join(parse(system="Be terse.", messages=TOOL_TURNS).request.prompts[0])
    for text in ["Be terse.", "Weather in Paris?", "Use the tool.", "Looking it up.", "weather", "Paris",
                 "18 C, clear", "And tomorrow?"]:
        assert text in flat


def test_tools_render_as_chat_tools_with_vllms_schema_default() -> None:
    city = {"properties": {"city": {"type": "string"}}}
    tools = [{"name": "weather", "description": "Now.", "input_schema": city},
             {"name": "time", "input_schema": {"type": "object"}, "strict": True}]
    req = parse(messages=HELLO, tools=tools).request
    assert req.chat is not None
    assert req.chat["tools"] == [
        {"type": "function", "function": {"name": "weather", "description": "Now.",
                                          "parameters": {**city, "type": "object"}}},
        {"type": "function", "function": {"name": "time", "description": None, "parameters": {"type": "object"},
                                          "strict": True}}]
    assert list(req.chat["tools"][0]["function"]["parameters"]) == ["properties", "type"]  # printed in this order
    assert orjson.dumps(tools).decode() in req.prompts[0]


@pytest.mark.parametrize("fields,effort", [({"output_config": {"effort": "high"}}, "high"),
                                           ({"thinking": {"type": "disabled"}}, "none"),
                                           ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, None)])
def test_reasoning_effort_for_the_template(fields: dict[str, Any], effort: str | None) -> None:
    chat = parse(messages=HELLO, **fields).request.chat
    assert chat is not None and chat.get("reasoning_effort") == effort


def test_an_image_is_counted_by_its_json_and_estimated() -> None:
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
    req = parse(system="s", messages=[{"role": "user", "content": [image, {"type": "text", "text": "What?"}]}]).request
    assert req.chat is None
    assert req.messages == 2
    assert orjson.dumps({"source": image["source"]}).decode() in req.prompts[0]


# --- what is refused --------------------------------------------------------------------------------

def test_max_tokens_is_required() -> None:
    with pytest.raises(ProtocolError) as e:
        parse_request(orjson.dumps({"model": "m", "messages": HELLO}))
    assert e.value.param == "max_tokens"


@pytest.mark.parametrize("fields,param", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": "64"}, "max_tokens"),
    ({"messages": []}, "messages"),
    ({"messages": "Hello"}, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0]"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"text": "untyped"}]}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": None}]}]}, "messages[0].content"),
    ({"messages": HELLO, "system": 3}, "system"),
    ({"messages": HELLO, "stream": "true"}, "stream"),
    ({"messages": HELLO, "tools": {"name": "x"}}, "tools"),
    ({"messages": HELLO, "thinking": "on"}, "thinking"),
])
def test_malformed_fields_are_refused_by_name(fields: dict[str, Any], param: str) -> None:
    assert refused(**fields).param == param


def test_too_many_messages_are_refused() -> None:
    assert refused(messages=HELLO * (MAX_MESSAGES + 1)).param == "messages"


def test_a_repeated_key_is_refused() -> None:
    with pytest.raises(ProtocolError) as e:
        parse_request(b'{"model": "m", "max_tokens": 64, "max_tokens": 8, "messages": []}')
    assert e.value.param == "max_tokens"


# --- the rewrite ------------------------------------------------------------------------------------

def test_the_clamp_and_the_engine_name_are_written() -> None:
    body = {"model": "m", "max_tokens": 5000, "messages": HELLO, "stream": True, "metadata": {"user_id": "u"}}
    rewrite = parse_request(orjson.dumps(body)).rewrite(1024, "engine")
    assert rewrite is not None
    assert orjson.loads(rewrite.body) == {**body, "max_tokens": 1024, "model": "engine"}


def test_a_thinking_budget_stays_below_the_clamp() -> None:
    thinking = {"type": "enabled", "budget_tokens": 4000}
    rewrite = parse(messages=HELLO, max_tokens=8000, thinking=thinking).rewrite(2048, "m")
    assert rewrite is not None
    assert orjson.loads(rewrite.body)["thinking"] == {"type": "enabled", "budget_tokens": 2047}
    kept = parse(messages=HELLO, max_tokens=8000, thinking=thinking).rewrite(6000, "m")
    assert kept is not None and orjson.loads(kept.body)["thinking"] == thinking


def test_nothing_to_rewrite_is_none() -> None:
    assert parse(messages=HELLO).rewrite(64, "m") is None


# --- errors -----------------------------------------------------------------------------------------

def test_error_body_is_anthropics_shape() -> None:
    assert orjson.loads(error_body(429, "rate_limit_exceeded", "Full.")) == {
        "type": "error", "error": {"type": "rate_limit_error", "message": "Full.",
                                   "details": {"error_code": "rate_limit_exceeded"}}}
