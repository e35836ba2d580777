"""tensorrt_llm: a CPU stand-in for TensorRT-LLM's engine model, the OWNER of the server's one paged KV
pool. Text in (TensorRT-LLM's preprocessing counts prompt tokens with the model's HF tokenizer.json,
and so does this model; one token per UTF-8 byte without one), max_tokens "words" out at a fixed
inter-token delay: one response per token when `stream` is true, else one response at the end.
Streaming needs the decoupled transaction policy; without it the model answers each request once.

Scheduling is TensorRT-LLM's GUARANTEED_NO_EVICT, first come first served: a request starts only when
the blocks of its whole sequence, ceil((prompt + max_tokens) / tokens_per_block), and a batch slot are
free; until then it waits, and those behind it wait too. Its blocks return when it ends or is
cancelled. A request that needs more blocks than the pool has is refused.

Published, for model="tensorrt_llm" only: nv_trt_llm_kv_cache_block_metrics and
nv_trt_llm_request_metrics, plus the tests' own kvgate_test_* series. Every request that passed
validation (a prompt, a max_tokens of at least 1, no stream unless decoupled) is appended to the record
file (JSON lines) when it ends, before its final response is sent.

One instance (one stub process, so one pool). `async def execute` starts a task per request on the
stub's event loop and returns: the tasks answer through the requests' response senders (decoupled or
not), so requests run concurrently.
"""

from __future__ import annotations

import backend_packages  # noqa: F401, I001 -- first: numpy 1.x and tokenizers
import parent_watch  # noqa: F401, I001 -- the stub ends with its server

import asyncio
import dataclasses
import hashlib
import json
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils
from tokenizers import Tokenizer

from trtllm_metrics import KV_CACHE_BLOCKS, REQUESTS, Gauges

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
# How often a waiting request looks whether its client has cancelled it.
CANCEL_POLL_S = 0.05


class KvPool:
    """The paged KV pool and batch slots, handed out in arrival order."""

    def __init__(self, total_blocks: int, max_batch: int, on_change: Callable[[], None]) -> None:
        self.total_blocks = total_blocks
        self.max_batch = max_batch
        self.used_blocks = 0
        self.peak_used_blocks = 0
        self.running = 0
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()
        self._on_change = on_change

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def _fits(self, blocks: int) -> bool:
        return self.running < self.max_batch and self.used_blocks + blocks <= self.total_blocks

    def _take(self, blocks: int) -> None:
        self.used_blocks += blocks
        self.peak_used_blocks = max(self.peak_used_blocks, self.used_blocks)
        self.running += 1

    def try_take(self, blocks: int) -> bool:
        """Take `blocks` and a slot now, if they are free and nobody waits."""
        if self._waiting or not self._fits(blocks):
            return False
        self._take(blocks)
        self._on_change()
        return True

    async def wait_take(self, blocks: int, cancelled: Callable[[], bool]) -> bool:
        """Wait in line for `blocks` and a slot; False if `cancelled()` while waiting."""
        entry = (blocks, asyncio.get_running_loop().create_future())
        self._waiting.append(entry)
        self._on_change()
        while not entry[1].done():
            await asyncio.wait([entry[1]], timeout=CANCEL_POLL_S)
            if not entry[1].done() and cancelled():
                self._waiting.remove(entry)
                self._admit()
                self._on_change()
                return False
        return True

    def release(self, blocks: int) -> None:
        self.used_blocks -= blocks
        self.running -= 1
        self._admit()
        self._on_change()

    def _admit(self) -> None:
        while self._waiting and self._fits(self._waiting[0][0]):
            blocks, ready = self._waiting.popleft()
            self._take(blocks)
            ready.set_result(None)


class RequestError(Exception):
    """A request this engine refuses: sent back as the request's error response."""


