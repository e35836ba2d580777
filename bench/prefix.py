"""`python -m bench.prefix`: prefix-cache-aware routing on a shared-prefix workload, in one run.

Many users chat at once: each user's chat opens with one of a few long system prompts, most of them
with one of several long documents, and goes on for several turns, each re-sending the whole
conversation. Three set-ups (bench/prefix_engines.py), each with fresh (cold) engines, one after the
other:

  least-request   Envoy alone, its LEAST_REQUEST balancer over the engines (no kvgate)
  headroom        kvgate, `routing: headroom`: the endpoint with the most KV headroom
  prefix          kvgate, `routing: prefix` (the default): expected prefix hit and headroom

The engines: 4 simulated vLLM engines (engines/sim, prefix caching on, GPU-like prefill), or with
`--engine vllm` 2 real vLLM replicas on the CPU (engines/real/vllm.py, the tiny random-weight Llama,
after `python -m engines.real.vllm install`) and the workload scaled down to their 2,048-token context
and 7,680-token caches (VLLM_WORKLOAD).

Reported per set-up: TTFT p50/p99 (streamed, to the first content chunk), throughput (requests done
per second of the run), the engines' own prefix-cache hit rate (vllm:prefix_cache_hits_total over
queries_total, summed) and their KV-exhaustion events (vLLM: preemptions); and each as a ratio against
least-request in the same run. Before them, the prefix index's own cost per request
(ext_proc/prefix_index.py) for a 2 KB and a 200 KB prompt, and its bytes per entry. `--plots DIR`
draws the TTFT distributions and hit rates (bench/prefix_plot.py).

Simulated: ~30 s by default, ~10 s with --quick (numbers from --quick mean nothing). vLLM: ~3.5 minutes,
most of it starting 2 replicas for each set-up.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shlex
import sys
import tempfile
import time
import timeit
import tracemalloc
from dataclasses import dataclass, field, replace
from pathlib import Path

import aiohttp
import orjson

from bench.machine import describe
from bench.prefix_engines import FLEETS, HITS, QUERIES, SETUPS, SIM, Fleet, engine_counters, started
from engines.sim.text import VOCAB
from ext_proc.prefix_index import PrefixIndex, prompt_blocks
from kvgate.cli.envoy_bootstrap import envoy_binary

MODEL = "shared-prefix"  # the index-cost measurement's model name


@dataclass(frozen=True)
class Workload:
    users: int = 48  # chatting at once
    turns: int = 4
    chats: int = 1  # each user's, one after the other
    system_prompts: int = 4
    system_words: int = 500
    documents: int = 24  # more than one engine's cache holds, fewer than all four hold together
    document_words: int = 2500
    document_share: float = 0.9  # of the chats, those about a document
    question_words: int = 100
    output_tokens: int = 32
    seed: int = 1


QUICK_WORKLOAD = Workload(users=12, turns=2, system_prompts=2, system_words=300, documents=6, document_words=800,
                          output_tokens=8)
# The tiny Llama's tokenizer makes ~2.8 tokens of a word: a document is ~730 tokens (23 blocks of 32), the
# 14 of them ~320 blocks, well over one replica's 239 usable blocks, and half of them (with the running
# chats' own blocks) within it; the fourth turn of a chat is up to ~1,400 tokens of prompt, within the
# 2,048-token context. kvgate reserves each request's whole prompt (shared blocks counted for each), up
# to 45 blocks: 8 users chatting at once fit the two budgets (~4 a replica), so that admission does not
# queue them, and each has 6 chats one after the other, ~3 chats a document over the run.
VLLM_WORKLOAD = Workload(users=8, turns=4, chats=6, system_prompts=2, system_words=60, documents=14,
                         document_words=260, question_words=15)
VLLM_QUICK_WORKLOAD = Workload(users=6, turns=2, system_prompts=2, system_words=40, documents=4, document_words=150,
                               question_words=10, output_tokens=8)
WORKLOADS = {"sim": (Workload(), QUICK_WORKLOAD), "vllm": (VLLM_WORKLOAD, VLLM_QUICK_WORKLOAD)}


@dataclass
class Result:
    setup: str
    ttft_s: list[float] = field(default_factory=list)
    sent_s: list[float] = field(default_factory=list)  # each request's, from the run's start
    turn: list[int] = field(default_factory=list)  # each request's in its chat, from 1
    start: float = 0.0  # the run's, time.perf_counter()
    failed: int = 0
    wall_s: float = 0.0
    hits: float = 0.0
    queries: float = 0.0
    exhaustion: float = 0.0
    queries_by_engine: list[float] = field(default_factory=list)  # each engine's share of the prompts

    @property
    def throughput(self) -> float:
        return len(self.ttft_s) / self.wall_s if self.wall_s else 0.0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0

    def ttft_ms(self, q: float) -> float:
        xs = sorted(self.ttft_s)
        return 1000 * xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


# --- the workload -----------------------------------------------------------------------------------

def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(VOCAB) for _ in range(n))


@dataclass(frozen=True)
class User:
    system: str
    questions: tuple[str, ...]


def users(w: Workload) -> list[User]:
    """Every chat's system prompt (+ document) and questions, user after user for each round of chats:
    the same for every set-up."""
    rng = random.Random(w.seed)
    systems = [f"System prompt {i}. " + _words(rng, w.system_words) for i in range(w.system_prompts)]
    documents = [f"Document {i}. " + _words(rng, w.document_words) for i in range(w.documents)]
    out = []
    for _ in range(w.users * w.chats):
        system = rng.choice(systems) + ("\n\n" + rng.choice(documents) if rng.random() < w.document_share else "")
        out.append(User(system, tuple(_words(rng, w.question_words) + "?" for _ in range(w.turns))))
    return out


async def _turn(session: aiohttp.ClientSession, url: str, fleet: Fleet, messages: list[dict[str, str]],
                output_tokens: int) -> tuple[float, str] | None:
    """One streamed chat turn: its TTFT and reply, or None when it failed."""
    body = {"model": fleet.model, "messages": messages, "max_tokens": output_tokens, "stream": True,
            **fleet.body_fields}
    start = time.perf_counter()
    ttft, reply = None, []
    async with session.post(f"{url}/v1/chat/completions", data=orjson.dumps(body),
                            headers={"content-type": "application/json"}) as r:
        if r.status != 200:
            await r.read()
            return None
        async for line in r.content:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            choices = orjson.loads(line[6:])["choices"]
            delta = choices[0]["delta"].get("content") if choices else None
            if delta:
                ttft = ttft if ttft is not None else time.perf_counter() - start
                reply.append(delta)
    return (ttft, "".join(reply)) if ttft is not None else None


async def _chat(session: aiohttp.ClientSession, url: str, fleet: Fleet, user: User, w: Workload,
                result: Result) -> None:
    messages = [{"role": "system", "content": user.system}]
    for turn, question in enumerate(user.questions, 1):
        messages.append({"role": "user", "content": question})
        sent = time.perf_counter() - result.start
        done = await _turn(session, url, fleet, messages, w.output_tokens)
        if done is None:
            result.failed += 1
            return
        result.ttft_s.append(done[0])
        result.sent_s.append(sent)
        result.turn.append(turn)
        messages.append({"role": "assistant", "content": done[1]})


async def run_load(url: str, fleet: Fleet, w: Workload, result: Result) -> None:
    """Every user chats at once, each turn after the previous one's answer, each chat after the previous
    one's end (a closed loop)."""
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        result.start = time.perf_counter()
        chats = users(w)

        async def user(first: int) -> None:
            for chat in chats[first::w.users]:
                await _chat(session, url, fleet, chat, w, result)

        await asyncio.gather(*(user(i) for i in range(w.users)))
        result.wall_s = time.perf_counter() - result.start


