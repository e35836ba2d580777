"""A model's chat template, found beside its tokenizer.json and rendered the way vLLM renders it.

vLLM (0.32) turns an OpenAI chat body into a prompt with Hugging Face transformers' `apply_chat_template`:
the Jinja template from the model's files, rendered in transformers' sandboxed environment with the
tokenizer's special tokens (`bos_token`, `eos_token`, ...), then tokenized without adding special
tokens (the template writes the BOS). `render` reproduces that text, so that counting it with the
model's tokenizer gives vLLM's `usage.prompt_tokens` (docs/catalog.md, "Prompt tokens").

Where the template comes from (`read_template`), as transformers loads it: `chat_template.jinja` beside
the tokenizer, else the `chat_template` of `tokenizer_config.json` (a string, or a list of named ones
of which "default" is used, and "tool_use" when the request has tools), or an explicit file. The
catalog reads the files (kvgate check validates them); ext_proc gets the text in its ModelPolicy.

Pure functions and no I/O besides `read_template`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

CHAT_TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
# The special tokens transformers passes to every template (PreTrainedTokenizerBase.special_tokens_map).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Content parts vLLM reads as text, and the key that holds each one's text.
_TEXT_PARTS = {"text": "text", "input_text": "text", "output_text": "text", "refusal": "refusal",
               "thinking": "thinking"}
# Keys of chat_template_kwargs that vLLM refuses or takes from elsewhere: never template variables.
_NOT_TEMPLATE_KWARGS = frozenset({"chat_template", "tokenize", "return_dict", "messages", "conversation"})
# Request fields vLLM merges over chat_template_kwargs, with their defaults; None and "auto" leave a
# kwarg of the same name as it was (vLLM's merge_kwargs).
_REQUEST_KWARGS = (("add_generation_prompt", True), ("continue_final_message", False), ("documents", None),
                   ("reasoning_effort", None))
_UNSET = (None, "auto")
# transformers marks the final message with this tag to cut the rendered prompt after it.
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


class TemplateError(ValueError):
    """No usable chat template: a file unreadable or malformed, no template in it, or a Jinja syntax error."""


class Unrenderable(ValueError):
    """The request cannot be rendered as vLLM would (an image part, a template that raises on it): the
    caller falls back to its estimate. vLLM itself refuses most such requests."""


@dataclass(frozen=True)
class TemplateSource:
    """The Jinja text of a model's chat template, and the special tokens it is rendered with."""

    template: str
    special_tokens: tuple[tuple[str, str], ...] = ()  # (name, text), e.g. ("bos_token", "<|begin_of_text|>")
    tool_use_template: str = ""  # a second template for requests with tools ("tool_use"), when the model has one
    origin: str = ""  # the file it was read from (messages only)


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken {"content": ...}."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise TemplateError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise TemplateError(f"{path} is not a JSON object")
    return data


def _templates_of(config: dict[str, Any], path: Path) -> tuple[str, str]:
    """(default, tool_use) templates of a tokenizer_config.json's chat_template; "" when absent."""
    value = config.get("chat_template")
    if value is None or isinstance(value, str):
        return value or "", ""
    if isinstance(value, list) and all(isinstance(t, dict) and isinstance(t.get("template"), str) for t in value):
        named = {t.get("name"): t["template"] for t in value}
        return named.get("default", ""), named.get("tool_use", "")
    raise TemplateError(f"{path}: chat_template must be a string or a list of {{name, template}}")


def read_template(tokenizer_json: Path, explicit: Path | None = None) -> TemplateSource | None:
    """The chat template of the model whose tokenizer.json is `tokenizer_json`: `explicit` (a Jinja file,
    or a tokenizer_config.json) when given, else chat_template.jinja beside the tokenizer, else the
    template in tokenizer_config.json there; None when the folder has none. Special tokens come from
    the tokenizer_config.json (or special_tokens_map.json) beside the tokenizer, or the explicit one."""
    folder = tokenizer_json.parent
    config_path = folder / TOKENIZER_CONFIG_FILE
    if explicit is not None and explicit.suffix == ".json":
        config_path = explicit
    config = _read_json(config_path) if config_path.is_file() else {}
    if explicit is not None and explicit.suffix != ".json":
        template_path, tool_use = explicit, ""
    elif explicit is None and (folder / CHAT_TEMPLATE_FILE).is_file():
        template_path, tool_use = folder / CHAT_TEMPLATE_FILE, ""
    else:
        template, tool_use = _templates_of(config, config_path)
        if not template:
            if explicit is not None:
                raise TemplateError(f"{explicit} has no chat_template")
            return None
        return TemplateSource(template, _special_tokens(config, folder), tool_use, str(config_path))
    try:
        template = template_path.read_text()
    except OSError as e:
        raise TemplateError(f"cannot read {template_path}: {e.strerror or e}") from None
    return TemplateSource(template, _special_tokens(config, folder), tool_use, str(template_path))


