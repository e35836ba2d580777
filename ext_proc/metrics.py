"""Prometheus metrics of one ext_proc process: decisions counted as they happen, ledgers read at scrape."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ext_proc.decision_metadata import ADMITTED, PASSED, DecisionRecord
from ext_proc.ledger import Ledger, Ledgers
from ext_proc.openai_protocol import CHAT_PATH

# ext_proc's own time per message is tens to hundreds of microseconds; the tail is what a GC pause, a
# busy event loop or a long prompt's tokenization adds. Envoy gives up at its message timeout (2 s).
PROCESSING_BUCKETS = (50e-6, 100e-6, 200e-6, 300e-6, 500e-6, 750e-6, 1e-3, 1.5e-3, 2e-3, 3e-3, 5e-3, 7.5e-3,
                      10e-3, 20e-3, 50e-3)
# The boundaries OpenTelemetry's GenAI conventions advise for these instruments (gen-ai-metrics.md).
GEN_AI_TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
GEN_AI_DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
# gen_ai.provider.name is required and has no well-known value for self-hosted engines behind a gateway.
GEN_AI_PROVIDER = "kvgate"
_GEN_AI_LABELS = ["gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model"]


def operation_name(path: str) -> str:
    """gen_ai.operation.name of an admitted API: OpenAI chat is `chat`; the completions API and Triton's
    generate/infer calls (text or tensors in, text out) are `text_completion`."""
    return "chat" if path == CHAT_PATH else "text_completion"


class _Children:
    """A labelled metric whose children are looked up once: prometheus_client's labels() validates and
    takes a lock on every call, which was a third of ext_proc's metric cost per request. Label values
    are catalog names and fixed codes, so the cache stays small."""

    def __init__(self, metric: Counter | Histogram):
        self.metric = metric
        self._by_labels: dict[tuple[str, ...], Any] = {}

    def labels(self, *labels: str) -> Any:
        child = self._by_labels.get(labels)
        if child is None:
            child = self._by_labels[labels] = self.metric.labels(*labels)
        return child


class Decisions:
    """What happens to requests as it happens: admission outcomes by model and reason ('admitted' or the
    refusal code), clamps, queue waits, ext_proc's own processing time, and the GenAI-convention metrics."""

    def __init__(self, registry: CollectorRegistry):
        self._counter = _Children(Counter("kvgate_admission_decisions", "Admission decisions by outcome",
                                ["model", "outcome"], registry=registry))
        self._wait = _Children(Histogram("kvgate_admission_queue_wait_seconds",
                               "Time a request waited for KV budget, by whether it got it",
                               ["model", "admitted"], registry=registry,
                               buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)))
        self._clamps = _Children(Counter("kvgate_admission_clamps", "Admitted requests whose max_tokens was lowered, by the "
                               "limit that lowered it", ["model", "limit"], registry=registry))
        self._tokens = _Children(Histogram("kvgate_admission_tokens", "Tokens an admitted request's KV reservation is sized for: "
                                 "input = its longest prompt (counted or bounded), output = the granted max_tokens",
                                 ["model", "token_type"], registry=registry, buckets=GEN_AI_TOKEN_BUCKETS))
        self._processing = _Children(Histogram("kvgate_ext_proc_processing_seconds",
                                     "ext_proc's own time per message, from receiving it to handing back its answer, "
                                     "queue wait excluded", ["phase"], registry=registry, buckets=PROCESSING_BUCKETS))
        # OpenTelemetry GenAI instruments in their Prometheus form (dots to underscores, unit suffix).
        self._gen_ai_tokens = _Children(Histogram("gen_ai_client_token_usage", "Input tokens of admitted requests, counted with "
                                        "the model's tokenizer (bounds are not reported)",
                                        [*_GEN_AI_LABELS, "gen_ai_token_type"], registry=registry,
                                        buckets=GEN_AI_TOKEN_BUCKETS))
        self._gen_ai_duration = _Children(Histogram("gen_ai_server_request_duration_seconds", "Request duration at the "
                                          "gateway: request headers to the end of the exchange (ext_proc stream end)",
                                          [*_GEN_AI_LABELS, "error_type"], registry=registry,
                                          buckets=GEN_AI_DURATION_BUCKETS))

    def record(self, model: str, outcome: str) -> None:
        self._counter.labels(model, outcome).inc()

    def totals(self) -> dict[str, dict[str, int]]:
        """Admitted and refused so far per model, from the outcome counter (read when asked, so the
        request path counts each decision once): model -> {"admitted": n, "refused": n}; `model` is ""
        for requests that named no known model, and requests passed through unreserved are neither."""
        out: dict[str, dict[str, int]] = {}
        for family in self._counter.metric.collect():
            for sample in family.samples:
                outcome = sample.labels["outcome"]
                if not sample.name.endswith("_total") or outcome == PASSED:
                    continue
                counts = out.setdefault(sample.labels["model"], {"admitted": 0, "refused": 0})
                counts["admitted" if outcome == ADMITTED else "refused"] += int(sample.value)
        return dict(sorted(out.items()))

    def waited(self, model: str, seconds: float, admitted: bool) -> None:
        self._wait.labels(model, str(admitted).lower()).observe(seconds)

    def admitted(self, d: DecisionRecord) -> None:
        """One admitted request (or gRPC stream message), its record filled by planned() and admitted()."""
        assert d.prompt_tokens is not None and d.max_tokens is not None
        self.record(d.model, ADMITTED)
        if d.clamped_by:
            self._clamps.labels(d.model, d.clamped_by).inc()
        self._tokens.labels(d.model, "input").observe(d.prompt_tokens)
        self._tokens.labels(d.model, "output").observe(d.max_tokens)
        # GenAI's token usage must not be reported unless counted (gen-ai-metrics.md): no bounds, and
        # no output (ext_proc never sees the response; max_tokens is a limit, not usage).
        if d.prompt_counted:
            self._gen_ai_tokens.labels(d.operation, GEN_AI_PROVIDER, d.model, "input").observe(d.prompt_tokens)

    def processed(self, phase: str, seconds: float) -> None:
        self._processing.labels(phase).observe(seconds)

    def finished(self, d: DecisionRecord, seconds: float) -> None:
        """The request is over. Lookups and requests no admitting API matched are no GenAI operation;
        `error_type` is the refusal code, empty for admitted ones (the engine's answer is not seen here)."""
        if d.operation and d.decision and d.decision != PASSED:
            error = "" if d.decision == ADMITTED else d.decision
            self._gen_ai_duration.labels(d.operation, GEN_AI_PROVIDER, d.model, error).observe(seconds)


