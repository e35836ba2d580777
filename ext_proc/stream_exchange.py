"""A bidi gRPC stream (Triton's ModelStreamInfer): many requests, each released at its last response.

Requests arrive in STREAMED body chunks, and frames may span chunks. Until the first message has
named the model neither the headers nor any chunk can be answered: the route depends on it. Each
message is then decided on its own, at once (it cannot wait: the messages behind it would wait too),
and goes where the first one went.

Responses arrive in STREAMED chunks too (the stream route turns response body processing on, and
only there). A request gives its reservation back at its last response, found by the request id
Triton echoes (docs/architecture.md, "gRPC streams"): a request sent without an id gets one here, taken
out of its responses again. A request refused after the first one goes to Triton as a stand-in that
Triton answers with an error for its id, and that error's text becomes the refusal's: the stream goes
on, as it does when Triton itself fails one request.
"""

from __future__ import annotations

import uuid
from collections import deque
from dataclasses import dataclass, field

import structlog
from tritonclient.grpc import service_pb2

from envoy.service.ext_proc.v3.external_processor_pb2 import HttpBody, ProcessingResponse
from ext_proc import decision, responses, triton_grpc
from ext_proc.admission import Refusal
from ext_proc.decision import Admit, Found, Pass, Planned, Refuse
from ext_proc.exchange import Exchange
from ext_proc.ledger import Ledger, Reservation
from ext_proc.request import ProtocolError
from ext_proc.triton_grpc import CompressedMessage

log = structlog.get_logger(component="ext_proc")


@dataclass
class _InFlight:
    """A request on the stream whose last response has not been seen yet."""

    reservation: Reservation | None  # None: refused here, Triton answers the stand-in
    id_given: bool  # the gateway gave it its id: its responses must not show it
    refusal: str = ""  # the client's error text, for a refused one
    model: str = ""  # the model it named, for a refused one's error
    # The gateway asked Triton for the empty final response (triton_grpc.EMPTY_FINAL): the client did
    # not, so it must not see it.
    hide_empty_final: bool = False


@dataclass
class _Frames:
    """One direction's bytes, cut into whole gRPC messages."""

    rest: bytes = b""  # the bytes of a frame still arriving

    def split(self, body: HttpBody) -> list[bytes]:
        messages, self.rest = triton_grpc.split_frames(self.rest + body.body)
        if body.end_of_stream and self.rest:
            raise ProtocolError("the stream ended inside a gRPC frame")
        return messages


