"""What an engine says about its own KV cache and queue, read from its Prometheus text exposition.

Pure: text in, `EngineLoad` out (the scraper in scraper.py does the I/O). Three dialects, by the
names the engines publish (docs/reference.md, "KV metrics"):

- trtllm-serve (`/prometheus/metrics`, only with `return_perf_metrics`): one gauge per value,
  `trtllm_kv_cache_utilization`, `trtllm_kv_cache_{used,free,max}_blocks`,
  `trtllm_kv_cache_tokens_per_block`, `trtllm_num_requests_{waiting,running}`, labelled
  `model_name="undefined", engine_type="undefined"` by trtllm-serve itself. The gauges get their
  first sample after the first iteration, so a fresh idle server has none yet.
- Triton's TensorRT-LLM backend (`/metrics` on the metrics port): two packed gauges,
  `nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=used|free|max|tokens_per|fraction}` and
  `nv_trt_llm_request_metrics{request_type=waiting|scheduled|active|max|context}`, labelled with the
  backend's own model (`model="tensorrt_llm"`, not the ensemble clients call) and `version`. Every
  model of a TensorRT-LLM repository publishes the families; only the one that owns the KV pool has
  non-zero values (measured on Triton 2.51 with a repository shaped like TensorRT-LLM's: `ensemble`
  publishes nothing, `tensorrt_llm_bls` only zeros, and only KV series, no request ones).
- vLLM (`/metrics`): `vllm:kv_cache_usage_perc` (a fraction despite its name; `vllm:gpu_cache_usage_perc`
  before 0.10), `vllm:num_requests_{waiting,running}`, per engine core (`engine` label, one per
  data-parallel rank); block size and count only as labels of `vllm:cache_config_info`, of which one
  block (the null block) holds no sequence: the usage fraction is over the others. The prompt tokens it
  has prefilled, `vllm:prompt_tokens_total` (a counter), are read to compare with kvgate's counts.

Several engine instances behind one endpoint (Triton model versions, vLLM data-parallel ranks) are
added up: blocks and requests summed, the used fraction over the summed blocks when known, else the
mean of the instances' fractions (data-parallel ranks have equal caches).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

Engine = Literal["trtllm-serve", "triton", "vllm"]

# A fraction a hair above 1 is rounding in the engine (used / max as a float), not a bad reading.
_FRACTION_SLACK = 1e-6


@dataclass(frozen=True)
class EngineLoad:
    """One endpoint's KV use and queue as its engine reports them; None: the engine does not say."""

    kv_used_fraction: float  # 0..1 of the endpoint's whole KV cache
    kv_used_blocks: int | None = None
    kv_max_blocks: int | None = None
    kv_usable_blocks: int | None = None  # the blocks sequences may hold (vLLM keeps one of max aside)
    tokens_per_block: int | None = None
    waiting: int | None = None  # queued, not yet holding KV blocks
    running: int | None = None  # holding KV blocks
    engine: Engine | None = None  # the dialect the text was read as
    prompt_tokens: int | None = None  # prompt tokens prefilled since the engine started (a counter)
    # Triton: the models whose series were read; more than one when none was named and several had
    # non-zero values (summed: see _pick_model).
    models: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Source:
    """Where one reading comes from: a family, narrowed by a label when the family packs several."""

    family: str
    field: str
    label: str | None = None  # the label naming the reading, e.g. kv_cache_block_type
    label_value: str | None = None
    value_label: str | None = None  # the reading is this label's value, not the sample's (vLLM info)


@dataclass(frozen=True)
class _Dialect:
    engine: Engine
    # Listed by preference: the first source that gives a field for an instance wins.
    sources: tuple[_Source, ...]
    # Labels that tell engine instances apart; other labels (pid, engine_type...) are ignored.
    instance_labels: tuple[str, ...] = ()
    # Label naming the model, for an endpoint serving several (only Triton does).
    model_label: str | None = None
    # Blocks of each instance's max that no sequence may hold (vLLM's null block), for an engine whose
    # cache size admission takes as its capacity (reconcile.py); None: not read as one.
    null_blocks: int | None = None

    @property
    def families(self) -> frozenset[str]:
        return frozenset(s.family for s in self.sources)

    @property
    def config_fields(self) -> frozenset[str]:
        """Fields read from labels of an info gauge: they describe the cache, not its use."""
        return frozenset(s.field for s in self.sources if s.value_label is not None)


def _packed(family: str, label: str, fields: dict[str, str]) -> tuple[_Source, ...]:
    return tuple(_Source(family, field, label, value) for value, field in fields.items())


