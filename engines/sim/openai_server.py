"""OpenAI-compatible HTTP front end, shaped like trtllm-serve's."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from engines.sim import generation, vllm_apis
from engines.sim.config import SimConfig
from engines.sim.engine import Chunk, EngineFull, GenRequest, RequestTooLarge, SimEngine
from engines.sim.http_common import (
    CONFIG,
    ENGINE,
    SseWriter,
    json_response,
    read_json_and_record,
    requested_reset,
    reset_after,
    setup_sim_app,
)
from engines.sim.metrics import SimMetrics
from engines.sim.records import new_records
from engines.sim.text import ModelTokenizer, block_hashes, chat_words, prompt_words
from kvgate.chat_template import Unrenderable

Json = dict[str, Any]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

METRICS = web.AppKey("metrics", SimMetrics)
# Counts prompts as vLLM does, when the simulator is given the model's tokenizer; else a token per word.
TOKENIZER = web.AppKey("tokenizer", ModelTokenizer)


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type_: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error = {"message": message, "type": type_, "param": param, "code": code}

    def response(self) -> web.Response:
        return json_response({"error": self.error}, status=self.status)


# --- request parsing -------------------------------------------------------------

_TYPE_NAMES = {
    str: "a string",
    int: "an integer",
    bool: "a boolean",
    dict: "an object",
    list: "an array",
}


def _get(body: Json, name: str, kind: type, default: Any = None) -> Any:
    """Typed optional field; an explicit null means absent, as in the OpenAI API."""
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ApiError(400, f"'{name}' must be {_TYPE_NAMES[kind]}", param=name)
    return value


def _stop(body: Json) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return tuple(stop)
    raise ApiError(400, "'stop' must be a string or an array of strings", param="stop")


def _message_text(message: Any) -> str:
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise ApiError(400, "each message must be an object with a string 'role'", param="messages")
    content = message.get("content")
    if content is None:  # e.g. an assistant turn that only carried tool calls
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        return " ".join(
            p["text"] for p in content if p.get("type") == "text" and isinstance(p.get("text"), str)
        )
    raise ApiError(
        400, "message 'content' must be a string or an array of content parts", param="messages"
    )


# A prompt as the engine sees it: its tokens (ids with a tokenizer, else words), and the key of its text.
Prompt = tuple[Sequence[Hashable], str]


def _chat_prompt(body: Json, tokenizer: ModelTokenizer | None) -> Prompt:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty array", param="messages")
    texts = [_message_text(m) for m in messages]
    if tokenizer is None:
        return chat_words((m["role"], t) for m, t in zip(messages, texts)), orjson.dumps(messages).decode()
    try:
        return tokenizer.chat_ids(body), orjson.dumps(messages).decode()
    except (Unrenderable, ValueError) as e:
        raise ApiError(400, f"chat template: {e}", param="messages") from None


def _completion_prompt(body: Json, tokenizer: ModelTokenizer | None) -> Prompt:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
        prompt = "\n".join(prompt)
    if not isinstance(prompt, str):
        raise ApiError(400, "'prompt' must be a string or an array of strings", param="prompt")
    return (prompt_words(prompt) if tokenizer is None else tokenizer.text_ids(prompt)), prompt


# --- the two dialects ------------------------------------------------------------


@dataclass(frozen=True)
class Dialect:
    """What differs between /v1/chat/completions and /v1/completions."""

    object: str
    chunk_object: str
    id_prefix: str
    default_max_tokens: int
    max_tokens_fields: tuple[str, ...]  # first present wins
    prompt: Callable[[Json, ModelTokenizer | None], Prompt]  # body -> (prompt tokens, text key)
    choice: Callable[[str], Json]  # text-carrying fields of a full choice
    delta: Callable[[str | None, bool], Json]  # (text or None on the closing chunk, first chunk?)


def _chat_delta(text: str | None, first: bool) -> Json:
    if text is None:
        return {}
    return {"role": "assistant", "content": text} if first else {"content": text}


def _choice(fields: Json, finish_reason: str | None) -> Json:
    return {"index": 0, **fields, "logprobs": None, "finish_reason": finish_reason}


CHAT = Dialect(
    object="chat.completion",
    chunk_object="chat.completion.chunk",
    id_prefix="chatcmpl-",
    # The remaining context length is unknowable without a real tokenizer and
    # model limit, so a fixed generous default stands in for it.
    default_max_tokens=1024,
    max_tokens_fields=("max_completion_tokens", "max_tokens"),
    prompt=_chat_prompt,
    choice=lambda text: {"message": {"role": "assistant", "content": text}},
    delta=lambda text, first: {"delta": _chat_delta(text, first)},
)

COMPLETIONS = Dialect(
    object="text_completion",
    chunk_object="text_completion",
    id_prefix="cmpl-",
    default_max_tokens=16,  # the OpenAI API's default
    max_tokens_fields=("max_tokens",),
    prompt=_completion_prompt,
    choice=lambda text: {"text": text},
    delta=lambda text, first: {"text": text or ""},
)


@dataclass(frozen=True)
class _Call:
    """One validated request and the envelope its response objects share."""

    dialect: Dialect
    model: str
    stream: bool
    include_usage: bool
    gen: GenRequest
    id: str
    created: int

    def envelope(self, object_: str, choices: list[Json], **extra: Any) -> Json:
        return {
            "id": self.id,
            "object": object_,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }

    def usage(self, completion_tokens: int) -> Json:
        prompt = self.gen.prompt_tokens
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt + completion_tokens,
        }


def _parse_call(body: Any, dialect: Dialect, config: SimConfig, tokenizer: ModelTokenizer | None,
                request_id: str | None) -> _Call:
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    model = _get(body, "model", str)
    if model is None:
        raise ApiError(400, "'model' is required", param="model")
    if model != config.model:
        raise ApiError(
            404, f"The model `{model}` does not exist.", param="model", code="model_not_found"
        )
    if _get(body, "n", int, 1) != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
    field = next(
        (f for f in dialect.max_tokens_fields if body.get(f) is not None),
        dialect.max_tokens_fields[0],
    )
    max_tokens = _get(body, field, int, dialect.default_max_tokens)
    if max_tokens < 1:
        raise ApiError(400, f"'{field}' must be at least 1", param=field)
    tokens, key = dialect.prompt(body, tokenizer)
    prefix = block_hashes(tokens, config.tokens_per_block) if config.prefix_caching else ()
    return _Call(
        dialect=dialect,
        model=model,
        stream=_get(body, "stream", bool, False),
        include_usage=_get(_get(body, "stream_options", dict, {}), "include_usage", bool, False),
        gen=GenRequest(len(tokens), max_tokens, _stop(body), key, prefix),
        id=dialect.id_prefix + (request_id or uuid.uuid4().hex),
        created=int(time.time()),
    )


# --- handlers --------------------------------------------------------------------


async def _complete(request: web.Request, dialect: Dialect) -> web.StreamResponse:
    body, valid = await read_json_and_record(request)
    if not valid:
        raise ApiError(400, "request body is not valid JSON")
    # vLLM names a response after the request's X-Request-Id (Envoy sends one); trtllm-serve does not.
    request_id = request.headers.get("X-Request-Id") if request.app[ENGINE].paged else None
    call = _parse_call(body, dialect, request.app[CONFIG], request.app.get(TOKENIZER), request_id)
    try:
        reset = requested_reset(request)  # a test hook; None for every ordinary request
    except ValueError as e:
        raise ApiError(400, str(e)) from None
    # run() frees the KV blocks even when the client goes away mid-stream.
    async with generation.run(request.app[ENGINE], call.gen) as chunks:
        if reset is not None:
            chunks = reset_after(request, chunks, reset)
        if call.stream:
            return await _stream(request, call, chunks)
        done = await generation.collect(chunks)
    choice = _choice(dialect.choice(done.text), done.finish_reason)
    return json_response(
        call.envelope(dialect.object, [choice], usage=call.usage(done.completion_tokens))
    )


async def _stream(
    request: web.Request, call: _Call, chunks: AsyncIterator[Chunk]
) -> web.StreamResponse:
    dialect = call.dialect
    sse = SseWriter(request)  # headers go out with the first token
    first, last = True, None
    async for last in chunks:
        if last.text or first:
            choice = _choice(dialect.delta(last.text, first), None)
            await sse.send(call.envelope(dialect.chunk_object, [choice]))
        first = False
    assert last is not None and last.finish_reason is not None
    closing = _choice(dialect.delta(None, False), last.finish_reason)
    await sse.send(call.envelope(dialect.chunk_object, [closing]))
    if call.include_usage:
        await sse.send(
            call.envelope(dialect.chunk_object, [], usage=call.usage(last.completion_tokens))
        )
    await sse.send("[DONE]")
    return await sse.finish()


def _endpoint(dialect: Dialect) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        return await _complete(request, dialect)

    return handle


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as e:
        return e.response()
    except RequestTooLarge as e:
        return ApiError(400, str(e), code="context_length_exceeded").response()
    except EngineFull as e:
        return ApiError(503, str(e), code="engine_full", type_="server_error").response()


async def _health(request: web.Request) -> web.Response:
    return web.Response()


async def _models(request: web.Request) -> web.Response:
    model = {
        "id": request.app[CONFIG].model,
        "object": "model",
        "created": 0,
        "owned_by": "kvgate-sim",
    }
    return json_response({"object": "list", "data": [model]})


async def _version(request: web.Request) -> web.Response:
    return json_response({"version": "kvgate-sim"})


async def _iteration_stats(request: web.Request) -> web.Response:
    return json_response(request.app[METRICS].iteration_stats())


async def _prometheus(request: web.Request) -> web.Response:
    return web.Response(
        body=request.app[METRICS].prometheus_text(), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


async def _vllm_prometheus(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS].vllm_text(), headers={"Content-Type": CONTENT_TYPE_LATEST})


def create_app(config: SimConfig) -> web.Application:
    """The simulator app. Serve it with handler_cancellation=True so a client that
    disconnects while its request waits in the queue gives its place back."""
    engine = SimEngine(config)
    app = web.Application(middlewares=[_errors])
    setup_sim_app(app, config, engine, new_records(config.record_limit))
    app[METRICS] = SimMetrics(engine)
    if config.tokenizer:
        app[TOKENIZER] = ModelTokenizer.load(config.tokenizer)
    app.router.add_post("/v1/chat/completions", _endpoint(CHAT))
    app.router.add_post("/v1/completions", _endpoint(COMPLETIONS))
    app.router.add_get("/health", _health)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/version", _version)
    # vLLM serves Prometheus text at /metrics, trtllm-serve its iteration stats.
    app.router.add_get("/metrics", _vllm_prometheus if engine.paged else _iteration_stats)
    app.router.add_get("/prometheus/metrics", _prometheus)
    # Responses, Anthropic's Messages, embeddings, tokenize: what vLLM serves besides chat and completions.
    vllm_apis.add_routes(app, app.get(TOKENIZER))
    return app
