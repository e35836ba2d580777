"""trtllm-serve's command line and its `--extra_llm_api_options` YAML for one catalog model.

Pure: `EngineSettings` in, argv and a dict out (assets.py writes them). Option names are
TensorRT-LLM 1.x's (`trtllm-serve --help`, `tensorrt_llm.llmapi.KvCacheConfig`); what kvgate needs
from them:

- the KV pool: `kv_cache_config.free_gpu_memory_fraction` (the catalog's kv.free_memory_fraction)
  capped by `kv_cache_config.max_tokens` (the catalog's budget in tokens), so the engine's pool is
  at most the budget the gateway hands out;
- the block size: fixed in a TensorRT engine's build, `kv_cache_config.tokens_per_block` for the
  PyTorch backend;
- the Prometheus KV gauges ext_proc scrapes at `/prometheus/metrics`: trtllm-serve serves that
  page only with `return_perf_metrics: true`, and the PyTorch backend collects the iteration stats
  the KV gauges come from only with `enable_iter_perf_stats: true` (the TensorRT backend always
  does, and its options reject the key).
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

from engines.engine_settings import DEFAULT_TOKENS_PER_BLOCK, EngineSettings

# Inside its container the engine binds every address; the compose network decides who reaches it.
BIND_HOST = "0.0.0.0"


def extra_llm_api_options(s: EngineSettings) -> dict[str, Any]:
    """The YAML trtllm-serve merges over its command line."""
    # A kv_cache_config given here replaces the one the command line built, so the fraction goes here
    # too, or it would fall back to TensorRT-LLM's default.
    kv: dict[str, Any] = {"free_gpu_memory_fraction": s.free_gpu_memory_fraction, "max_tokens": s.max_kv_tokens}
    if s.backend == "pytorch":
        # Only when it differs from the default: TensorRT-LLM versions without the field reject it.
        if s.tokens_per_block != DEFAULT_TOKENS_PER_BLOCK:
            kv["tokens_per_block"] = s.tokens_per_block
        if s.kv_cache_dtype:
            kv["dtype"] = s.kv_cache_dtype
    options: dict[str, Any] = {"kv_cache_config": kv, "return_perf_metrics": True}
    if s.backend == "pytorch":
        options["enable_iter_perf_stats"] = True
    return options


def argv(s: EngineSettings, options_file: PurePosixPath) -> list[str]:
    """`trtllm-serve MODEL ...` as the engine's container runs it."""
    tokenizer = ["--tokenizer", str(s.tokenizer_dir)] if s.tokenizer_dir else []
    return ["trtllm-serve", str(s.checkpoint), "--backend", s.backend, *tokenizer,
            "--host", BIND_HOST, "--port", str(s.port),
            "--max_batch_size", str(s.max_batch_size), "--max_num_tokens", str(s.max_num_tokens),
            "--max_seq_len", str(s.max_seq_len),
            "--tp_size", str(s.tensor_parallel), "--pp_size", str(s.pipeline_parallel),
            "--kv_cache_free_gpu_memory_fraction", str(s.free_gpu_memory_fraction),
            "--extra_llm_api_options", str(options_file)]
