"""KV-cache size of a model, read from its HF config.json or TensorRT-LLM engine config.json.

bytes per token = 2 (K and V) x layers x kv_heads_per_gpu x head_dim x bytes per element.
KV pool of one GPU, as TensorRT-LLM sizes it = free_fraction x (GPU memory - weights - reserved),
capped by max_tokens_in_paged_kv_cache, in whole blocks; the weights are estimated from the same
config.json (`WeightShape`). Pure functions: no files are opened here except by the `load_*` functions.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Bytes per element (of the KV cache or of weights) by dtype name as HF and TensorRT-LLM spell them.
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

GiB = 2**30

# TensorRT-LLM's default kv_cache_free_gpu_mem_fraction.
DEFAULT_FREE_FRACTION = 0.9

# GPU memory that is neither weights nor KV pool: the CUDA context, cuBLAS/NCCL workspaces and the
# engine's activation, runtime and decoder buffers. TensorRT-LLM allocates these before it measures
# free memory, so the fraction applies to what is left after them, and the fraction's 10% does not
# cover them. They grow with max_batch_size, max_num_tokens and vocabulary (logits); 2 GiB covers an
# engine of modest batch (NVIDIA/TensorRT-LLM#1400: a Llama-2-7B engine of batch 1 on an A100 80GB
# kept about 1.6 GB besides weights and KV) and errs large rather than small: a budget above the
# engine's real pool makes the gateway admit requests the engine then queues. Engines of large batch
# need more: set `reserved` from the engine log ("Allocated ... for runtime buffers / decoder /
# execution context memory").
DEFAULT_RESERVED_BYTES = 2 * GiB

# Architectures (HF `architectures`, TensorRT-LLM `architecture`) whose MLP is up/down only; every
# other dense decoder this estimate knows (Llama, Mistral, Qwen2, Gemma, Phi-3) gates its MLP.
_PLAIN_MLP = frozenset({
    "GPT2LMHeadModel", "GPTForCausalLM", "GPTJForCausalLM", "GPTNeoForCausalLM", "GPTNeoXForCausalLM",
    "GPTBigCodeForCausalLM", "OPTForCausalLM", "BloomForCausalLM", "FalconForCausalLM", "PhiForCausalLM",
    "MPTForCausalLM", "Starcoder2ForCausalLM",
})
# TensorRT-LLM's GPT spells a gated MLP in its activation.
_GATED_ACTS = frozenset({"swiglu", "geglu"})
# Architectures with q/k/v biases that their config does not announce.
_QKV_BIAS = frozenset({"QWenLMHeadModel", "QWenForCausalLM", "Qwen2ForCausalLM"})
# Where configs say a model is a mixture of experts (Mixtral, Qwen-MoE, DeepSeek).
_EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


class ModelShapeError(ValueError):
    """The config.json lacks a field KV or weight math needs, holds an unknown dtype, or describes a
    model the weight estimate does not cover (mixture of experts)."""


@dataclass(frozen=True)
class ModelShape:
    layers: int
    kv_heads: int
    head_dim: int
    kv_dtype: str
    tensor_parallel: int = 1
    tokens_per_block: int | None = None  # only TensorRT-LLM engine configs carry it
    max_seq_len: int | None = None  # likewise: the engine refuses longer prompt + output

    def bytes_per_token(self) -> int:
        """KV bytes one token holds on one GPU: each GPU keeps kv_heads / tp heads (at least one)."""
        heads_per_gpu = max(1, math.ceil(self.kv_heads / self.tensor_parallel))
        return 2 * self.layers * heads_per_gpu * self.head_dim * dtype_bytes(self.kv_dtype)


@dataclass(frozen=True)
class WeightShape:
    """What the weight estimate reads from a config.json: a dense decoder laid out like Llama
    (embedding, per layer q/k/v/o + MLP + two norms, final norm, LM head)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str  # of the weights; the KV cache may be stored narrower (ModelShape.kv_dtype)
    tie_word_embeddings: bool = False
    gated_mlp: bool = True
    qkv_bias: bool = False
    linear_bits: int | None = None  # quantized q/k/v/o/MLP weights; embeddings and norms keep dtype
    tensor_parallel: int = 1
    parallel_embedding: bool = False  # TensorRT-LLM's use_parallel_embedding (off by default)

    def parameters(self) -> int:
        """Parameters of the whole model."""
        return sum(self._per_gpu(1))

    def bytes_per_gpu(self) -> int:
        """Weight bytes one GPU holds at `tensor_parallel`. Per-group scales of 4-bit weights (~3% of
        them) are not counted: the reserved memory of the KV budget absorbs them."""
        linear, other = self._per_gpu(self.tensor_parallel)
        nbytes = dtype_bytes(self.dtype)
        return -(-linear * (self.linear_bits or 8 * nbytes) // 8) + other * nbytes

    def _per_gpu(self, tp: int) -> tuple[int, int]:
        """(linear-layer parameters, other parameters) of one GPU of `tp`, sharded as TensorRT-LLM does:
        attention by heads (a GPU keeps at least one KV head, replicated when kv_heads < tp), the MLP by
        columns, the LM head by vocabulary; the embedding table is whole on every GPU unless
        parallel_embedding; norms are replicated. Ceilings: an uneven split pads, never shrinks."""
        h, d = self.hidden_size, self.head_dim
        q_heads, kv_heads = -(-self.heads // tp), -(-self.kv_heads // tp)
        attention = h * d * 2 * (q_heads + kv_heads)  # q and o, k and v
        mlp = (3 if self.gated_mlp else 2) * h * -(-self.intermediate_size // tp)
        biases = (q_heads + 2 * kv_heads) * d if self.qkv_bias else 0
        vocab_rows = -(-self.vocab_size // tp)
        embedding = (vocab_rows if self.parallel_embedding else self.vocab_size) * h
        # A tied table serves as LM head only where both are split alike.
        shared = self.tie_word_embeddings and (self.parallel_embedding or tp == 1)
        lm_head = 0 if shared else vocab_rows * h
        return self.layers * (attention + mlp), self.layers * (biases + 2 * h) + h + embedding + lm_head


def dtype_bytes(dtype: str) -> int:
    try:
        return DTYPE_BYTES[dtype.lower()]
    except KeyError:
        raise ModelShapeError(f"unknown dtype {dtype!r}; known: {', '.join(sorted(DTYPE_BYTES))}") from None


def _require(cfg: dict[str, Any], key: str, where: str) -> Any:
    if cfg.get(key) is None:  # null is as missing as absent
        raise ModelShapeError(f"{where} has no {key!r}")
    return cfg[key]


def _attention(cfg: dict[str, Any], where: str, head_dim_key: str) -> tuple[int, int, int]:
    """(heads, kv_heads, head_dim): the head_dim field when present, else hidden_size / heads."""
    heads = int(_require(cfg, "num_attention_heads", where))
    head_dim = cfg.get(head_dim_key) or int(_require(cfg, "hidden_size", where)) // heads
    return heads, int(cfg.get("num_key_value_heads") or heads), int(head_dim)  # no GQA field: plain MHA


def _hf_dtype(cfg: dict[str, Any]) -> str:
    return str(cfg.get("torch_dtype") or cfg.get("dtype") or "float16")


def shape_from_hf(cfg: dict[str, Any]) -> ModelShape:
    """HF config.json: head_dim when present, else hidden_size / num_attention_heads."""
    _, kv_heads, head_dim = _attention(cfg, "HF config", "head_dim")
    return ModelShape(
        layers=int(_require(cfg, "num_hidden_layers", "HF config")),
        kv_heads=kv_heads,
        head_dim=head_dim,
        kv_dtype=_hf_dtype(cfg),
    )


def shape_from_trtllm(cfg: dict[str, Any]) -> ModelShape:
    """TensorRT-LLM engine config.json: pretrained_config + build_config."""
    pre = cfg["pretrained_config"]
    build = cfg.get("build_config", {})
    _, kv_heads, head_dim = _attention(pre, "pretrained_config", "head_size")
    quant = (pre.get("quantization") or {}).get("kv_cache_quant_algo")
    kv_dtype = _KV_QUANT_DTYPE.get(str(quant).upper(), str(_require(pre, "dtype", "pretrained_config")))
    return ModelShape(
        layers=int(_require(pre, "num_hidden_layers", "pretrained_config")),
        kv_heads=kv_heads,
        head_dim=head_dim,
        kv_dtype=kv_dtype,
        tensor_parallel=int((pre.get("mapping") or {}).get("tp_size", 1)),
        tokens_per_block=(build.get("plugin_config") or {}).get("tokens_per_block"),
        max_seq_len=build.get("max_seq_len"),
    )


def shape_from_config(cfg: dict[str, Any]) -> ModelShape:
    """Either flavour: TensorRT-LLM engine configs nest everything under pretrained_config."""
    return shape_from_trtllm(cfg) if "pretrained_config" in cfg else shape_from_hf(cfg)


def load_model_shape(path: Path) -> ModelShape:
    return shape_from_config(json.loads(path.read_text()))


def quant_bits(algo: str | None) -> int | None:
    """Bits per quantized weight from a TensorRT-LLM / ModelOpt quant_algo (W4A16_AWQ, W8A8_SQ_*,
    FP8, NVFP4, ...). None for no quantization and for what it does not know (MIXED_PRECISION):
    those weights are then counted at the model's dtype, the larger and so safer estimate."""
    name = str(algo or "").upper()
    if m := re.match(r"W(\d+)A", name):
        return int(m.group(1))
    if name.startswith(("FP8", "INT8")):
        return 8
    return 4 if "FP4" in name else None


def _hf_quant_bits(qc: dict[str, Any] | None) -> int | None:
    """HF quantization_config: GPTQ/AWQ give `bits`, ModelOpt a `quant_algo`, fp8 checkpoints a method."""
    if not qc:
        return None
    if qc.get("bits"):
        return int(qc["bits"])
    return quant_bits(qc.get("quant_algo") or ("FP8" if str(qc.get("quant_method")).lower() == "fp8" else None))


def _dense_only(cfg: dict[str, Any], where: str) -> None:
    """Experts multiply the MLP; counting one would under-estimate the weights and over-state the KV pool."""
    moe = cfg.get("moe") or {}
    if any(int(cfg.get(k) or 0) > 1 for k in _EXPERT_KEYS) or int(moe.get("num_experts") or 0) > 1:
        raise ModelShapeError(f"{where} describes a mixture-of-experts model; its weights are not estimated")


def _gated_mlp(architectures: list[str], hidden_act: Any) -> bool:
    return str(hidden_act).lower() in _GATED_ACTS or not _PLAIN_MLP.intersection(architectures)


def weights_from_hf(cfg: dict[str, Any]) -> WeightShape:
    """HF config.json. Without tie_word_embeddings, untied: the default of Llama, Mistral and Qwen2
    configs, and the larger estimate."""
    where = "HF config"
    _dense_only(cfg, where)
    heads, kv_heads, head_dim = _attention(cfg, where, "head_dim")
    archs = list(cfg.get("architectures") or [])
    return WeightShape(
        vocab_size=int(_require(cfg, "vocab_size", where)),
        hidden_size=int(_require(cfg, "hidden_size", where)),
        intermediate_size=int(_require(cfg, "intermediate_size", where)),
        layers=int(_require(cfg, "num_hidden_layers", where)),
        heads=heads, kv_heads=kv_heads, head_dim=head_dim,
        dtype=_hf_dtype(cfg),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        gated_mlp=_gated_mlp(archs, cfg.get("hidden_act")),
        qkv_bias=bool(cfg.get("attention_bias")) or bool(_QKV_BIAS.intersection(archs)),
        linear_bits=_hf_quant_bits(cfg.get("quantization_config")),
    )


def weights_from_trtllm(cfg: dict[str, Any]) -> WeightShape:
    """TensorRT-LLM engine config.json: pretrained_config, sharded by its mapping.tp_size."""
    pre, where = cfg["pretrained_config"], "pretrained_config"
    _dense_only(pre, where)
    heads, kv_heads, head_dim = _attention(pre, where, "head_size")
    archs = [str(pre.get("architecture") or "")]
    return WeightShape(
        vocab_size=int(_require(pre, "vocab_size", where)),
        hidden_size=int(_require(pre, "hidden_size", where)),
        intermediate_size=int(_require(pre, "intermediate_size", where)),
        layers=int(_require(pre, "num_hidden_layers", where)),
        heads=heads, kv_heads=kv_heads, head_dim=head_dim,
        dtype=str(_require(pre, "dtype", where)),
        tie_word_embeddings=bool(pre.get("share_embedding_table", False)),
        gated_mlp=_gated_mlp(archs, pre.get("hidden_act")),
        qkv_bias=bool(pre.get("attn_bias")) or bool(_QKV_BIAS.intersection(archs)),
        linear_bits=quant_bits((pre.get("quantization") or {}).get("quant_algo")),
        tensor_parallel=int((pre.get("mapping") or {}).get("tp_size", 1)),
        parallel_embedding=bool(pre.get("use_parallel_embedding", False)),
    )


def weights_from_config(cfg: dict[str, Any]) -> WeightShape:
    return weights_from_trtllm(cfg) if "pretrained_config" in cfg else weights_from_hf(cfg)


def load_weight_shape(path: Path) -> WeightShape:
    return weights_from_config(json.loads(path.read_text()))


def blocks_for(tokens: int, tokens_per_block: int) -> int:
    return -(-tokens // tokens_per_block)


def reservation_bytes(tokens: int, tokens_per_block: int, bytes_per_token: int) -> int:
    """What a request of `tokens` (prompt + output) can claim in a paged cache: whole blocks."""
    return blocks_for(tokens, tokens_per_block) * tokens_per_block * bytes_per_token


def kv_pool_bytes(gpu_memory: int, weight_bytes: int, *, bytes_per_token: int, tokens_per_block: int,
                  free_fraction: float = DEFAULT_FREE_FRACTION, reserved: int = DEFAULT_RESERVED_BYTES,
                  max_tokens: int | None = None) -> int:
    """The KV pool TensorRT-LLM allocates on one GPU: free_fraction of the memory weights and runtime
    buffers leave, at most max_tokens (max_tokens_in_paged_kv_cache, rounded up to whole blocks as
    TensorRT-LLM does), in whole blocks. 0 when weights and reserved leave nothing."""
    free = max(0, gpu_memory - weight_bytes - reserved)
    block = bytes_per_token * tokens_per_block
    blocks = int(free * free_fraction) // block
    if max_tokens is not None:
        blocks = min(blocks, blocks_for(max_tokens, tokens_per_block))
    return blocks * block