@dataclass
class Job:
    """One request, as the record file shows it."""

    request_id: str
    prompt: str
    prompt_sha256: str
    prompt_tokens: int
    max_tokens: int
    stream: bool
    blocks: int
    arrived: float = field(default_factory=time.time)
    waited: bool = False
    started: float | None = None
    ended: float | None = None
    generated: int = 0
    outcome: str = ""  # finished | cancelled | refused | failed
    error: str = ""


def _text_response(text: str) -> pb_utils.InferenceResponse:
    return pb_utils.InferenceResponse(
        output_tensors=[pb_utils.Tensor("text_output", np.array([[text.encode()]], dtype=np.object_))])


def _error_response(message: str) -> pb_utils.InferenceResponse:
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message))


def _token_text(index: int) -> str:
    """The index-th generated "word"; the words of a sequence concatenate to its text."""
    return f"w{index}" if index == 0 else f" w{index}"


def _scalar(request: pb_utils.InferenceRequest, name: str) -> object | None:
    """The one element of an input of shape [1, 1] (batch of one), or None if the input is absent."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    values = tensor.as_numpy()
    if values.size != 1:
        raise RequestError(f"{name}: one sequence per request, got shape {list(values.shape)}")
    return values.item()


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        parameters = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.tokens_per_block = int(parameters["tokens_per_block"])
        self.inter_token_s = float(parameters["inter_token_ms"]) / 1000
        self.tokenizer = Tokenizer.from_file(parameters["tokenizer_json"]) if parameters["tokenizer_json"] else None
        self.add_special_tokens = parameters["add_special_tokens"] == "true"
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)
        self.record_file = Path(parameters["record_file"]) if parameters["record_file"] else None
        labels = {"model": args["model_name"], "version": args["model_version"]}
        self.kv_metrics = Gauges(KV_CACHE_BLOCKS, **labels)
        self.request_metrics = Gauges(REQUESTS, **labels)
        self.metric_families: list[pb_utils.MetricFamily] = []
        self.peak_metric = self._metric("kvgate_test_peak_used_blocks", "Most KV blocks ever in use at once",
                                        pb_utils.MetricFamily.GAUGE, labels)
        self.started_metric = self._metric("kvgate_test_requests_started_total", "Requests given their KV blocks",
                                           pb_utils.MetricFamily.COUNTER, labels)
        self.waited_metric = self._metric("kvgate_test_requests_waited_total",
                                          "Requests that found their KV blocks or a batch slot taken and waited",
                                          pb_utils.MetricFamily.COUNTER, labels)
        self.refused_metric = self._metric("kvgate_test_requests_refused_total",
                                           "Requests refused: invalid, or more KV blocks than the pool has",
                                           pb_utils.MetricFamily.COUNTER, labels)
        self.context = 0  # started requests that have not produced their first token yet
        self.pool = KvPool(int(parameters["pool_blocks"]), config["max_batch_size"], self._publish)
        self.tasks: set[asyncio.Task[None]] = set()
        self._publish()

    def _metric(self, name: str, description: str, kind: int, labels: dict[str, str]) -> pb_utils.Metric:
        family = pb_utils.MetricFamily(name=name, description=description, kind=kind)
        self.metric_families.append(family)  # kept: a Metric whose family object is gone can no longer be set
        return family.Metric(labels=labels)

    def _publish(self) -> None:
        pool = self.pool
        self.kv_metrics.set({"max": pool.total_blocks, "used": pool.used_blocks,
                             "free": pool.total_blocks - pool.used_blocks, "tokens_per": self.tokens_per_block,
                             "fraction": pool.used_blocks / pool.total_blocks})
        self.request_metrics.set({"waiting": pool.waiting, "scheduled": pool.running, "active": pool.running,
                                  "max": pool.max_batch, "context": self.context})
        self.peak_metric.set(pool.peak_used_blocks)

    async def execute(self, requests: list[pb_utils.InferenceRequest]) -> None:
        for request in requests:
            task = asyncio.get_running_loop().create_task(self._serve(request))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    def _job(self, request: pb_utils.InferenceRequest) -> Job:
        raw = _scalar(request, "text_input")
        max_tokens = _scalar(request, "max_tokens")
        assert isinstance(raw, bytes) and isinstance(max_tokens, int)  # Triton checked the datatypes
        try:
            prompt = raw.decode()
        except UnicodeDecodeError as e:
            raise RequestError(f"text_input is not UTF-8: {e}") from None
        if max_tokens < 1:
            raise RequestError(f"max_tokens must be at least 1, got {max_tokens}")
        stream = bool(_scalar(request, "stream"))
        if stream and not self.decoupled:
            raise RequestError("streaming needs a decoupled model; this tensorrt_llm is not decoupled")
        tokens = (len(self.tokenizer.encode(prompt, add_special_tokens=self.add_special_tokens).ids)
                  if self.tokenizer else len(raw))
        return Job(request_id=request.request_id(), prompt=prompt, prompt_sha256=hashlib.sha256(raw).hexdigest(),
                   prompt_tokens=tokens, max_tokens=max_tokens, stream=stream,
                   blocks=math.ceil((tokens + max_tokens) / self.tokens_per_block))

    async def _serve(self, request: pb_utils.InferenceRequest) -> None:
        sender = request.get_response_sender()
        job = None
        try:
            job = self._job(request)
            if job.blocks > self.pool.total_blocks:
                raise RequestError(f"the sequence needs {job.blocks} KV blocks ({job.prompt_tokens} prompt tokens + "
                                   f"{job.max_tokens} max_tokens), the pool has {self.pool.total_blocks}")
            final = await self._run(job, sender)
        except RequestError as e:
            self.refused_metric.increment(1)
            if job:
                job.outcome, job.error = "refused", str(e)
            final = _error_response(str(e))
        except Exception as e:  # a bug here must answer the client, not leave its request hanging
            message = f"tensorrt_llm failed: {type(e).__name__}: {e}"
            pb_utils.Logger.log_error(message)
            if job:
                job.outcome, job.error = "failed", message
            final = _error_response(message)
        # Recorded (and its blocks back in the pool) before the client can see the request end.
        if job:
            self._record(job)
        sender.send(final, flags=FINAL)

    async def _run(self, job: Job, sender: pb_utils.InferenceResponseSender) -> pb_utils.InferenceResponse | None:
        """Wait for the blocks, generate, give the blocks back; the request's final response."""
        if not self.pool.try_take(job.blocks):
            job.waited = True
            self.waited_metric.increment(1)
            if not await self.pool.wait_take(job.blocks, sender.is_cancelled):
                job.outcome = "cancelled"
                return None
        job.started = time.time()
        self.started_metric.increment(1)
        self.context += 1
        try:
            return await self._generate(job, sender)
        finally:
            if job.generated == 0:
                self.context -= 1
            self.pool.release(job.blocks)

    async def _generate(self, job: Job, sender: pb_utils.InferenceResponseSender) -> pb_utils.InferenceResponse | None:
        """Send every token's response but the last (streaming); the final response, None if cancelled."""
        for index in range(job.max_tokens):
            await asyncio.sleep(self.inter_token_s)
            if sender.is_cancelled():
                job.outcome = "cancelled"
                return None
            job.generated += 1
            if index == 0:
                self.context -= 1
                self._publish()
            if job.stream and index < job.max_tokens - 1:
                sender.send(_text_response(_token_text(index)))
        job.outcome = "finished"
        if job.stream:
            return _text_response(_token_text(job.max_tokens - 1))
        return _text_response("".join(map(_token_text, range(job.max_tokens))))

    def _record(self, job: Job) -> None:
        job.ended = time.time()
        if self.record_file:
            with self.record_file.open("a") as f:
                f.write(json.dumps(dataclasses.asdict(job)) + "\n")

    def finalize(self) -> None:
        for task in self.tasks:
            task.cancel()
