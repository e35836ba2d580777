"""kvgate/chat_template.py: where a model's chat template is found, and the prompt it renders from an
OpenAI chat body, as vLLM 0.32 renders it (tests/real_engines/test_vllm_gateway.py checks the counts
against the real engine)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench.tokens import LLAMA3_TEMPLATE
from kvgate.chat_template import ChatTemplate, TemplateError, TemplateSource, Unrenderable, read_template

# Llama 3's shape, as the tiny test model ships it (engines/real/tiny_llama.py).
LLAMA3 = LLAMA3_TEMPLATE
SPECIAL = (("bos_token", "<s>"), ("eos_token", "</s>"))


def render(body: dict[str, Any], template: str = LLAMA3, **source: Any) -> str:
    return ChatTemplate(TemplateSource(template, SPECIAL, **source)).render(body)


def user(content: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": content}]}


# --- finding the template -------------------------------------------------------------------------

@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "tokenizer.json").write_text("{}")
    return tmp_path


def config(folder: Path, **fields: Any) -> None:
    (folder / "tokenizer_config.json").write_text(json.dumps(fields))


def test_tokenizer_config_template_and_special_tokens(folder: Path) -> None:
    config(folder, chat_template="T", bos_token="<s>", eos_token={"content": "</s>", "lstrip": False})
    assert read_template(folder / "tokenizer.json") == TemplateSource(
        "T", (("bos_token", "<s>"), ("eos_token", "</s>")), "", str(folder / "tokenizer_config.json"))


def test_chat_template_jinja_wins_over_tokenizer_config_as_transformers_loads_them(folder: Path) -> None:
    config(folder, chat_template="old", bos_token="<s>")
    (folder / "chat_template.jinja").write_text("new")
    source = read_template(folder / "tokenizer.json")
    assert source is not None and (source.template, source.special_tokens) == ("new", (("bos_token", "<s>"),))


def test_named_templates_give_the_default_and_the_tool_use_one(folder: Path) -> None:
    config(folder, chat_template=[{"name": "default", "template": "D"}, {"name": "tool_use", "template": "U"}])
    source = read_template(folder / "tokenizer.json")
    assert source is not None and (source.template, source.tool_use_template) == ("D", "U")


def test_special_tokens_map_fills_in_what_the_config_lacks(folder: Path) -> None:
    config(folder, chat_template="T", bos_token="<s>")
    (folder / "special_tokens_map.json").write_text(json.dumps({"eos_token": "</s>", "bos_token": "<ignored>"}))
    source = read_template(folder / "tokenizer.json")
    assert source is not None and source.special_tokens == (("bos_token", "<s>"), ("eos_token", "</s>"))


def test_an_explicit_file_is_used(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    config(folder, chat_template="beside", bos_token="<s>")
    elsewhere = tmp_path_factory.mktemp("t")
    (elsewhere / "mine.jinja").write_text("J")
    (elsewhere / "tokenizer_config.json").write_text(json.dumps({"chat_template": "C", "bos_token": "<b>"}))
    jinja = read_template(folder / "tokenizer.json", elsewhere / "mine.jinja")
    assert jinja is not None and (jinja.template, jinja.special_tokens) == ("J", (("bos_token", "<s>"),))
    cfg = read_template(folder / "tokenizer.json", elsewhere / "tokenizer_config.json")
    assert cfg is not None and (cfg.template, cfg.special_tokens) == ("C", (("bos_token", "<b>"),))


def test_no_template_beside_the_tokenizer_is_none(folder: Path) -> None:
    assert read_template(folder / "tokenizer.json") is None
    config(folder, bos_token="<s>")
    assert read_template(folder / "tokenizer.json") is None


@pytest.mark.parametrize(("name", "text"), [("tokenizer_config.json", "{not json"),
                                            ("tokenizer_config.json", "[1]"),
                                            ("tokenizer_config.json", '{"chat_template": 7}')])
def test_malformed_files_are_template_errors(folder: Path, name: str, text: str) -> None:
    (folder / name).write_text(text)
    with pytest.raises(TemplateError):
        read_template(folder / "tokenizer.json")


def test_an_explicit_config_without_a_template_is_an_error(folder: Path) -> None:
    config(folder, bos_token="<s>")
    with pytest.raises(TemplateError, match="no chat_template"):
        read_template(folder / "tokenizer.json", folder / "tokenizer_config.json")


def test_a_syntax_error_names_the_file_and_line() -> None:
    with pytest.raises(TemplateError, match=r"mine.jinja, line 2"):
        ChatTemplate(TemplateSource("ok\n{% if %}", origin="mine.jinja"))


# --- rendering ------------------------------------------------------------------------------------

def test_llama3_shape_with_the_generation_prompt() -> None:
    body = {"messages": [{"role": "system", "content": "  Be terse. "}, {"role": "user", "content": "Hi"}]}
    assert render(body) == ("<s><|start_header_id|>system<|end_header_id|>\n\nBe terse.<|eot_id|>"
                            "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                            "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_add_generation_prompt_is_the_request_field_not_the_template_kwarg() -> None:
    """vLLM merges the request's own fields over chat_template_kwargs: its default (true) wins."""
    assert render({**user("Hi"), "add_generation_prompt": False}).endswith("Hi<|eot_id|>")
    assert render({**user("Hi"), "chat_template_kwargs": {"add_generation_prompt": False}}).endswith("\n\n")