_TRTLLM = _Dialect(
    "trtllm-serve",
    (
        _Source("trtllm_kv_cache_utilization", "fraction"),
        _Source("trtllm_kv_cache_used_blocks", "used"),
        _Source("trtllm_kv_cache_free_blocks", "free"),
        _Source("trtllm_kv_cache_max_blocks", "max"),
        _Source("trtllm_kv_cache_tokens_per_block", "tokens_per_block"),
        _Source("trtllm_num_requests_waiting", "waiting"),
        _Source("trtllm_num_requests_running", "running"),
    ),
)
_TRITON = _Dialect(
    "triton",
    _packed(
        "nv_trt_llm_kv_cache_block_metrics",
        "kv_cache_block_type",
        {"fraction": "fraction", "used": "used", "free": "free", "max": "max", "tokens_per": "tokens_per_block"},
    )
    # active: requests the batch manager holds (trtllm-serve's num_requests_running is the same
    # numActiveRequests); scheduled is only this iteration's batch.
    + _packed("nv_trt_llm_request_metrics", "request_type", {"waiting": "waiting", "active": "running"}),
    instance_labels=("model", "version"),
    model_label="model",
)
_VLLM = _Dialect(
    "vllm",
    (
        _Source("vllm:kv_cache_usage_perc", "fraction"),
        _Source("vllm:gpu_cache_usage_perc", "fraction"),
        _Source("vllm:num_requests_waiting", "waiting"),
        _Source("vllm:num_requests_running", "running"),
        _Source("vllm:cache_config_info", "max", value_label="num_gpu_blocks"),
        _Source("vllm:cache_config_info", "tokens_per_block", value_label="block_size"),
        _Source("vllm:prompt_tokens", "prompt_tokens"),
    ),
    instance_labels=("engine",),
    null_blocks=1,
)
_DIALECTS = (_TRTLLM, _TRITON, _VLLM)

# Only lines of these families reach the parser: a vLLM page of ~1000 lines of histograms takes
# ~50 ms to parse whole, on the event loop that admits requests; the lines we need take well under 1.
_KEPT_PREFIXES = tuple(
    prefix + name
    for name in sorted({f for d in _DIALECTS for f in d.families})
    for prefix in ("", "# HELP ", "# TYPE ")
)
_EXPECTED = (
    "trtllm_kv_cache_utilization (trtllm-serve), nv_trt_llm_kv_cache_block_metrics "
    "(Triton TensorRT-LLM backend) or vllm:kv_cache_usage_perc (vLLM)"
)


class NotPublishedYet(ValueError):
    """The engine answers but has no KV numbers yet: trtllm-serve sets its gauges when a first request
    completes. It is up, and idle as far as anyone can tell."""


class ModelNotPublished(NotPublishedYet):
    """Triton answers, but not for the model named (not loaded yet, or loading again after a restart;
    or a wrong name, which the scraper logs). Up: the ledger alone counts meanwhile."""


def parse_engine_load(text: str, model: str | None = None) -> EngineLoad:
    """Reads an engine's Prometheus text exposition.

    `model` picks the TensorRT-LLM model (its `model` label, e.g. "tensorrt_llm") on a Triton
    serving several; without it, the models with non-zero series count (`_pick_model`). trtllm-serve
    and vLLM serve one model per process and ignore it (trtllm-serve labels every series
    model_name="undefined").

    Raises ValueError, saying what was missing, when the text is malformed, holds none of the
    known families, or lacks the KV use; lines of other families are not looked at.
    """
    families = _parse(text)
    dialect = next((d for d in _DIALECTS if families.keys() & d.families), None)
    if dialect is None:
        raise ValueError(f"no engine KV metrics found: expected {_EXPECTED}")
    instances = _instances(dialect, families)
    if not instances:
        declared = ", ".join(sorted(families.keys() & dialect.families))
        raise NotPublishedYet(f"{dialect.engine} metrics have no samples yet ({declared} declared without values)")
    models: tuple[str, ...] = ()
    if dialect.model_label is not None:
        instances = _pick_model(dialect, instances, model)
        models = tuple(sorted({dict(key)[dialect.model_label] for key in instances}))
    return replace(_combine(dialect, list(instances.values())), models=models)


def _parse(text: str) -> dict[str, list[Sample]]:
    """Samples of the known families by family name; a family declared without samples maps to []."""
    kept = "\n".join(line for line in text.splitlines() if line.startswith(_KEPT_PREFIXES))
    try:
        parsed = list(text_string_to_metric_families(kept + "\n"))
    except Exception as e:  # the parser raises ValueError mostly, but not only
        raise ValueError(f"malformed Prometheus text: {e}") from e
    families: dict[str, list[Sample]] = defaultdict(list)
    for family in parsed:
        families[family.name].extend(family.samples)
    return families


_Instance = tuple[tuple[str, str], ...]  # the values of the dialect's instance labels