def _special_tokens(config: dict[str, Any], folder: Path) -> tuple[tuple[str, str], ...]:
    # transformers' special_tokens_map: tokenizer_config.json's, completed by special_tokens_map.json.
    legacy = folder / SPECIAL_TOKENS_MAP_FILE
    extra = _read_json(legacy) if legacy.is_file() else {}
    tokens = {}
    for name in SPECIAL_TOKEN_NAMES:
        text = _token_text(config.get(name)) or _token_text(extra.get(name))
        if text is not None:
            tokens[name] = text
    return tuple(tokens.items())


# --- rendering ----------------------------------------------------------------------------------------

class _Generation(jinja2.ext.Extension):
    """transformers' {% generation %} tag (it marks assistant text for training masks): renders its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return str(caller())


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # transformers' own: Jinja's escapes HTML characters, which would change the prompt.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def compile_template(text: str) -> jinja2.Template:
    """The template in transformers' environment; raises jinja2.TemplateSyntaxError for a broken one."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(text)


def _iterates_content(template: jinja2.Template, text: str) -> bool:
    """Whether the template loops over a message's content (vLLM's "openai" content format: parts kept as
    [{"type": "text", "text": ...}]) rather than printing it as a string. vLLM reads this from the
    template's syntax tree; this checks the forms templates use: `for x in <var>['content']`,
    `<var>.content`, or a loop variable named content."""
    tree = template.environment.parse(text)
    for loop in tree.find_all(jinja2.nodes.For):
        it = loop.iter
        while isinstance(it, (jinja2.nodes.Filter, jinja2.nodes.Test)) and it.node is not None:
            it = it.node
        if isinstance(it, jinja2.nodes.Getitem) and isinstance(it.arg, jinja2.nodes.Const) \
                and it.arg.value == "content":
            return True
        if isinstance(it, jinja2.nodes.Getattr) and it.attr == "content":
            return True
        if isinstance(it, jinja2.nodes.Name) and it.name == "content":
            return True
    return False


@dataclass(frozen=True)
class ChatTemplate:
    """A compiled TemplateSource. `render(body)` is the prompt vLLM makes of an OpenAI chat body."""

    source: TemplateSource
    _compiled: dict[str, tuple[jinja2.Template, bool]] = field(default_factory=dict, init=False, compare=False,
                                                               repr=False)

    def __post_init__(self) -> None:
        for text in filter(None, (self.source.template, self.source.tool_use_template)):
            try:
                compiled = compile_template(text)
            except jinja2.TemplateSyntaxError as e:
                raise TemplateError(f"{self.source.origin or 'template'}, line {e.lineno}: {e.message}") from None
            self._compiled[text] = (compiled, _iterates_content(compiled, text))

    @cached_property
    def _special(self) -> dict[str, str]:
        return dict(self.source.special_tokens)

    def render(self, body: Mapping[str, Any]) -> str:
        """The prompt text of an OpenAI chat body (messages, tools, documents, chat_template_kwargs,
        add_generation_prompt, continue_final_message, reasoning_effort). Raises Unrenderable when vLLM
        would render it differently or not at all."""
        tools = _tools(body.get("tools"))
        text = self.source.tool_use_template if tools and self.source.tool_use_template else self.source.template
        template, parts_kept = self._compiled[text]
        messages = body.get("messages")
        if not isinstance(messages, list):
            raise Unrenderable("no messages")
        conversation = [_message(m, parts_kept) for m in messages]
        if any(m["role"] == "developer" for m in conversation) and "'developer'" not in text \
                and '"developer"' not in text:
            conversation = _developer_as_system(conversation)
        kwargs = _template_kwargs(body, tools)
        try:
            return _render(template, conversation, kwargs, self._special)
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError,
                ArithmeticError) as e:
            raise Unrenderable(f"the chat template raised {type(e).__name__}: {e}") from None


def _text_of(part: Any) -> str:
    if isinstance(part, str):
        return part
    if isinstance(part, dict) and part.get("type") in _TEXT_PARTS:
        text = part.get(_TEXT_PARTS[part["type"]])
        if isinstance(text, str):
            return text
    raise Unrenderable("a content part that is not text")


def _content(content: Any, parts_kept: bool) -> Any:
    """vLLM's message content: for a template that prints content, the text parts joined by newlines;
    for one that loops over it, the parts as {"type": "text", "text": ...} (their other fields kept)."""
    parts = [] if content is None else [content] if isinstance(content, str) else content
    if not isinstance(parts, list):
        raise Unrenderable("content that is neither text nor parts")
    if not parts_kept:
        return "\n".join(_text_of(p) for p in parts)
    return [{"type": "text", "text": _text_of(p),
             **({k: v for k, v in p.items() if k not in ("type", "text", _TEXT_PARTS.get(p["type"], "text"))}
                if isinstance(p, dict) else {})} for p in parts]


