"""parse_engine_load on expositions shaped like the engines' own, and on the simulator's."""

from __future__ import annotations

from pathlib import Path

import pytest

from engines.sim.config import SimConfig
from engines.sim.engine import SimEngine
from engines.sim.metrics import SimMetrics, TritonMetrics
from ext_proc.engine_metrics import EngineLoad, ModelNotPublished, NotPublishedYet, parse_engine_load

# trtllm-serve --return_perf_metrics: prometheus_client in multiprocess mode (hence pid), every series
# labelled model_name/engine_type "undefined" by trtllm-serve, iteration gauges among request ones.
TRTLLM_SERVE = """\
# HELP trtllm_request_success_total Count of successfully processed requests.
# TYPE trtllm_request_success_total counter
trtllm_request_success_total{engine_type="undefined",finished_reason="stop",model_name="undefined"} 12.0
trtllm_request_success_total{engine_type="undefined",finished_reason="length",model_name="undefined"} 3.0
# HELP trtllm_e2e_request_latency_seconds Histogram of end to end request latency in seconds.
# TYPE trtllm_e2e_request_latency_seconds histogram
trtllm_e2e_request_latency_seconds_sum{engine_type="undefined",model_name="undefined"} 7.25
trtllm_e2e_request_latency_seconds_bucket{engine_type="undefined",le="0.3",model_name="undefined"} 2.0
trtllm_e2e_request_latency_seconds_bucket{engine_type="undefined",le="+Inf",model_name="undefined"} 15.0
trtllm_e2e_request_latency_seconds_count{engine_type="undefined",model_name="undefined"} 15.0
# HELP trtllm_kv_cache_hit_rate KV cache hit rate
# TYPE trtllm_kv_cache_hit_rate gauge
trtllm_kv_cache_hit_rate{engine_type="undefined",model_name="undefined",pid="4711"} 0.5
# HELP trtllm_kv_cache_utilization KV cache utilization
# TYPE trtllm_kv_cache_utilization gauge
trtllm_kv_cache_utilization{engine_type="undefined",model_name="undefined",pid="4711"} 0.25
# HELP trtllm_num_requests_running Number of active requests
# TYPE trtllm_num_requests_running gauge
trtllm_num_requests_running{engine_type="undefined",model_name="undefined",pid="4711"} 3.0
# HELP trtllm_num_requests_waiting Number of queued requests
# TYPE trtllm_num_requests_waiting gauge
trtllm_num_requests_waiting{engine_type="undefined",model_name="undefined",pid="4711"} 1.0
# HELP trtllm_kv_cache_max_blocks Maximum number of KV cache blocks
# TYPE trtllm_kv_cache_max_blocks gauge
trtllm_kv_cache_max_blocks{engine_type="undefined",model_name="undefined",pid="4711"} 8192.0
# HELP trtllm_kv_cache_free_blocks Number of free KV cache blocks
# TYPE trtllm_kv_cache_free_blocks gauge
trtllm_kv_cache_free_blocks{engine_type="undefined",model_name="undefined",pid="4711"} 6144.0
# HELP trtllm_kv_cache_used_blocks Number of used KV cache blocks
# TYPE trtllm_kv_cache_used_blocks gauge
trtllm_kv_cache_used_blocks{engine_type="undefined",model_name="undefined",pid="4711"} 2048.0
# HELP trtllm_kv_cache_tokens_per_block Number of tokens per KV cache block
# TYPE trtllm_kv_cache_tokens_per_block gauge
trtllm_kv_cache_tokens_per_block{engine_type="undefined",model_name="undefined",pid="4711"} 32.0
"""

