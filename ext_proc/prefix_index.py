"""Where each prompt prefix was routed: an approximate index of chained block hashes per endpoint.

An engine with prefix caching (vLLM's automatic prefix caching, TensorRT-LLM's KV reuse) keeps the KV
blocks of the prompts it served, keyed by the chain of the blocks' contents, and skips prefilling the
leading blocks of a new prompt it still holds. ext_proc cannot see those caches; it remembers instead
which prefixes it sent where: the expected hit of a prompt on an endpoint is the number of its leading
blocks this replica routed there recently. Approximate by design: the engine may have evicted them,
another replica may have put them there, and an LRU bound ages old ones out here.

What is hashed: the text of the prompt's pieces (tokens.texts: a chat's message contents in order, so
that requests sharing a system prompt or a document share their leading blocks), cut into blocks of
`block_chars(policy)` characters, each block's hash chained with the one before (block i stands for the
whole prefix up to it, as in the engines). Text rather than token ids: the token counter keeps counts,
not ids, and encoding a long cached prompt again would cost ~1 ms per KB. Text blocks of ~4 characters
per token stand for token blocks; the index only compares endpoints, so the estimate need not be exact.
Token-id prompts carry no text: they are routed on headroom alone.

Hashes are Python's `hash` (SipHash, salted per process): a block costs ~0.1 µs where BLAKE2b costs
~1 µs. A colliding prompt crafted by a client could only move its own routing preference; the KV
reservation still decides what is admitted.

Memory is bounded by `max_entries` across every model and endpoint (one LRU): an entry is an int key in
an OrderedDict, ~100-150 bytes (bench/prefix.py measures it).

The index is also a Prometheus collector: `kvgate_prefix_expected_hit_tokens_total{model,endpoint}`, the
prompt tokens of admitted requests it expected cached where it sent them. Over
`kvgate_prompt_tokens_admitted_total` (prompt_gap.py) it is the expected hit rate, to read beside what
vLLM reports it hit (`vllm:prefix_cache_hits_total` over `vllm:prefix_cache_queries_total`, on the
engine's /metrics): an expected rate well above the engine's means its cache is smaller than the
traffic routed to it, or that other clients evict what the index remembers.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import accumulate

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

# English BPE averages ~4 characters per token: a text block of tokens_per_block x 4 characters stands
# for one engine block.
CHARS_PER_TOKEN = 4
# Index blocks hold at least this many tokens (a whole number of engine blocks): vLLM's 16-token blocks
# would cost ~1 ms to hash for a 200 KB prompt; 64-token ones cost a quarter of that, and lose at most 63
# tokens of a shared prefix, which changes no routing decision.
MIN_BLOCK_TOKENS = 64
# ~130 B each: ~17 MiB. 131,072 blocks of >= 64 tokens cover >= 8M prompt tokens, the KV caches of tens
# of large engines.
DEFAULT_MAX_ENTRIES = 131_072


def block_tokens(tokens_per_block: int) -> int:
    """Tokens of one index block: the fewest whole engine blocks holding MIN_BLOCK_TOKENS."""
    return tokens_per_block * math.ceil(MIN_BLOCK_TOKENS / tokens_per_block)


@dataclass(frozen=True)
class PromptBlocks:
    """A prompt's chained block hashes (only whole blocks: engines cache only those) and its length in
    characters, so that a hit can be given as a fraction of the prompt."""

    hashes: tuple[int, ...]
    chars: int
    block_chars: int

    def fraction(self, blocks: int) -> float:
        """The share of the prompt that `blocks` leading blocks cover."""
        return blocks * self.block_chars / self.chars if self.chars else 0.0


NO_BLOCKS = PromptBlocks((), 0, 1)


def prompt_blocks(pieces: Sequence[str], tokens_per_block: int) -> PromptBlocks:
    """The chained hashes of the text `pieces` make, joined as the engine sees them one after another.
    A separator between pieces keeps ("ab", "c") apart from ("a", "bc")."""
    text = "\x00".join(pieces)
    size = block_tokens(tokens_per_block) * CHARS_PER_TOKEN
    whole = len(text) - len(text) % size
    chunk_hashes = [hash(text[i:i + size]) for i in range(0, whole, size)]
    return PromptBlocks(tuple(accumulate(chunk_hashes, lambda prev, h: hash((prev, h)))), len(text), size)


@dataclass(eq=False)  # a collector is registered by identity
class PrefixIndex(Collector):
    """The blocks routed to each (model, endpoint), least recently routed evicted first."""

    max_entries: int = DEFAULT_MAX_ENTRIES
    # Keys are block hashes xor'ed with the endpoint's salt: one flat LRU for every endpoint.
    _entries: OrderedDict[int, None] = field(default_factory=OrderedDict, init=False, repr=False)
    # Prompt tokens expected cached where they were routed, by (model, endpoint).
    _expected_hit_tokens: defaultdict[tuple[str, str], float] = field(
        default_factory=lambda: defaultdict(float), init=False, repr=False)

    def __post_init__(self) -> None:
        if self.max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {self.max_entries}")

    def __len__(self) -> int:
        return len(self._entries)

    def record(self, model: str, endpoint: str, blocks: PromptBlocks, prompt_tokens: int) -> None:
        """The prompt (of `prompt_tokens` tokens, every sequence's) was routed to the endpoint: its
        blocks are (or soon will be) cached there. Recorded last block first, so a prompt's leading
        blocks are always its most recently used: the blocks present for an endpoint are then whole
        prefixes, and `cached` may bisect."""
        if not blocks.hashes:
            return
        hit = blocks.fraction(self.cached(model, endpoint, blocks))
        self._expected_hit_tokens[(model, endpoint)] += min(1.0, hit) * prompt_tokens
        salt, entries = hash((model, endpoint)), self._entries
        for h in reversed(blocks.hashes):
            key = h ^ salt
            if key in entries:
                entries.move_to_end(key)
            else:
                entries[key] = None
        while len(entries) > self.max_entries:
            entries.popitem(last=False)

    def cached(self, model: str, endpoint: str, blocks: PromptBlocks) -> int:
        """How many leading blocks of the prompt were routed to the endpoint and not aged out. A
        lookup does not refresh them: only routing there does."""
        salt, entries, hashes = hash((model, endpoint)), self._entries, blocks.hashes
        lo, hi = 0, len(hashes)  # blocks[:lo] are present; blocks[hi:] are not
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if (hashes[mid - 1] ^ salt) in entries:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def expected_hits(self, model: str, endpoints: Iterable[str], blocks: PromptBlocks) -> Mapping[str, float]:
        """Per endpoint, the fraction of the prompt expected in its prefix cache; endpoints with none
        are left out."""
        if not blocks.hashes:
            return {}
        return {e: blocks.fraction(n) for e in endpoints if (n := self.cached(model, e, blocks))}

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "kvgate_prefix_expected_hit_tokens", "Prompt tokens of admitted requests the prefix index expected "
            "in the prefix cache of the endpoint it routed them to (approximate)", labels=["model", "endpoint"])
        for (model, endpoint), tokens in sorted(self._expected_hit_tokens.items()):
            family.add_metric([model, endpoint], tokens)
        yield family
