"""Engine metrics as the engines publish them, read from engine state at request time.

trtllm-serve: a JSON iteration-stats endpoint and Prometheus text (SimMetrics).
Triton with the TensorRT-LLM backend: Prometheus text with the backend's
nv_trt_llm_* families (TritonMetrics).
"""

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
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(name, doc, value=value)
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(name, doc, value=value)  # exposed with a _total suffix
        yield _exhaustion_counter(self._engine)


def _exhaustion_counter(engine: SimEngine) -> CounterMetricFamily:
    return CounterMetricFamily(
        "kvgate_sim_kv_exhaustion_events",  # exposed with a _total suffix
        "Requests that had to wait for KV blocks or a batch slot",
        value=engine.stats.kv_exhaustion_events,
    )


# The TensorRT-LLM backend labels its metrics with its own model, not the ensemble.
TRT_LLM_MODEL_LABELS = {"model": "tensorrt_llm", "version": "1"}


class _TritonCollector(Collector):
    def __init__(self, engine: SimEngine) -> None:
        self._engine = engine

    def collect(self) -> Iterator[Metric]:
        engine, kv = self._engine, self._engine.kv
        labels = list(TRT_LLM_MODEL_LABELS)
        label_values = list(TRT_LLM_MODEL_LABELS.values())
        requests = GaugeMetricFamily(
            "nv_trt_llm_request_metrics",
            "TRT LLM request metrics",
            labels=["request_type", *labels],
        )
        # active: requests the batch manager holds; scheduled: those in the current
        # iteration's batch (the same here, as nothing is paused); context: scheduled
        # requests still prefilling; waiting: queued for KV blocks or a batch slot.
        for request_type, value in (
            ("active", engine.running),
            ("scheduled", engine.running),
            ("max", engine.config.max_batch),
            ("context", engine.context),
            ("waiting", engine.waiting),
        ):
            requests.add_metric([request_type, *label_values], value)
        yield requests
        blocks = GaugeMetricFamily(
            "nv_trt_llm_kv_cache_block_metrics",
            "TRT LLM KV cache block metrics",
            labels=["kv_cache_block_type", *labels],
        )
        for block_type, value in (
            ("max", kv.total_blocks),
            ("free", kv.free_blocks),
            ("used", kv.used_blocks),
            ("tokens_per", kv.tokens_per_block),
            ("fraction", kv.utilization),
        ):
            blocks.add_metric([block_type, *label_values], value)
        yield blocks
        yield _exhaustion_counter(engine)


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


class TritonMetrics:
    """Triton's Prometheus metrics. A real Triton serves them on their own port (8002);
    the simulator serves them at /metrics on its HTTP port."""

    def __init__(self, engine: SimEngine) -> None:
        # Per instance, so several simulators in one process do not share series.
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_TritonCollector(engine))

    def prometheus_text(self) -> bytes:
        return generate_latest(self.registry)
