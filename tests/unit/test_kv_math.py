"""kvgate/kv_math.py: KV bytes per token from HF and TensorRT-LLM config.json (docs/reference.md, "KV-cache arithmetic")."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest

from kvgate.kv_math import (
    DEFAULT_FREE_FRACTION,
    DEFAULT_RESERVED_BYTES,
    ModelShapeError,
    blocks_for,
    dtype_bytes,
    kv_pool_bytes,
    load_model_shape,
    load_weight_shape,
    quant_bits,
    reservation_bytes,
    shape_from_config,
    shape_from_hf,
    shape_from_trtllm,
    weights_from_config,
    weights_from_hf,
    weights_from_trtllm,
)

KiB = 1024
GiB = 2**30


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


def real_hf(arch: str, vocab: int, hidden: int, inter: int, layers: int, heads: int, kv_heads: int,
            dtype: str, **extra: Any) -> dict[str, Any]:
    """The fields of a published HF config.json that KV and weight math read."""
    return {"architectures": [arch], "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": inter,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "hidden_act": "silu", "torch_dtype": dtype, "tie_word_embeddings": False, **extra}


# The published config.json of each model of the docs/reference.md table, and its published parameter count.
HF = {
    "Llama-2-7B": real_hf("LlamaForCausalLM", 32000, 4096, 11008, 32, 32, 32, "float16", model_type="llama"),
    "Llama-2-13B": real_hf("LlamaForCausalLM", 32000, 5120, 13824, 40, 40, 40, "float16", model_type="llama"),
    "Llama-3-8B": real_hf("LlamaForCausalLM", 128256, 4096, 14336, 32, 32, 8, "bfloat16", model_type="llama"),
    "Mistral-7B": real_hf("MistralForCausalLM", 32000, 4096, 14336, 32, 32, 8, "bfloat16", model_type="mistral"),
    "Qwen2.5-7B": real_hf("Qwen2ForCausalLM", 152064, 3584, 18944, 28, 28, 4, "bfloat16", model_type="qwen2"),
}
PUBLISHED_PARAMS = {"Llama-2-7B": 6.74e9, "Llama-2-13B": 13.0e9, "Llama-3-8B": 8.03e9, "Mistral-7B": 7.24e9,
                    "Qwen2.5-7B": 7.62e9}

# docs/reference.md: model -> (config, layers, kv heads, head dim, fp16 bytes/token, fp8 bytes/token)
TABLE = {
    "Llama-2-7B": (HF["Llama-2-7B"], 32, 32, 128, 512 * KiB, 256 * KiB),
    "Llama-2-13B": (HF["Llama-2-13B"], 40, 40, 128, 800 * KiB, 400 * KiB),
    "Llama-3-8B": (HF["Llama-3-8B"], 32, 8, 128, 128 * KiB, 64 * KiB),
    "Mistral-7B": (HF["Mistral-7B"], 32, 8, 128, 128 * KiB, 64 * KiB),
    "Qwen2.5-7B": (HF["Qwen2.5-7B"], 28, 4, 128, 56 * KiB, 28 * KiB),
}


def engine_of(hf: dict[str, Any], *, tp: int = 1, dtype: str = "float16", kv_quant: str | None = None,
              quant_algo: str | None = None, parallel_embedding: bool = False) -> dict[str, Any]:
    """The TensorRT-LLM engine config.json trtllm-build writes for an HF model (its field names)."""
    heads = hf["num_attention_heads"]
    return {
        "version": "0.17.0",
        "pretrained_config": {
            "architecture": hf["architectures"][0], "dtype": dtype, "logits_dtype": "float32",
            "vocab_size": hf["vocab_size"], "hidden_size": hf["hidden_size"],
            "intermediate_size": hf["intermediate_size"], "num_hidden_layers": hf["num_hidden_layers"],
            "num_attention_heads": heads, "num_key_value_heads": hf["num_key_value_heads"],
            "head_size": hf.get("head_dim") or hf["hidden_size"] // heads, "hidden_act": hf["hidden_act"],
            "use_parallel_embedding": parallel_embedding, "embedding_sharding_dim": 0,
            "share_embedding_table": False,
            "quantization": {"quant_algo": quant_algo, "kv_cache_quant_algo": kv_quant},
            "mapping": {"world_size": tp, "tp_size": tp, "pp_size": 1},
        },
        "build_config": {"max_input_len": 3072, "max_seq_len": 4096, "max_batch_size": 64,
                         "max_num_tokens": 8192, "plugin_config": {"tokens_per_block": 64}},
    }


# --- the reference table ---------------------------------------------------------------------

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


def test_hf_no_kv_heads_field_means_mha() -> None:
    """Configs older than GQA (Llama-1, early Llama-2 conversions) have no num_key_value_heads."""
    cfg = {k: v for k, v in HF["Llama-2-7B"].items() if k != "num_key_value_heads"}
    assert shape_from_hf(cfg).kv_heads == 32
    assert shape_from_hf(cfg).bytes_per_token() == 512 * KiB


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


@pytest.mark.parametrize("model", list(TABLE))
def test_table_from_trtllm_engine_config(model: str) -> None:
    hf, layers, kv_heads, head_dim, fp16, fp8 = TABLE[model]
    shape = shape_from_config(engine_of(hf))
    assert (shape.layers, shape.kv_heads, shape.head_dim, shape.tensor_parallel) == (layers, kv_heads, head_dim, 1)
    assert shape.bytes_per_token() == fp16
    assert shape_from_config(engine_of(hf, dtype="bfloat16")).bytes_per_token() == fp16
    assert shape_from_config(engine_of(hf, kv_quant="FP8")).bytes_per_token() == fp8
    assert shape_from_config(engine_of(hf, kv_quant="INT8")).bytes_per_token() == fp8


@pytest.mark.parametrize(("model", "tp", "kv_quant", "bytes_per_token"), [
    ("Llama-2-13B", 2, None, 400 * KiB),   # 40 KV heads, 20 per GPU
    ("Llama-2-13B", 2, "FP8", 200 * KiB),
    ("Llama-2-7B", 4, None, 128 * KiB),
    ("Mistral-7B", 2, None, 64 * KiB),
    ("Qwen2.5-7B", 4, "FP8", 7 * KiB),     # 4 KV heads, 1 per GPU
    ("Llama-3-8B", 16, "FP8", 8 * KiB),    # 8 KV heads < 16 GPUs: each keeps a replica of one
    ("Mistral-7B", 16, None, 16 * KiB),
])
def test_trtllm_tensor_parallel(model: str, tp: int, kv_quant: str | None, bytes_per_token: int) -> None:
    shape = shape_from_config(engine_of(HF[model], tp=tp, kv_quant=kv_quant))
    assert shape.tensor_parallel == tp
    assert shape.bytes_per_token() == bytes_per_token


def test_trtllm_max_seq_len_from_build_config() -> None:
    assert shape_from_config(engine_of(HF["Llama-3-8B"])).max_seq_len == 4096
    assert shape_from_hf(HF["Llama-3-8B"]).max_seq_len is None


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


# --- weights: parameter counts against the published sizes ----------------------------------

@pytest.mark.parametrize("model", list(HF))
def test_parameter_count_matches_published(model: str) -> None:
    params = weights_from_hf(HF[model]).parameters()
    assert params == pytest.approx(PUBLISHED_PARAMS[model], rel=0.01)


@pytest.mark.parametrize("model", list(HF))
def test_engine_config_counts_the_same_parameters(model: str) -> None:
    assert weights_from_config(engine_of(HF[model])).parameters() == weights_from_hf(HF[model]).parameters()


def test_llama_3_8b_parameters_exactly() -> None:
    """Embedding and LM head 128256 x 4096 each; per layer q, o 4096^2, k, v 4096 x 1024, gated MLP
    3 x 4096 x 14336, two norms; a final norm: what HF reports, 8,030,261,248."""
    per_layer = 2 * 4096**2 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096
    assert weights_from_hf(HF["Llama-3-8B"]).parameters() == 2 * 128256 * 4096 + 32 * per_layer + 4096 \
        == 8_030_261_248


def test_qwen_counts_its_qkv_biases() -> None:
    qwen = weights_from_hf(HF["Qwen2.5-7B"])
    assert qwen.qkv_bias
    assert qwen.parameters() - dataclasses.replace(qwen, qkv_bias=False).parameters() == 28 * (3584 + 2 * 512)
    assert qwen.parameters() == 7_615_616_512
    assert not weights_from_hf(HF["Llama-3-8B"]).qkv_bias


def test_attention_bias_field_counts_biases() -> None:
    assert weights_from_hf({**HF["Llama-3-8B"], "attention_bias": True}).qkv_bias


def test_tied_embeddings_and_head_dim_field() -> None:
    """Llama-3.2-1B: 64-wide heads (head_dim), one table for embedding and LM head; HF reports 1.24B."""
    cfg = real_hf("LlamaForCausalLM", 128256, 2048, 8192, 16, 32, 8, "bfloat16", head_dim=64,
                  tie_word_embeddings=True)
    weights = weights_from_hf(cfg)
    assert weights.parameters() == 1_235_814_400
    assert dataclasses.replace(weights, tie_word_embeddings=False).parameters() == 1_235_814_400 + 128256 * 2048


def test_plain_mlp_architecture() -> None:
    """Pythia-6.9B (GPT-NeoX): up and down projections only; published 6.86B."""
    cfg = real_hf("GPTNeoXForCausalLM", 50432, 4096, 16384, 32, 32, 32, "float16", hidden_act="gelu")
    weights = weights_from_hf(cfg)
    assert not weights.gated_mlp
    assert weights.parameters() == pytest.approx(6.857e9, rel=0.01)


def test_trtllm_gated_activation_makes_a_gated_mlp() -> None:
    cfg = engine_of(HF["Llama-3-8B"])
    cfg["pretrained_config"].update(architecture="GPTForCausalLM", hidden_act="swiglu")
    assert weights_from_trtllm(cfg).gated_mlp
    cfg["pretrained_config"]["hidden_act"] = "gelu"
    assert not weights_from_trtllm(cfg).gated_mlp


# --- weights: bytes on one GPU ---------------------------------------------------------------

LLAMA3_LINEAR = 32 * (2 * 4096**2 + 2 * 4096 * 1024 + 3 * 4096 * 14336)
LLAMA3_OTHER = 2 * 128256 * 4096 + 32 * 2 * 4096 + 4096  # embedding, LM head, norms


@pytest.mark.parametrize("model", list(HF))
def test_weight_bytes_are_parameters_times_the_weights_dtype(model: str) -> None:
    weights = weights_from_hf(HF[model])
    assert weights.bytes_per_gpu() == 2 * weights.parameters()
    assert dataclasses.replace(weights, dtype="float32").bytes_per_gpu() == 4 * weights.parameters()


def test_fp8_kv_cache_does_not_shrink_the_weights() -> None:
    """kv_cache_quant_algo narrows the KV cache only: bf16 weights stay 2 bytes, KV becomes 1."""
    cfg = engine_of(HF["Llama-3-8B"], dtype="bfloat16", kv_quant="FP8")
    assert shape_from_config(cfg).bytes_per_token() == 64 * KiB
    assert weights_from_config(cfg).bytes_per_gpu() == 2 * (LLAMA3_LINEAR + LLAMA3_OTHER) == 16_060_522_496


@pytest.mark.parametrize(("quant_algo", "linear_bytes"), [
    ("FP8", LLAMA3_LINEAR),
    ("W8A16", LLAMA3_LINEAR),
    ("W4A16_AWQ", LLAMA3_LINEAR // 2),
    (None, 2 * LLAMA3_LINEAR),
    ("MIXED_PRECISION", 2 * LLAMA3_LINEAR),  # unknown: counted at the model dtype, the larger estimate
])
def test_quantized_linear_weights_keep_embeddings_in_dtype(quant_algo: str | None, linear_bytes: int) -> None:
    cfg = engine_of(HF["Llama-3-8B"], dtype="bfloat16", quant_algo=quant_algo)
    assert weights_from_config(cfg).bytes_per_gpu() == linear_bytes + 2 * LLAMA3_OTHER


@pytest.mark.parametrize(("algo", "bits"), [
    ("W4A16", 4), ("W4A16_AWQ", 4), ("W4A8_AWQ", 4), ("W4A16_GPTQ", 4), ("W8A16", 8), ("W8A8_SQ_PER_CHANNEL", 8),
    ("FP8", 8), ("FP8_PER_CHANNEL_PER_TOKEN", 8), ("FP8_BLOCK_SCALES", 8), ("NVFP4", 4), ("fp8", 8),
    ("MIXED_PRECISION", None), (None, None), ("", None),
])
def test_quant_bits(algo: str | None, bits: int | None) -> None:
    assert quant_bits(algo) == bits


@pytest.mark.parametrize(("quantization_config", "bits"), [
    ({"quant_method": "awq", "bits": 4, "group_size": 128}, 4),
    ({"quant_method": "gptq", "bits": 8}, 8),
    ({"quant_method": "fp8", "activation_scheme": "dynamic"}, 8),
    ({"quant_method": "modelopt", "quant_algo": "NVFP4"}, 4),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, None),
])
def test_hf_quantization_config(quantization_config: dict[str, Any], bits: int | None) -> None:
    cfg = {**HF["Llama-3-8B"], "quantization_config": quantization_config}
    assert weights_from_hf(cfg).linear_bits == bits


def test_llama_2_13b_weights_on_each_of_two_gpus() -> None:
    """TensorRT-LLM splits attention by heads, the MLP by columns and the LM head by vocabulary,
    and keeps the whole embedding table on every GPU unless use_parallel_embedding."""
    per_layer = 2 * 5120 * 20 * 128 * 2 + 3 * 5120 * (13824 // 2) + 2 * 5120
    split = 40 * per_layer + 5120 + 16000 * 5120  # layers, final norm, half the LM head
    weights = weights_from_config(engine_of(HF["Llama-2-13B"], tp=2))
    assert weights.tensor_parallel == 2
    assert weights.bytes_per_gpu() == 2 * (split + 32000 * 5120)
    parallel = weights_from_config(engine_of(HF["Llama-2-13B"], tp=2, parallel_embedding=True))
    assert parallel.bytes_per_gpu() == 2 * (split + 16000 * 5120)


def test_kv_heads_fewer_than_gpus_replicate_k_and_v_weights() -> None:
    weights = weights_from_config(engine_of(HF["Llama-3-8B"], tp=16, parallel_embedding=True))
    per_layer = 2 * 4096 * 2 * 128 + 2 * 4096 * 1 * 128 + 3 * 4096 * (14336 // 16) + 2 * 4096
    assert weights.bytes_per_gpu() == 2 * (32 * per_layer + 4096 + 2 * (128256 // 16) * 4096)


def test_tied_table_counted_twice_when_split_unlike() -> None:
    """A tied table is one tensor only where embedding and LM head are split alike."""
    cfg = real_hf("LlamaForCausalLM", 128256, 2048, 8192, 16, 32, 8, "bfloat16", head_dim=64,
                  tie_word_embeddings=True)
    tied = weights_from_hf(cfg)
    untied = dataclasses.replace(tied, tie_word_embeddings=False)
    assert dataclasses.replace(tied, tensor_parallel=2).bytes_per_gpu() == \
        dataclasses.replace(untied, tensor_parallel=2).bytes_per_gpu()
    both_split = {"tensor_parallel": 2, "parallel_embedding": True}
    assert dataclasses.replace(tied, **both_split).bytes_per_gpu() == \
        dataclasses.replace(untied, **both_split).bytes_per_gpu() - 2 * 64128 * 2048


def test_load_weight_shape_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(HF["Mistral-7B"]))
    assert load_weight_shape(path).parameters() == weights_from_hf(HF["Mistral-7B"]).parameters()


@pytest.mark.parametrize("field", ["vocab_size", "intermediate_size", "hidden_size", "num_hidden_layers"])
def test_weights_missing_field(field: str) -> None:
    hf = {**HF["Llama-3-8B"], field: None}
    with pytest.raises(ModelShapeError, match=field):
        weights_from_hf(hf)
    engine = engine_of(HF["Llama-3-8B"])
    del engine["pretrained_config"][field]
    with pytest.raises(ModelShapeError, match=field):
        weights_from_trtllm(engine)


@pytest.mark.parametrize("experts", [{"num_local_experts": 8}, {"num_experts": 60}, {"n_routed_experts": 64}])
def test_mixture_of_experts_is_not_estimated(experts: dict[str, int]) -> None:
    with pytest.raises(ModelShapeError, match="mixture-of-experts"):
        weights_from_hf({**HF["Mistral-7B"], **experts})


def test_trtllm_moe_section() -> None:
    cfg = engine_of(HF["Mistral-7B"])
    cfg["pretrained_config"]["moe"] = {"num_experts": 0, "top_k": 0}  # what dense engines write
    weights_from_trtllm(cfg)
    cfg["pretrained_config"]["moe"] = {"num_experts": 8, "top_k": 2}
    with pytest.raises(ModelShapeError, match="mixture-of-experts"):
        weights_from_trtllm(cfg)


# --- the KV pool TensorRT-LLM allocates ------------------------------------------------------

BLOCK = 128 * KiB * 32  # Llama-3-8B bf16, 32 tokens per block


def test_kv_pool_defaults_are_trtllms() -> None:
    assert DEFAULT_FREE_FRACTION == 0.9
    assert DEFAULT_RESERVED_BYTES == 2 * GiB


def test_kv_pool_llama_3_8b_on_80_gib() -> None:
    """The docs/catalog.md example: 0.9 x (80 GiB - 16,060,522,496 B weights - 2 GiB), in 4 MiB blocks."""
    weights = weights_from_hf(HF["Llama-3-8B"]).bytes_per_gpu()
    pool = kv_pool_bytes(80 * GiB, weights, bytes_per_token=128 * KiB, tokens_per_block=32)
    assert pool == math.floor(0.9 * (80 * GiB - weights - 2 * GiB)) // BLOCK * BLOCK == 60_918_071_296
    assert pool // (128 * KiB) == 464_768  # tokens


def test_kv_pool_fraction_applies_after_weights_and_reserved() -> None:
    pool = kv_pool_bytes(100 * BLOCK, 30 * BLOCK, bytes_per_token=128 * KiB, tokens_per_block=32,
                         free_fraction=0.5, reserved=10 * BLOCK)
    assert pool == 30 * BLOCK


def test_kv_pool_is_whole_blocks() -> None:
    pool = kv_pool_bytes(10 * BLOCK + BLOCK - 1, 0, bytes_per_token=128 * KiB, tokens_per_block=32,
                         free_fraction=1.0, reserved=0)
    assert pool == 10 * BLOCK


@pytest.mark.parametrize(("max_tokens", "blocks"), [(32 * 5, 5), (32 * 5 + 1, 6), (10**9, 100)])
def test_kv_pool_capped_by_max_tokens_in_whole_blocks(max_tokens: int, blocks: int) -> None:
    pool = kv_pool_bytes(100 * BLOCK, 0, bytes_per_token=128 * KiB, tokens_per_block=32,
                         free_fraction=1.0, reserved=0, max_tokens=max_tokens)
    assert pool == blocks * BLOCK


def test_kv_pool_is_zero_when_weights_fill_the_gpu() -> None:
    assert kv_pool_bytes(16 * GiB, 16 * GiB, bytes_per_token=128 * KiB, tokens_per_block=32) == 0
    assert kv_pool_bytes(17 * GiB, 16 * GiB, bytes_per_token=128 * KiB, tokens_per_block=32) == 0
