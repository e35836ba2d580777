"""ext_proc/openai_protocol.py: parse OpenAI request bodies, rewrite their output limit, render errors."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from ext_proc.openai_protocol import (
    CHAT_PATH,
    COMPLETIONS_PATH,
    MAX_MESSAGES,
    MAX_PROMPTS,
    OpenAIRequest,
    error_body,
    parse_request,
)
from ext_proc.request import MAX_JSON_CONTAINERS, MAX_JSON_VALUES, ProtocolError, UnsupportedMediaType

USER = {"role": "user", "content": "hello"}


def body(**fields: Any) -> bytes:
    return orjson.dumps(fields)


def chat(*messages: dict[str, Any], **fields: Any) -> OpenAIRequest:
    return parse_request(CHAT_PATH, body(model="m", messages=list(messages) or [USER], **fields))


def completion(prompt: Any = "hello", **fields: Any) -> OpenAIRequest:
    return parse_request(COMPLETIONS_PATH, body(model="m", prompt=prompt, **fields))


def parse_error(path: str, raw: bytes) -> ProtocolError:
    with pytest.raises(ProtocolError) as e:
        parse_request(path, raw)
    return e.value


def chat_error(**fields: Any) -> ProtocolError:
    return parse_error(CHAT_PATH, body(**{"model": "m", "messages": [USER], **fields}))


def completion_error(**fields: Any) -> ProtocolError:
    return parse_error(COMPLETIONS_PATH, body(**{"model": "m", "prompt": "hi", **fields}))


def with_max_tokens(req: OpenAIRequest, max_tokens: int) -> bytes | None:
    out = req.rewrite(max_tokens, req.request.model)
    return None if out is None else out.body


def rewritten(req: OpenAIRequest, max_tokens: int) -> dict[str, Any]:
    out = with_max_tokens(req, max_tokens)
    assert out is not None
    return orjson.loads(out)


# --- chat ------------------------------------------------------------------------------------

def test_chat_parses_model_messages_and_param() -> None:
    req = chat(USER, {"role": "assistant", "content": "hi"})
    assert req.request.model == "m"
    assert req.request.messages == 2
    assert req.request.prompts == (("hello", "hi"),)  # one prompt: the contents, in order
    assert req.request.prompt_param == "messages"
    assert req.request.exact_prompt_tokens == ()
    assert req.request.sequences_per_prompt == 1
    assert req.request.requested_max_tokens is None


def test_chat_text_bytes_count_utf8() -> None:
    ascii_req = chat({"role": "user", "content": "ab"})
    chinese = chat({"role": "user", "content": "你好"})
    # Two CJK characters are 6 UTF-8 bytes, two ASCII ones 2.
    assert chinese.request.prompt_bytes[0] - ascii_req.request.prompt_bytes[0] == 4
    assert len(chinese.request.prompt_bytes) == 1


def test_chat_text_bytes_grow_with_content() -> None:
    short = chat({"role": "user", "content": "x"})
    long = chat({"role": "user", "content": "x" * 1001})
    assert long.request.prompt_bytes[0] - short.request.prompt_bytes[0] == 1000


def test_chat_counts_content_parts() -> None:
    plain = chat({"role": "user", "content": ""})
    parts = chat({"role": "user", "content": [{"type": "text", "text": "é" * 10}]})
    assert parts.request.prompt_bytes[0] - plain.request.prompt_bytes[0] >= 20


def test_chat_pieces_are_contents_and_what_templates_render() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
    req = chat({"role": "system", "content": "be brief"},
               {"role": "user", "content": [{"type": "text", "text": "look:"},
                                            {"type": "image_url", "image_url": {"url": "data:x"}}]},
               {"role": "assistant", "content": None, "tool_calls": [call]},
               {"role": "tool", "content": "42", "tool_call_id": "c1"},
               {"role": "narrator", "content": "", "name": "bob"},
               response_format={"type": "json_object"})
    assert req.request.prompts == ((
        "be brief",
        "look:", '{"type":"image_url","image_url":{"url":"data:x"}}',  # non-text parts as JSON
        orjson.dumps({"tool_calls": [call]}).decode(),
        "42", '{"tool_call_id":"c1"}',
        "narrator", "", '{"name":"bob"}',  # a role no template knows is rendered as text
        '{"type":"json_object"}',
    ),)
    assert req.request.messages == 5


def test_chat_bytes_are_the_pieces_bytes() -> None:
    req = chat({"role": "user", "content": "héllo"}, {"role": "custom", "content": "x"})
    assert req.request.prompt_bytes == (len("héllo".encode()) + len("custom") + 1,)


TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                         "parameters": {"type": "object"}}}


def test_chat_counts_tools() -> None:
    without = chat()
    with_tools = chat(tools=[TOOL])
    assert with_tools.request.prompts == (("hello", orjson.dumps([TOOL]).decode()),)
    assert with_tools.request.prompt_bytes[0] - without.request.prompt_bytes[0] >= len("get_weather") + len("Weather in a city")


def tool_with_property(prop: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {prop: {"type": "string"}}, "required": [prop]}}}


def test_chat_counts_tool_schema_property_names() -> None:
    """Chat templates render the tool JSON (keys included) into the prompt: an upper bound counts keys."""
    long_name = "p" * 300
    short = chat(tools=[tool_with_property("p")])
    long = chat(tools=[tool_with_property(long_name)])
    # The name appears twice in the rendered schema: as a key of "properties" and in "required".
    assert long.request.prompt_bytes[0] - short.request.prompt_bytes[0] >= 2 * (len(long_name) - 1)


@pytest.mark.parametrize(("fields", "expected"), [
    ({"max_tokens": 100}, 100),
    ({"max_completion_tokens": 70}, 70),
    ({"max_tokens": 100, "max_completion_tokens": 70}, 70),
    ({"max_tokens": 50, "max_completion_tokens": 70}, 50),
    ({"max_tokens": None, "max_completion_tokens": 70}, 70),
])
def test_chat_requested_max_tokens_is_the_min(fields: dict[str, Any], expected: int) -> None:
    assert chat(**fields).request.requested_max_tokens == expected


def test_chat_n() -> None:
    assert chat(n=3).request.sequences_per_prompt == 3


# --- completions -----------------------------------------------------------------------------

def test_completion_string_prompt() -> None:
    req = completion("héllo")
    assert req.request.prompts == (("héllo",),)
    assert req.request.prompt_bytes == (6,)
    assert req.request.exact_prompt_tokens == ()
    assert req.request.prompt_param == "prompt"
    assert req.request.messages == 0


def test_completion_list_of_prompts() -> None:
    req = completion(["a", "你", "abc"]).request
    assert req.prompts == (("a",), ("你",), ("abc",))
    assert req.prompt_bytes == (1, 3, 3)


def test_completion_token_ids() -> None:
    req = completion([1, 2, 3, 4])
    assert req.request.exact_prompt_tokens == (4,)
    assert req.request.prompts == ()


def test_completion_list_of_token_id_lists() -> None:
    assert completion([[1, 2], [3, 4, 5], [6]]).request.exact_prompt_tokens == (2, 3, 1)


def test_completion_max_tokens_and_n() -> None:
    req = completion(max_tokens=30, n=2)
    assert req.request.requested_max_tokens == 30
    assert req.request.sequences_per_prompt == 2


def test_completion_ignores_max_completion_tokens() -> None:
    req = completion(max_completion_tokens=5)
    assert req.request.requested_max_tokens is None
    assert req.limit_keys == ("max_tokens",)


@pytest.mark.parametrize("prompt", [None, 5, [], ["a", 1], [[]], [[1], "a"], {"text": "a"}, [True, False]])
def test_completion_bad_prompt(prompt: Any) -> None:
    assert completion_error(prompt=prompt).param == "prompt"


def test_completion_bool_in_token_id_lists_rejected() -> None:
    """A flat list of ids already refuses booleans; lists of id lists must too."""
    assert completion_error(prompt=[[1, True], [2]]).param == "prompt"


def test_completion_missing_prompt() -> None:
    assert parse_error(COMPLETIONS_PATH, body(model="m")).param == "prompt"


# --- errors common to both -------------------------------------------------------------------

@pytest.mark.parametrize("raw", [b"", b"{not json", b"[1, 2]", b'"text"', b"null", b"\xff\xfe"])
@pytest.mark.parametrize("path", [CHAT_PATH, COMPLETIONS_PATH])
def test_body_not_a_json_object(path: str, raw: bytes) -> None:
    assert parse_error(path, raw).param is None


def test_empty_body_message() -> None:
    assert "empty" in str(parse_error(CHAT_PATH, b""))


def test_invalid_json_message() -> None:
    assert "JSON" in str(parse_error(CHAT_PATH, b"{"))


@pytest.mark.parametrize("model", [None, 3, "", ["m"]])
def test_model_must_be_a_string(model: Any) -> None:
    assert chat_error(model=model).param == "model"


def test_model_missing() -> None:
    assert parse_error(CHAT_PATH, body(messages=[USER])).param == "model"


@pytest.mark.parametrize("messages", [None, "hello", {"role": "user"}, []])
def test_messages_must_be_a_non_empty_list(messages: Any) -> None:
    assert chat_error(messages=messages).param == "messages"


@pytest.mark.parametrize("bad", [{"content": "no role"}, {"role": 1, "content": "x"}, "user: hi"])
def test_message_needs_a_role(bad: Any) -> None:
    assert chat_error(messages=[USER, bad]).param == "messages[1]"


@pytest.mark.parametrize("key", ["max_tokens", "max_completion_tokens"])
@pytest.mark.parametrize("value", ["10", 10.0, 10.5, True, False, 0, -1, [10]])
def test_chat_limit_must_be_a_positive_int(key: str, value: Any) -> None:
    assert chat_error(**{key: value}).param == key


@pytest.mark.parametrize("value", ["1", 1.5, True, 0, -2])
def test_completion_max_tokens_must_be_a_positive_int(value: Any) -> None:
    assert completion_error(max_tokens=value).param == "max_tokens"


@pytest.mark.parametrize("value", ["2", 2.0, True, 0, -1])
def test_n_must_be_a_positive_int(value: Any) -> None:
    assert chat_error(n=value).param == "n"
    assert completion_error(n=value).param == "n"


def test_protocol_error_is_a_value_error_with_message() -> None:
    e = chat_error(max_tokens=0)
    assert isinstance(e, ValueError)
    assert "max_tokens" in str(e)


# --- with_max_tokens -------------------------------------------------------------------------

def test_unchanged_limit_returns_none() -> None:
    assert with_max_tokens(chat(max_tokens=100), 100) is None
    assert with_max_tokens(chat(max_tokens=100, max_completion_tokens=100), 100) is None
    assert with_max_tokens(completion(max_tokens=7), 7) is None


def test_rewrites_every_present_key() -> None:
    out = rewritten(chat(max_tokens=500, max_completion_tokens=300), 100)
    assert (out["max_tokens"], out["max_completion_tokens"]) == (100, 100)


def test_rewrites_when_only_one_of_two_keys_differs() -> None:
    out = rewritten(chat(max_tokens=100, max_completion_tokens=300), 100)
    assert (out["max_tokens"], out["max_completion_tokens"]) == (100, 100)


def test_rewrites_only_the_key_used() -> None:
    out = rewritten(chat(max_completion_tokens=300), 100)
    assert out["max_completion_tokens"] == 100
    assert "max_tokens" not in out


def test_adds_max_tokens_when_none_present() -> None:
    assert rewritten(chat(), 64)["max_tokens"] == 64
    assert rewritten(completion(), 64)["max_tokens"] == 64
    assert "max_completion_tokens" not in rewritten(chat(), 64)


def test_null_limit_counts_as_absent() -> None:
    out = rewritten(chat(max_tokens=None), 64)
    assert out["max_tokens"] == 64


def test_completion_rewrite_leaves_max_completion_tokens_alone() -> None:
    out = rewritten(completion(max_tokens=500, max_completion_tokens=500), 10)
    assert (out["max_tokens"], out["max_completion_tokens"]) == (10, 500)


def test_rewrite_keeps_other_fields() -> None:
    req = chat({"role": "user", "content": "你好 \"quoted\""}, max_tokens=500, temperature=0.2, stream=True,
               stop=["\n"], user="u-1", logit_bias={"50256": -100})
    out = rewritten(req, 10)
    assert out == {**req.body, "max_tokens": 10}


def test_rewrite_is_valid_json_bytes() -> None:
    out = with_max_tokens(completion("x", max_tokens=99, echo=False), 5)
    assert isinstance(out, bytes)
    assert orjson.loads(out)["prompt"] == "x"


def test_rewrite_does_not_change_the_parsed_request() -> None:
    req = chat(max_tokens=500)
    with_max_tokens(req, 10)
    assert req.body["max_tokens"] == 500


# --- error_body ------------------------------------------------------------------------------

def test_error_body_shape() -> None:
    out = orjson.loads(error_body("too long", type_="invalid_request_error", code="context_length_exceeded",
                                  param="messages"))
    assert out == {"error": {"message": "too long", "type": "invalid_request_error",
                             "param": "messages", "code": "context_length_exceeded"}}


def test_error_body_param_defaults_to_null() -> None:
    out = orjson.loads(error_body("busy", type_="rate_limit_error", code="rate_limit_exceeded"))
    assert out["error"]["param"] is None
    assert set(out["error"]) == {"message", "type", "param", "code"}


# --- duplicate keys: a parser differential (orjson and vLLM keep the last, Triton the first) -----

@pytest.mark.parametrize("raw", [
    b'{"model":"m","prompt":"hi","max_tokens":100000,"max_tokens":10}',
    b'{"model": "m", "prompt": "hi", "max_tokens": 100000, "max_tokens": 10}',
    b'{"model":"m","prompt":"hi","max_tokens":100000,"\\u006dax_tokens":10}',  # the same key, escaped
    # An escaped colon elsewhere balances the colon count of the repeated key: the exact check decides.
    b'{"model":"m","prompt":"\\u003a","max_tokens":100000,"max_tokens":10}',
])
def test_duplicate_top_level_key_is_refused_naming_it(raw: bytes) -> None:
    e = parse_error(COMPLETIONS_PATH, raw)
    assert e.param == "max_tokens"
    assert "twice" in str(e)


def test_duplicate_key_at_any_depth_is_refused() -> None:
    raw = b'{"model":"m","messages":[{"role":"user","content":"' + b"x" * 100_000 + b'","content":"hi"}]}'
    e = parse_error(CHAT_PATH, raw)
    assert e.param == "content"


def test_duplicate_key_in_a_large_body_is_refused() -> None:
    """Above 8 KB the counts are vectorized; above 64 KB the structure is counted first."""
    raw = body(model="m", prompt="x: " * 50_000, max_tokens=10)[:-1] + b',"max_tokens":100000}'
    assert parse_error(COMPLETIONS_PATH, raw).param == "max_tokens"


@pytest.mark.parametrize("prompt", ["\\u003a", "a\\\\u003A" * 5000, "::" * 10_000])
def test_escaped_colons_and_literal_escapes_are_no_duplicates(prompt: str) -> None:
    raw = b'{"model": "m", "prompt": "' + prompt.encode() + b'", "max_tokens": 5}'
    assert parse_request(COMPLETIONS_PATH, raw).request.requested_max_tokens == 5


def test_same_key_in_sibling_objects_is_no_duplicate() -> None:
    req = chat({"role": "user", "content": "a"}, {"role": "assistant", "content": "b"})
    assert req.request.messages == 2


# --- best_of -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("fields", "sequences"), [({"best_of": 4}, 4), ({"n": 2, "best_of": 3}, 3),
                                                   ({"n": 3, "best_of": 3}, 3), ({"n": 2, "best_of": None}, 2)])
def test_best_of_reserves_every_sequence_generated(fields: dict[str, Any], sequences: int) -> None:
    assert completion(**fields).request.sequences_per_prompt == sequences
    assert chat(**fields).request.sequences_per_prompt == sequences


@pytest.mark.parametrize("value", ["4", 4.0, True, 0, -1, [4]])
def test_best_of_must_be_a_positive_int(value: Any) -> None:
    assert completion_error(best_of=value).param == "best_of"


def test_best_of_below_n_is_refused() -> None:
    e = completion_error(n=3, best_of=2)
    assert e.param == "best_of" and "at least" in str(e)


# --- fields the engine would read differently: refused with the param --------------------------

@pytest.mark.parametrize("content", [42, {"type": "text", "text": "hi"}, [42], ["hi"], [{"type": "text", "text": 42}],
                                     [{"type": "text"}], [{"text": "no type"}], [{"type": 5, "text": "x"}], True])
def test_content_of_the_wrong_type_is_refused(content: Any) -> None:
    e = chat_error(messages=[USER, {"role": "user", "content": content}])
    assert e.param == "messages[1].content"


def test_other_content_parts_are_counted_as_json() -> None:
    audio = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
    req = chat({"role": "user", "content": [audio, {"type": "text", "text": "t"}]})
    assert req.request.prompts == ((orjson.dumps(audio).decode(), "t"),)


@pytest.mark.parametrize("value", ["true", 1, 0, [], {}])
def test_stream_must_be_a_boolean(value: Any) -> None:
    assert chat_error(stream=value).param == "stream"
    assert completion_error(stream=value).param == "stream"


@pytest.mark.parametrize("value", [True, False, None])
def test_stream_booleans_and_null_are_fine(value: Any) -> None:
    assert chat(stream=value).request.model == "m"


@pytest.mark.parametrize("field", ["chat_template", "prompt_embeds"])
def test_what_the_gateway_cannot_count_is_refused(field: str) -> None:
    e = chat_error(**{field: "{% for m in messages %}{{ m.content * 1000 }}{% endfor %}"})
    assert e.param == field
    assert "cannot count" in str(e) or "not counted" in str(e)
    assert completion_error(**{field: "x"}).param == field


def test_documents_and_template_kwargs_are_counted() -> None:
    docs = [{"title": "t", "text": "d" * 500}]
    kwargs = {"enable_thinking": False, "custom": "k" * 300}
    plain = chat().request.prompt_bytes[0]
    req = chat(documents=docs, chat_template_kwargs=kwargs)
    assert req.request.prompts == (("hello", orjson.dumps(docs).decode(), orjson.dumps(kwargs).decode()),)
    assert req.request.prompt_bytes[0] - plain >= 800


@pytest.mark.parametrize(("field", "value"), [("chat_template_kwargs", "x"), ("chat_template_kwargs", [1]),
                                              ("documents", "doc"), ("add_generation_prompt", "yes"),
                                              ("continue_final_message", 1)])
def test_rendering_fields_of_the_wrong_type_are_refused(field: str, value: Any) -> None:
    assert chat_error(**{field: value}).param == field


def test_rendering_booleans_are_fine() -> None:
    assert chat(add_generation_prompt=False, continue_final_message=True).request.prompts == (("hello",),)


def test_suffix_is_counted_with_each_text_prompt() -> None:
    assert completion(["a", "b"], suffix="END").request.prompts == (("a", "END"), ("b", "END"))


@pytest.mark.parametrize("fields", [{"suffix": 5}, {"suffix": ["x"]}])
def test_suffix_must_be_a_string(fields: dict[str, Any]) -> None:
    assert completion_error(**fields).param == "suffix"


def test_suffix_with_token_ids_is_refused() -> None:
    assert completion_error(prompt=[1, 2], suffix="x").param == "prompt"


# --- caps, checked before anything is built ------------------------------------------------------

def test_messages_cap() -> None:
    assert chat(*[USER] * MAX_MESSAGES).request.messages == MAX_MESSAGES
    e = chat_error(messages=[USER] * (MAX_MESSAGES + 1))
    assert e.param == "messages" and str(MAX_MESSAGES) in str(e)


@pytest.mark.parametrize("item", ["", [1]])
def test_prompts_cap(item: Any) -> None:
    assert len(completion([item] * MAX_PROMPTS).request.prompts or completion([item] * MAX_PROMPTS)
               .request.exact_prompt_tokens) == MAX_PROMPTS
    assert completion_error(prompt=[item] * (MAX_PROMPTS + 1)).param == "prompt"


def test_json_structure_caps_refuse_before_parsing() -> None:
    many_arrays = body(model="m", prompt="x", extra=[[]] * (MAX_JSON_CONTAINERS + 1))
    assert "arrays and objects" in str(parse_error(COMPLETIONS_PATH, many_arrays))
    many_values = body(model="m", prompt=[""] * (MAX_JSON_VALUES + 1))
    assert "values" in str(parse_error(COMPLETIONS_PATH, many_values))


def test_commas_and_brackets_inside_strings_do_not_count_against_the_caps() -> None:
    prompt = '[{"a": 1}, "b\\\\"], ' * 30_000  # > MAX_JSON_CONTAINERS brackets, escaped quotes and backslashes
    req = completion(prompt)
    assert req.request.prompts == ((prompt,),)


def test_token_ids_up_to_the_values_cap() -> None:
    assert completion([5] * (MAX_JSON_VALUES - 10)).request.exact_prompt_tokens == (MAX_JSON_VALUES - 10,)


def test_nesting_deeper_than_the_serializer_allows_is_refused() -> None:
    """Such a body parsed, and its rewrite raised (orjson writes at most 254 levels): a 500."""
    deep = b'{"model":"m","prompt":"x","metadata":' + b"[" * 300 + b"]" * 300 + b"}"
    assert "deeper" in str(parse_error(COMPLETIONS_PATH, deep))
    ok = b'{"model":"m","prompt":"x","metadata":' + b"[" * 250 + b"]" * 250 + b"}"
    assert parse_request(COMPLETIONS_PATH, ok).rewrite(5, "engine") is not None


# --- Content-Encoding ----------------------------------------------------------------------------

@pytest.mark.parametrize("encoding", ["gzip", "br", "deflate", "zstd", "gzip, identity", "identity,br", "x"])
def test_a_compressed_body_is_refused_415(encoding: str) -> None:
    with pytest.raises(UnsupportedMediaType) as e:
        parse_request(CHAT_PATH, body(model="m", messages=[USER]), {"content-encoding": encoding})
    assert (e.value.status, e.value.code) == (415, "unsupported_media_type")
    assert "uncompressed" in str(e.value)


@pytest.mark.parametrize("encoding", ["identity", "IDENTITY", "", " identity "])
def test_identity_encoding_is_fine(encoding: str) -> None:
    req = parse_request(CHAT_PATH, body(model="m", messages=[USER]), {"content-encoding": encoding})
    assert req.request.model == "m"


def test_protocol_errors_are_400_invalid_request() -> None:
    e = chat_error(max_tokens=0)
    assert (e.status, e.code) == (400, "invalid_request")


def test_a_chat_carries_its_body_for_the_chat_template() -> None:
    req = chat(max_tokens=5)
    assert req.request.chat == req.body
    assert completion().request.chat is None