def run_setup(setup: str, fleet: Fleet, w: Workload, run_dir: Path) -> Result:
    result = Result(setup)
    with started(setup, fleet, run_dir / setup) as (url, engines):
        before = asyncio.run(engine_counters(fleet, engines))  # the readiness probes' own
        asyncio.run(run_load(url, fleet, w, result))
        after = asyncio.run(engine_counters(fleet, engines))
    spent = [{k: a[k] - b[k] for k in a} for a, b in zip(after, before)]
    result.hits = sum(x[HITS] for x in spent)
    result.queries = sum(x[QUERIES] for x in spent)
    result.exhaustion = sum(x[fleet.exhaustion] for x in spent)
    result.queries_by_engine = [x[QUERIES] for x in spent]
    return result


# --- the index's own cost ---------------------------------------------------------------------------

@dataclass(frozen=True)
class IndexCost:
    prompt_kb: int
    us_per_request: float  # hash the prompt, look it up on 4 endpoints, record it on one


def index_cost(prompt_kb: int, endpoints: int = 4, tokens_per_block: int = 16) -> IndexCost:
    """What prefix routing adds to one request in ext_proc, on a warm index holding the prompt."""
    rng = random.Random(prompt_kb)
    pieces = (_words(rng, prompt_kb * 1024 // 7)[:prompt_kb * 1024],)
    index, names = PrefixIndex(), [f"e{i}:1" for i in range(endpoints)]
    index.record(MODEL, names[0], prompt_blocks(pieces, tokens_per_block), 1)

    def once() -> None:
        blocks = prompt_blocks(pieces, tokens_per_block)
        index.expected_hits(MODEL, names, blocks)
        index.record(MODEL, names[0], blocks, 1)

    n = 2000 if prompt_kb < 10 else 50
    return IndexCost(prompt_kb, min(timeit.repeat(once, number=n, repeat=5)) / n * 1e6)


def bytes_per_entry(entries: int = 100_000) -> float:
    """Memory of the index per entry, filled with distinct 64-token blocks."""
    tracemalloc.start()
    index = PrefixIndex(max_entries=entries)
    before = tracemalloc.get_traced_memory()[0]
    for i in range(entries // 100):
        index.record(MODEL, "e:1", prompt_blocks((f"{i} " + "x" * 256 * 100,), 16), 1)
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return used / len(index)


# --- report -----------------------------------------------------------------------------------------

def render(results: list[Result], fleet: Fleet, costs: list[IndexCost], entry_bytes: float) -> str:
    base = results[0]

    def ratio(x: float, b: float) -> str:
        return f"{x / b:.2f}x" if b else "-"

    lines = ["| set-up | requests | failed | TTFT p50 ms | TTFT p99 ms | req/s | prefix-cache hit rate | "
             f"{fleet.exhaustion_label} | prompt tokens by engine |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.setup} | {len(r.ttft_s)} | {r.failed} | {r.ttft_ms(0.5):.0f} ({ratio(r.ttft_ms(0.5), base.ttft_ms(0.5))}) | "
                     f"{r.ttft_ms(0.99):.0f} ({ratio(r.ttft_ms(0.99), base.ttft_ms(0.99))}) | "
                     f"{r.throughput:.2f} ({ratio(r.throughput, base.throughput)}) | "
                     f"{r.hit_rate:.1%} ({ratio(r.hit_rate, base.hit_rate)}) | {r.exhaustion:.0f} | "
                     f"{' / '.join(f'{q / r.queries:.0%}' for q in r.queries_by_engine) if r.queries else '-'} |")
    lines += ["", f"Ratios against {base.setup}, measured in the same run.", "",
              "| prompt | prefix index per request (hash, 4 lookups, record) |", "|---|---|"]
    lines += [f"| {c.prompt_kb} KB | {c.us_per_request:.0f} µs |" for c in costs]
    lines += ["", f"Index memory: {entry_bytes:.0f} B per entry."]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.prefix", description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=FLEETS, default=SIM.name,
                        help="4 simulated vLLM engines (default), or 2 real vLLM replicas on the CPU")
    parser.add_argument("--quick", action="store_true", help="a tiny run (smoke test): the numbers mean nothing")
    parser.add_argument("--users", type=int, help="override the workload's number of users")
    parser.add_argument("--chats", type=int, help="override the workload's chats per user")
    parser.add_argument("--plots", type=Path, metavar="DIR",
                        help=f"write {' or '.join(f.plot_name for f in FLEETS.values())} (by engine) there (e.g. docs)")
    parser.add_argument("--run-dir", type=Path, help="where logs go (default: a temporary directory)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[Result]:
    args = parse_args(argv)
    fleet = FLEETS[args.engine]
    w = WORKLOADS[fleet.name][1 if args.quick else 0]
    w = replace(w, users=args.users or w.users, chats=args.chats or w.chats)
    fleet.prepare()
    costs = [index_cost(2), index_cost(200)]
    entry_bytes = bytes_per_entry(10_000 if args.quick else 100_000)
    loadavg = os.getloadavg()
    started_at = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kvgate-prefix-") as tmp:
        run_dir = args.run_dir or Path(tmp)
        results = [run_setup(s, fleet, w, run_dir) for s in SETUPS]
    print(shlex.join([sys.executable, "-m", "bench.prefix", *(sys.argv[1:] if argv is None else argv)]))
    print(f"engines: {fleet.count} x {fleet.name}; workload: {w}")
    print(f"{describe(envoy_binary())}; load average before the run {loadavg[0]:.2f} / {loadavg[1]:.2f} "
          f"(1 / 5 min); the run took {time.monotonic() - started_at:.0f} s")
    print(render(results, fleet, costs, entry_bytes))
    if args.plots:
        from bench.prefix_plot import plot  # matplotlib only when asked for

        print(f"plot: {plot(results, fleet, w, args.plots / fleet.plot_name)}", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
