"""Prometheus metrics of one ext_proc process: decisions counted as they happen, ledgers read at scrape."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ext_proc.ledger import Ledgers


class Decisions:
    """Admission outcomes by model and reason ('admitted' or the refusal code)."""

    def __init__(self, registry: CollectorRegistry):
        self._counter = Counter("kvgate_admission_decisions", "Admission decisions by outcome",
                                ["model", "outcome"], registry=registry)

    def record(self, model: str, outcome: str) -> None:
        self._counter.labels(model, outcome).inc()


class LedgerCollector(Collector):
    def __init__(self, ledgers: Ledgers):
        self._ledgers = ledgers

    def collect(self) -> Iterator[Metric]:
        families = {
            "kvgate_kv_reserved_bytes": ("KV-cache bytes reserved by admitted requests", lambda lg: lg.reserved),
            "kvgate_kv_budget_bytes": ("KV-cache bytes this replica may hand out", lambda lg: lg.capacity),
            "kvgate_kv_reservations": ("Requests holding a reservation", lambda lg: lg.active),
        }
        for name, (doc, read) in families.items():
            family = GaugeMetricFamily(name, doc, labels=["model"])
            for model, ledger in self._ledgers.items():
                family.add_metric([model], read(ledger))
            yield family


def registry_for(ledgers: Ledgers) -> tuple[CollectorRegistry, Decisions]:
    registry = CollectorRegistry()
    registry.register(LedgerCollector(ledgers))
    return registry, Decisions(registry)
