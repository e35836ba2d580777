"""ext_proc/responses_api.py: the Responses API's body as admission reads it (the prompt's text pieces, the
chat vLLM renders, the output limit), what it refuses, and the rewrite. The counts against a real vLLM:
tests/real_engines/test_vllm_more_apis.py."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from ext_proc.openai_protocol import CHAT_PATH, MAX_MESSAGES
from ext_proc.openai_protocol import parse_request as parse_chat
from ext_proc.request import ProtocolError
from ext_proc.responses_api import ResponsesRequest, parse_request
from tests.unit.test_chat_template import render


def parse(**fields: Any) -> ResponsesRequest:
    return parse_request(orjson.dumps({"model": "m", **fields}))


def refused(**fields: Any) -> ProtocolError:
    with pytest.raises(ProtocolError) as e:
        parse(**fields)
    return e.value


USER_ITEM = {"role": "user", "content": [{"type": "input_text", "text": "What is a KV cache?"}]}
CONVERSATION = [
    USER_ITEM,
    {"type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
     "content": [{"type": "output_text", "text": "Memory for attention.", "annotations": []}]},
    {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "lookup", "arguments": '{"q": "kv"}'},
    {"type": "function_call_output", "call_id": "call_1", "output": "pages of keys and values"},
    {"role": "user", "content": "Thanks."},
]


# --- the prompt -------------------------------------------------------------------------------------

def test_a_string_input_is_a_user_message_after_the_instructions() -> None:
    req = parse(input="Hello", instructions="Be terse.", max_output_tokens=64).request
    assert req.prompts == (("Be terse.", "Hello"),)
    assert req.prompt_param == "input"
    assert req.requested_max_tokens == 64
    assert req.messages == 2
    assert req.chat == {"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hello"}],
                        "add_generation_prompt": True, "continue_final_message": False,
                        "add_special_tokens": True}  # vLLM adds them to a Responses prompt (a second BOS)


def test_without_max_output_tokens_the_clamp_decides() -> None:
    assert parse(input="Hello").request.requested_max_tokens is None


def test_items_become_the_chat_vllm_builds() -> None:
    """vLLM's construct_input_messages: a function call joins the assistant message before it, its output
    is a tool message, messages with a role pass as they are."""
    chat = parse(input=CONVERSATION).request.chat
    assert chat is not None
    assert chat["messages"] == [
        USER_ITEM,
        {"role": "assistant", "content": "Memory for attention.", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "kv"}'}}]},
        {"role": "tool", "content": "pages of keys and values", "tool_call_id": "call_1"},
        {"role": "user", "content": "Thanks."},
    ]


def test_the_chat_renders_as_the_same_conversation_sent_to_chat_completions() -> None:
    """The model's template sees what it would see from the chat API: the counts agree across APIs."""
    as_chat = parse_chat(CHAT_PATH, orjson.dumps({"model": "m", "messages": [
        {"role": "system", "content": "Be terse."}, {"role": "user", "content": "What is a KV cache?"},
        {"role": "assistant", "content": "Memory for attention.", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "kv"}'}}]},
        {"role": "tool", "content": "pages of keys and values", "tool_call_id": "call_1"},
        {"role": "user", "content": "Thanks."}]})).request
    responses = parse(input=CONVERSATION, instructions="Be terse.").request
    assert responses.chat is not None and as_chat.chat is not None
    assert render(dict(responses.chat)) == render(dict(as_chat.chat))


def test_the_body_is_not_changed_by_building_the_chat() -> None:
    assistant = {"role": "assistant", "content": None, "tool_calls": [{"id": "a", "type": "function",
                                                                        "function": {"name": "f", "arguments": "{}"}}]}
    items = [USER_ITEM, assistant, {"type": "function_call", "call_id": "b", "name": "g", "arguments": "{}"}]
    parsed = parse(input=items)
    assert parsed.body["input"] == [USER_ITEM, assistant, items[2]]
    assert len(assistant["tool_calls"]) == 1
    assert parsed.request.chat is not None
    assert [c["id"] for c in parsed.request.chat["messages"][1]["tool_calls"]] == ["a", "b"]


def test_reasoning_joins_the_assistant_message() -> None:
    chat = parse(input=[USER_ITEM, {"type": "reasoning", "id": "r", "summary": [],
                                    "content": [{"type": "reasoning_text", "text": "Think."}]},
                        {"role": "assistant", "content": [{"type": "output_text", "text": "Done."}]}]).request.chat
    assert chat is not None
    assert chat["messages"][1:] == [{"role": "assistant", "reasoning": "Think.", "content": "Done."}]


def test_an_in_progress_final_assistant_message_is_continued() -> None:
    chat = parse(input=[USER_ITEM, {"type": "message", "role": "assistant", "status": "in_progress",
                                    "content": [{"type": "output_text", "text": "Once upon"}]}]).request.chat
    assert chat is not None
    assert (chat["continue_final_message"], chat["add_generation_prompt"]) == (True, False)
    assert render(dict(chat)).endswith("Once upon")


