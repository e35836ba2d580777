"""The APIs vLLM serves besides chat and completions, on the simulator's engine: OpenAI's Responses
(`/v1/responses`), Anthropic's Messages (`/v1/messages`, `/v1/messages/count_tokens`), embeddings
(`/v1/embeddings`, as a vLLM pooling model would: the prompt is prefilled, its KV cache held meanwhile),
and vLLM's `/tokenize` and `/detokenize`. Shapes as vLLM 0.32 answers them, errors in each API's own
convention, streams as server-sent events with their event names (the anthropic SDK needs them).

Prompts are counted from their text: messages of role and text rendered by the model's chat template
when the simulator has its tokenizer (exact for text-only requests), else a token per word.
"""

from __future__ import annotations

import time
import uuid
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from engines.sim import generation
from engines.sim.engine import Chunk, EngineFull, GenRequest, RequestTooLarge
from engines.sim.http_common import CONFIG, ENGINE, SseWriter, json_response, read_json_and_record
from engines.sim.text import VOCAB, ModelTokenizer, count_chat_tokens, count_prompt_tokens
from kvgate.chat_template import Unrenderable

Json = dict[str, Any]
# The default output limit when a Responses request names none (vLLM's is the rest of the context).
DEFAULT_MAX_OUTPUT = 1024
EMBEDDING_DIMENSIONS = 8


class _Refused(Exception):
    """A request the simulated engine refuses; `body` is the error in the API's own shape."""

    def __init__(self, status: int, body: Json) -> None:
        super().__init__(str(body))
        self.status = status
        self.body = body


def _openai_error(status: int, message: str, param: str | None = None) -> _Refused:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return _Refused(status, {"error": {"message": message, "type": kind, "param": param, "code": status}})


def _anthropic_error(status: int, message: str, param: str | None = None) -> _Refused:
    """vLLM's Anthropic errors (which name no field: `param` is for the shared signature)."""
    kind = {404: "not_found_error", 503: "overloaded_error"}.get(status, "invalid_request_error")
    return _Refused(status, {"type": "error", "error": {"type": kind, "message": message}})


Errors = Callable[..., _Refused]  # (status, message, param=None) -> the error in an API's shape


class _EventWriter(SseWriter):
    async def event(self, name: str, data: Json) -> None:
        """A named event, `event:` then `data:`, as vLLM sends both APIs' events (the anthropic SDK needs them)."""
        if not self.response.prepared:
            await self.response.prepare(self._request)
        await self.response.write(b"event: " + name.encode() + b"\n")
        await self.send(data)


