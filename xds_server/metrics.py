"""Prometheus metrics of the control plane, read from the ADS server's own bookkeeping at scrape time
(nothing is counted twice). A Grafana dashboard reads these exact names."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from xds_server.server import AdsServicer


class XdsCollector(Collector):
    def __init__(self, ads: AdsServicer):
        self._ads = ads

    def collect(self) -> Iterator[Metric]:
        pushes = CounterMetricFamily("kvgate_xds_pushes", "xDS responses sent, by resource type",
                                     labels=["type_url"])
        for type_url, n in sorted(self._ads.responses_sent.items()):
            pushes.add_metric([type_url], n)
        yield pushes
        nacks = CounterMetricFamily("kvgate_xds_nacks", "xDS responses a client rejected, by resource type",
                                    labels=["type_url"])
        for type_url, n in sorted(self._ads.nacks_received.items()):
            nacks.add_metric([type_url], n)
        yield nacks
        nodes = GaugeMetricFamily("kvgate_xds_connected_nodes", "Connected xDS streams, by node group (node.cluster)",
                                  labels=["group"])
        for group, n in sorted(Counter(c.cluster for c in self._ads.clients.values()).items()):
            nodes.add_metric([group], n)
        yield nodes


def registry_for(ads: AdsServicer) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(XdsCollector(ads))
    return registry
