"""Exact prompt tokens: each model's own tokenizer.json (HF `tokenizers`), loaded when a policy names it.

`TokenCounter` counts text pieces with one tokenizer and remembers the counts of recent pieces: a
system prompt, a few-shot prefix or the earlier turns of a conversation come back request after
request, and counting a long text costs milliseconds (bench/tokens.py, docs/benchmarks.md).
`Tokenizers` holds one counter per (path, sha256) that the policies name; a tokenizer that cannot be
loaded leaves its models on the upper bound (tokens.py) and is logged, never raised.

A rendered chat prompt is counted in segments (`TokenCounter.split`): HF tokenizers cut the text at
their added tokens (<|start_header_id|>, <|eot_id|>...) before anything else and encode each piece
between them on its own, so count(text) = added tokens + sum of the pieces' counts, and a chat template
puts such tokens around every message: each message's piece is cached like any other text.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from tokenizers import Tokenizer

from ext_proc.policy import Policy

# Counts kept per tokenizer. An entry is a 16-byte digest, an int and an OrderedDict node: ~130-160 B
# (bench/tokens.py measures it), so 32,768 entries hold ~5 MiB. That keeps every system prompt and
# few-shot prefix of a deployment (hundreds) plus the recent history of its conversations: at 200
# requests/s bringing ~3 new pieces each, about a minute, enough for the next turn of most chats,
# each of which re-sends all earlier messages.
DEFAULT_CACHE_ENTRIES = 32_768


def _key(text: str) -> bytes:
    # A digest, not the text: the cache must not keep megabytes of prompts alive. 128 bits of BLAKE2b
    # so that no client can craft a long text whose key is that of a short cached one (Python's 64-bit
    # str hash is guessable when PYTHONHASHSEED is fixed). ~1.6 µs per KB here, against ~1 ms per KB
    # for encoding.
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


@dataclass(eq=False)
class TokenCounter:
    """Token counts of text pieces with one tokenizer, the recent ones kept in an LRU cache.

    Pieces are counted without the special tokens a tokenizer adds around a whole text (its
    post-processor's BOS: `specials_added`); special tokens written in the text are counted.
    """

    tokenizer: Tokenizer
    cache_entries: int = DEFAULT_CACHE_ENTRIES
    # Distinct texts of each `count` answered from the cache, and texts encoded (count and prefetch).
    hits: int = field(default=0, init=False)
    misses: int = field(default=0, init=False)
    # Tokens the tokenizer adds to a text encoded with special tokens (Llama 3's BOS): what an engine's
    # completions prompt gets on top of its text.
    specials_added: int = field(default=0, init=False)
    _cache: OrderedDict[bytes, int] = field(default_factory=OrderedDict, init=False, repr=False)
    # The added tokens as the tokenizer finds them; None: the text cannot be cut at them (see _splitter).
    _added: re.Pattern[str] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.cache_entries < 1:
            raise ValueError(f"cache_entries must be at least 1, got {self.cache_entries}")
        # A tokenizer.json may ship with truncation or padding configured (for training); either would
        # make lengths lie about long or short texts.
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.specials_added = self.tokenizer.num_special_tokens_to_add(False)
        self._added = _splitter(self.tokenizer)

    def split(self, text: str) -> tuple[int, list[str]]:
        """The added tokens in `text`, and the non-empty pieces between them: encoding the pieces one
        by one gives the rest of the text's tokens. A tokenizer whose pieces would not encode alike
        (see _splitter) leaves the text whole: (0, [text])."""
        if self._added is None:
            return 0, [text]
        pieces = self._added.split(text)
        return len(pieces) - 1, [p for p in pieces if p]

    def count(self, texts: Sequence[str]) -> list[int]:
        """Tokens of each text; the ones not cached are encoded together in one batch."""
        keys = [_key(t) for t in texts]
        known: dict[bytes, int] = {}
        for k in keys:
            n = self._cache.get(k)
            if n is not None:
                self._cache.move_to_end(k)
                known[k] = n
        self.hits += len(known)
        missing = {k: t for k, t in zip(keys, texts) if k not in known}  # a text twice is encoded once
        if missing:
            counted = dict(zip(missing, self._encode(list(missing.values()))))
            self._store(counted)
            known.update(counted)  # not read back from the cache: storing may have evicted some
        return [known[k] for k in keys]

    async def prefetch(self, texts: Sequence[str]) -> None:
        """Encode the texts not cached yet in a worker thread (the tokenizer releases the GIL), so that
        a following `count` is all cache hits and the event loop is not held by a long prompt."""
        missing = {k: t for k, t in ((_key(t), t) for t in texts) if k not in self._cache}
        if missing:
            counts = await asyncio.to_thread(self._encode, list(missing.values()))
            self._store(dict(zip(missing, counts)))  # back on the event loop: the cache has one writer

    def _encode(self, texts: list[str]) -> list[int]:
        # encode_batch_fast skips the character offsets that only lengths don't need (~30% faster).
        return [len(e) for e in self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)]

    def _store(self, counts: dict[bytes, int]) -> None:
        self.misses += len(counts)
        self._cache.update(counts)
        while len(self._cache) > self.cache_entries:
            self._cache.popitem(last=False)


def _walk(node: object) -> Iterator[dict[str, object]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def _splitter(tokenizer: Tokenizer) -> re.Pattern[str] | None:
    """A pattern matching the tokenizer's added tokens the way it matches them (longest first, each
    taking the whitespace beside it that its lstrip/rstrip claims), or None when cutting a text at them
    and encoding the pieces apart would count differently from the whole: an added token matched after
    normalization or only as a whole word, or a Metaspace pre-tokenizer that marks only the first piece
    of a text (prepend_scheme "first", Llama 2's and Mistral's newer files)."""
    added = list(tokenizer.get_added_tokens_decoder().values())
    if any(t.normalized or t.single_word for t in added):
        return None
    if any(n.get("type") == "Metaspace" and n.get("prepend_scheme") == "first"
           for n in _walk(json.loads(tokenizer.to_str()).get("pre_tokenizer"))):
        return None
    if not added:
        return re.compile("(?!)")  # matches nothing: the whole text is one piece
    alternatives = [(r"\s*" if t.lstrip else "") + re.escape(t.content) + (r"\s*" if t.rstrip else "")
                    for t in sorted(added, key=lambda t: -len(t.content))]
    return re.compile("|".join(alternatives))


class TokenizerError(Exception):
    """A policy's tokenizer cannot be used; its models fall back to the upper bound."""


