"""Deterministic generated text, stop-string handling and prompt token counting."""

from __future__ import annotations

import random
import re
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from itertools import accumulate
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from kvgate.chat_template import ChatTemplate, read_template

VOCAB = (
    "the", "a", "cache", "block", "token", "model", "gateway", "request", "server", "batch",
    "latency", "memory", "page", "queue", "stream", "kernel", "tensor", "layer", "attention",
    "prefix", "prompt", "decode", "prefill", "route", "engine", "fast", "slow", "full", "free",
    "ready",
)  # fmt: skip

# Chat templates wrap each message in a role header and separators.
CHAT_TOKENS_PER_MESSAGE = 4

_TOKEN_RE = re.compile(r"\w+|[^\w\s]")


def generate_words(seed: int, key: str) -> Iterator[str]:
    """Endless words, the same sequence for the same (seed, key) in every process."""
    rng = random.Random(f"{seed}\x00{key}")  # str seeds hash via sha512, unlike hash()
    while True:
        yield rng.choice(VOCAB)


def prompt_words(text: str) -> list[str]:
    """Approximate tokenizer: one token per word and per punctuation mark.

    Real tokenizers merge frequent byte sequences, so like them this counts
    fewer tokens than a one-token-per-byte upper bound.
    """
    return _TOKEN_RE.findall(text)


def count_prompt_tokens(text: str) -> int:
    return len(prompt_words(text))


def count_chat_tokens(contents: Iterable[str]) -> int:
    """Prompt tokens of a chat: each message's content plus CHAT_TOKENS_PER_MESSAGE (4)."""
    return sum(count_prompt_tokens(c) + CHAT_TOKENS_PER_MESSAGE for c in contents)


def chat_words(messages: Iterable[tuple[str, str]]) -> list[str]:
    """The tokens of a chat of (role, content) messages without a tokenizer: each content's words framed
    by CHAT_TOKENS_PER_MESSAGE (4) tokens naming its role, as a chat template frames them."""
    return [t for role, content in messages for t in ("<|start|>", role, "<|sep|>", *prompt_words(content), "<|end|>")]


def block_hashes(tokens: Sequence[Hashable], tokens_per_block: int) -> tuple[int, ...]:
    """The chained hashes of the whole blocks of `tokens`, as a prefix cache knows them: each block's
    hash covers every token before it."""
    whole = len(tokens) - len(tokens) % tokens_per_block
    blocks = (hash(tuple(tokens[i:i + tokens_per_block])) for i in range(0, whole, tokens_per_block))
    return tuple(accumulate(blocks, lambda prev, h: hash((prev, h))))


@dataclass(frozen=True)
class ModelTokenizer:
    """Prompt tokens as vLLM counts them: a chat rendered with the model's chat template (the one
    beside its tokenizer.json) and tokenized without added special tokens; a text prompt tokenized with
    them (Llama's BOS)."""

    tokenizer: Tokenizer
    template: ChatTemplate | None

    @classmethod
    def load(cls, tokenizer_json: str) -> ModelTokenizer:
        source = read_template(Path(tokenizer_json))
        return cls(Tokenizer.from_file(tokenizer_json), ChatTemplate(source) if source else None)

    def chat_ids(self, body: Mapping[str, Any]) -> list[int]:
        """Raises kvgate.chat_template.Unrenderable for a chat the template cannot render."""
        if self.template is None:
            raise ValueError("the model has no chat template")
        return self.tokenizer.encode(self.template.render(body), add_special_tokens=False).ids

    def text_ids(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt).ids

    def chat(self, body: Mapping[str, Any]) -> int:
        return len(self.chat_ids(body))

    def text(self, prompt: str) -> int:
        return len(self.text_ids(prompt))


class StopScanner:
    """Finds stop strings in text that arrives piece by piece.

    It holds back the longest tail that could still begin a stop string, so text
    that a later piece turns into a match is never released to the client.
    """

    def __init__(self, stops: Iterable[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._pending = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """Returns (text safe to release, whether a stop string was hit).

        On a hit the released text ends right before the stop string.
        """
        text = self._pending + piece
        hits = [i for i in (text.find(s) for s in self._stops) if i >= 0]
        if hits:
            self._pending = ""
            return text[: min(hits)], True
        held = self._held_tail(text)
        self._pending = text[len(text) - held :]
        return text[: len(text) - held], False

    def flush(self) -> str:
        """The held-back tail, released once no more text will come."""
        text, self._pending = self._pending, ""
        return text

    def _held_tail(self, text: str) -> int:
        for size in range(min(len(text), max((len(s) - 1 for s in self._stops), default=0)), 0, -1):
            if any(s.startswith(text[-size:]) for s in self._stops):
                return size
        return 0
