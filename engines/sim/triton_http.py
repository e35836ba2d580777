"""Triton's HTTP/REST front (KServe v2 plus the generate extension) for the
TensorRT-LLM ensemble.

Every route under /v2/models/{m} is also served under /v2/models/{m}/versions/{v}.
Errors have Triton's shape, `{"error": "message"}`. Prometheus metrics are at
GET /metrics on this port; a real Triton serves them on a port of their own (8002).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from engines.sim import generation
from engines.sim.config import SimConfig
from engines.sim.engine import EngineFull, RequestTooLarge, SimEngine
from engines.sim.http_common import (
    CONFIG,
    ENGINE,
    RECORDS,
    SseWriter,
    json_response,
    read_json_and_record,
    setup_sim_app,
)
from engines.sim.metrics import TritonMetrics
from engines.sim.records import Records, record
from engines.sim.triton_model import (
    MODEL_VERSION,
    OUTPUTS,
    TritonError,
    call_from_generate,
    call_from_tensors,
    check_model,
    model_config,
    model_metadata,
    record_body,
    server_metadata,
    tensor_output,
)
from engines.sim.triton_tensors import (
    HEADER_LENGTH,
    TensorError,
    decode_http_request,
    encode_http_response,
    requested_outputs,
    wants_binary,
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

METRICS = web.AppKey("triton_metrics", TritonMetrics)

STATUS = {TritonError.INVALID: 400, TritonError.NOT_FOUND: 404, TritonError.UNAVAILABLE: 503}


def _error(status: int, message: str) -> web.Response:
    return json_response({"error": message}, status=status)


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except TritonError as e:
        return _error(STATUS[e.kind], e.message)
    except TensorError as e:
        return _error(400, str(e))
    except RequestTooLarge as e:
        return _error(400, str(e))
    except EngineFull as e:
        return _error(503, str(e))


def _model(request: web.Request) -> str:
    """The model the path names, after checking it is the served one."""
    name = request.match_info["model"]
    check_model(request.app[CONFIG].model, name, request.match_info.get("version", ""))
    return name


# --- health and metadata ------------------------------------------------------------


async def _ok(request: web.Request) -> web.Response:
    return web.Response()


async def _server_metadata(request: web.Request) -> web.Response:
    return json_response(server_metadata())


async def _model_ready(request: web.Request) -> web.Response:
    _model(request)
    return web.Response()


async def _model_metadata(request: web.Request) -> web.Response:
    return json_response(model_metadata(_model(request)))


async def _model_config(request: web.Request) -> web.Response:
    return json_response(model_config(_model(request), request.app[CONFIG].max_batch))


async def _metrics(request: web.Request) -> web.Response:
    return web.Response(
        body=request.app[METRICS].prometheus_text(), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


# --- generate extension ---------------------------------------------------------------


async def _generate(request: web.Request) -> web.Response:
    """One response with the whole text; a true `stream` input changes nothing here."""
    body, valid = await read_json_and_record(request)
    model = _model(request)
    if not valid:
        raise TritonError(TritonError.INVALID, "failed to parse the request JSON buffer")
    call = call_from_generate(model, body)
    done = await generation.complete(request.app[ENGINE], call.gen)
    return json_response(
        {"model_name": model, "model_version": MODEL_VERSION, "text_output": done.text}
    )


async def _generate_stream(request: web.Request) -> web.StreamResponse:
    """SSE, `data: {"model_name", "model_version", "text_output"}` per response.

    With a true `stream` input the ensemble is decoupled: one event per token.
    Without it, one event with the whole text, as TensorRT-LLM answers then. The
    stream simply ends afterwards; there is no [DONE] event.
    """
    body, valid = await read_json_and_record(request)
    model = _model(request)
    if not valid:
        raise TritonError(TritonError.INVALID, "failed to parse the request JSON buffer")
    call = call_from_generate(model, body)
    sse = SseWriter(request)  # headers go out with the first event

    def event(text: str) -> dict[str, str]:
        return {"model_name": model, "model_version": MODEL_VERSION, "text_output": text}

    async with generation.run(request.app[ENGINE], call.gen) as chunks:
        if call.stream:
            async for chunk in chunks:
                await sse.send(event(chunk.text))
        else:
            await sse.send(event((await generation.collect(chunks)).text))
    return await sse.finish()


# --- KServe v2 infer -------------------------------------------------------------------


async def _infer(request: web.Request) -> web.Response:
    """KServe v2 inference, JSON tensors or the binary tensor extension."""
    name = request.match_info["model"]
    records = request.app[RECORDS]
    raw = await request.read()
    try:
        decoded = decode_http_request(raw, request.headers.get(HEADER_LENGTH))
    except TensorError as e:
        record(records, request.path, request.headers.items(), record_body(name, None, str(e)))
        _model(request)  # an unknown model is reported before a malformed request
        raise
    record(records, request.path, request.headers.items(), record_body(name, decoded.inputs))
    model = _model(request)
    wanted = requested_outputs(decoded.header) or {}  # none named: all of them
    known = {n for n, _ in OUTPUTS}
    for output in wanted:
        if output not in known:
            raise TritonError(
                TritonError.INVALID, f"unexpected inference output '{output}' for model '{model}'"
            )
    call = call_from_tensors(model, decoded.inputs)
    done = await generation.complete(request.app[ENGINE], call.gen)
    tensor = tensor_output(done.text)
    outputs = [(tensor, wants_binary(decoded.header, wanted.get(tensor.name, {})))]
    data, header_length = encode_http_response(model, MODEL_VERSION, decoded.id, outputs)
    if header_length is None:
        return web.Response(body=data, content_type="application/json")
    return web.Response(
        body=data,
        content_type="application/octet-stream",
        headers={HEADER_LENGTH: str(header_length)},
    )


def create_triton_app(config: SimConfig, engine: SimEngine, records: Records) -> web.Application:
    """Triton's HTTP front on a shared engine and record log (the gRPC front uses the
    same ones). Serve it with handler_cancellation=True, so a client that goes away
    frees its KV blocks."""
    app = web.Application(middlewares=[_errors])
    setup_sim_app(app, config, engine, records)
    app[METRICS] = TritonMetrics(engine)
    app.router.add_get("/v2/health/live", _ok)
    app.router.add_get("/v2/health/ready", _ok)
    app.router.add_get("/v2", _server_metadata)
    for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        app.router.add_get(prefix, _model_metadata)
        app.router.add_get(prefix + "/ready", _model_ready)
        app.router.add_get(prefix + "/config", _model_config)
        app.router.add_post(prefix + "/generate", _generate)
        app.router.add_post(prefix + "/generate_stream", _generate_stream)
        app.router.add_post(prefix + "/infer", _infer)
    app.router.add_get("/metrics", _metrics)
    return app
