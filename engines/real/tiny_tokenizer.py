"""A real tokenizer.json for tests and bench/tokens.py, trained here with `tokenizers` on the text this
repository ships (nothing downloaded): byte-level BPE, the scheme of GPT-2, Llama 3, Qwen and Mistral's
newer tokenizers, so every string it is given, whatever the script, has a count no larger than its
UTF-8 bytes."""

from __future__ import annotations

import functools
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

REPO = Path(__file__).resolve().parents[2]
# Folders whose text the larger tokenizer learns from; generated protobuf modules are left out
# (serialized descriptors, not text).
_SOURCE_DIRS = ("bench", "docs", "engines", "envoy", "ext_proc", "kvgate", "proto", "tests", "xds_server")
_SOURCE_SUFFIXES = (".md", ".py", ".proto", ".yaml", ".txt")


def docs_corpus() -> list[str]:
    """The repo's documentation: README.md and docs/**/*.md."""
    return [p.read_text() for p in [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]]


def source_corpus() -> list[str]:
    """All of the repo's own text: documentation, Python, protos, YAML (~0.75 MB)."""
    files = [p for d in _SOURCE_DIRS for p in sorted((REPO / d).rglob("*"))
             if p.suffix in _SOURCE_SUFFIXES and p.is_file() and not p.name.endswith(("_pb2.py", "_pb2_grpc.py"))]
    return [REPO.joinpath("README.md").read_text(), *(p.read_text(errors="replace") for p in files)]


def train(corpus: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE with every byte in its alphabet, so no text is ever unknown. Training stops early
    when every word of the corpus is one token (~10k for source_corpus)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(corpus, trainer)
    return tokenizer


@functools.cache
def trained_json(vocab_size: int = 1000, sources: bool = False) -> str:
    """The serialized tokenizer, trained once per process (docs ~0.1 s, sources ~0.5 s)."""
    return train(source_corpus() if sources else docs_corpus(), vocab_size).to_str()


def write_tokenizer(directory: Path, vocab_size: int = 1000, sources: bool = False,
                    name: str = "tokenizer.json") -> Path:
    """A tokenizer.json in `directory`, as a catalog would name it."""
    path = directory / name
    path.write_text(trained_json(vocab_size, sources))
    return path


def load(vocab_size: int = 1000, sources: bool = False) -> Tokenizer:
    """A fresh Tokenizer object of the trained tokenizer (the reference counts are taken with it)."""
    return Tokenizer.from_str(trained_json(vocab_size, sources))
