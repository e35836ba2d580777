"""engines/kv_math.py: KV bytes per token from HF and TensorRT-LLM config.json (DESIGN.md §6)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from engines.kv_math import (
    ModelShapeError,
    blocks_for,
    dtype_bytes,
    load_model_shape,
    reservation_bytes,
    shape_from_config,
    shape_from_hf,
    shape_from_trtllm,
)

KiB = 1024


def hf_config(layers: int, heads: int, kv_heads: int | None, hidden: int, dtype: str = "bfloat16",
              **extra: Any) -> dict[str, Any]:
    """An HF config.json with the real field names (kv_heads None: the field is absent, plain MHA)."""
    cfg: dict[str, Any] = {"num_hidden_layers": layers, "num_attention_heads": heads,
                           "hidden_size": hidden, "torch_dtype": dtype, "vocab_size": 32000}
    if kv_heads is not None:
        cfg["num_key_value_heads"] = kv_heads
    cfg.update(extra)
    return cfg


def trtllm_config(*, tp: int = 2, kv_quant: str | None = "FP8", tokens_per_block: int = 64,
                  **pretrained: Any) -> dict[str, Any]:
    """A TensorRT-LLM engine config.json of Llama-3-8B."""
    pre: dict[str, Any] = {
        "architecture": "LlamaForCausalLM", "dtype": "bfloat16", "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_size": 4096, "head_size": 128,
        "quantization": {"quant_algo": None, "kv_cache_quant_algo": kv_quant},
        "mapping": {"world_size": tp, "tp_size": tp, "pp_size": 1},
    }
    pre.update(pretrained)
    return {"version": "0.17.0", "pretrained_config": pre,
            "build_config": {"max_seq_len": 8192, "max_num_tokens": 8192,
                             "plugin_config": {"tokens_per_block": tokens_per_block}}}


# DESIGN.md §6: model -> (config, layers, kv heads, head dim, fp16 bytes/token, fp8 bytes/token)
TABLE = {
    "Llama-2-7B": (hf_config(32, 32, None, 4096, "float16"), 32, 32, 128, 512 * KiB, 256 * KiB),
    "Llama-2-13B": (hf_config(40, 40, 40, 5120, "float16"), 40, 40, 128, 800 * KiB, 400 * KiB),
    "Llama-3-8B": (hf_config(32, 32, 8, 4096), 32, 8, 128, 128 * KiB, 64 * KiB),
    "Mistral-7B": (hf_config(32, 32, 8, 4096), 32, 8, 128, 128 * KiB, 64 * KiB),
    "Qwen2.5-7B": (hf_config(28, 28, 4, 3584), 28, 4, 128, 56 * KiB, 28 * KiB),
}


# --- the DESIGN.md table ---------------------------------------------------------------------

@pytest.mark.parametrize("model", list(TABLE))
def test_table_shape(model: str) -> None:
    cfg, layers, kv_heads, head_dim, _, _ = TABLE[model]
    shape = shape_from_hf(cfg)
    assert (shape.layers, shape.kv_heads, shape.head_dim) == (layers, kv_heads, head_dim)


@pytest.mark.parametrize("model", list(TABLE))
def test_table_fp16_bytes_per_token(model: str) -> None:
    cfg, *_, fp16, _ = TABLE[model]
    shape = shape_from_hf({**cfg, "torch_dtype": "float16"})
    assert shape.bytes_per_token() == fp16


@pytest.mark.parametrize("model", list(TABLE))
def test_table_bf16_equals_fp16(model: str) -> None:
    cfg, *_, fp16, _ = TABLE[model]
    assert shape_from_hf({**cfg, "torch_dtype": "bfloat16"}).bytes_per_token() == fp16


@pytest.mark.parametrize("model", list(TABLE))
def test_table_fp8_bytes_per_token(model: str) -> None:
    cfg, *_, fp8 = TABLE[model]
    shape = dataclasses.replace(shape_from_hf(cfg), kv_dtype="fp8")
    assert shape.bytes_per_token() == fp8


def test_hf_dispatch_by_shape_from_config() -> None:
    cfg = TABLE["Qwen2.5-7B"][0]
    assert shape_from_config(cfg) == shape_from_hf(cfg)


def test_hf_plain_dtype_field_when_no_torch_dtype() -> None:
    cfg = hf_config(32, 32, 8, 4096)
    del cfg["torch_dtype"]
    cfg["dtype"] = "float32"
    assert shape_from_hf(cfg).kv_dtype == "float32"
    assert shape_from_hf(cfg).bytes_per_token() == 256 * KiB


def test_hf_no_dtype_means_fp16() -> None:
    cfg = hf_config(32, 32, 8, 4096)
    del cfg["torch_dtype"]
    assert shape_from_hf(cfg).bytes_per_token() == 128 * KiB


# --- TensorRT-LLM engine config --------------------------------------------------------------

def test_trtllm_fp8_kv_with_tp2() -> None:
    shape = shape_from_config(trtllm_config())
    assert shape.kv_dtype == "fp8"
    assert shape.tensor_parallel == 2
    # 2 x 32 layers x (8 / 2) heads per GPU x 128 x 1 byte
    assert shape.bytes_per_token() == 32 * KiB


def test_trtllm_tokens_per_block_from_build_config() -> None:
    assert shape_from_trtllm(trtllm_config(tokens_per_block=64)).tokens_per_block == 64


def test_trtllm_without_kv_quant_uses_dtype() -> None:
    shape = shape_from_config(trtllm_config(kv_quant=None))
    assert shape.kv_dtype == "bfloat16"
    assert shape.bytes_per_token() == 64 * KiB


def test_trtllm_int8_kv_quant() -> None:
    assert shape_from_config(trtllm_config(kv_quant="INT8", tp=1)).bytes_per_token() == 64 * KiB


def test_trtllm_without_mapping_is_tp1() -> None:
    cfg = trtllm_config(kv_quant=None)
    del cfg["pretrained_config"]["mapping"]
    assert shape_from_config(cfg).tensor_parallel == 1
    assert shape_from_config(cfg).bytes_per_token() == 128 * KiB


def test_trtllm_head_size_beats_hidden_over_heads() -> None:
    cfg = trtllm_config(head_size=256, kv_quant=None, tp=1)
    assert shape_from_config(cfg).head_dim == 256


def test_trtllm_head_dim_from_hidden_when_no_head_size() -> None:
    cfg = trtllm_config(hidden_size=3584, num_attention_heads=28)
    del cfg["pretrained_config"]["head_size"]
    assert shape_from_config(cfg).head_dim == 128


def test_tensor_parallel_keeps_at_least_one_head_per_gpu() -> None:
    shape = dataclasses.replace(shape_from_hf(TABLE["Qwen2.5-7B"][0]), tensor_parallel=8)
    # 4 KV heads over 8 GPUs: each GPU still holds (a replica of) one head.
    assert shape.bytes_per_token() == 2 * 28 * 1 * 128 * 2


# --- head_dim precedence ---------------------------------------------------------------------

def test_hf_head_dim_field_beats_hidden_over_heads() -> None:
    # Gemma-7B: hidden 3072 / 16 heads would say 192; config.json says 256.
    shape = shape_from_hf(hf_config(28, 16, 16, 3072, head_dim=256))
    assert shape.head_dim == 256


def test_hf_null_head_dim_falls_back_to_hidden_over_heads() -> None:
    assert shape_from_hf(hf_config(32, 32, 8, 4096, head_dim=None)).head_dim == 128


def test_hf_head_dim_without_hidden_size() -> None:
    cfg = hf_config(32, 32, 8, 4096, head_dim=128)
    del cfg["hidden_size"]
    assert shape_from_hf(cfg).head_dim == 128


# --- missing fields, unknown dtypes ----------------------------------------------------------

@pytest.mark.parametrize("field", ["num_hidden_layers", "num_attention_heads", "hidden_size"])
def test_hf_missing_field(field: str) -> None:
    cfg = hf_config(32, 32, 8, 4096)
    del cfg[field]
    with pytest.raises(ModelShapeError, match=field):
        shape_from_hf(cfg)


@pytest.mark.parametrize("field", ["num_hidden_layers", "num_attention_heads", "dtype"])
def test_trtllm_missing_field(field: str) -> None:
    cfg = trtllm_config(kv_quant=None)
    del cfg["pretrained_config"][field]
    with pytest.raises(ModelShapeError, match=field):
        shape_from_trtllm(cfg)


def test_model_shape_error_is_a_value_error() -> None:
    assert issubclass(ModelShapeError, ValueError)


def test_unknown_dtype() -> None:
    shape = shape_from_hf(hf_config(32, 32, 8, 4096, "float4"))
    with pytest.raises(ModelShapeError, match="float4"):
        shape.bytes_per_token()


@pytest.mark.parametrize(("dtype", "nbytes"), [("BF16", 2), ("Float16", 2), ("FP8", 1), ("int8", 1), ("float32", 4)])
def test_dtype_bytes_case_insensitive(dtype: str, nbytes: int) -> None:
    assert dtype_bytes(dtype) == nbytes


def test_load_model_shape_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(trtllm_config()))
    assert load_model_shape(path).bytes_per_token() == 32 * KiB


# --- paged-cache rounding --------------------------------------------------------------------

@pytest.mark.parametrize(("tokens", "per_block", "blocks"), [
    (0, 32, 0), (1, 32, 1), (31, 32, 1), (32, 32, 1), (33, 32, 2), (64, 64, 1), (65, 64, 2), (8192, 32, 256),
])
def test_blocks_for_rounds_up(tokens: int, per_block: int, blocks: int) -> None:
    assert blocks_for(tokens, per_block) == blocks


@pytest.mark.parametrize(("tokens", "per_block", "bytes_per_token", "expected"), [
    (1, 32, 100, 3200),
    (32, 32, 100, 3200),
    (33, 32, 100, 6400),
    (8192, 32, 131072, 8192 * 131072),
    (100, 64, 10, 1280),
])
def test_reservation_bytes_whole_blocks(tokens: int, per_block: int, bytes_per_token: int, expected: int) -> None:
    assert reservation_bytes(tokens, per_block, bytes_per_token) == expected
