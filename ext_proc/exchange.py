"""One ext_proc stream, which is one HTTP request: its headers step, shared by every API, and the
turning of decision outcomes into Envoy's answers (with the request's record, the sinks, and the
reservations it holds until the stream ends).

What follows the headers depends on how the body arrives: whole (http_exchange.py: every HTTP API and
unary gRPC), or as a bidi gRPC stream's chunks (stream_exchange.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import structlog
from google.protobuf.struct_pb2 import Struct

from envoy.service.ext_proc.v3.external_processor_pb2 import HttpHeaders, ProcessingResponse
from ext_proc import apis, decision, responses
from ext_proc.admission import Refusal
from ext_proc.apis import Convention
from ext_proc.decision import Admit, Answer, Expect, Lookup, Pass, Planned, Refuse
from ext_proc.decision_metadata import DecisionRecord
from ext_proc.ledger import Reservation
from ext_proc.metrics import Decisions, operation_name
from ext_proc.prefix_index import PrefixIndex
from ext_proc.sinks import Decided, Sinks
from ext_proc.state import AdmissionState
from ext_proc.tenants import KEY_HEADERS
from ext_proc.triton_http import BINARY_HEADER
from kvgate.wire import ADMISSION_ATTRIBUTES, PRIORITY_HEADER


class Gate(Protocol):
    """What an exchange needs of the process that serves it (server.py's ExtProcServicer)."""

    table: AdmissionState
    decisions: Decisions
    sinks: Sinks
    clock: Callable[[], float]
    reservation_ttl_s: float
    stream_first_message_timeout_s: float
    inline_count_chars: int
    prefixes: PrefixIndex  # where prompt prefixes were routed (prefix-aware endpoint choice)

    def release(self, held: Reservation | Refusal) -> None: ...


# Where Envoy puts the attributes it sends (the filter's name).
EXT_PROC_ATTRIBUTES = "envoy.filters.http.ext_proc"

# The request headers admission reads; Envoy 1.40 sends values as raw_value.
_WANTED = frozenset({":path", ":method", "content-type", "content-encoding", "x-request-id", PRIORITY_HEADER,
                     BINARY_HEADER, *KEY_HEADERS})


def read_headers(headers: HttpHeaders) -> dict[str, str]:
    """The wanted headers as text. Values are bytes on the wire and need not be UTF-8: invalid bytes
    become U+FFFD, so such an API key matches no tenant (keys are ASCII) and is refused with a 401.
    A header sent more than once keeps every value, joined with commas as HTTP lists are: a second
    inference-header-content-length cannot pass unseen, nor a coding in a second content-encoding."""
    out: dict[str, str] = {}
    for h in headers.headers.headers:
        if h.key in _WANTED:
            value = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
            out[h.key] = f"{out[h.key]},{value}" if h.key in out else value
    return out


@dataclass
class Exchange:
    gate: Gate
    started: float  # when the stream opened: the request's duration runs from here
    headers: dict[str, str] = field(default_factory=dict)
    convention: Convention = Convention.OPENAI
    expect: Expect | None = None  # set once the headers passed: the API and the caller
    # One per admitted request not yet over; a gRPC stream carries many (stream_exchange.py).
    reservations: list[Reservation] = field(default_factory=list)
    # What was decided, for the access log (Envoy dynamic metadata) and the per-request metrics.
    record: DecisionRecord = field(default_factory=DecisionRecord)

    def on_headers(self, msg: HttpHeaders) -> ProcessingResponse:
        """Headers sent on their own: lookups (the key checked) and gRPC streams ask for them."""
        answer = self.start(read_headers(msg), body_follows=not msg.end_of_stream)
        if answer is not None:
            return answer
        assert self.expect is not None
        # A stream's route depends on its first message: the headers are answered once it arrives,
        # and a client may open a stream well before it sends anything.
        if self.expect.call.api.streaming:
            return responses.wait_longer(self.gate.stream_first_message_timeout_s)
        return responses.continue_headers()

    def on_attributes(self, attributes: Mapping[str, Struct]) -> ProcessingResponse | None:
        """One exchange per request: the body came first, with what ext_proc reads of the headers as
        its attributes. None: the body decides."""
        values = attributes.get(EXT_PROC_ATTRIBUTES)
        headers = {} if values is None else {
            ADMISSION_ATTRIBUTES[k]: v.string_value for k, v in values.fields.items() if k in ADMISSION_ATTRIBUTES}
        return self.start(headers, body_follows=True)

    def start(self, headers: dict[str, str], body_follows: bool) -> ProcessingResponse | None:
        """The headers step, the same however they came: which API, whose key. None when the body
        decides; else the answer (a refusal, or a lookup let through)."""
        self.headers = headers
        # Every log line about this request carries Envoy's request id (the stream's task is its own).
        structlog.contextvars.bind_contextvars(request_id=headers.get("x-request-id"))
        path = headers.get(":path", "").partition("?")[0]
        self.convention = apis.convention_for(path, headers.get("content-type", ""))
        tenant = decision.authenticate(self.gate.table, headers)
        if isinstance(tenant, Refuse):
            return self.refuse(tenant)
        call = decision.match_call(headers, path)
        if isinstance(call, Lookup):
            found = decision.lookup(self.gate.table, tenant, path)
            if isinstance(found, Answer):
                return responses.answer(found.body)
            return self.refuse(found) if isinstance(found, Refuse) else responses.continue_headers()
        if isinstance(call, Refuse):
            return self.refuse(call)
        self.convention = call.api.convention
        self.record.operation = operation_name(path)
        refused = decision.check_call(call, headers.get(":method", ""), path, body_follows=body_follows)
        if refused is not None:
            return self.refuse(refused)
        self.expect = Expect(call, tenant)
        return None

    # --- outcomes to answers ------------------------------------------------------------------------

    def _decided(self, outcome: Admit | Pass | Refuse) -> None:
        self.gate.sinks(Decided(outcome, self.record, self.headers.get("x-request-id")))

    def refuse(self, outcome: Refuse) -> ProcessingResponse:
        self.refused(outcome)
        return responses.refuse(outcome.refusal, self.convention)

    def refused(self, outcome: Refuse) -> None:
        """A refusal the caller answers itself (one request of a gRPC stream: stream_exchange.py)."""
        self.record.refused(outcome.model, outcome.refusal.code)
        self._decided(outcome)

    def planned(self, planned: Planned) -> None:
        self.record.planned(planned.policy, planned.parsed.request, planned.plan, planned.priority_class,
                            counted=planned.counted)

    def admitted(self, outcome: Admit) -> None:
        self.reservations.append(outcome.reservation)
        self.record.admitted(outcome.reservation, outcome.upstream)
        self._decided(outcome)

    def passed(self, outcome: Pass) -> None:
        self.record.passed(outcome.model)
        self._decided(outcome)

    def release(self, held: Reservation) -> None:
        """One request of a gRPC stream is over before the stream: its reservation goes back now."""
        self.reservations.remove(held)
        self.gate.release(held)

    def end(self) -> None:
        """The request is over, however it ended: give back everything it holds."""
        for held in self.reservations:
            self.gate.release(held)