def load_counter(path: str, sha256: str, cache_entries: int = DEFAULT_CACHE_ENTRIES) -> TokenCounter:
    """Read, check and parse a tokenizer.json. Blocking (a 9 MB file parses in 100+ ms): call it in a
    thread. The bytes checked are the bytes parsed, so a file replaced meanwhile cannot slip through."""
    if not sha256:
        raise TokenizerError("the policy gives no sha256 to check the file against")
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise TokenizerError(f"cannot read it: {e.strerror or e}") from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256.lower():
        raise TokenizerError(f"sha256 is {actual}, the policy expects {sha256}: every replica must count "
                             "with the file the catalog named")
    try:
        tokenizer = Tokenizer.from_buffer(data)
    except Exception as e:  # the binding raises a bare Exception for any malformed file
        raise TokenizerError(f"not a tokenizers tokenizer.json: {e}") from None
    return TokenCounter(tokenizer, cache_entries)


def _tokenizer_key(policy: Policy) -> tuple[str, str]:
    return policy.tokenizer_path, policy.tokenizer_sha256


@dataclass(eq=False)
class Tokenizers:
    """The counters the current policies name, one per (path, sha256): models sharing a tokenizer
    share its counter and cache, and a policy update naming the same file does not reload it."""

    cache_entries: int = DEFAULT_CACHE_ENTRIES
    log: structlog.typing.FilteringBoundLogger = field(
        default_factory=lambda: structlog.get_logger(component="ext_proc"))
    _counters: dict[tuple[str, str], TokenCounter] = field(default_factory=dict, init=False)
    # Updates follow policy pushes; two at once must not load the same file twice.
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock, init=False)

    async def update(self, policies: Iterable[Policy]) -> None:
        """Load the tokenizers the policies name that are not loaded yet, off the event loop, and drop
        the ones no policy names any more. Until a load completes, or when it fails (logged; it is
        retried at the next update, so putting the right file in place and re-applying the catalog
        repairs it), `counter_for` answers None and the model is bounded instead."""
        by_key: dict[tuple[str, str], list[str]] = {}
        for p in policies:
            if p.tokenizer_path:
                by_key.setdefault(_tokenizer_key(p), []).append(p.name)
        async with self._lock:
            for key in by_key.keys() - self._counters.keys():
                path, sha256 = key
                start = time.perf_counter()
                try:
                    counter = await asyncio.to_thread(load_counter, path, sha256, self.cache_entries)
                except Exception as e:  # whatever the file holds, the gateway keeps serving on the bound
                    self.log.error("tokenizer.unusable", path=path, models=by_key[key], error=str(e),
                                   fallback="upper bound (prompt_estimate)")
                    continue
                self._counters[key] = counter
                self.log.info("tokenizer.loaded", path=path, models=by_key[key],
                              vocab=counter.tokenizer.get_vocab_size(),
                              load_ms=round((time.perf_counter() - start) * 1000, 1))
            for key in self._counters.keys() - by_key.keys():
                del self._counters[key]

    def counter_for(self, policy: Policy) -> TokenCounter | None:
        """The model's counter; None: count with the upper bound."""
        return self._counters.get(_tokenizer_key(policy)) if policy.tokenizer_path else None
