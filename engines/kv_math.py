"""KV-cache size of a model, read from its HF config.json or TensorRT-LLM engine config.json.

bytes per token = 2 (K and V) x layers x kv_heads_per_gpu x head_dim x bytes per element.
Pure functions: no files are opened here except by `load_model_shape`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Bytes per KV element by dtype name as HF and TensorRT-LLM spell them.
DTYPE_BYTES: dict[str, int] = {
    "float32": 4,
    "fp32": 4,
    "float16": 2,
    "fp16": 2,
    "bfloat16": 2,
    "bf16": 2,
    "fp8": 1,
    "float8": 1,
    "int8": 1,
}

# TensorRT-LLM's quantization.kv_cache_quant_algo values that shrink the KV cache.
_KV_QUANT_DTYPE = {"FP8": "fp8", "INT8": "int8"}


class ModelShapeError(ValueError):
    """The config.json lacks a field KV math needs, or holds an unknown dtype."""


@dataclass(frozen=True)
class ModelShape:
    layers: int
    kv_heads: int
    head_dim: int
    kv_dtype: str
    tensor_parallel: int = 1
    tokens_per_block: int | None = None  # only TensorRT-LLM engine configs carry it

    def bytes_per_token(self) -> int:
        """KV bytes one token holds on one GPU: each GPU keeps kv_heads / tp heads (at least one)."""
        heads_per_gpu = max(1, math.ceil(self.kv_heads / self.tensor_parallel))
        return 2 * self.layers * heads_per_gpu * self.head_dim * dtype_bytes(self.kv_dtype)


def dtype_bytes(dtype: str) -> int:
    try:
        return DTYPE_BYTES[dtype.lower()]
    except KeyError:
        raise ModelShapeError(f"unknown KV dtype {dtype!r}; known: {', '.join(sorted(DTYPE_BYTES))}") from None


def _require(cfg: dict[str, Any], key: str, where: str) -> Any:
    if key not in cfg:
        raise ModelShapeError(f"{where} has no {key!r}")
    return cfg[key]


def shape_from_hf(cfg: dict[str, Any]) -> ModelShape:
    """HF config.json: head_dim when present, else hidden_size / num_attention_heads."""
    heads = int(_require(cfg, "num_attention_heads", "HF config"))
    head_dim = cfg.get("head_dim") or int(_require(cfg, "hidden_size", "HF config")) // heads
    return ModelShape(
        layers=int(_require(cfg, "num_hidden_layers", "HF config")),
        kv_heads=int(cfg.get("num_key_value_heads") or heads),  # no GQA field means plain MHA
        head_dim=int(head_dim),
        kv_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float16"),
    )


def shape_from_trtllm(cfg: dict[str, Any]) -> ModelShape:
    """TensorRT-LLM engine config.json: pretrained_config + build_config."""
    pre = cfg["pretrained_config"]
    build = cfg.get("build_config", {})
    heads = int(_require(pre, "num_attention_heads", "pretrained_config"))
    head_dim = pre.get("head_size") or int(_require(pre, "hidden_size", "pretrained_config")) // heads
    quant = (pre.get("quantization") or {}).get("kv_cache_quant_algo")
    kv_dtype = _KV_QUANT_DTYPE.get(str(quant).upper(), str(_require(pre, "dtype", "pretrained_config")))
    return ModelShape(
        layers=int(_require(pre, "num_hidden_layers", "pretrained_config")),
        kv_heads=int(pre.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        kv_dtype=kv_dtype,
        tensor_parallel=int((pre.get("mapping") or {}).get("tp_size", 1)),
        tokens_per_block=(build.get("plugin_config") or {}).get("tokens_per_block"),
    )


def shape_from_config(cfg: dict[str, Any]) -> ModelShape:
    """Either flavour: TensorRT-LLM engine configs nest everything under pretrained_config."""
    return shape_from_trtllm(cfg) if "pretrained_config" in cfg else shape_from_hf(cfg)


def load_model_shape(path: Path) -> ModelShape:
    return shape_from_config(json.loads(path.read_text()))


def blocks_for(tokens: int, tokens_per_block: int) -> int:
    return -(-tokens // tokens_per_block)


def reservation_bytes(tokens: int, tokens_per_block: int, bytes_per_token: int) -> int:
    """What a request of `tokens` (prompt + output) can claim in a paged cache: whole blocks."""
    return blocks_for(tokens, tokens_per_block) * tokens_per_block * bytes_per_token
