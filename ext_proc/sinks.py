"""Where decisions go once made: one event per outcome, handed to a list of small sinks in turn, the
way structlog chains processors. A new consumer is one more sink in the list (ext_proc/__main__.py
builds it), not another call at every place a decision is made.

The access log is the one consumer that is not here: the decision travels to it on Envoy's next
answer, as dynamic metadata the request's DecisionRecord attaches (decision_metadata.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import structlog

from ext_proc.decision import Admit, Pass, Refuse
from ext_proc.decision_metadata import DecisionRecord
from ext_proc.metrics import Decisions
from ext_proc.prompt_gap import PromptGap
from ext_proc.status import RecentRefusals


@dataclass(frozen=True)
class Decided:
    """An outcome of one request (or one message of a gRPC stream); `record` is already updated."""

    outcome: Admit | Pass | Refuse
    record: DecisionRecord
    request_id: str | None


@dataclass(frozen=True)
class Finished:
    """The request is over (its ext_proc stream ended), `seconds` after its headers arrived."""

    record: DecisionRecord
    seconds: float


Event = Decided | Finished
Sink = Callable[[Event], None]


class Sinks:
    """Calls every sink with every event, in order."""

    def __init__(self, sinks: Iterable[Sink] = ()):
        self._sinks = tuple(sinks)

    def __call__(self, event: Event) -> None:
        for sink in self._sinks:
            sink(event)

    def __len__(self) -> int:
        return len(self._sinks)


def metrics(decisions: Decisions) -> Sink:
    """Prometheus: outcomes by model and reason, clamps, tokens, the GenAI duration."""
    def sink(event: Event) -> None:
        match event:
            case Decided(outcome=Admit(), record=record):
                decisions.admitted(record)
            case Decided(outcome=Refuse(model=model, refusal=refusal)):
                decisions.record(model, refusal.code)
            case Finished(record=record, seconds=seconds):
                decisions.finished(record, seconds)
    return sink


def prompt_gap(gap: PromptGap) -> Sink:
    """The prompt tokens admitted to each endpoint, to set against what the engine prefilled."""
    def sink(event: Event) -> None:
        if isinstance(event, Decided) and isinstance(event.outcome, Admit):
            gap.admitted(event.record.model, event.record.endpoint, event.record.prompt_tokens_total)
    return sink


def recent_refusals(refusals: RecentRefusals) -> Sink:
    """The status page's list of what was refused lately."""
    def sink(event: Event) -> None:
        if isinstance(event, Decided) and isinstance(event.outcome, Refuse):
            refusals.record(event.outcome.model, event.outcome.refusal, event.request_id)
    return sink


def busy_log(log: structlog.typing.FilteringBoundLogger) -> Sink:
    """A log line for each request refused for want of KV budget: what it wanted, what each endpoint
    had. Other refusals are the client's doing and are counted, not logged."""
    def sink(event: Event) -> None:
        if isinstance(event, Decided) and isinstance(event.outcome, Refuse) and event.outcome.headroom:
            log.info("admission.refused", model=event.outcome.model, wanted=event.record.reserved_bytes,
                     headroom=list(event.outcome.headroom))
    return sink
