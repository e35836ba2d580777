"""tensorrt_llm_bls: TensorRT-LLM's BLS shape. Each request is sent on to the engine model
(tensorrt_llm) by BLS; when decoupled, the engine's responses are streamed back as they come, and then
the final flag alone, as TensorRT-LLM's BLS model ends a streamed request (a client sees that flag only
if it asks for Triton's empty final response); else its one response is returned. The KV pool is the engine's: this
model publishes zero-valued nv_trt_llm_kv_cache_block_metrics for itself, as a model that owns no pool
may.

The stub runs BLS calls on its event loop's default executor (6 threads on 2 cores), and a decoupled
call's response iterator blocks its thread on every next(): this model gives the loop a bigger
executor, so that many requests can be in flight at once.

Triton 2.51's Python backend cannot cancel a BLS request: when a client cancels, this model stops
forwarding, and the engine's request runs to its end (its KV blocks are held until then).
"""

from __future__ import annotations

import backend_packages  # noqa: F401, I001 -- first: numpy 1.x
import parent_watch  # noqa: F401, I001 -- the stub ends with its server

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor

import triton_python_backend_utils as pb_utils

from trtllm_metrics import KV_CACHE_BLOCKS, Gauges

ENGINE = "tensorrt_llm"
INPUTS = ("text_input", "max_tokens", "stream")
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
# Requests in flight at once (each holds a thread while it waits for the engine's next response).
MAX_IN_FLIGHT = 256


def _copy(response: pb_utils.InferenceResponse) -> pb_utils.InferenceResponse:
    """The engine's response (outputs or error), to send on."""
    return pb_utils.InferenceResponse(output_tensors=response.output_tensors(),
                                      error=response.error() if response.has_error() else None)


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        self.kv_metrics = Gauges(KV_CACHE_BLOCKS, args["model_name"], args["model_version"])
        self.kv_metrics.set(dict.fromkeys(KV_CACHE_BLOCKS.types, 0))
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(json.loads(args["model_config"]))
        self.executor = ThreadPoolExecutor(max_workers=MAX_IN_FLIGHT, thread_name_prefix="bls")
        self.tasks: set[asyncio.Task[None]] = set()

    async def execute(self, requests: list[pb_utils.InferenceRequest]) -> None:
        asyncio.get_running_loop().set_default_executor(self.executor)
        for request in requests:
            task = asyncio.get_running_loop().create_task(self._forward(request))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _forward(self, request: pb_utils.InferenceRequest) -> None:
        sender = request.get_response_sender()
        inputs = [t for t in (pb_utils.get_input_tensor_by_name(request, name) for name in INPUTS) if t is not None]
        engine_request = pb_utils.InferenceRequest(model_name=ENGINE, inputs=inputs, request_id=request.request_id(),
                                                   requested_output_names=["text_output"])
        if not self.decoupled:
            sender.send(_copy(await engine_request.async_exec()), flags=FINAL)
            return
        responses = await engine_request.async_exec(decoupled=True)
        loop = asyncio.get_running_loop()
        while (response := await loop.run_in_executor(None, next, responses, None)) is not None:
            if sender.is_cancelled():
                break
            if response.has_error() or response.output_tensors():
                sender.send(_copy(response))
        sender.send(flags=FINAL)

    def finalize(self) -> None:
        for task in self.tasks:
            task.cancel()
        self.executor.shutdown(wait=False, cancel_futures=True)
