"""trtllm-serve's two metric endpoints, both read from engine state at request time."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from engines.sim.engine import SimEngine


class _EngineCollector(Collector):
    def __init__(self, engine: SimEngine) -> None:
        self._engine = engine

    def collect(self) -> Iterator[Metric]:
        kv, stats = self._engine.kv, self._engine.stats
        gauges = {
            "trtllm_kv_cache_utilization": ("Fraction of KV cache blocks in use", kv.utilization),
            "trtllm_kv_cache_tokens_per_block": ("Tokens per KV cache block", kv.tokens_per_block),
            "trtllm_kv_cache_max_blocks": ("KV cache capacity in blocks", kv.total_blocks),
            "trtllm_kv_cache_used_blocks": ("KV cache blocks in use", kv.used_blocks),
            "trtllm_num_requests_waiting": (
                "Requests waiting to be scheduled",
                self._engine.waiting,
            ),
            "trtllm_num_requests_running": ("Requests scheduled", self._engine.running),
        }
        counters = {
            "trtllm_request_success": ("Requests finished (stop or length)", stats.completed),
            "trtllm_prompt_tokens": ("Prompt tokens prefilled", stats.prompt_tokens_total),
            "trtllm_generation_tokens": ("Tokens generated", stats.generation_tokens_total),
            "kvgate_sim_kv_exhaustion_events": (
                "Requests that had to wait for KV blocks or a batch slot",
                stats.kv_exhaustion_events,
            ),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(name, doc, value=value)
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(name, doc, value=value)  # exposed with a _total suffix


class SimMetrics:
    def __init__(self, engine: SimEngine) -> None:
        self._engine = engine
        self._iterations = itertools.count(1)
        # Per instance, so several simulators in one process do not share series.
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_EngineCollector(engine))

    def prometheus_text(self) -> bytes:
        return generate_latest(self.registry)

    def iteration_stats(self) -> list[dict[str, Any]]:
        """trtllm-serve's /metrics shape: a list of iteration stats, here one current snapshot."""
        kv = self._engine.kv
        return [
            {
                "iter": next(self._iterations),
                "numActiveRequests": self._engine.running,
                "numQueuedRequests": self._engine.waiting,
                "kvCacheStats": {
                    "maxNumBlocks": kv.total_blocks,
                    "freeNumBlocks": kv.free_blocks,
                    "usedNumBlocks": kv.used_blocks,
                    "tokensPerBlock": kv.tokens_per_block,
                },
            }
        ]
