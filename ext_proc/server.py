"""The ExternalProcessor gRPC service: one stream per HTTP request, held open until it ends.

Flow per stream: request headers (which API? apis.py) -> request body (parse, plan, reserve:
_decide) -> stream end (release). Envoy half-closes the stream when the downstream request finishes
or is aborted (DESIGN.md §3), so the `finally` below is "the request is over", however it ended.
A gRPC bidi stream (ModelStreamInfer) arrives in STREAMED chunks, each message decided on its own.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc
import structlog

from envoy.service.ext_proc.v3 import external_processor_pb2_grpc
from envoy.service.ext_proc.v3.external_processor_pb2 import HttpBody, HttpHeaders, ProcessingRequest, ProcessingResponse
from ext_proc import admission, apis, responses, triton_grpc
from ext_proc.apis import Call, Convention
from ext_proc.ledger import Ledgers, Reservation
from ext_proc.metrics import Decisions
from ext_proc.policy import Policy
from ext_proc.request import ProtocolError, Rewrite
from ext_proc.triton_http import BINARY_HEADER


@dataclass
class PolicyTable:
    """Current policies by model name; `loaded` stays False until the first xDS update arrives."""

    ledgers: Ledgers
    policies: dict[str, Policy] = field(default_factory=dict)
    loaded: bool = False

    def replace(self, policies: list[Policy]) -> None:
        for p in policies:
            self.ledgers.set_capacity(p.name, p.budget_bytes)
        self.policies = {p.name: p for p in policies}
        self.loaded = True


@dataclass
class _Request:
    headers: dict[str, str] = field(default_factory=dict)
    path: str = ""
    convention: Convention = Convention.OPENAI
    call: Call | None = None
    # One per admitted request; a gRPC stream carries many, all released when it ends.
    reservations: list[Reservation] = field(default_factory=list)
    # A gRPC stream: the model its first message routed it to, the bytes of a frame still
    # arriving, and the chunks Envoy sent before that first message completed.
    stream_model: str | None = None
    stream_rest: bytes = b""
    unanswered_chunks: int = 0


@dataclass(frozen=True)
class _Admitted:
    model: str
    max_tokens: int | None  # None: a lookup, nothing to clamp
    rewrite: Rewrite | None


# The request headers admission reads; Envoy 1.40 sends values as raw_value.
_WANTED = frozenset({":path", ":method", "content-type", "x-request-id", BINARY_HEADER})


def _headers(headers: HttpHeaders) -> dict[str, str]:
    return {h.key: h.raw_value.decode() if h.raw_value else h.value
            for h in headers.headers.headers if h.key in _WANTED}


def _not_found(model: str, policy: Policy | None) -> str:
    if policy is None:
        return f"The model {model!r} does not exist."
    return f"The model {model!r} is served over the {policy.protocol} protocol; use that API for it."


@dataclass
class ExtProcServicer(external_processor_pb2_grpc.ExternalProcessorServicer):
    table: PolicyTable
    decisions: Decisions
    # Backstop for a stream end that never comes: above Envoy's upstream timeout.
    reservation_ttl_s: float = 900.0
    # Envoy caps it with the filter's max_message_timeout (xds_server settings).
    stream_first_message_timeout_s: float = 60.0
    clock: Callable[[], float] = time.monotonic
    log: structlog.typing.FilteringBoundLogger = field(
        default_factory=lambda: structlog.get_logger(component="ext_proc"))

    async def Process(self, request_iterator: AsyncIterator[ProcessingRequest],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[ProcessingResponse]:
        req = _Request()
        try:
            async for msg in request_iterator:
                kind = msg.WhichOneof("request")
                if kind == "request_headers":
                    replies = self._on_headers(msg.request_headers, req)
                elif kind == "request_body":
                    replies = self._on_body(msg.request_body, req)
                else:
                    continue
                for reply in replies:
                    yield reply
        finally:
            now = self.clock()
            for r in req.reservations:
                ledger = self.table.ledgers.get(r.key)
                if ledger is not None:
                    ledger.release(r, now)

    def _refuse(self, req: _Request, model: str, r: admission.Refusal) -> list[ProcessingResponse]:
        self.decisions.record(model, r.code)
        return [responses.refuse(r, req.convention)]

    def _on_headers(self, headers: HttpHeaders, req: _Request) -> list[ProcessingResponse]:
        req.headers = _headers(headers)
        req.path = req.headers.get(":path", "").partition("?")[0]
        req.convention = apis.convention_for(req.path, req.headers.get("content-type", ""))
        req.call = apis.match(req.path, req.headers.get("content-type", ""))
        if req.call is None:
            return self._refuse(req, "", admission.Refusal(404, "unknown_url", f"Unknown request URL: {req.path}. "
                                                           "The gateway admits the OpenAI API, Triton's generate and "
                                                           "KServe v2 infer over HTTP, and Triton's gRPC inference."))
        req.convention = req.call.api.convention
        if req.headers.get(":method") != "POST":
            return self._refuse(req, "", admission.Refusal(405, "method_not_allowed", f"{req.path} takes POST"))
        if headers.end_of_stream:
            return self._refuse(req, "", admission.Refusal(400, "invalid_request", "request body is empty"))
        # A stream's route depends on its first message: the headers are answered once it arrives,
        # and a client may open a stream well before it sends anything.
        if req.call.api.streaming:
            return [responses.wait_longer(self.stream_first_message_timeout_s)]
        return [responses.CONTINUE_HEADERS]

    def _on_body(self, body: HttpBody, req: _Request) -> list[ProcessingResponse]:
        assert req.call is not None  # a refused call ends at its headers
        if req.call.api.streaming:
            return self._on_stream_message(body, req)
        decided = self._decide(req, body.body)
        if isinstance(decided, list):
            return decided
        return [responses.admit(decided.model, decided.max_tokens, decided.rewrite)]

    def _on_stream_message(self, body: HttpBody, req: _Request) -> list[ProcessingResponse]:
        """A chunk of a bidi gRPC stream (STREAMED body): frames may span chunks, and until the first
        message has named the model, neither the headers nor any chunk can be answered."""
        try:
            messages, req.stream_rest = triton_grpc.split_frames(req.stream_rest + body.body)
            if body.end_of_stream and req.stream_rest:
                raise ProtocolError("the stream ended inside a gRPC frame")
        except ProtocolError as e:
            return self._refuse(req, "", admission.Refusal(400, "invalid_request", str(e)))
        routed = req.stream_model is not None
        out = []
        for message in messages:
            decided = self._decide(req, message)
            if isinstance(decided, list):
                return decided  # a refusal ends the whole stream: gRPC has no per-message status
            if req.stream_model is not None and decided.model != req.stream_model:
                return self._refuse(req, decided.model, admission.Refusal(
                    400, "invalid_request", f"this stream serves model {req.stream_model!r}, not "
                    f"{decided.model!r}", param="model_name"))
            req.stream_model = decided.model
            out.append(decided.rewrite.body if decided.rewrite else triton_grpc.frame(message))
        req.unanswered_chunks += 1
        if req.stream_model is None:
            return []
        replies = [] if routed else [responses.route_headers(req.stream_model)]
        replies += [responses.stream_chunk(b"") for _ in range(req.unanswered_chunks - 1)]
        replies.append(responses.stream_chunk(b"".join(out)))
        req.unanswered_chunks = 0
        return replies

    def _decide(self, req: _Request, raw: bytes) -> _Admitted | list[ProcessingResponse]:
        """Parse, find the policy, plan and reserve: what to send upstream, or the refusal."""
        assert req.call is not None
        if not self.table.loaded:
            return self._refuse(req, "", admission.Refusal(
                503, "policies_not_loaded", "The gateway has not received its model policies yet.",
                type_="service_unavailable", retry_after=1))
        try:
            parsed = req.call.api.parse(req.call.model, req.headers, raw)
        except ProtocolError as e:
            return self._refuse(req, "", admission.Refusal(400, "invalid_request", str(e), param=e.param))
        llm = parsed.request
        policy = self.table.policies.get(llm.model)
        if policy is None or policy.protocol != req.call.api.protocol:
            # Unknown names stay out of the metric labels: clients choose them.
            return self._refuse(req, "", admission.Refusal(404, "model_not_found", _not_found(llm.model, policy),
                                                           param="model"))
        if not llm.admit:
            return _Admitted(policy.name, None, parsed.rewrite(None, policy.backend_model))
        planned = admission.plan(llm, policy)
        if isinstance(planned, admission.Refusal):
            return self._refuse(req, llm.model, planned)
        ledger = self.table.ledgers.get(policy.name)
        assert ledger is not None  # PolicyTable.replace creates it with the policy
        held = admission.admit(planned, policy.name, ledger, self.clock(), self.reservation_ttl_s)
        if isinstance(held, admission.Refusal):
            self.log.info("admission.refused", model=llm.model, request_id=req.headers.get("x-request-id"),
                          reserved=ledger.reserved, capacity=ledger.capacity, wanted=planned.nbytes)
            return self._refuse(req, llm.model, held)
        req.reservations.append(held)
        self.decisions.record(llm.model, "admitted")
        return _Admitted(policy.name, planned.max_tokens, parsed.rewrite(planned.max_tokens, policy.backend_model))

    def expire(self) -> int:
        """Run the TTL backstop; returns how many reservations it had to release."""
        expired = self.table.ledgers.expire(self.clock())
        for r in expired:
            self.log.warning("ledger.expired", model=r.key, nbytes=r.nbytes)
        return len(expired)