# Triton 2.x with the TensorRT-LLM backend behind an ensemble: the nv_trt_llm_* families carry the
# backend's model (tensorrt_llm), the core nv_inference_* ones every model of the ensemble.
TRITON = """\
# HELP nv_inference_request_success Number of successful inference requests, all batch sizes
# TYPE nv_inference_request_success counter
nv_inference_request_success{model="ensemble",version="1"} 40
nv_inference_request_success{model="postprocessing",version="1"} 40
nv_inference_request_success{model="preprocessing",version="1"} 40
nv_inference_request_success{model="tensorrt_llm",version="1"} 40
# HELP nv_inference_pending_request_count Instantaneous number of pending requests awaiting execution per-model.
# TYPE nv_inference_pending_request_count gauge
nv_inference_pending_request_count{model="tensorrt_llm",version="1"} 0
# HELP nv_trt_llm_request_metrics TRT LLM request metrics
# TYPE nv_trt_llm_request_metrics gauge
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="waiting",version="1"} 2
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="context",version="1"} 1
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="scheduled",version="1"} 5
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="max",version="1"} 512
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="active",version="1"} 6
# HELP nv_trt_llm_runtime_memory_metrics TRT LLM runtime memory metrics
# TYPE nv_trt_llm_runtime_memory_metrics gauge
nv_trt_llm_runtime_memory_metrics{memory_type="pinned",model="tensorrt_llm",version="1"} 0
nv_trt_llm_runtime_memory_metrics{memory_type="gpu",model="tensorrt_llm",version="1"} 1610236
# HELP nv_trt_llm_kv_cache_block_metrics TRT LLM KV cache block metrics
# TYPE nv_trt_llm_kv_cache_block_metrics gauge
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="fraction",model="tensorrt_llm",version="1"} 0.5
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="tokens_per",model="tensorrt_llm",version="1"} 64
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="used",model="tensorrt_llm",version="1"} 3120
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="free",model="tensorrt_llm",version="1"} 3120
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="max",model="tensorrt_llm",version="1"} 6240
# HELP nv_trt_llm_inflight_batcher_metrics TRT LLM inflight_batcher-specific metrics
# TYPE nv_trt_llm_inflight_batcher_metrics gauge
nv_trt_llm_inflight_batcher_metrics{inflight_batcher_specific_metric="paused_requests",model="tensorrt_llm",version="1"} 0
# HELP nv_trt_llm_general_metrics General TRT LLM metrics
# TYPE nv_trt_llm_general_metrics gauge
nv_trt_llm_general_metrics{general_type="iteration_counter",model="tensorrt_llm",version="1"} 1037
# HELP nv_gpu_utilization GPU utilization rate [0.0 - 1.0)
# TYPE nv_gpu_utilization gauge
nv_gpu_utilization{gpu_uuid="GPU-5f2b9f7a-d2d5-9a4c-3b3e-1b7d0f6a9c11"} 0.83
"""

