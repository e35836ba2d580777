"""TensorRT-LLM's Prometheus families, named and labelled as its Triton backend publishes them, for the
Python models of this repository."""

from __future__ import annotations

from dataclasses import dataclass

import triton_python_backend_utils as pb_utils


@dataclass(frozen=True)
class Family:
    name: str
    description: str
    type_label: str
    types: tuple[str, ...]


KV_CACHE_BLOCKS = Family("nv_trt_llm_kv_cache_block_metrics", "TRT LLM KV cache block metrics",
                         "kv_cache_block_type", ("max", "free", "used", "tokens_per", "fraction"))
REQUESTS = Family("nv_trt_llm_request_metrics", "TRT LLM request metrics",
                  "request_type", ("waiting", "scheduled", "active", "max", "context"))


class Gauges:
    """One family's gauges for one model: a series per type, labelled with the model and its version."""

    def __init__(self, family: Family, model: str, version: str) -> None:
        # Kept: a Metric whose MetricFamily object is gone can no longer be set.
        self._family = pb_utils.MetricFamily(name=family.name, description=family.description,
                                             kind=pb_utils.MetricFamily.GAUGE)
        self._gauges = {kind: self._family.Metric(labels={family.type_label: kind, "model": model, "version": version})
                        for kind in family.types}

    def set(self, values: dict[str, float]) -> None:
        for kind, value in values.items():
            self._gauges[kind].set(value)
