"""Triton's gRPC front, `inference.GRPCInferenceService`, for the TensorRT-LLM ensemble.

Unary RPCs report errors as gRPC status codes. ModelStreamInfer serves each
incoming ModelInferRequest as a generation of its own, concurrently with the
others on the stream, and reports a request's error in-band
(ModelStreamInferResponse.error_message) without ending the stream.

Final-response flag, as Triton 2.51 sends it (for decoupled models and the others
alike): every streamed response carries the bool parameter `triton_final_response`, true on the last
response of a request. The simulated model sends its final flag with its last response, as
TensorRT-LLM's engine and ensemble do, so `triton_enable_empty_final_response` (tritonclient's
`async_stream_infer(..., enable_empty_final_response=True)`) changes nothing here: measured on the
real Triton, an empty final response comes only from a model that sends the flag alone (TensorRT-LLM's
BLS model).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from typing import Any

import grpc
from google.protobuf.json_format import ParseDict
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

from engines.sim import generation
from engines.sim.config import SimConfig
from engines.sim.engine import EngineFull, RequestTooLarge, SimEngine
from engines.sim.records import Records, record
from engines.sim.triton_model import (
    MODEL_VERSION,
    OUTPUTS,
    TritonCall,
    TritonError,
    call_from_tensors,
    check_model,
    model_config,
    model_metadata,
    record_body,
    server_metadata,
    tensor_output,
)
from engines.sim.triton_tensors import TensorError, decode_grpc_inputs, encode_grpc_outputs

SERVICE = "/inference.GRPCInferenceService/"
INFER_PATH = SERVICE + "ModelInfer"
STREAM_INFER_PATH = SERVICE + "ModelStreamInfer"
FINAL_RESPONSE = "triton_final_response"

CODES = {
    TritonError.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    TritonError.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    TritonError.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
}

Metadata = Iterable[tuple[str, Any]]


def _as_triton_error(error: Exception) -> TritonError:
    if isinstance(error, TritonError):
        return error
    if isinstance(error, EngineFull):
        return TritonError(TritonError.UNAVAILABLE, str(error))
    return TritonError(TritonError.INVALID, str(error))  # TensorError, RequestTooLarge


_REQUEST_ERRORS = (TritonError, TensorError, EngineFull, RequestTooLarge)


class TritonGrpcService(service_pb2_grpc.GRPCInferenceServiceServicer):
    """The servicer for grpc.aio; RPCs it does not implement answer UNIMPLEMENTED."""

    def __init__(self, config: SimConfig, engine: SimEngine, records: Records) -> None:
        self._config = config
        self._engine = engine
        self._records = records

    # --- health and metadata --------------------------------------------------------

    async def ServerLive(
        self, request: service_pb2.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> service_pb2.ServerLiveResponse:
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: service_pb2.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> service_pb2.ServerReadyResponse:
        return service_pb2.ServerReadyResponse(ready=True)

    async def ServerMetadata(
        self, request: service_pb2.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> service_pb2.ServerMetadataResponse:
        return ParseDict(server_metadata(), service_pb2.ServerMetadataResponse())

    async def ModelReady(
        self, request: service_pb2.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> service_pb2.ModelReadyResponse:
        try:
            check_model(self._config.model, request.name, request.version)
        except TritonError:
            return service_pb2.ModelReadyResponse(ready=False)
        return service_pb2.ModelReadyResponse(ready=True)

    async def ModelMetadata(
        self, request: service_pb2.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> service_pb2.ModelMetadataResponse:
        await self._check_model_or_abort(request.name, request.version, context)
        return ParseDict(model_metadata(request.name), service_pb2.ModelMetadataResponse())

    async def ModelConfig(
        self, request: service_pb2.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> service_pb2.ModelConfigResponse:
        await self._check_model_or_abort(request.name, request.version, context)
        config = model_config(request.name, self._config.max_batch)
        return service_pb2.ModelConfigResponse(
            config=ParseDict(config, model_config_pb2.ModelConfig())
        )

    async def _check_model_or_abort(
        self, name: str, version: str, context: grpc.aio.ServicerContext
    ) -> None:
        try:
            check_model(self._config.model, name, version)
        except TritonError as e:
            await context.abort(CODES[e.kind], e.message)

    # --- inference -------------------------------------------------------------------

    async def ModelInfer(
        self, request: service_pb2.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> service_pb2.ModelInferResponse:
        """The whole generation in one response, whatever the `stream` input says."""
        try:
            call = self._accept(request, INFER_PATH, context.invocation_metadata() or ())
            done = await generation.complete(self._engine, call.gen)
            return self._response(request, done.text)
        except _REQUEST_ERRORS as e:
            error = _as_triton_error(e)
            await context.abort(CODES[error.kind], error.message)  # raises

    async def ModelStreamInfer(
        self,
        request_iterator: AsyncIterator[service_pb2.ModelInferRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[service_pb2.ModelStreamInferResponse]:
        """Serves the stream's requests concurrently, interleaving their responses.

        The stream ends once the client has half-closed it and every request has
        been answered. When the client cancels it, every generation on it is
        cancelled, which frees their KV blocks.
        """
        metadata = tuple(context.invocation_metadata() or ())
        responses: asyncio.Queue[service_pb2.ModelStreamInferResponse | None] = asyncio.Queue()
        tasks: set[asyncio.Task[None]] = set()

        async def serve(request: service_pb2.ModelInferRequest) -> None:
            try:
                async for response in self._stream_one(request, metadata):
                    responses.put_nowait(response)
            except _REQUEST_ERRORS as e:
                responses.put_nowait(self._stream_error(request, _as_triton_error(e).message))
            except Exception as e:  # a bug must not hang the stream
                responses.put_nowait(self._stream_error(request, f"internal error: {e!r}"))

        async def read() -> None:
            try:
                async for request in request_iterator:
                    task = asyncio.create_task(serve(request))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                while tasks:
                    await asyncio.wait(set(tasks))
            finally:
                responses.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (response := await responses.get()) is not None:
                yield response
            await reader  # surfaces a failure to read the request stream
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()

    async def _stream_one(
        self, request: service_pb2.ModelInferRequest, metadata: Metadata
    ) -> AsyncIterator[service_pb2.ModelStreamInferResponse]:
        call = self._accept(request, STREAM_INFER_PATH, metadata)
        async with generation.run(self._engine, call.gen) as chunks:
            if call.stream:  # decoupled: a response per token
                async for chunk in chunks:
                    yield self._stream_response(request, chunk.text, chunk.finish_reason is not None)
            else:
                done = await generation.collect(chunks)
                yield self._stream_response(request, done.text, True)

    # --- helpers ---------------------------------------------------------------------

    def _accept(
        self, request: service_pb2.ModelInferRequest, path: str, metadata: Metadata
    ) -> TritonCall:
        """Records the request, then validates it (model first, as Triton does)."""
        try:
            inputs = decode_grpc_inputs(request)
        except TensorError as e:
            record(self._records, path, metadata, record_body(request.model_name, None, str(e)))
            check_model(self._config.model, request.model_name, request.model_version)
            raise
        record(self._records, path, metadata, record_body(request.model_name, inputs))
        check_model(self._config.model, request.model_name, request.model_version)
        known = {name for name, _ in OUTPUTS}
        for output in request.outputs:
            if output.name not in known:
                raise TritonError(
                    TritonError.INVALID,
                    f"unexpected inference output '{output.name}' for model "
                    f"'{request.model_name}'",
                )
        return call_from_tensors(request.model_name, inputs)

    def _response(self, request: service_pb2.ModelInferRequest, text: str) -> service_pb2.ModelInferResponse:
        response = service_pb2.ModelInferResponse(
            model_name=request.model_name, model_version=MODEL_VERSION, id=request.id
        )
        outputs, raw = encode_grpc_outputs([tensor_output(text)])
        response.outputs.extend(outputs)
        response.raw_output_contents.extend(raw)
        return response

    def _stream_response(
        self, request: service_pb2.ModelInferRequest, text: str, final: bool
    ) -> service_pb2.ModelStreamInferResponse:
        response = self._response(request, text)
        response.parameters[FINAL_RESPONSE].bool_param = final
        return service_pb2.ModelStreamInferResponse(infer_response=response)

    def _stream_error(
        self, request: service_pb2.ModelInferRequest, message: str
    ) -> service_pb2.ModelStreamInferResponse:
        """As Triton 2.51 answers one request of a stream: the id always; the model and the final
        flag only when the model exists (an unknown model's error carries neither)."""
        if request.model_name != self._config.model:
            return service_pb2.ModelStreamInferResponse(
                error_message=message, infer_response=service_pb2.ModelInferResponse(id=request.id)
            )
        error = service_pb2.ModelStreamInferResponse(
            error_message=message,
            infer_response=service_pb2.ModelInferResponse(
                model_name=request.model_name, model_version=MODEL_VERSION, id=request.id
            ),
        )
        error.infer_response.parameters[FINAL_RESPONSE].bool_param = True
        return error


def add_to_server(service: TritonGrpcService, server: grpc.aio.Server) -> None:
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(service, server)