@dataclass
class StreamExchange:
    ex: Exchange
    model: str | None = None  # the model its first message routed it to
    ledger: Ledger | None = None
    requests: _Frames = field(default_factory=_Frames)
    responses: _Frames = field(default_factory=_Frames)
    unanswered_chunks: int = 0  # chunks Envoy sent before the first message completed
    # By request id, oldest first: a client may reuse an id, and Triton answers a request's
    # responses in order.
    in_flight: dict[str, deque[_InFlight]] = field(default_factory=dict)
    # Ids this stream gives: unique to it, so a client's own ids cannot collide with them.
    _id_prefix: str = field(default_factory=lambda: f"kvgate-{uuid.uuid4().hex[:12]}-")
    _given: int = 0
    watching: bool = True  # False once a response could not be read: the rest is released at the end

    # --- requests ----------------------------------------------------------------------------------

    def on_chunk(self, body: HttpBody) -> list[ProcessingResponse]:
        ex = self.ex
        try:
            messages = self.requests.split(body)
        except ProtocolError as e:
            return [ex.refuse(Refuse("", Refusal(400, "invalid_request", str(e))))]
        routed = self.model is not None
        out = []
        for message in messages:
            outcome, found = self._decide(message)
            if isinstance(outcome, Refuse):
                if self.model is None:  # nothing routed yet: a gRPC status refuses the stream
                    return [ex.refuse(outcome)]
                ex.refused(outcome)
                out.append(self._stand_in(message, found, outcome))
                continue
            if isinstance(outcome, Admit):
                ex.admitted(outcome)
                self.ledger = self.ledger or outcome.reservation.ledger
            else:
                ex.passed(outcome)
            self.model = outcome.model
            sent = outcome.rewrite.body[triton_grpc.FRAME_HEADER:] if outcome.rewrite else message
            reservation = outcome.reservation if isinstance(outcome, Admit) else None
            out.append(self._track(sent, found, reservation))
        self.unanswered_chunks += 1
        if self.model is None:
            return []
        replies = [] if routed else [responses.route_headers(self.model)]
        replies += [responses.stream_chunk(b"") for _ in range(self.unanswered_chunks - 1)]
        replies.append(responses.stream_chunk(b"".join(out)))
        self.unanswered_chunks = 0
        return replies

    def _track(self, message: bytes, found: Found | None, reservation: Reservation | None) -> bytes:
        """The framed message as it goes upstream, its request now in flight."""
        named = self._named(message, found)
        request_id, given = self._request_id(named)
        if given:
            message = triton_grpc.with_id(message, request_id)
        hide = not triton_grpc.asks_empty_final(named)
        if hide:
            message = triton_grpc.with_empty_final(message)
        self._add(request_id, _InFlight(reservation, given, hide_empty_final=hide))
        return triton_grpc.frame(message)

    def _stand_in(self, message: bytes, found: Found | None, refused: Refuse) -> bytes:
        """What goes upstream for a refused request: Triton answers it with an error for its id."""
        named = self._named(message, found)
        request_id, given = self._request_id(named)
        # tritonclient hands a stream's errors to its callback without their id: the text names it.
        error = refused.refusal.message if given else f"{refused.refusal.message} (request id {request_id!r})"
        self._add(request_id, _InFlight(None, given, error, named.model_name))
        return triton_grpc.refused_request(request_id)

    @staticmethod
    def _named(message: bytes, found: Found | None) -> service_pb2.ModelInferRequest:
        """The request as the client sent it (parsed once when it could be)."""
        return found.parsed.message if found is not None else triton_grpc.read_stream_request(message)

    def _request_id(self, named: service_pb2.ModelInferRequest) -> tuple[str, bool]:
        """The request's id, and whether the gateway gave it (the client sent none)."""
        if named.id:
            return named.id, False
        self._given += 1
        return f"{self._id_prefix}{self._given}", True

    def _add(self, request_id: str, request: _InFlight) -> None:
        self.in_flight.setdefault(request_id, deque()).append(request)

    def _decide(self, raw: bytes) -> tuple[Admit | Pass | Refuse, Found | None]:
        ex = self.ex
        gate, state = ex.gate, ex.gate.table
        assert ex.expect is not None
        found = decision.parse(state, ex.expect, ex.headers, raw)
        if not isinstance(found, decision.Found):
            return found, None
        if self.model is not None and found.policy.name != self.model:  # before any charge
            return Refuse(found.policy.name, Refusal(
                400, "invalid_request", f"this stream serves model {self.model!r}, not {found.policy.name!r}",
                param="model_name")), found
        planned = decision.plan(state, found, ex.expect.tenant, ex.headers)
        if isinstance(planned, Planned):
            ex.planned(planned)
            planned = decision.charge(state, planned, ex.expect.tenant, gate.clock())
        if isinstance(planned, Refuse):
            return planned, found
        ledgers = [self.ledger] if self.ledger else state.ledgers_of(planned.policy)
        held = decision.try_reserve(planned, ledgers, gate.clock(), gate.reservation_ttl_s)
        return decision.settle(state, planned, held, ledgers, gate.clock(), grpc=True), found

    # --- responses ---------------------------------------------------------------------------------

    def on_response(self, body: HttpBody) -> ProcessingResponse:
        """Release each request whose last response this chunk completes. The chunk goes on as it
        came unless a response in it must change (a refusal's text, an id the gateway gave) or a
        frame is still arriving (the part before it goes on now, the frame once whole)."""
        if not self.watching:
            return responses.response_chunk(None)
        held, data = bool(self.responses.rest), self.responses.rest + body.body
        try:
            messages = self.responses.split(body)
            out = [self._on_response(m) for m in messages]
        except ProtocolError as e:  # compressed or unreadable: passed on as the engine sent it
            log.warning("stream.responses_unreadable", error=str(e), compressed=isinstance(e, CompressedMessage))
            self.watching = False
            return responses.response_chunk(data if held else None)
        if not held and not self.responses.rest and all(sent is m for sent, m in zip(out, messages)):
            return responses.response_chunk(None)
        return responses.response_chunk(b"".join(triton_grpc.frame(m) for m in out if m is not None))

    def _on_response(self, message: bytes) -> bytes | None:
        """The response as the client must see it (None: not at all); a request's last one releases it."""
        response = triton_grpc.read_stream_response(message)
        queue = self.in_flight.get(response.request_id)
        if not queue:
            return message  # no request of ours (a model answering for another id): nothing to release
        request = queue[0]
        if response.last:
            queue.popleft()
            if not queue:
                del self.in_flight[response.request_id]
            if request.reservation is not None:
                self.ex.release(request.reservation)
            if request.hide_empty_final and response.empty:
                return None
        if request.refusal:
            message = response.with_error(request.refusal, request.model)
        return triton_grpc.without_id(message) if request.id_given else message