def test_function_tools_render_as_chat_tools_and_are_counted() -> None:
    tool = {"type": "function", "name": "lookup", "description": "Find it.", "strict": True,
            "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}
    req = parse(input="x", tools=[tool, {"type": "web_search"}], reasoning={"effort": "low"}).request
    assert req.chat is not None
    assert req.chat["tools"] == [{"type": "function", "function": {k: v for k, v in tool.items() if k != "type"}}]
    assert req.chat["reasoning_effort"] == "low"
    assert orjson.dumps([tool, {"type": "web_search"}]).decode() in req.prompts[0]


def test_an_item_vllm_converts_otherwise_is_estimated() -> None:
    """Encrypted reasoning (vLLM refuses it) or a built-in tool's call: no chat, the pieces and the
    per-message estimate count it."""
    for item in [{"type": "reasoning", "summary": [], "encrypted_content": "gAAAA"},
                 {"type": "web_search_call", "id": "ws", "status": "completed", "action": {"query": "kv"}}]:
        req = parse(input=[USER_ITEM, item], instructions="Be terse.").request
        assert req.chat is None
        assert req.messages == 3


def test_every_text_is_in_the_bound() -> None:
    """The pieces hold every text of the request: the bound never misses one."""
    req = parse(input=CONVERSATION, instructions="Be terse.").request
    flat = "".join(req.prompts[0])
    for text in ["Be terse.", "What is a KV cache?", "Memory for attention.", "lookup", "pages of keys and values",
                 "Thanks."]:
        assert text in flat
    assert req.prompt_bytes[0] >= sum(len(t.encode()) for t in ["Be terse.", "What is a KV cache?", "Thanks."])


def test_an_unknown_role_is_counted_as_text() -> None:
    assert parse(input=[{"role": "narrator", "content": "Once."}]).request.prompts == (("narrator", "Once."),)


# --- what is refused --------------------------------------------------------------------------------

@pytest.mark.parametrize("key,value", [("previous_response_id", "resp_123"), ("conversation", "conv_1"),
                                       ("conversation", {"id": "conv_1"}), ("prompt", {"id": "pmpt_1"})])
def test_a_prompt_held_by_the_server_is_refused(key: str, value: Any) -> None:
    e = refused(input="Next question", **{key: value})
    assert e.param == key and e.status == 400
    assert "not supported by the gateway" in str(e)


def test_previous_response_id_null_is_no_reference() -> None:
    assert parse(input="x", previous_response_id=None, store=True).request.prompts == (("x",),)


def test_an_item_reference_is_refused() -> None:
    e = refused(input=[USER_ITEM, {"type": "item_reference", "id": "msg_1"}])
    assert e.param == "input[1]"


def test_background_is_refused_and_store_is_passed_on() -> None:
    assert refused(input="x", background=True).param == "background"
    parsed = parse(input="x", background=False, store=True)
    assert parsed.body["store"] is True


@pytest.mark.parametrize("fields,param", [
    ({}, "input"),
    ({"input": 7}, "input"),
    ({"input": {"role": "user"}}, "input"),
    ({"input": ["text"]}, "input[0]"),
    ({"input": [{"type": 3}]}, "input[0]"),
    ({"input": [{"role": 3, "content": "x"}]}, "input[0]"),
    ({"input": [{"role": "user", "content": 3}]}, "input[0].content"),
    ({"input": [{"role": "user", "content": [{"text": "no type"}]}]}, "input[0].content"),
    ({"input": [{"role": "user", "content": [{"type": "input_text", "text": 5}]}]}, "input[0].content"),
    ({"input": "x", "instructions": ["x"]}, "instructions"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "x", "max_output_tokens": "64"}, "max_output_tokens"),
    ({"input": "x", "stream": "yes"}, "stream"),
    ({"input": "x", "store": 1}, "store"),
    ({"input": "x", "tools": {}}, "tools"),
    ({"input": "x", "reasoning": "high"}, "reasoning"),
])
def test_malformed_fields_are_refused_by_name(fields: dict[str, Any], param: str) -> None:
    assert refused(**fields).param == param


def test_the_model_is_required() -> None:
    with pytest.raises(ProtocolError) as e:
        parse_request(b'{"input": "x"}')
    assert e.value.param == "model"


def test_a_repeated_key_is_refused_at_any_depth() -> None:
    with pytest.raises(ProtocolError) as e:
        parse_request(b'{"model": "m", "input": [{"role": "user", "content": "a", "content": "b"}]}')
    assert e.value.param == "content"


def test_too_many_items_are_refused_before_anything_is_built() -> None:
    assert refused(input=[{"role": "user", "content": "x"}] * (MAX_MESSAGES + 1)).param == "input"


def test_a_compressed_body_is_refused() -> None:
    with pytest.raises(ProtocolError) as e:
        parse_request(orjson.dumps({"model": "m", "input": "x"}), {"content-encoding": "gzip"})
    assert e.value.status == 415


# --- the rewrite ------------------------------------------------------------------------------------

def test_the_clamp_is_written_even_when_the_client_sent_none() -> None:
    """Without one vLLM would let the response run to the end of the context."""
    rewrite = parse(input="x", stream=True).rewrite(256, "m")
    assert rewrite is not None
    assert orjson.loads(rewrite.body) == {"model": "m", "input": "x", "stream": True, "max_output_tokens": 256}


def test_the_engine_name_is_written_and_nothing_else_changes() -> None:
    body = {"model": "m", "input": CONVERSATION, "max_output_tokens": 100, "store": False, "metadata": {"k": "v"}}
    rewrite = parse_request(orjson.dumps(body)).rewrite(100, "engine")
    assert rewrite is not None
    assert orjson.loads(rewrite.body) == {**body, "model": "engine"}


def test_nothing_to_rewrite_is_none() -> None:
    assert parse(input="x", max_output_tokens=100).rewrite(100, "m") is None