# vLLM V1, one engine core: usage per engine, block size and count as labels of an info gauge.
VLLM = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 4.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 7.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.375
# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 91234.0
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 4096.0
vllm:prompt_tokens_created{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 1.7964029554216778e+09
# HELP vllm:prompt_tokens_cached_total Number of cached prompt tokens (local prefix cache hits).
# TYPE vllm:prompt_tokens_cached_total counter
vllm:prompt_tokens_cached_total{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 512.0
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.001",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="meta-llama/Llama-3.1-8B-Instruct"} 210.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 210.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 18.9
# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="16",cache_dtype="auto",enable_prefix_caching="True",engine="0",gpu_memory_utilization="0.9",num_cpu_blocks="None",num_gpu_blocks="27488",num_gpu_blocks_override="None"} 1.0
"""


def test_trtllm_serve() -> None:
    assert parse_engine_load(TRTLLM_SERVE) == EngineLoad(
        kv_used_fraction=0.25, kv_used_blocks=2048, kv_max_blocks=8192, tokens_per_block=32,
        waiting=1, running=3, engine="trtllm-serve",
    )  # fmt: skip


def test_trtllm_serve_ignores_the_model_filter() -> None:
    """trtllm-serve serves one model and labels it "undefined": a filter would match nothing."""
    assert parse_engine_load(TRTLLM_SERVE, model="llama").kv_used_blocks == 2048


def test_trtllm_serve_without_block_gauges_uses_its_utilization() -> None:
    """Releases before the block gauges published only utilization (with max blocks and block size)."""
    lines = TRTLLM_SERVE.splitlines()
    text = "\n".join(line for line in lines if "used_blocks" not in line and "free_blocks" not in line)
    load = parse_engine_load(text)
    assert (load.kv_used_fraction, load.kv_used_blocks, load.kv_max_blocks) == (0.25, None, 8192)


def test_trtllm_serve_before_its_first_iteration() -> None:
    """The iteration gauges are declared at start but get a sample only once the engine iterates."""
    declared_only = "\n".join(line for line in TRTLLM_SERVE.splitlines() if line.startswith("#"))
    with pytest.raises(ValueError, match="trtllm-serve metrics have no samples yet"):
        parse_engine_load(declared_only)


def test_trtllm_serve_without_kv_use() -> None:
    text = """\
trtllm_num_requests_waiting 0
trtllm_kv_cache_max_blocks 64
"""
    with pytest.raises(ValueError, match="trtllm-serve metrics lack KV use: no trtllm_kv_cache_utilization sample"):
        parse_engine_load(text)


def test_the_simulated_trtllm_serve() -> None:
    engine = SimEngine(SimConfig(kv_blocks=64, tokens_per_block=16))
    assert engine.kv.try_allocate("request", 100)  # ceil(100 / 16) = 7 blocks
    load = parse_engine_load(SimMetrics(engine).prometheus_text().decode())
    assert load == EngineLoad(
        kv_used_fraction=7 / 64, kv_used_blocks=7, kv_max_blocks=64, tokens_per_block=16,
        waiting=0, running=0, engine="trtllm-serve",
    )  # fmt: skip


def test_triton() -> None:
    assert parse_engine_load(TRITON) == EngineLoad(
        kv_used_fraction=0.5, kv_used_blocks=3120, kv_max_blocks=6240, tokens_per_block=64,
        waiting=2, running=6, engine="triton", models=("tensorrt_llm",),
    )  # fmt: skip
    assert parse_engine_load(TRITON, model="tensorrt_llm").kv_used_blocks == 3120


def test_the_simulated_triton() -> None:
    engine = SimEngine(SimConfig(kv_blocks=64, tokens_per_block=16, max_batch=8))
    assert engine.kv.try_allocate("request", 33)  # 3 blocks
    load = parse_engine_load(TritonMetrics(engine).prometheus_text().decode())
    assert load.kv_used_blocks == 3 and load.kv_max_blocks == 64 and load.engine == "triton"
    assert load == EngineLoad(
        kv_used_fraction=3 / 64, kv_used_blocks=3, kv_max_blocks=64, tokens_per_block=16,
        waiting=0, running=0, engine="triton", models=load.models,
    )  # fmt: skip


def _triton_model(model: str, used: int, max_blocks: int, version: str = "1", tokens_per: int = 64) -> str:
    labels = f'model="{model}",version="{version}"'
    blocks = {"used": used, "max": max_blocks, "free": max_blocks - used, "tokens_per": tokens_per}
    lines = [f'nv_trt_llm_kv_cache_block_metrics{{kv_cache_block_type="{k}",{labels}}} {v}' for k, v in blocks.items()]
    lines += [f'nv_trt_llm_request_metrics{{request_type="{k}",{labels}}} 1' for k in ("waiting", "active")]
    return "\n".join(lines) + "\n"


def test_triton_with_several_models_reads_the_one_named() -> None:
    text = _triton_model("llama_trtllm", 10, 100) + _triton_model("mistral_trtllm", 30, 200)
    load = parse_engine_load(text, model="mistral_trtllm")
    assert (load.kv_used_blocks, load.kv_max_blocks, load.models) == (30, 200, ("mistral_trtllm",))


def test_triton_without_the_named_model_is_up_without_numbers() -> None:
    """Not loaded yet (or a wrong name, which the scraper logs): not a reason to count the engine full."""
    text = _triton_model("llama_trtllm", 10, 100) + _triton_model("mistral_trtllm", 30, 200)
    with pytest.raises(ModelNotPublished, match=r"no model 'tensorrt_llm' \(found: llama_trtllm, mistral_trtllm\)"):
        parse_engine_load(text, model="tensorrt_llm")
    assert issubclass(ModelNotPublished, NotPublishedYet)


def test_triton_with_several_non_zero_models_and_none_named_adds_them_up() -> None:
    """Never blind, never under: the sum over-counts only pools the catalog failed to tell apart."""
    load = parse_engine_load(_triton_model("llama_trtllm", 10, 100) + _triton_model("mistral_trtllm", 30, 200))
    assert (load.kv_used_blocks, load.kv_max_blocks, load.running) == (40, 300, 2)
    assert load.models == ("llama_trtllm", "mistral_trtllm")


REAL_TRITON = Path(__file__).parent / "data"


@pytest.mark.parametrize(("page", "used", "running"), [("idle", 0, 0), ("busy", 21, 3)])
def test_real_triton_with_a_bls_publishing_zeros_reads_the_pools_owner(page: str, used: int, running: int) -> None:
    """Pages of the real Triton 2.51 (tests/real_engines/triton_fixture.py's repository): `tensorrt_llm`
    owns the 64-block pool, `tensorrt_llm_bls` publishes zeros for every KV type and no request
    metrics, `ensemble` nothing. Its zeros are no model: the owner is read, named or not."""
    text = (REAL_TRITON / f"triton_2.51_trtllm_repository_{page}.txt").read_text()
    expected = EngineLoad(kv_used_fraction=used / 64, kv_used_blocks=used, kv_max_blocks=64, tokens_per_block=16,
                          waiting=0, running=running, engine="triton", models=("tensorrt_llm",))
    assert parse_engine_load(text) == expected
    assert parse_engine_load(text, model="tensorrt_llm") == expected
    bls = parse_engine_load(text, model="tensorrt_llm_bls")  # named, it is read: zeros, and no queue known
    assert (bls.kv_used_blocks, bls.kv_max_blocks, bls.running) == (0, 0, None)


def test_triton_whose_models_all_publish_zeros_is_an_idle_engine() -> None:
    """An engine still starting (or restarted): zeros everywhere read as nothing used, never as an error."""
    load = parse_engine_load(_triton_model("tensorrt_llm", 0, 0, tokens_per=0) + _triton_model("bls", 0, 0, tokens_per=0))
    assert (load.kv_used_blocks, load.kv_used_fraction, load.models) == (0, 0.0, ("bls", "tensorrt_llm"))


def test_triton_model_versions_add_up() -> None:
    """Two loaded versions are two engines with caches of their own behind one endpoint."""
    load = parse_engine_load(_triton_model("tensorrt_llm", 10, 100, "1") + _triton_model("tensorrt_llm", 50, 100, "2"))
    assert (load.kv_used_blocks, load.kv_max_blocks, load.kv_used_fraction) == (60, 200, 0.3)
    assert (load.waiting, load.running, load.tokens_per_block) == (2, 2, 64)


def test_triton_versions_with_different_block_sizes_have_no_single_block_size() -> None:
    text = _triton_model("tensorrt_llm", 10, 100, "1", 32) + _triton_model("tensorrt_llm", 10, 100, "2", 64)
    assert parse_engine_load(text).tokens_per_block is None


def test_triton_used_blocks_from_free_and_max() -> None:
    text = """\
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="free",model="tensorrt_llm",version="1"} 96
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="max",model="tensorrt_llm",version="1"} 128
"""
    load = parse_engine_load(text)
    assert (load.kv_used_blocks, load.kv_used_fraction) == (32, 0.25)
    assert (load.waiting, load.running, load.tokens_per_block) == (None, None, None)


def test_triton_blocks_win_over_its_fraction() -> None:
    """Blocks are exact and what kv_used_blocks reports; the fraction only stands in when they are missing."""
    text = TRITON.replace('kv_cache_block_type="fraction",model="tensorrt_llm",version="1"} 0.5',
                          'kv_cache_block_type="fraction",model="tensorrt_llm",version="1"} 0.4875')
    assert parse_engine_load(text).kv_used_fraction == 0.5


def test_triton_before_the_waiting_request_type() -> None:
    """Older backends published active, scheduled, max and context, but no waiting."""
    text = "\n".join(line for line in TRITON.splitlines() if 'request_type="waiting"' not in line)
    load = parse_engine_load(text)
    assert (load.waiting, load.running) == (None, 6)


def test_vllm() -> None:
    """One of vLLM's blocks is its null block: sequences hold the others, and its usage is a fraction of
    them. Its prompt-token counter is read (not the counter's creation time, nor the cached tokens)."""
    assert parse_engine_load(VLLM) == EngineLoad(
        kv_used_fraction=0.375, kv_used_blocks=None, kv_max_blocks=27488, kv_usable_blocks=27487,
        tokens_per_block=16, waiting=7, running=4, engine="vllm", prompt_tokens=4096,
    )  # fmt: skip


def test_vllm_data_parallel_ranks_add_up() -> None:
    rank1 = VLLM.replace('engine="0"', 'engine="1"').replace("} 0.375", "} 0.125")
    load = parse_engine_load(VLLM + rank1)
    assert (load.kv_used_fraction, load.kv_max_blocks, load.kv_usable_blocks, load.waiting, load.running,
            load.prompt_tokens) == (0.25, 2 * 27488, 2 * 27487, 14, 8, 2 * 4096)


def test_vllm_before_profiling_knows_no_block_count() -> None:
    load = parse_engine_load(VLLM.replace('num_gpu_blocks="27488"', 'num_gpu_blocks="None"'))
    assert (load.kv_max_blocks, load.kv_usable_blocks, load.tokens_per_block, load.kv_used_fraction) == (
        None, None, 16, 0.375)


def test_old_vllm_gpu_cache_usage_perc() -> None:
    text = """\
# HELP vllm:gpu_cache_usage_perc GPU KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{model_name="facebook/opt-125m"} 0.0625
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="facebook/opt-125m"} 0.0
"""
    load = parse_engine_load(text)
    assert (load.kv_used_fraction, load.waiting, load.running, load.engine) == (0.0625, 0, None, "vllm")


def test_other_families_are_not_looked_at() -> None:
    """Only the families read are parsed (a whole vLLM page is ~50 ms of parsing): a broken line
    elsewhere cannot cost the reading."""
    assert parse_engine_load(VLLM + "some_other_metric{broken 1\n").kv_used_fraction == 0.375


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no engine KV metrics found: expected trtllm_kv_cache_utilization"),
        ("<html><body><h1>404 Not Found</h1></body></html>", "no engine KV metrics found"),
        ('{"detail": "Not Found"}', "no engine KV metrics found"),
        ("nv_inference_count{model=\"ensemble\",version=\"1\"} 4\n", "no engine KV metrics found"),
        ('trtllm_kv_cache_utilization{model_name="x} 0.5\n', "malformed Prometheus text"),
        ("trtllm_kv_cache_utilization zero\n", "malformed Prometheus text"),
        ("trtllm_kv_cache_utilization 1.5\n", r"KV used fraction 1.5 is not within 0..1"),
        ("trtllm_kv_cache_utilization NaN\n", r"KV used fraction nan is not within 0..1"),
        ("trtllm_kv_cache_utilization 0.5\ntrtllm_num_requests_waiting -1\n", "waiting is -1.0, not a count"),
        ('vllm:num_requests_waiting{engine="0"} 0\n', r"vllm metrics lack KV use: no vllm:kv_cache_usage_perc or "
                                                      r"vllm:gpu_cache_usage_perc sample"),
    ],
)
def test_unusable_text(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_engine_load(text)