_LEDGER_GAUGES: dict[str, tuple[str, Callable[[Ledger], float]]] = {
    "kvgate_kv_reserved_bytes": ("KV-cache bytes reserved on the pool by admitted requests, by any name",
                                 lambda lg: lg.reserved),
    "kvgate_kv_budget_bytes": ("KV-cache bytes this replica may hand out", lambda lg: lg.capacity),
    "kvgate_kv_engine_excess_bytes": ("Engine KV use the reservations do not explain", lambda lg: lg.excess),
    "kvgate_kv_engine_blind": ("1 while the engine's metrics are stale (endpoint counted full)",
                               lambda lg: int(lg.blind)),
    "kvgate_kv_reservations": ("Requests holding a reservation on the pool, by any name", lambda lg: lg.active),
}


class LedgerCollector(Collector):
    def __init__(self, ledgers: Ledgers, queue_lengths: Callable[[], dict[str, int]]):
        self._ledgers = ledgers
        self._queue_lengths = queue_lengths

    def collect(self) -> Iterator[Metric]:
        """Per model and endpoint, as before pools; every model on a pool shows the pool's numbers, and
        `pool` tells which series are one pool (take max, not sum, by pool)."""
        ledgers = self._ledgers.all()
        for name, (doc, read) in _LEDGER_GAUGES.items():
            family = GaugeMetricFamily(name, doc, labels=["model", "endpoint", "pool"])
            for ledger in ledgers:
                family.add_metric([ledger.model, ledger.endpoint, ledger.pool.key], read(ledger))
            yield family
        yield GaugeMetricFamily("kvgate_budget_share", "This replica's part of every endpoint's KV budget",
                                value=self._ledgers.share)
        waiting = GaugeMetricFamily("kvgate_admission_queue_waiting", "Requests waiting for KV budget",
                                    labels=["model"])
        for model, n in sorted(self._queue_lengths().items()):
            waiting.add_metric([model], n)
        yield waiting


def registry_for(ledgers: Ledgers, queue_lengths: Callable[[], dict[str, int]]) -> tuple[CollectorRegistry, Decisions]:
    registry = CollectorRegistry()
    registry.register(LedgerCollector(ledgers, queue_lengths))
    return registry, Decisions(registry)
