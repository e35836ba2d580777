"""The ExternalProcessor gRPC service: one stream per HTTP request, held open until it ends.

Per stream: request headers (exchange.py: which API, whose key) -> request body (http_exchange.py when
it arrives whole, stream_exchange.py for a bidi gRPC stream's chunks, and its responses' chunks, each
request released at its last response) -> stream end (release what is left). Envoy
half-closes the stream when the downstream request finishes or is aborted (docs/architecture.md, "The
request path"), so the `finally` below is "the request is over", however it ended.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc
import structlog

from envoy.service.ext_proc.v3 import external_processor_pb2_grpc
from envoy.service.ext_proc.v3.external_processor_pb2 import ProcessingRequest, ProcessingResponse
from ext_proc import http_exchange, sinks
from ext_proc.admission import Refusal
from ext_proc.decision import Refuse
from ext_proc.exchange import Exchange
from ext_proc.ledger import Reservation
from ext_proc.metrics import Decisions
from ext_proc.prefix_index import PrefixIndex
from ext_proc.prompt_gap import PromptGap
from ext_proc.sinks import Finished, Sinks
from ext_proc.state import AdmissionState
from ext_proc.status import RecentRefusals
from ext_proc.stream_exchange import StreamExchange


# The last resort: what a request gets if deciding it raised. It never reached an engine.
INTERNAL_ERROR = Refusal(500, "internal_error", "The gateway failed to decide this request and did not send it "
                         "to any engine; this is a gateway bug, and its log has the details.",
                         type_="server_error")


@dataclass
class ExtProcServicer(external_processor_pb2_grpc.ExternalProcessorServicer):
    table: AdmissionState
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
    # Where each decision goes; by default metrics, the status page's refusals and the busy log (and
    # the prompt tokens admitted, with a PromptGap).
    sinks: Sinks = field(default_factory=Sinks)
    prompt_gap: PromptGap | None = None
    # Where prompt prefixes were routed, for prefix-aware endpoint choice (admission.choose).
    prefixes: PrefixIndex = field(default_factory=PrefixIndex)

    def __post_init__(self) -> None:
        if not self.sinks:
            self.sinks = Sinks([sinks.metrics(self.decisions), sinks.recent_refusals(self.refusals),
                                sinks.busy_log(self.log),
                                *([sinks.prompt_gap(self.prompt_gap)] if self.prompt_gap is not None else [])])

    async def Process(self, request_iterator: AsyncIterator[ProcessingRequest],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[ProcessingResponse]:
        ex = Exchange(self, started=self.clock())
        stream: StreamExchange | None = None
        try:
            async for msg in request_iterator:
                received = self.clock()
                try:
                    if msg.HasField("request_headers"):
                        yield self._answered(ex, ex.on_headers(msg.request_headers), "headers", received)
                    elif not ex.headers and (refused := ex.on_attributes(msg.attributes)) is not None:
                        yield self._answered(ex, refused, "body", received)  # the headers came as attributes
                    elif msg.HasField("response_body"):  # only a gRPC stream's route sends these
                        assert stream is not None
                        yield self._answered(ex, stream.on_response(msg.response_body), "response", received)
                    elif ex.expect is not None and ex.expect.call.api.streaming:
                        stream = stream or StreamExchange(ex)
                        for i, reply in enumerate(stream.on_chunk(msg.request_body)):
                            yield self._answered(ex, reply, "body", received if i == 0 else None)
                    else:
                        async for reply in http_exchange.on_body(ex, msg.request_body.body):
                            yield self._answered(ex, reply, "body", received)
                            if reply.WhichOneof("response") is not None:
                                received = None
                except Exception:  # a bug, not the client's doing: refuse in its convention, never a bare 500
                    self.log.exception("ext_proc.failed")
                    yield self._answered(ex, ex.refuse(Refuse("", INTERNAL_ERROR)), "body", None)
                    return
        finally:
            structlog.contextvars.unbind_contextvars("request_id")
            ex.end()
            self.sinks(Finished(ex.record, self.clock() - ex.started))

    def _answered(self, ex: Exchange, reply: ProcessingResponse, phase: str, received: float | None) -> ProcessingResponse:
        """`reply` with the decision not yet sent attached. The first answer to a message (not a mere
        longer timeout) measures ext_proc's overhead, from `received` on: waiting for KV budget is
        admission, not overhead."""
        if reply.WhichOneof("response") is not None:
            if received is not None:
                self.decisions.processed(phase, self.clock() - received - ex.record.waited_s)
            ex.record.attach(reply)
        return reply

    def release(self, held: Reservation | Refusal) -> None:
        """Gives a reservation back (once) and offers the freed budget to the requests waiting for it."""
        if isinstance(held, Reservation) and held.ledger.release(held, self.clock()):
            self.table.wake(held.ledger.model)

    def expire(self) -> int:
        """Run the TTL backstop; returns how many reservations it had to release."""
        expired = self.table.ledgers.expire(self.clock())
        for r in expired:
            self.log.warning("ledger.expired", ledger=r.key, nbytes=r.nbytes)
            self.table.wake(r.ledger.model)
        return len(expired)