def _instances(dialect: _Dialect, families: dict[str, list[Sample]]) -> dict[_Instance, dict[str, float]]:
    readings: dict[_Instance, dict[str, float]] = defaultdict(dict)
    for source in dialect.sources:
        for sample in families.get(source.family, ()):
            if sample.name.endswith("_created"):  # a counter's creation time, not its value
                continue
            if source.label is not None and sample.labels.get(source.label) != source.label_value:
                continue
            value = _value(sample, source)
            if value is None:
                continue
            key = tuple((name, sample.labels.get(name, "")) for name in dialect.instance_labels)
            readings[key].setdefault(source.field, value)
    # A series known only from vllm:cache_config_info (labelled unlike the usage gauges) is not an
    # engine instance of its own: every rank publishes its usage, even idle.
    return {key: r for key, r in readings.items() if r.keys() - dialect.config_fields}


def _value(sample: Sample, source: _Source) -> float | None:
    if source.value_label is None:
        return float(sample.value)
    try:  # vLLM writes "None" for a count it does not know yet
        return float(sample.labels.get(source.value_label, ""))
    except ValueError:
        return None


def _pick_model(
    dialect: _Dialect, instances: dict[_Instance, dict[str, float]], model: str | None
) -> dict[_Instance, dict[str, float]]:
    """The named model's instances. Without a name: the instances of models with a non-zero reading,
    since the models that do not own a pool publish zeros (an ensemble's BLS); several such models
    are added up, which over-counts a pool only if they are separate pools the catalog did not tell
    apart: never blind, and never under. All zero: all of them (an idle, or starting, engine)."""
    def model_of(key: _Instance) -> str:
        return dict(key)[dialect.model_label or ""]

    if model is None:
        owning = {key: r for key, r in instances.items() if any(r.values())}
        return owning or instances
    picked = {key: r for key, r in instances.items() if model_of(key) == model}
    if not picked:
        models = sorted({model_of(key) for key in instances})
        raise ModelNotPublished(f"{dialect.engine} metrics have no model {model!r} (found: {', '.join(models)})")
    return picked


def _combine(dialect: _Dialect, instances: Sequence[dict[str, float]]) -> EngineLoad:
    fractions: list[float] = []
    used_blocks: list[float | None] = []
    for r in instances:
        used = r.get("used")
        if used is None and "max" in r and "free" in r:
            used = r["max"] - r["free"]
        used_blocks.append(used)
        # Blocks when known: exact, and consistent with kv_used_blocks; the engine's fraction else. No
        # block used is nothing used, even of a pool of 0 blocks (a Triton model still starting).
        fraction = used / r["max"] if used is not None and r.get("max") else r.get("fraction", 0.0 if used == 0 else None)
        if fraction is None:
            raise ValueError(
                f"{dialect.engine} metrics lack KV use: no {_names(dialect, 'fraction')} sample, "
                f"nor used (or free) and max blocks"
            )
        fractions.append(fraction)
    used_total = _sum(used_blocks)
    max_total = _sum(r.get("max") for r in instances)
    if used_total is not None and max_total:
        kv_used_fraction = used_total / max_total
    else:
        kv_used_fraction = sum(fractions) / len(fractions)
    return EngineLoad(
        kv_used_fraction=_fraction(kv_used_fraction),
        kv_used_blocks=_count("used blocks", used_total),
        kv_max_blocks=_count("max blocks", max_total),
        kv_usable_blocks=None if dialect.null_blocks is None else _count("usable blocks", _sum(
            None if r.get("max") is None else r["max"] - dialect.null_blocks for r in instances)),
        tokens_per_block=_count("tokens per block", _common(r.get("tokens_per_block") for r in instances)),
        waiting=_count("waiting", _sum(r.get("waiting") for r in instances)),
        running=_count("running", _sum(r.get("running") for r in instances)),
        engine=dialect.engine,
        prompt_tokens=_count("prompt tokens", _sum(r.get("prompt_tokens") for r in instances)),
    )


def _names(dialect: _Dialect, field: str) -> str:
    return " or ".join(
        f"{s.family}{{{s.label}={s.label_value}}}" if s.label else s.family
        for s in dialect.sources
        if s.field == field
    )


def _sum(values: Iterable[float | None]) -> float | None:
    """The sum when every instance gave the value: a partial sum would under-count."""
    total = 0.0
    for v in values:
        if v is None:
            return None
        total += v
    return total


def _common(values: Iterable[float | None]) -> float | None:
    """The value all instances share; None when one lacks it or they differ (no single block size)."""
    distinct = set(values)
    return distinct.pop() if len(distinct) == 1 else None


def _fraction(value: float) -> float:
    if not (math.isfinite(value) and 0.0 <= value <= 1.0 + _FRACTION_SLACK):
        raise ValueError(f"KV used fraction {value} is not within 0..1")
    return min(value, 1.0)


def _count(what: str, value: float | None) -> int | None:
    if value is None:
        return None
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{what} is {value}, not a count")
    return round(value)
