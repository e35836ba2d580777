"""What counting prompt tokens with the model's tokenizer costs per request, against the byte upper bound.

For chat bodies of three sizes (short, ~2 KB, ~32 KB of prompt) it times `tokens.prompt_tokens` on the
parsed request: with no tokenizer (the upper bound); with a `TokenCounter` and no chat template (the
messages' text counted, the template's tokens estimated: "pieces"); and with the model's chat template
rendered and counted in segments ("exact": what vLLM counts). Each counted way is timed when none of
the request's text is cached (cold), when all but the newest message is (the usual next turn of a
conversation), and when all is (warm). Parsing is timed too, as the scale of what ext_proc already
spends. The tokenizers are trained here on the repository's own text (engines/real/tiny_tokenizer.py):
byte-level BPE like Llama 3's, with Llama 3's chat markup as added tokens, but with 2k-10k tokens
instead of 128k, so a real tokenizer.json costs more to load and somewhat more per token (see
docs/benchmarks.md). The template has Llama 3's shape (the test model's, engines/real/tiny_llama.py).

    /work/venv/bin/python -m bench.tokens [--iterations 40]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import orjson

from bench.machine import describe
from ext_proc import tokens
from ext_proc.openai_protocol import CHAT_PATH, parse_request
from ext_proc.policy import Policy
from ext_proc.request import LLMRequest
from ext_proc.tokenizer import TokenCounter, load_counter
from kvgate.chat_template import ChatTemplate, TemplateSource
from kvgate.cli.envoy_bootstrap import envoy_binary
from engines.real import tiny_tokenizer

# Llama 3's chat format: BOS, then per message a role header and the trimmed content ended by <|eot_id|>,
# then an open assistant header.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
LLAMA3_MARKUP = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")

# The catalog's defaults: what the bound and the pieces both add for the chat template.
POLICY = Policy(name="m", protocol="openai", backend_model="m", max_context_tokens=1 << 20, max_output_tokens=1024,
                kv_bytes_per_token=131072, tokens_per_block=32, endpoints=(), estimate_bytes_per_token=1.0,
                estimate_per_message=8, estimate_per_request=8)
TEMPLATED = dataclasses.replace(POLICY, chat_template=ChatTemplate(
    TemplateSource(LLAMA3_TEMPLATE, (("bos_token", "<|begin_of_text|>"),))))


@dataclass(frozen=True)
class Shape:
    """A chat body: a system prompt, earlier turns, and the newest user message, sizes in bytes."""

    name: str
    system: int
    history: tuple[int, ...]
    last: int


SHAPES = (Shape("short", 120, (), 60),
          Shape("2 KB", 600, (500, 400), 500),
          Shape("32 KB", 1000, (400, 300), 31000))


class Corpus:
    """Windows of the repo's docs as message text; a different offset gives different text, which is
    what a cold cache needs (the tokenizer's own word cache stays warm, as it would in service)."""

    def __init__(self) -> None:
        text = "\n".join(tiny_tokenizer.docs_corpus())
        self.text = text * (1 + 200_000 // len(text))

    def window(self, offset: int, size: int) -> str:
        start = (offset * 7919) % (len(self.text) - size)  # a prime stride: far apart, never aligned
        return self.text[start:start + size]


def body(shape: Shape, corpus: Corpus, prefix: int, last: int) -> bytes:
    """`prefix` picks the system prompt and history, `last` the newest message: equal numbers, equal text."""
    turns = [("system", shape.system), *zip(("user", "assistant") * 4, shape.history)]
    messages = [{"role": role, "content": corpus.window(prefix * 13 + i, size)} for i, (role, size) in enumerate(turns)]
    messages.append({"role": "user", "content": corpus.window(1_000_003 + last, shape.last)})
    return orjson.dumps({"model": "m", "max_tokens": 256, "messages": messages})


def timed_us(fn: Callable[[], object]) -> float:
    start = time.perf_counter_ns()
    fn()
    return (time.perf_counter_ns() - start) / 1000


def chat_request(raw: bytes) -> LLMRequest:
    """The parsed request with its chat body, as ext_proc's decision step hands it to counting."""
    parsed = parse_request(CHAT_PATH, raw)
    return dataclasses.replace(parsed.request, chat=parsed.body)


@dataclass(frozen=True)
class Timings:
    """µs per request, median: nothing cached, all but the newest message cached, all cached."""

    cold_us: float
    next_turn_us: float
    warm_us: float


@dataclass(frozen=True)
class Row:
    tokenizer: str
    shape: str
    body_bytes: int
    bound_tokens: int
    pieces_tokens: int
    exact_tokens: int
    parse_us: float
    bound_us: float
    render_us: float  # the chat template alone
    pieces: Timings
    exact: Timings


def time_counting(policy: Policy, path: Path, sha256: str, cold: list[LLMRequest], turns: list[LLMRequest],
                  n: int) -> Timings:
    """One counting way, with a fresh counter (an empty cache): every request of the cold and next-turn
    runs is new to it."""
    counter = load_counter(str(path), sha256)
    cold_us = statistics.median(timed_us(lambda r=r: tokens.prompt_tokens(r, policy, counter)) for r in cold)
    tokens.prompt_tokens(turns[0], policy, counter)
    next_us = statistics.median(timed_us(lambda r=r: tokens.prompt_tokens(r, policy, counter)) for r in turns[1:])
    warm_us = statistics.median(timed_us(lambda: tokens.prompt_tokens(cold[0], policy, counter)) for _ in range(n))
    return Timings(cold_us, next_us, warm_us)


def measure(label: str, tokenizer_path: Path, sha256: str, shape: Shape, corpus: Corpus, n: int) -> Row:
    """Medians over n requests."""
    cold = [chat_request(body(shape, corpus, i, i)) for i in range(n)]
    # Same system prompt and history, a new last message each: after the first, only that one misses.
    turns = [chat_request(body(shape, corpus, 10_000, 10_000 + i)) for i in range(n + 1)]
    raw = body(shape, corpus, 0, 0)
    counter = load_counter(str(tokenizer_path), sha256)
    template = TEMPLATED.chat_template
    assert template is not None
    return Row(label, shape.name, len(raw), tokens.prompt_tokens(cold[0], POLICY, None)[0],
               tokens.prompt_tokens(cold[0], POLICY, counter)[0], tokens.prompt_tokens(cold[0], TEMPLATED, counter)[0],
               parse_us=statistics.median(timed_us(lambda: parse_request(CHAT_PATH, raw)) for _ in range(n)),
               bound_us=statistics.median(timed_us(lambda r=r: tokens.prompt_tokens(r, POLICY, None)) for r in cold),
               render_us=statistics.median(timed_us(lambda r=r: template.render(r.chat)) for r in cold),
               pieces=time_counting(POLICY, tokenizer_path, sha256, cold, turns, n),
               exact=time_counting(TEMPLATED, tokenizer_path, sha256, cold, turns, n))


def cache_bytes_per_entry(counter: TokenCounter, entries: int = 20_000) -> float:
    """The cache's own memory per entry (digest, count, LRU node); the texts are not kept."""
    texts = [f"piece number {i} of the cache measurement" for i in range(entries)]
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    counter.count(texts)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(s.size_diff for s in after.compare_to(before, "filename")
                if s.traceback[0].filename.endswith("ext_proc/tokenizer.py"))
    return grown / entries


def render(rows: list[Row]) -> str:
    lines = ["| tokenizer | request | body | tokens: bound / pieces / exact | parse | bound | render "
             "| pieces cold / next / warm | exact cold / next / warm | exact / pieces cold | exact / pieces next "
             "| exact / pieces warm | exact warm / bound |",
             "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    lines += [f"| {r.tokenizer} | {r.shape} | {r.body_bytes:,} B | {r.bound_tokens:,} / {r.pieces_tokens:,} / "
              f"{r.exact_tokens:,} | {r.parse_us:,.1f} | {r.bound_us:,.1f} | {r.render_us:,.1f} "
              f"| {r.pieces.cold_us:,.1f} / {r.pieces.next_turn_us:,.1f} / {r.pieces.warm_us:,.1f} "
              f"| {r.exact.cold_us:,.1f} / {r.exact.next_turn_us:,.1f} / {r.exact.warm_us:,.1f} "
              f"| {r.exact.cold_us / r.pieces.cold_us:.2f}x | {r.exact.next_turn_us / r.pieces.next_turn_us:.2f}x "
              f"| {r.exact.warm_us / r.pieces.warm_us:.2f}x | {r.exact.warm_us / r.bound_us:,.1f}x |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[Row]:
    p = argparse.ArgumentParser(prog="python -m bench.tokens", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iterations", type=int, default=40, help="requests timed per cell (median reported)")
    args = p.parse_args(argv)
    machine = describe(envoy_binary())
    corpus = Corpus()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for vocab, sources, what in ((2000, False, "docs"), (32000, True, "all repo text")):
            trained = tiny_tokenizer.load(vocab, sources)
            trained.add_special_tokens(list(LLAMA3_MARKUP))
            path = Path(tmp) / f"{vocab}-{sources}.json"
            trained.save(str(path))
            sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
            load_ms = timed_us(lambda: load_counter(str(path), sha256)) / 1000
            counter = load_counter(str(path), sha256)
            label = f"{counter.tokenizer.get_vocab_size():,} tokens ({what})"
            print(f"{label}: tokenizer.json {path.stat().st_size / 1e6:.2f} MB, loaded and checked in "
                  f"{load_ms:.1f} ms; LRU cache ~{cache_bytes_per_entry(counter):.0f} B per entry", file=sys.stderr)
            rows += [measure(label, path, sha256, shape, corpus, args.iterations) for shape in SHAPES]
    print(f"command: {' '.join(['python -m bench.tokens', *(argv if argv is not None else sys.argv[1:])])}")
    print(f"machine: {machine.date}, nproc {machine.nproc}, {machine.cpu_model}, Python {machine.python}")
    print("µs per request, median; ratios against the pieces count and the upper bound measured in the same run")
    print(render(rows))
    return rows


if __name__ == "__main__":
    main()
