"""What ext_proc decided about one request, and how it travels to Envoy's access log.

One `DecisionRecord` per ext_proc stream (one HTTP request). server.py fills it as the request is
parsed, planned and admitted or refused; the first answer to Envoy after each decision carries it as
dynamic metadata in the `kvgate` namespace (the ext_proc filter must list that namespace in
`metadata_options.receiving_namespaces`), and the access log prints it
(`%DYNAMIC_METADATA(kvgate)%`). metrics.py reads the same record for the per-request metrics, so the
log line and the counters cannot disagree about what happened.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from envoy.service.ext_proc.v3.external_processor_pb2 import ProcessingResponse
from ext_proc.admission import Plan
from ext_proc.ledger import Reservation
from ext_proc.policy import Policy
from ext_proc.request import LLMRequest
from kvgate.wire import DECISION_NAMESPACE

ADMITTED = "admitted"
# A lookup (Triton's ModelReady, ModelMetadata...): routed to the model, nothing reserved.
PASSED = "passed"

# Which limit lowered a request's max_tokens (the `limit` label of the clamp counter).
CLAMPED_BY_MODEL = "max_output_tokens"  # the model's own cap on output
CLAMPED_BY_CONTEXT = "context"  # what the context window leaves after the prompt


def clamp_limit(requested: int | None, granted: int, max_output_tokens: int) -> str | None:
    """The limit that lowered `requested` to `granted`, or None when nothing was lowered (a request
    that named no max_tokens gets a default, which is not a clamp)."""
    if requested is None or granted >= requested:
        return None
    return CLAMPED_BY_MODEL if granted == max_output_tokens else CLAMPED_BY_CONTEXT


@dataclass
class DecisionRecord:
    # GenAI operation name (metrics.operation_name): chat | text_completion; "" when no API matched.
    operation: str = ""
    decision: str = ""  # ADMITTED, PASSED or the refusal code; "" until decided
    model: str = ""  # "" for names that are no model of the catalog: clients choose those
    priority_class: str = ""
    prompt_tokens: int | None = None  # the longest prompt: counted, or bounded (prompt_counted False)
    prompt_counted: bool = False  # counted with the model's tokenizer or given as token ids
    prompt_tokens_total: int = 0  # of every prompt and sequence: what the engine prefills (prompt_gap.py)
    requested_max_tokens: int | None = None
    max_tokens: int | None = None  # granted
    clamped_by: str = ""  # CLAMPED_BY_*, "" when not clamped
    endpoint: str = ""  # the engine ("host:port") the reservation is on
    upstream: str = ""  # the host Envoy must pick for it, when not `endpoint` (a Triton engine's gRPC port)
    reserved_bytes: int | None = None  # KV bytes reserved (admitted) or that would have been (refused)
    waited_s: float = 0.0  # in the model's queue, waiting for budget
    _unsent: bool = False  # decided since the last answer to Envoy
    _sent: frozenset[str] = frozenset()  # the fields Envoy holds from an earlier decision (gRPC streams)

    def planned(self, policy: Policy, llm: LLMRequest, plan: Plan, priority_class: str, counted: bool) -> None:
        self.model = policy.name
        self.priority_class = priority_class
        self.prompt_tokens = plan.prompt_tokens
        self.prompt_tokens_total = plan.prompt_tokens_total
        self.prompt_counted = counted or bool(llm.exact_prompt_tokens)
        self.requested_max_tokens = llm.requested_max_tokens
        self.max_tokens = plan.max_tokens
        self.clamped_by = clamp_limit(llm.requested_max_tokens, plan.max_tokens, policy.max_output_tokens) or ""
        self.reserved_bytes = plan.nbytes

    def admitted(self, held: Reservation, upstream: str | None) -> None:
        self._decided(ADMITTED, held.ledger.model)
        self.endpoint = held.ledger.endpoint
        self.upstream = upstream if upstream and upstream != self.endpoint else ""
        self.reserved_bytes = held.nbytes

    def passed(self, model: str) -> None:
        self._decided(PASSED, model)

    def refused(self, model: str, code: str) -> None:
        self._decided(code, model)

    def _decided(self, decision: str, model: str) -> None:
        self.decision = decision
        self.model = model
        self._unsent = True

    def fields(self) -> dict[str, Any]:
        """The metadata fields: what is known, nothing empty (the access log prints absent ones as null).
        Each field costs about a microsecond to build (protobuf Struct maps are slow from Python), so
        the rare ones appear only when they say something: requested_max_tokens when it was clamped,
        prompt_counted when the prompt was counted rather than bounded, waited_ms after a wait."""
        out: dict[str, Any] = {"decision": self.decision}
        for key in ("model", "priority_class", "endpoint", "upstream"):
            if value := getattr(self, key):
                out[key] = value
        for key in ("prompt_tokens", "max_tokens", "reserved_bytes"):
            if (value := getattr(self, key)) is not None:
                out[key] = value
        if self.clamped_by:
            out["requested_max_tokens"] = self.requested_max_tokens
        if self.prompt_counted:
            out["prompt_counted"] = True
        if self.waited_s:
            out["waited_ms"] = round(self.waited_s * 1000, 3)
        return out

    def attach(self, reply: ProcessingResponse) -> None:
        """Put a decision not yet sent on `reply`, an answer built for this request (never a message
        shared between requests)."""
        if self._unsent:
            fields: dict[str, Any] = self.fields()
            # Envoy merges each decision into what it holds, key by key: a field the previous message
            # of a stream had and this one lacks is cleared, or the log would show it for this one.
            fields.update(dict.fromkeys(self._sent - fields.keys()))
            reply.dynamic_metadata.update({DECISION_NAMESPACE: fields})
            self._sent = frozenset(k for k, v in fields.items() if v is not None)
            self._unsent = False
