"""Prometheus metrics of one ext_proc process: decisions counted as they happen, ledgers read at scrape."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ext_proc.ledger import Ledger, Ledgers


class Decisions:
    """Admission outcomes by model and reason ('admitted' or the refusal code), and queue waits."""

    def __init__(self, registry: CollectorRegistry):
        self._counter = Counter("kvgate_admission_decisions", "Admission decisions by outcome",
                                ["model", "outcome"], registry=registry)
        self._wait = Histogram("kvgate_admission_queue_wait_seconds",
                               "Time a request waited for KV budget, by whether it got it",
                               ["model", "admitted"], registry=registry,
                               buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60))

    def record(self, model: str, outcome: str) -> None:
        self._counter.labels(model, outcome).inc()

    def waited(self, model: str, seconds: float, admitted: bool) -> None:
        self._wait.labels(model, str(admitted).lower()).observe(seconds)


_LEDGER_GAUGES: dict[str, tuple[str, Callable[[Ledger], float]]] = {
    "kvgate_kv_reserved_bytes": ("KV-cache bytes reserved by admitted requests", lambda lg: lg.reserved),
    "kvgate_kv_budget_bytes": ("KV-cache bytes this replica may hand out", lambda lg: lg.capacity),
    "kvgate_kv_engine_excess_bytes": ("Engine KV use the reservations do not explain", lambda lg: lg.excess),
    "kvgate_kv_engine_blind": ("1 while the engine's metrics are stale (endpoint counted full)",
                               lambda lg: int(lg.blind)),
    "kvgate_kv_reservations": ("Requests holding a reservation", lambda lg: lg.active),
}


class LedgerCollector(Collector):
    def __init__(self, ledgers: Ledgers, queue_lengths: Callable[[], dict[str, int]]):
        self._ledgers = ledgers
        self._queue_lengths = queue_lengths

    def collect(self) -> Iterator[Metric]:
        ledgers = self._ledgers.all()
        for name, (doc, read) in _LEDGER_GAUGES.items():
            family = GaugeMetricFamily(name, doc, labels=["model", "endpoint"])
            for ledger in ledgers:
                family.add_metric([ledger.model, ledger.endpoint], read(ledger))
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