def test_text_parts_are_joined_by_newlines_for_a_template_that_prints_content() -> None:
    parts = [{"type": "text", "text": "a"}, {"type": "input_text", "text": "b"}, {"type": "refusal", "refusal": "c"}]
    assert "\n\na\nb\nc<|eot_id|>" in render(user(parts))
    assert "user<|end_header_id|>\n\n<|eot_id|>" in render(user(None))


def test_a_template_that_loops_over_content_gets_the_parts() -> None:
    looping = "{% for m in messages %}{% for p in m['content'] %}[{{ p.type }}:{{ p.text }}]{% endfor %}{% endfor %}"
    assert render(user("x"), looping) == "[text:x]"
    assert render(user([{"type": "text", "text": "y"}, "z"]), looping) == "[text:y][text:z]"


def test_a_part_that_is_not_text_cannot_be_rendered() -> None:
    with pytest.raises(Unrenderable):
        render(user([{"type": "image_url", "image_url": {"url": "http://x"}}]))


def test_tool_calls_get_their_arguments_parsed_and_other_fields_dropped() -> None:
    template = "{% for m in messages %}{{ m | tojson }}\n{% endfor %}"
    body = {"messages": [
        {"role": "assistant", "content": None, "extra": 1, "tool_calls": [
            {"id": "1", "type": "function", "function": {"name": "f", "arguments": '{"a": "<b>"}'}},
            {"id": "2", "type": "function", "function": {"name": "g", "arguments": "not json"}}]},
        {"role": "tool", "tool_call_id": "1", "content": "42", "name": "f"}]}
    first, second, _ = render(body, template).split("\n")
    assert json.loads(first) == {"role": "assistant", "content": "", "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": {"a": "<b>"}}},
        {"id": "2", "type": "function", "function": {"name": "g", "arguments": {}}}]}
    assert '"<b>"' in first  # transformers' tojson: no HTML escaping
    assert json.loads(second) == {"role": "tool", "content": "42", "tool_call_id": "1", "name": "f"}


def test_tools_are_passed_as_vllm_dumps_them() -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}, "x": 1}},
             {"type": "function", "function": {"name": "g", "description": "d", "strict": True}}]
    out = render({**user("hi"), "tools": tools}, "{{ tools | tojson }}")
    assert json.loads(out) == [
        {"type": "function", "function": {"name": "f", "description": None, "parameters": {"type": "object"}}},
        {"type": "function", "function": {"name": "g", "description": "d", "parameters": None, "strict": True}}]


def test_requests_with_tools_use_the_tool_use_template() -> None:
    assert render({**user("hi"), "tools": []}, "D", tool_use_template="U") == "D"  # no tools in it
    assert render({**user("hi"), "tools": [{"type": "function", "function": {"name": "f"}}]}, "D",
                  tool_use_template="U") == "U"


def test_developer_messages_become_one_leading_system_message_for_a_template_without_them() -> None:
    template = "{% for m in messages %}{{ m.role }}={{ m.content }};{% endfor %}"
    body = {"messages": [{"role": "user", "content": "u"}, {"role": "developer", "content": "d"},
                         {"role": "system", "content": "s"}]}
    assert render(body, template) == "system=d\n\ns;user=u;"
    assert render({"messages": [{"role": "developer", "content": "d"}, {"role": "user", "content": "u"}]},
                  template) == "system=d;user=u;"
    knows = template + "{# 'developer' #}"
    assert render(body, knows) == "user=u;developer=d;system=s;"


def test_continue_final_message_cuts_the_prompt_open() -> None:
    body = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "The answer is"}],
            "continue_final_message": True, "add_generation_prompt": False}
    assert render(body).endswith("<|start_header_id|>assistant<|end_header_id|>\n\nThe answer is")


def test_template_kwargs_and_special_tokens_reach_the_template() -> None:
    template = "{{ bos_token }}|{{ eos_token }}|{{ flavour }}|{{ enable_thinking }}|{{ documents | length }}"
    body = {**user("hi"), "chat_template_kwargs": {"flavour": "mint", "eos_token": "E"}, "reasoning_effort": "low",
            "documents": [{"title": "t", "text": "x"}]}
    assert render(body, template) == "<s>|E|mint|True|1"


@pytest.mark.parametrize("template", ["{{ raise_exception('roles must alternate') }}", "{{ messages[5].content }}x",
                                      "{{ 1 / 0 }}"])
def test_a_template_that_fails_on_a_request_is_unrenderable(template: str) -> None:
    with pytest.raises(Unrenderable):
        render(user("hi"), template)


def test_the_generation_tag_renders_its_body() -> None:
    assert render(user("hi"), "{% generation %}G{{ messages | length }}{% endgeneration %}") == "G1"
