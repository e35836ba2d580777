"""Engine metrics as the engines publish them, read from engine state at request time.

trtllm-serve: a JSON iteration-stats endpoint and Prometheus text (SimMetrics).
Triton with the TensorRT-LLM backend: Prometheus text with the backend's
nv_trt_llm_* families (TritonMetrics).
vLLM: Prometheus text with its vllm:* names, for the vLLM flavor (VllmMetrics).
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


class _VllmCollector(Collector):
    """vLLM 0.32's names and labels for what ext_proc and the benchmarks read (docs/reference.md)."""

    def __init__(self, engine: SimEngine, model: str) -> None:
        self._engine = engine
        self._labels = {"engine": "0", "model_name": model}

    def _gauge(self, name: str, doc: str, value: float, **labels: str) -> GaugeMetricFamily:
        family = GaugeMetricFamily(name, doc, labels=[*self._labels, *labels])
        family.add_metric([*self._labels.values(), *labels.values()], value)
        return family

    def _counter(self, name: str, doc: str, value: float) -> CounterMetricFamily:
        family = CounterMetricFamily(name, doc, labels=list(self._labels))  # exposed with a _total suffix
        family.add_metric(list(self._labels.values()), value)
        return family

    def collect(self) -> Iterator[Metric]:
        engine, kv, stats = self._engine, self._engine.kv, self._engine.stats
        yield self._gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", kv.utilization)
        yield self._gauge("vllm:num_requests_running", "Number of requests in model execution batches.", engine.running)
        yield self._gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", engine.waiting)
        by_reason = GaugeMetricFamily("vllm:num_requests_waiting_by_reason", "Requests waiting, by reason.",
                                      labels=[*self._labels, "reason"])
        for reason, value in (("capacity", engine.waiting), ("deferred", 0)):
            by_reason.add_metric([*self._labels.values(), reason], value)
        yield by_reason
        yield self._counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.",
                            stats.preemptions)
        yield self._counter("vllm:prompt_tokens", "Number of prefill tokens processed.", stats.prompt_tokens_total)
        yield self._counter("vllm:generation_tokens", "Number of generation tokens processed.",
                            stats.generation_tokens_total)
        # vLLM's own help texts; both count tokens, at every scheduling of a request (a preempted one again).
        yield self._counter("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried "
                            "tokens.", stats.prefix_cache_queries)
        yield self._counter("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.",
                            stats.prefix_cache_hits)
        info = GaugeMetricFamily("vllm:cache_config_info", "Information of the LLMEngine CacheConfig",
                                 labels=["block_size", "engine", "num_gpu_blocks"])
        info.add_metric([str(kv.tokens_per_block), "0", str(kv.total_blocks)], 1.0)
        yield info
        yield _exhaustion_counter(engine)


class SimMetrics:
    def __init__(self, engine: SimEngine) -> None:
        self._engine = engine
        self._iterations = itertools.count(1)
        # Per instance, so several simulators in one process do not share series.
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_EngineCollector(engine))
        self.vllm_registry = CollectorRegistry(auto_describe=False)
        self.vllm_registry.register(_VllmCollector(engine, engine.config.model))

    def prometheus_text(self) -> bytes:
        return generate_latest(self.registry)

    def vllm_text(self) -> bytes:
        return generate_latest(self.vllm_registry)

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
