"""The ExternalProcessor gRPC service: one stream per HTTP request, held open until it ends.

Flow per stream: request headers (which API? apis.py) -> request body (parse, plan, reserve:
_decide) -> stream end (release). Envoy half-closes the stream when the downstream request finishes
or is aborted (DESIGN.md §3), so the `finally` below is "the request is over", however it ended.
A gRPC bidi stream (ModelStreamInfer) arrives in STREAMED chunks, each message decided on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc
import structlog

from envoy.service.ext_proc.v3 import external_processor_pb2_grpc
from envoy.service.ext_proc.v3.external_processor_pb2 import HttpBody, HttpHeaders, ProcessingRequest, ProcessingResponse
from ext_proc import admission, apis, responses, tokens, triton_grpc
from ext_proc.apis import Call, Convention
from ext_proc.ledger import Ledger, Ledgers, Reservation
from ext_proc.decision_metadata import DecisionRecord
from ext_proc.metrics import Decisions, operation_name
from ext_proc.policy import Policy
from ext_proc.request import Parsed, ProtocolError, Rewrite
from ext_proc.status import RecentRefusals
from ext_proc.tokenizer import Tokenizers
from ext_proc.triton_http import BINARY_HEADER
from ext_proc.waitqueue import WaitQueue
from ext_proc.ratelimit import Charge, OverLimit, RateLimits
from ext_proc.tenants import KEY_HEADERS, Tenant, TenantTable, Unauthenticated
from kvgate.wire import PRIORITY_HEADER


@dataclass
class PolicyTable:
    """Current policies by model name, their ledgers and wait queues; `loaded` stays False until
    the first xDS update arrives."""

    ledgers: Ledgers
    policies: dict[str, Policy] = field(default_factory=dict)
    loaded: bool = False
    max_waiting: int = 1000  # per model; beyond it a request that does not fit is refused at once
    queues: dict[str, WaitQueue[Reservation]] = field(default_factory=dict)
    tokenizers: Tokenizers = field(default_factory=Tokenizers)
    tenants: TenantTable = field(default_factory=TenantTable)
    limits: RateLimits = field(default_factory=RateLimits)
    _loading: asyncio.Task[None] | None = None

    def replace(self, policies: list[Policy]) -> None:
        keys = {(p.name, e.address) for p in policies for e in p.endpoints}
        for p in policies:
            for e in p.endpoints:
                ledger = self.ledgers.set_budget(p.name, e.address, e.budget_bytes)
                if not p.metrics_interval_s:  # not scraped (any more): the ledger alone counts
                    ledger.blind, ledger.excess = False, 0
        self.ledgers.retain(keys)
        self.policies = {p.name: p for p in policies}
        self.queues = {p.name: self.queues.get(p.name) or WaitQueue(self.max_waiting) for p in policies}
        self.loaded = True
        self.wake_all()
        # Until a tokenizer is loaded (off the event loop) its model's prompts are bounded, not counted.
        with contextlib.suppress(RuntimeError):  # no running loop: unit tests that load none
            self._loading = asyncio.get_running_loop().create_task(self.tokenizers.update(policies))

    @property
    def ready(self) -> bool:
        """Both policies and tenants heard from the control plane: admitting before that could let
        through a request without a key, or refuse one for want of a model."""
        return self.loaded and self.tenants.loaded

    def set_share(self, fraction: float) -> None:
        """This replica's part of every endpoint's budget (and of every tenant's rate limits), as the
        control plane divides it."""
        self.ledgers.set_share(fraction)
        self.limits.share = fraction
        self.wake_all()

    def ledgers_of(self, policy: Policy) -> list[Ledger]:
        return self.ledgers.of_model(policy.name, [e.address for e in policy.endpoints])

    def wake(self, model: str) -> None:
        """Budget of `model` may have freed up: offer it to the requests waiting for it."""
        queue = self.queues.get(model)
        if queue is not None:
            queue.wake()

    def wake_all(self) -> None:
        for queue in self.queues.values():
            queue.wake()


@dataclass
class _Request:
    headers: dict[str, str] = field(default_factory=dict)
    path: str = ""
    convention: Convention = Convention.OPENAI
    call: Call | None = None
    # One per admitted request; a gRPC stream carries many, all released when it ends.
    reservations: list[Reservation] = field(default_factory=list)
    # A gRPC stream: the model and endpoint its first message routed it to, the bytes of a frame
    # still arriving, and the chunks Envoy sent before that first message completed.
    stream_model: str | None = None
    stream_endpoint: str | None = None
    stream_ledger: Ledger | None = None
    stream_rest: bytes = b""
    unanswered_chunks: int = 0
    tenant: Tenant | None = None  # None: the gateway is open
    # What was decided, for the access log (Envoy dynamic metadata) and the per-request metrics.
    decision: DecisionRecord = field(default_factory=DecisionRecord)
    started: float = 0.0  # when the stream opened: the request's duration runs from here


@dataclass(frozen=True)
class _Admitted:
    model: str
    max_tokens: int | None  # None: a lookup, nothing to clamp
    rewrite: Rewrite | None
    endpoint: str | None = None  # the upstream host admission reserved on
    ledger: Ledger | None = None


@dataclass(frozen=True)
class _Planned:
    """A parsed request with its plan, before any budget is taken."""

    policy: Policy
    parsed: Parsed
    plan: admission.Plan
    priority_class: str
    charge: Charge | None = None  # taken from the tenant's rate limits; refunded if refused later


# The request headers admission reads; Envoy 1.40 sends values as raw_value.
_WANTED = frozenset({":path", ":method", "content-type", "x-request-id", PRIORITY_HEADER, BINARY_HEADER,
                     *KEY_HEADERS})


def _headers(headers: HttpHeaders) -> dict[str, str]:
    return {h.key: h.raw_value.decode() if h.raw_value else h.value
            for h in headers.headers.headers if h.key in _WANTED}


_NOT_LOADED = admission.Refusal(503, "policies_not_loaded", "The gateway has not received its model policies yet.",
                                type_="service_unavailable", retry_after=1)


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
    # Prompts longer than this are tokenized in a thread (bench/tokens.py: ~1 ms per KB, hop ~0.1 ms).
    inline_count_chars: int = 1024
    clock: Callable[[], float] = time.monotonic
    log: structlog.typing.FilteringBoundLogger = field(
        default_factory=lambda: structlog.get_logger(component="ext_proc"))
    # The last refusals, for the status page (ext_proc/status.py).
    refusals: RecentRefusals = field(default_factory=RecentRefusals)

    async def Process(self, request_iterator: AsyncIterator[ProcessingRequest],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[ProcessingResponse]:
        req = _Request(started=self.clock())
        try:
            async for msg in request_iterator:
                received, timed = self.clock(), False
                phase = "headers" if msg.HasField("request_headers") else "body"
                async for reply in self._replies(msg, req):
                    if reply.WhichOneof("response") is not None:  # an answer, not just a longer timeout
                        if not timed:  # ext_proc's overhead: waiting for KV budget is admission, not that
                            self.decisions.processed(phase, self.clock() - received - req.decision.waited_s)
                            timed = True
                        req.decision.attach(reply)
                    yield reply
        finally:
            structlog.contextvars.unbind_contextvars("request_id")
            for r in req.reservations:
                self._release(r)
            self.decisions.finished(req.decision, self.clock() - req.started)

    async def _replies(self, msg: ProcessingRequest, req: _Request) -> AsyncIterator[ProcessingResponse]:
        kind = msg.WhichOneof("request")
        if kind == "request_headers":
            for reply in self._on_headers(msg.request_headers, req):
                yield reply
        elif kind == "request_body":
            async for reply in self._on_body(msg.request_body, req):
                yield reply

    def _refuse(self, req: _Request, model: str, r: admission.Refusal) -> list[ProcessingResponse]:
        self.decisions.record(model, r.code)
        req.decision.refused(model, r.code)
        self.refusals.record(model, r, req.headers.get("x-request-id"))
        return [responses.refuse(r, req.convention)]

    def _on_headers(self, headers: HttpHeaders, req: _Request) -> list[ProcessingResponse]:
        req.headers = _headers(headers)
        # Every log line about this request carries Envoy's request id (the stream's task is its own).
        structlog.contextvars.bind_contextvars(request_id=req.headers.get("x-request-id"))
        req.path = req.headers.get(":path", "").partition("?")[0]
        content_type = req.headers.get("content-type", "")
        req.convention = apis.convention_for(req.path, content_type)
        req.call = apis.match(req.path, content_type)
        if not self.table.ready:
            return self._refuse(req, "", _NOT_LOADED)
        # The key first, before any body is read (and before an unknown URL is even told apart).
        caller = self.table.tenants.authenticate(req.headers)
        if isinstance(caller, Unauthenticated):
            return self._refuse(req, "", admission.Refusal(401, "invalid_api_key", caller.message))
        req.tenant = caller
        if req.call is None and apis.is_lookup(req.headers.get(":method", ""), req.path, content_type):
            return [responses.continue_lookup()]
        if req.call is None:
            return self._refuse(req, "", admission.Refusal(404, "unknown_url", f"Unknown request URL: {req.path}. "
                                                           "The gateway admits the OpenAI API, Triton's generate and "
                                                           "KServe v2 infer over HTTP, and Triton's gRPC inference."))
        req.convention = req.call.api.convention
        req.decision.operation = operation_name(req.path)
        if req.headers.get(":method") != "POST":
            return self._refuse(req, "", admission.Refusal(405, "method_not_allowed", f"{req.path} takes POST"))
        if headers.end_of_stream:
            return self._refuse(req, "", admission.Refusal(400, "invalid_request", "request body is empty"))
        # A stream's route depends on its first message: the headers are answered once it arrives,
        # and a client may open a stream well before it sends anything.
        if req.call.api.streaming:
            return [responses.wait_longer(self.stream_first_message_timeout_s)]
        return [responses.CONTINUE_HEADERS]

    async def _on_body(self, body: HttpBody, req: _Request) -> AsyncIterator[ProcessingResponse]:
        assert req.call is not None  # a refused call ends at its headers
        if req.call.api.streaming:
            for reply in self._on_stream_message(body, req):
                yield reply
            return
        found = self._parse(req, body.body)
        if isinstance(found, _Admitted):
            req.decision.passed(found.model)
            yield responses.admit(found.model, None, found.rewrite)
            return
        if isinstance(found, tuple):
            await self._count_off_loop(*found)
            found = self._plan(req, *found)
        if isinstance(found, list):
            for reply in found:
                yield reply
            return
        planned = found
        ledgers = self.table.ledgers_of(planned.policy)
        held = self._try(planned, ledgers)
        wait_s = planned.policy.max_wait_s(planned.priority_class) or 0.0
        queue = self.table.queues.get(planned.policy.name)
        if held is None and wait_s > 0 and queue is not None and not queue.full:
            # Envoy would give up on us after its message timeout: tell it how long this may take.
            yield responses.wait_longer(wait_s + 1)
            started = self.clock()
            try:
                held = await queue.wait(planned.policy.rank(planned.priority_class),
                                        lambda: self._try(planned, ledgers), wait_s, release=self._release)
            except asyncio.CancelledError:  # the client left while waiting: it never ran
                self._refund(planned)
                raise
            req.decision.waited_s = self.clock() - started
            self.decisions.waited(planned.policy.name, req.decision.waited_s, held is not None)
        settled = self._settle(req, planned, held, ledgers)
        if isinstance(settled, list):
            yield settled[0]
        else:
            yield responses.admit(settled.model, settled.max_tokens, settled.rewrite, settled.endpoint)

    async def _count_off_loop(self, policy: Policy, parsed: Parsed) -> None:
        """Tokenizing a long new prompt takes milliseconds (about 1 ms per KB): do it in a thread, so
        the event loop keeps serving other requests, and let the plan read the counts from the cache.
        Short prompts are counted inline: the thread hop costs more than they do."""
        counter = self.table.tokenizers.counter_for(policy)
        pieces = tokens.text_pieces(parsed.request)
        if counter is not None and sum(map(len, pieces)) > self.inline_count_chars:
            await counter.prefetch(pieces)

    def _release(self, held: Reservation | admission.Refusal) -> None:
        """Gives a reservation back (once) and offers the freed budget to the requests waiting for it."""
        if isinstance(held, Reservation) and held.ledger.release(held, self.clock()):
            self.table.wake(held.ledger.model)

    def _refund(self, planned: _Planned) -> None:
        if planned.charge is not None:
            self.table.limits.refund(planned.charge, self.clock())

    def _try(self, planned: _Planned, ledgers: list[Ledger]) -> Reservation | admission.Refusal | None:
        return admission.admit(planned.plan, planned.policy, ledgers, self.clock(), self.reservation_ttl_s)

    def _settle(self, req: _Request, planned: _Planned, held: Reservation | admission.Refusal | None,
                ledgers: list[Ledger]) -> _Admitted | list[ProcessingResponse]:
        """Admitted (with the endpoint reserved on), or the refusal; None means it never fitted."""
        model = planned.policy.name
        if held is None:
            held = admission.busy(planned.plan, planned.policy, ledgers, self.clock())
            self.log.info("admission.refused", model=model, wanted=planned.plan.nbytes,
                          headroom=[lg.headroom for lg in ledgers])
        if isinstance(held, admission.Refusal):
            self._refund(planned)  # it never ran: the tenant gets its tokens back
            return self._refuse(req, model, held)
        req.reservations.append(held)
        req.decision.admitted(held)
        self.decisions.admitted(req.decision)
        endpoint = planned.policy.endpoint(held.ledger.endpoint)
        max_tokens = planned.plan.max_tokens
        return _Admitted(model, max_tokens, planned.parsed.rewrite(max_tokens, planned.policy.backend_model),
                         endpoint.upstream(grpc=req.convention is Convention.GRPC) if endpoint else None, held.ledger)

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
            decided = self._decide_stream_message(req, message)
            if isinstance(decided, list):
                return decided  # a refusal ends the whole stream: gRPC has no per-message status
            req.stream_model = decided.model
            req.stream_endpoint = req.stream_endpoint or decided.endpoint
            req.stream_ledger = req.stream_ledger or decided.ledger
            out.append(decided.rewrite.body if decided.rewrite else triton_grpc.frame(message))
        req.unanswered_chunks += 1
        if req.stream_model is None:
            return []
        replies = [] if routed else [responses.route_headers(req.stream_model, req.stream_endpoint)]
        replies += [responses.stream_chunk(b"") for _ in range(req.unanswered_chunks - 1)]
        replies.append(responses.stream_chunk(b"".join(out)))
        req.unanswered_chunks = 0
        return replies

    def _decide_stream_message(self, req: _Request, raw: bytes) -> _Admitted | list[ProcessingResponse]:
        """One message of a stream, admitted now or refused: it cannot wait, the messages behind it
        would wait too. All of a stream's messages go where its first one went."""
        found = self._parse(req, raw)
        if not isinstance(found, tuple):
            return found
        policy, parsed = found
        if req.stream_model is not None and policy.name != req.stream_model:  # before any charge
            return self._refuse(req, policy.name, admission.Refusal(
                400, "invalid_request", f"this stream serves model {req.stream_model!r}, not "
                f"{policy.name!r}", param="model_name"))
        planned = self._plan(req, policy, parsed)
        if not isinstance(planned, _Planned):
            return planned
        ledgers = [req.stream_ledger] if req.stream_ledger else self.table.ledgers_of(planned.policy)
        return self._settle(req, planned, self._try(planned, ledgers), ledgers)

    def _parse(self, req: _Request, raw: bytes) -> tuple[Policy, Parsed] | _Admitted | list[ProcessingResponse]:
        """Parse and find the policy: a request to plan, a lookup to pass on, or the refusal."""
        assert req.call is not None
        try:
            parsed = req.call.api.parse(req.call.model, req.headers, raw)
        except ProtocolError as e:
            return self._refuse(req, "", admission.Refusal(400, "invalid_request", str(e), param=e.param))
        llm = parsed.request
        policy = self.table.policies.get(llm.model)
        if policy is not None and req.tenant is not None and not req.tenant.may_call(policy.name):
            return self._refuse(req, policy.name, admission.Refusal(
                403, "permission_denied", f"Tenant {req.tenant.name!r} may not call model {policy.name!r}.",
                param="model"))
        if policy is None or policy.protocol != req.call.api.protocol:
            # Unknown names stay out of the metric labels: clients choose them.
            return self._refuse(req, "", admission.Refusal(404, "model_not_found", _not_found(llm.model, policy),
                                                           param="model"))
        if not llm.admit:
            return _Admitted(policy.name, None, parsed.rewrite(None, policy.backend_model))
        return policy, parsed

    def _plan(self, req: _Request, policy: Policy, parsed: Parsed) -> _Planned | list[ProcessingResponse]:
        llm = parsed.request
        priority_class = (req.headers.get(PRIORITY_HEADER) or (req.tenant and req.tenant.priority_class)
                          or policy.default_priority_class)
        ceiling = req.tenant.priority_class if req.tenant else ""
        if ceiling and policy.max_wait_s(priority_class) is not None and policy.rank(priority_class) < policy.rank(ceiling):
            priority_class = ceiling  # a tenant's class is the highest its requests may ask for
        if policy.max_wait_s(priority_class) is None:
            return self._refuse(req, policy.name, admission.Refusal(
                400, "invalid_priority_class", f"{PRIORITY_HEADER} {priority_class!r} is not a priority class "
                f"of model {policy.name!r}: use one of {', '.join(n for n, _ in policy.priority_classes)}",
                param=PRIORITY_HEADER))
        counter = self.table.tokenizers.counter_for(policy)
        planned = admission.plan(llm, policy, counter)
        if isinstance(planned, admission.Refusal):
            return self._refuse(req, llm.model, planned)
        req.decision.planned(policy, llm, planned, priority_class, counted=counter is not None)
        charge = None
        # With no share yet (a replica just joined) the request waits for one; its limit would be 0.
        if req.tenant is not None and self.table.limits.share > 0:
            charge = self.table.limits.charge(req.tenant, planned.tokens, self.clock())
            if isinstance(charge, OverLimit):
                return self._refuse(req, policy.name, admission.Refusal(
                    429, "rate_limit_exceeded", f"Rate limit reached for tenant {req.tenant.name!r} on {charge.what} "
                    f"per minute: limit {charge.limit} on this gateway replica, this request needs "
                    f"{1 if charge.what == 'requests' else planned.tokens}.",
                    type_=charge.what, retry_after=charge.retry_after))
        return _Planned(policy, parsed, planned, priority_class, charge)

    def expire(self) -> int:
        """Run the TTL backstop; returns how many reservations it had to release."""
        expired = self.table.ledgers.expire(self.clock())
        for r in expired:
            self.log.warning("ledger.expired", ledger=r.key, nbytes=r.nbytes)
            self.table.wake(r.ledger.model)
        return len(expired)