def _message(m: Any, parts_kept: bool) -> dict[str, Any]:
    """A request message as vLLM hands it to the template (chat_utils._parse_chat_message_content): role,
    content, and only the fields its role carries; tool call arguments parsed into objects."""
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise Unrenderable("a message without a role")
    role = m["role"]
    out: dict[str, Any] = {"role": role, "content": _content(m.get("content"), parts_kept)}
    if role == "assistant":
        calls = m.get("tool_calls")
        if isinstance(calls, list) and calls:
            out["tool_calls"] = [_tool_call(c) for c in calls]
        if m.get("reasoning") is not None:
            out["reasoning"] = out["reasoning_content"] = m["reasoning"]
    elif role == "tool" and "tool_call_id" in m:
        out["tool_call_id"] = m["tool_call_id"]
    for key in ("name", "task"):
        if isinstance(m.get(key), str):
            out[key] = m[key]
    if role == "developer":
        out["tools"] = m.get("tools")
    return out


def _tool_call(call: Any) -> Any:
    """Arguments sent as a JSON string become an object, as templates expect (vLLM's
    _postprocess_messages); missing, empty or not an object: {}."""
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        return call
    arguments = call["function"].get("arguments")
    if isinstance(arguments, str) and arguments:
        try:
            arguments = json.loads(arguments)
        except ValueError:
            arguments = None
    return {**call, "function": {**call["function"], "arguments": arguments if isinstance(arguments, dict) else {}}}


def _tools(tools: Any) -> list[dict[str, Any]] | None:
    """Tool schemas as vLLM passes them (its pydantic model, dumped): type, then the function's name,
    description (null when absent) and parameters, strict and defer_loading only when set."""
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise Unrenderable("tools is not a list")
    out = []
    for t in tools:
        if not isinstance(t, dict) or not isinstance(t.get("function"), dict):
            raise Unrenderable("a tool without a function")
        f = t["function"]
        function = {"name": f.get("name"), "description": f.get("description"), "parameters": f.get("parameters")}
        function.update({k: f[k] for k in ("strict", "defer_loading") if f.get(k) is not None})
        if t.get("defer_loading") is not None and "defer_loading" not in function:
            function["defer_loading"] = t["defer_loading"]
        out.append({"type": "function", "function": function,
                    **({"defer_loading": t["defer_loading"]} if t.get("defer_loading") is not None else {})})
    return out


def _developer_as_system(conversation: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A template that knows no developer role gets those messages as system ones, and every system
    message merged into one at the front when they are not already one there (vLLM's
    _convert_developer_to_system and _consolidate_system_messages)."""
    converted = [{**{k: v for k, v in m.items() if k != "tools"}, "role": "system"} if m["role"] == "developer"
                 else m for m in conversation]
    systems = [i for i, m in enumerate(converted) if m["role"] == "system"]
    if systems in ([], [0]):
        return converted
    texts = [c for m in converted if m["role"] == "system"
             if (c := m["content"] if isinstance(m["content"], str) else
                 "\n".join(p["text"] for p in m["content"] if isinstance(p, dict) and "text" in p))]
    return [{"role": "system", "content": "\n\n".join(texts)}, *(m for m in converted if m["role"] != "system")]


def _template_kwargs(body: Mapping[str, Any], tools: list[dict[str, Any]] | None) -> dict[str, Any]:
    """What vLLM passes to apply_chat_template besides the conversation: its own defaults (tools), under
    the request's chat_template_kwargs, under the request's own fields."""
    user = body.get("chat_template_kwargs")
    user = dict(user) if isinstance(user, dict) else {}
    fields = {name: body.get(name, default) for name, default in _REQUEST_KWARGS}
    if fields["reasoning_effort"] is not None and "enable_thinking" not in user:
        fields["enable_thinking"] = fields["reasoning_effort"] != "none"
    merged = {**user, **{k: v for k, v in fields.items() if v not in _UNSET}}
    return {"tools": tools, **{k: v for k, v in merged.items() if k not in _NOT_TEMPLATE_KWARGS and v not in _UNSET}}


def _render(template: jinja2.Template, conversation: list[dict[str, Any]], kwargs: dict[str, Any],
            special: dict[str, str]) -> str:
    """transformers' render_jinja_template for one conversation, continue_final_message included: the
    final message is marked, the prompt cut where the mark lands."""
    kwargs = {**special, **kwargs}
    tools, documents = kwargs.pop("tools", None), kwargs.pop("documents", None)
    add_generation_prompt = kwargs.pop("add_generation_prompt", False)
    continue_final = kwargs.pop("continue_final_message", False)
    if continue_final:
        final = conversation[-1]["content"] if conversation else None
        if not isinstance(final, str):
            raise Unrenderable("continue_final_message with a final message that is not text")
        conversation = [*conversation[:-1], {**conversation[-1], "content": final + _CONTINUE_TAG}]
    rendered = template.render(messages=conversation, tools=tools, documents=documents,
                               add_generation_prompt=add_generation_prompt, **kwargs)
    if not continue_final:
        return rendered
    at = rendered.rfind(_CONTINUE_TAG.strip())
    if at < 0:
        raise Unrenderable("the chat template dropped the final message")
    return rendered[:at] if rendered[at:at + len(_CONTINUE_TAG)] == _CONTINUE_TAG else rendered[:at].rstrip()

