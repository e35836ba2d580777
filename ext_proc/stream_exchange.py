"""A bidi gRPC stream (Triton's ModelStreamInfer), which arrives in STREAMED body chunks.

Frames may span chunks, and until the first message has named the model neither the headers nor any
chunk can be answered: the route depends on it. Each message is then decided on its own, at once (it
cannot wait: the messages behind it would wait too), and goes where the first one went.
"""

from __future__ import annotations

from dataclasses import dataclass

from envoy.service.ext_proc.v3.external_processor_pb2 import HttpBody, ProcessingResponse
from ext_proc import decision, responses, triton_grpc
from ext_proc.admission import Refusal
from ext_proc.decision import Admit, Pass, Planned, Refuse
from ext_proc.exchange import Exchange
from ext_proc.ledger import Ledger
from ext_proc.request import ProtocolError


@dataclass
class StreamExchange:
    ex: Exchange
    model: str | None = None  # the model its first message routed it to
    ledger: Ledger | None = None
    rest: bytes = b""  # the bytes of a frame still arriving
    unanswered_chunks: int = 0  # chunks Envoy sent before the first message completed

    def on_chunk(self, body: HttpBody) -> list[ProcessingResponse]:
        ex = self.ex
        try:
            messages, self.rest = triton_grpc.split_frames(self.rest + body.body)
            if body.end_of_stream and self.rest:
                raise ProtocolError("the stream ended inside a gRPC frame")
        except ProtocolError as e:
            return [ex.refuse(Refuse("", Refusal(400, "invalid_request", str(e))))]
        routed = self.model is not None
        out = []
        for message in messages:
            outcome = self._decide(message)
            if isinstance(outcome, Refuse):
                return [ex.refuse(outcome)]  # a refusal ends the whole stream: gRPC has no per-message status
            if isinstance(outcome, Admit):
                ex.admitted(outcome)
                self.ledger = self.ledger or outcome.reservation.ledger
            else:
                ex.passed(outcome)
            self.model = outcome.model
            out.append(outcome.rewrite.body if outcome.rewrite else triton_grpc.frame(message))
        self.unanswered_chunks += 1
        if self.model is None:
            return []
        replies = [] if routed else [responses.route_headers(self.model)]
        replies += [responses.stream_chunk(b"") for _ in range(self.unanswered_chunks - 1)]
        replies.append(responses.stream_chunk(b"".join(out)))
        self.unanswered_chunks = 0
        return replies

    def _decide(self, raw: bytes) -> Admit | Pass | Refuse:
        ex = self.ex
        gate, state = ex.gate, ex.gate.table
        assert ex.expect is not None
        found = decision.parse(state, ex.expect, ex.headers, raw)
        if not isinstance(found, decision.Found):
            return found
        if self.model is not None and found.policy.name != self.model:  # before any charge
            return Refuse(found.policy.name, Refusal(
                400, "invalid_request", f"this stream serves model {self.model!r}, not {found.policy.name!r}",
                param="model_name"))
        planned = decision.plan(state, found, ex.expect.tenant, ex.headers)
        if isinstance(planned, Planned):
            ex.planned(planned)
            planned = decision.charge(state, planned, ex.expect.tenant, gate.clock())
        if isinstance(planned, Refuse):
            return planned
        ledgers = [self.ledger] if self.ledger else state.ledgers_of(planned.policy)
        held = decision.try_reserve(planned, ledgers, gate.clock(), gate.reservation_ttl_s)
        return decision.settle(state, planned, held, ledgers, gate.clock(), grpc=True)
