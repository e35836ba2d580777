"""Write the tiny model that the real engines serve: an HF-style Llama folder with random weights and a
tokenizer trained here (no hub, nothing downloaded). Runs in the vLLM venv, from the repository root:

    .venv-vllm/bin/python -m engines.real.tiny_llama OUT_DIR

(engines.real.vllm.build_model does that). Deterministic: fixed seed, and the tokenizer of
engines.real.tiny_tokenizer trained on the repository's documentation.

The shape is the smallest one vLLM's CPU attention takes (head size 32), with grouped KV heads as real
Llamas have: 2 layers x 2 KV heads x head size 32 x (K and V) x 2 bytes (bf16) = 512 bytes of KV cache
per token, which is what the gateway's admission arithmetic is checked against.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, processors
from transformers import LlamaConfig, LlamaForCausalLM

from engines.real import tiny_tokenizer

VOCAB_SIZE = 512
MAX_POSITIONS = 2048
SEED = 0
BOS, END_OF_TEXT, EOT, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|pad|>"
START_HEADER, END_HEADER = "<|start_header_id|>", "<|end_header_id|>"
SPECIAL_TOKENS = (BOS, END_OF_TEXT, START_HEADER, END_HEADER, EOT, PAD)

# Llama 3's chat format: BOS once, then per message a role header and the content ended by <|eot_id|>;
# the generation prompt is an open assistant header. The template writes the BOS itself, so a chat
# prompt must be tokenized without adding special tokens (a completions prompt gets one added).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


def build_tokenizer() -> Tokenizer:
    """Byte-level BPE whose special tokens take the last ids of the 512, and which adds BOS to every
    encoded text (as Llama 3's tokenizer.json does)."""
    tokenizer = tiny_tokenizer.train(tiny_tokenizer.docs_corpus(), VOCAB_SIZE - len(SPECIAL_TOKENS))
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    assert tokenizer.get_vocab_size() <= VOCAB_SIZE, tokenizer.get_vocab_size()
    return tokenizer


def build_model(tokenizer: Tokenizer) -> LlamaForCausalLM:
    ids = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS,
        bos_token_id=ids[BOS], eos_token_id=[ids[END_OF_TEXT], ids[EOT]], pad_token_id=ids[PAD],
        dtype=torch.bfloat16,
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.generation_config.bos_token_id = ids[BOS]
    model.generation_config.eos_token_id = [ids[END_OF_TEXT], ids[EOT]]
    model.generation_config.pad_token_id = ids[PAD]
    return model


def tokenizer_config() -> dict[str, object]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOT,
        "pad_token": PAD,
        "model_max_length": MAX_POSITIONS,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


def main(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    tokenizer.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOT, "pad_token": PAD}, indent=2) + "\n")
    (out_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    # config.json, generation_config.json and model.safetensors.
    build_model(tokenizer).save_pretrained(out_dir)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