def _text(content: Any) -> str:
    """The text of a content: a string, or the text of its parts or blocks (others carry none here)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(t for p in content if isinstance(p, dict) for t in (p.get("text"), p.get("thinking"))
                         if isinstance(t, str))
    return ""


def _count(messages: list[tuple[str, str]], tokenizer: ModelTokenizer | None, error: Errors) -> int:
    if tokenizer is None:
        return count_chat_tokens(text for _, text in messages)
    try:
        return tokenizer.chat({"messages": [{"role": r, "content": t} for r, t in messages]})
    except (Unrenderable, ValueError) as e:
        raise error(400, f"chat template: {e}") from None


@dataclass(frozen=True)
class _Call:
    body: Json
    model: str
    gen: GenRequest
    stream: bool
    id: str


async def _read(request: web.Request, error: Errors) -> Json:
    body, valid = await read_json_and_record(request)
    if not valid or not isinstance(body, dict):
        raise error(400, "request body must be a JSON object")
    served = request.app[CONFIG].model
    if body.get("model") != served:
        raise error(404, f"The model `{body.get('model')}` does not exist.")
    return body


def _limit(body: Json, key: str, default: int | None, error: Errors) -> int:
    value = body.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise error(400, f"'{key}' must be a positive integer", key)
    return value


async def _run(request: web.Request, call: _Call, error: Errors,
               stream: Callable[[_EventWriter, _Call, AsyncIterator[Chunk]], Awaitable[None]],
               whole: Callable[[_Call, generation.Completion], Json]) -> web.StreamResponse:
    """Generate, streamed or whole; the engine's refusals in the API's shape (before any byte is sent)."""
    try:
        async with generation.run(request.app[ENGINE], call.gen) as chunks:
            if not call.stream:
                return json_response(whole(call, await generation.collect(chunks)))
            sse = _EventWriter(request)
            await stream(sse, call, chunks)
            return await sse.finish()
    except RequestTooLarge as e:
        raise error(400, str(e)) from None
    except EngineFull as e:
        raise error(503, str(e)) from None


# --- OpenAI's Responses ----------------------------------------------------------------------------

def _responses_messages(body: Json) -> list[tuple[str, str]]:
    items = body.get("input")
    messages = [("system", body["instructions"])] if isinstance(body.get("instructions"), str) else []
    if isinstance(items, str):
        return [*messages, ("user", items)]
    if not isinstance(items, list):
        raise _openai_error(400, "'input' must be a string or an array of items", "input")
    for item in items:
        if isinstance(item, dict):
            role = item.get("role") or ("tool" if item.get("type") == "function_call_output" else "assistant")
            messages.append((role, _text(item.get("content", item.get("output", item.get("arguments"))))))
    return messages


def _response(call: _Call, text: str | None, done: generation.Completion | None) -> Json:
    """The response object: in progress (no text yet), or done."""
    item: Json = {"id": f"msg_{call.id}", "type": "message", "role": "assistant",
                  "status": "completed" if done else "in_progress",
                  "content": [] if text is None else [{"type": "output_text", "text": text, "annotations": []}]}
    out: Json = {"id": f"resp_{call.id}", "object": "response", "created_at": int(time.time()), "model": call.model,
                 "status": "in_progress", "output": [item] if done else [], "max_output_tokens": call.gen.max_tokens,
                 "instructions": call.body.get("instructions"), "tools": [], "tool_choice": "auto",
                 "parallel_tool_calls": True, "store": False, "incomplete_details": None, "usage": None}
    if done is not None:
        out["status"] = "incomplete" if done.finish_reason == "length" else "completed"
        if done.finish_reason == "length":
            out["incomplete_details"] = {"reason": "max_output_tokens"}
        prompt = call.gen.prompt_tokens
        out["usage"] = {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0},
                        "output_tokens": done.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                        "total_tokens": prompt + done.completion_tokens}
    return out


async def _responses_stream(sse: _EventWriter, call: _Call, chunks: AsyncIterator[Chunk]) -> None:
    seq = iter(range(1 << 62))
    item_id = f"msg_{call.id}"
    at = {"item_id": item_id, "output_index": 0, "content_index": 0}

    async def emit(kind: str, **fields: Any) -> None:
        await sse.event(kind, {"type": kind, "sequence_number": next(seq), **fields})

    started = _response(call, None, None)
    await emit("response.created", response=started)
    await emit("response.in_progress", response=started)
    await emit("response.output_item.added", output_index=0,
               item={"id": item_id, "type": "message", "role": "assistant", "status": "in_progress", "content": []})
    await emit("response.content_part.added", **at, part={"type": "output_text", "text": "", "annotations": []})
    text, last = [], None
    async for last in chunks:
        if last.text:
            text.append(last.text)
            await emit("response.output_text.delta", **at, delta=last.text, logprobs=[])
    assert last is not None and last.finish_reason is not None
    done = generation.Completion("".join(text), last.completion_tokens, last.finish_reason)
    final = _response(call, done.text, done)
    part = final["output"][0]["content"][0]
    await emit("response.output_text.done", **at, text=done.text, logprobs=[])
    await emit("response.content_part.done", **at, part=part)
    await emit("response.output_item.done", output_index=0, item=final["output"][0])
    # vLLM ends with response.completed whatever the status (OpenAI's API sends response.incomplete).
    await emit("response.completed", response=final)


async def _responses(request: web.Request) -> web.StreamResponse:
    error = _openai_error
    body = await _read(request, error)
    prompt = _count(_responses_messages(body), request.app.get(_TOKENIZER), error)
    gen = GenRequest(prompt, _limit(body, "max_output_tokens", DEFAULT_MAX_OUTPUT, error), (), orjson.dumps(
        body.get("input")).decode())
    call = _Call(body, body["model"], gen, body.get("stream") is True, uuid.uuid4().hex)
    return await _run(request, call, error, _responses_stream, lambda c, done: _response(c, done.text, done))


# --- Anthropic's Messages --------------------------------------------------------------------------

_STOP_REASONS = {"length": "max_tokens", "stop": "stop_sequence"}


def _anthropic_messages(body: Json) -> list[tuple[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _anthropic_error(400, "'messages' must be a non-empty array")
    system = body.get("system")
    out = [("system", _text(system))] if system else []
    return out + [(m.get("role", "user"), _text(m.get("content"))) for m in messages if isinstance(m, dict)]


def _message(call: _Call, done: generation.Completion) -> Json:
    return {"id": f"msg_{call.id}", "type": "message", "role": "assistant", "model": call.model,
            "content": [{"type": "text", "text": done.text}], "stop_reason": _STOP_REASONS[done.finish_reason],
            "stop_sequence": None,
            "usage": {"input_tokens": call.gen.prompt_tokens, "output_tokens": done.completion_tokens}}


async def _messages_stream(sse: _EventWriter, call: _Call, chunks: AsyncIterator[Chunk]) -> None:
    start = {"id": f"msg_{call.id}", "type": "message", "role": "assistant", "model": call.model, "content": [],
             "stop_reason": None, "stop_sequence": None,
             "usage": {"input_tokens": call.gen.prompt_tokens, "output_tokens": 0}}
    await sse.event("message_start", {"type": "message_start", "message": start})
    await sse.event("content_block_start",
                 {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})
    await sse.event("ping", {"type": "ping"})
    last = None
    async for last in chunks:
        if last.text:
            await sse.event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                      "delta": {"type": "text_delta", "text": last.text}})
    assert last is not None and last.finish_reason is not None
    await sse.event("content_block_stop", {"type": "content_block_stop", "index": 0})
    await sse.event("message_delta", {"type": "message_delta", "usage": {"output_tokens": last.completion_tokens},
                                        "delta": {"stop_reason": _STOP_REASONS[last.finish_reason],
                                                  "stop_sequence": None}})
    await sse.event("message_stop", {"type": "message_stop"})


async def _messages(request: web.Request) -> web.StreamResponse:
    error = _anthropic_error
    body = await _read(request, error)
    if "max_tokens" not in body:
        raise error(400, "max_tokens: Field required")
    stop = body.get("stop_sequences") or ()
    prompt = _count(_anthropic_messages(body), request.app.get(_TOKENIZER), error)
    gen = GenRequest(prompt, _limit(body, "max_tokens", None, error), tuple(s for s in stop if isinstance(s, str)),
                     orjson.dumps(body.get("messages")).decode())
    call = _Call(body, body["model"], gen, body.get("stream") is True, uuid.uuid4().hex)
    return await _run(request, call, error, _messages_stream, _message)


async def _count_tokens(request: web.Request) -> web.Response:
    body = await _read(request, _anthropic_error)
    return json_response({"input_tokens": _count(_anthropic_messages(body), request.app.get(_TOKENIZER),
                                                 _anthropic_error)})


# --- embeddings and the tokenizer ------------------------------------------------------------------

def _inputs(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value
    raise _openai_error(400, "'input' must be a string or an array of strings", "input")


async def _embeddings(request: web.Request) -> web.Response:
    """Each input is prefilled (one token generated: its blocks are held meanwhile), then embedded."""
    body = await _read(request, _openai_error)
    tokenizer = request.app.get(_TOKENIZER)
    data, total = [], 0
    for i, text in enumerate(_inputs(body.get("input"))):
        tokens = count_prompt_tokens(text) if tokenizer is None else tokenizer.text(text)
        try:
            await generation.complete(request.app[ENGINE], GenRequest(tokens, 1, (), text))
        except RequestTooLarge as e:
            raise _openai_error(400, str(e), "input") from None
        except EngineFull as e:
            raise _openai_error(503, str(e)) from None
        vector = [((zlib.crc32(text.encode()) >> k) & 0xFF) / 255 for k in range(EMBEDDING_DIMENSIONS)]
        data.append({"object": "embedding", "index": i, "embedding": vector})
        total += tokens
    return json_response({"object": "list", "model": body["model"], "data": data,
                          "usage": {"prompt_tokens": total, "total_tokens": total}})


def _token_ids(text: str, tokenizer: ModelTokenizer | None) -> list[int]:
    if tokenizer is not None:
        return tokenizer.tokenizer.encode(text).ids
    return [VOCAB.index(w) if w in VOCAB else len(VOCAB) for w in text.split()]


async def _tokenize(request: web.Request) -> web.Response:
    body = await _read(request, _openai_error)
    tokenizer = request.app.get(_TOKENIZER)
    if isinstance(body.get("messages"), list):
        text = "\n".join(_text(m.get("content")) for m in body["messages"] if isinstance(m, dict))
    elif isinstance(body.get("prompt"), str):
        text = body["prompt"]
    else:
        raise _openai_error(400, "'prompt' or 'messages' is required", "prompt")
    ids = _token_ids(text, tokenizer)
    config = request.app[CONFIG]
    return json_response({"count": len(ids), "max_model_len": config.kv_blocks * config.tokens_per_block,
                          "tokens": ids, "token_strs": None})


async def _detokenize(request: web.Request) -> web.Response:
    body = await _read(request, _openai_error)
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
        raise _openai_error(400, "'tokens' must be an array of integers", "tokens")
    tokenizer = request.app.get(_TOKENIZER)
    words = tokenizer.tokenizer.decode(tokens) if tokenizer else " ".join(VOCAB[t % len(VOCAB)] for t in tokens)
    return json_response({"prompt": words})


@web.middleware
async def _refusals(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                    ) -> web.StreamResponse:
    try:
        return await handler(request)
    except _Refused as e:
        return json_response(e.body, status=e.status)


_TOKENIZER: web.AppKey[ModelTokenizer] = web.AppKey("vllm_apis_tokenizer", ModelTokenizer)


def add_routes(app: web.Application, tokenizer: ModelTokenizer | None) -> None:
    """Serve these APIs on `app` (the OpenAI personality's), counting with `tokenizer` when given."""
    if tokenizer is not None:
        app[_TOKENIZER] = tokenizer
    app.middlewares.append(_refusals)
    app.router.add_post("/v1/responses", _responses)
    app.router.add_post("/v1/messages", _messages)
    app.router.add_post("/v1/messages/count_tokens", _count_tokens)
    app.router.add_post("/v1/embeddings", _embeddings)
    app.router.add_post("/tokenize", _tokenize)
    app.router.add_post("/detokenize", _detokenize)
