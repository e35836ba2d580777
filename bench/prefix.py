"""`python -m bench.prefix`: prefix-cache-aware routing on a shared-prefix workload, in one run.

Many users chat over 4 simulated vLLM engines (engines/sim, vLLM flavour, prefix caching on, one prefill
lane each so that prefill is the engine's bottleneck as on a GPU): each user's chat opens with one of a
few long system prompts, half of them with one of a few long documents, and goes on for several turns,
each re-sending the whole conversation. Three set-ups, each with fresh (cold) engines, one after the
other:

  least-request   Envoy alone, its LEAST_REQUEST balancer over the 4 engines (no kvgate)
  headroom        kvgate, `routing: headroom`: the endpoint with the most KV headroom
  prefix          kvgate, `routing: prefix` (the default): expected prefix hit and headroom

Reported per set-up: TTFT p50/p99 (streamed, to the first content chunk), throughput (requests done
per second of the run), the engines' own prefix-cache hit rate (vllm:prefix_cache_hits_total over
queries_total, summed) and their KV-exhaustion events; and each as a ratio against least-request in
the same run. Before them, the prefix index's own cost per request (ext_proc/prefix_index.py) for a
2 KB and a 200 KB prompt, and its bytes per entry.

~4 minutes by default, ~40 s with --quick (numbers from --quick mean nothing).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
import timeit
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml

from bench.machine import describe
from bench.spike_engines import status, wait
from engines.sim.text import VOCAB
from ext_proc.prefix_index import PrefixIndex, prompt_blocks
from kvgate.catalog import Address, parse_catalog
from kvgate.cli.envoy_bootstrap import envoy_binary
from kvgate.cli.gateway import Gateway, probe
from kvgate.cli.processes import Supervisor, free_port

HOST = "127.0.0.1"
MODEL = "shared-prefix"
SETUPS = ("least-request", "headroom", "prefix")


@dataclass(frozen=True)
class Workload:
    users: int = 48
    turns: int = 4
    system_prompts: int = 4
    system_words: int = 500
    documents: int = 24  # more than one engine's cache holds, fewer than all four hold together
    document_words: int = 2500
    document_share: float = 0.9  # of the chats, those about a document
    question_words: int = 100
    output_tokens: int = 32
    seed: int = 1


@dataclass(frozen=True)
class Engines:
    """Each simulated engine: a GPU-like prefill (~10,000 tokens/s, one prefill at a time) and decode."""

    count: int = 4
    kv_blocks: int = 4096  # 16-token blocks: 65,536 tokens each
    tokens_per_block: int = 16
    ttft_base_ms: float = 10.0
    ttft_per_token_ms: float = 0.1
    itl_ms: float = 10.0
    batch_slowdown: float = 0.01


QUICK_WORKLOAD = Workload(users=12, turns=2, system_prompts=2, system_words=300, documents=6, document_words=800,
                          output_tokens=8)


@dataclass
class Result:
    setup: str
    ttft_s: list[float] = field(default_factory=list)
    failed: int = 0
    wall_s: float = 0.0
    hits: float = 0.0
    queries: float = 0.0
    exhaustion: float = 0.0

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
    """Every user's system prompt (+ document) and questions: the same for every set-up."""
    rng = random.Random(w.seed)
    systems = [f"System prompt {i}. " + _words(rng, w.system_words) for i in range(w.system_prompts)]
    documents = [f"Document {i}. " + _words(rng, w.document_words) for i in range(w.documents)]
    out = []
    for _ in range(w.users):
        system = rng.choice(systems) + ("\n\n" + rng.choice(documents) if rng.random() < w.document_share else "")
        out.append(User(system, tuple(_words(rng, w.question_words) + "?" for _ in range(w.turns))))
    return out


async def _turn(session: aiohttp.ClientSession, url: str, messages: list[dict[str, str]],
                output_tokens: int) -> tuple[float, str] | None:
    """One streamed chat turn: its TTFT and reply, or None when it failed."""
    body = {"model": MODEL, "messages": messages, "max_tokens": output_tokens, "stream": True}
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
            delta = orjson.loads(line[6:])["choices"][0]["delta"].get("content")
            if delta:
                ttft = ttft if ttft is not None else time.perf_counter() - start
                reply.append(delta)
    return (ttft, "".join(reply)) if ttft is not None else None


async def _chat(session: aiohttp.ClientSession, url: str, user: User, w: Workload, result: Result) -> None:
    messages = [{"role": "system", "content": user.system}]
    for question in user.questions:
        messages.append({"role": "user", "content": question})
        done = await _turn(session, url, messages, w.output_tokens)
        if done is None:
            result.failed += 1
            return
        result.ttft_s.append(done[0])
        messages.append({"role": "assistant", "content": done[1]})


async def run_load(url: str, w: Workload, result: Result) -> None:
    """Every user chats at once, each turn after the previous one's answer (a closed loop)."""
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        start = time.perf_counter()
        await asyncio.gather(*(_chat(session, url, u, w, result) for u in users(w)))
        result.wall_s = time.perf_counter() - start


# --- the set-ups ------------------------------------------------------------------------------------

def _sim_argv(e: Engines, port: int) -> list[str]:
    return [sys.executable, "-m", "engines.sim", "--flavor", "vllm", "--prefix-caching", "--prefill-lanes", "1",
            "--host", HOST, "--port", str(port), "--model", MODEL, "--kv-blocks", str(e.kv_blocks),
            "--tokens-per-block", str(e.tokens_per_block), "--ttft-base-ms", str(e.ttft_base_ms),
            "--ttft-per-token-ms", str(e.ttft_per_token_ms), "--itl-ms", str(e.itl_ms),
            "--batch-slowdown", str(e.batch_slowdown)]


def catalog(engines: list[Address], e: Engines, routing: str) -> dict[str, Any]:
    """The model over the running engines; its budget is exactly each engine's cache (vLLM's null block
    aside, which ext_proc reads from the engine). No tokenizer: prompts are bounded at 4 bytes per token
    (the simulator's words average ~6.5 bytes with their space: the bound stays above its count)."""
    return {"models": [{
        "name": MODEL, "engine": "vllm", "routing": routing, "max_context_tokens": 65536, "max_output_tokens": 1024,
        "tokens_per_block": e.tokens_per_block,
        "endpoints": [{"host": a.host, "port": a.port} for a in engines],
        "kv": {"bytes_per_token": 1024, "budget_per_endpoint": e.kv_blocks * e.tokens_per_block * 1024},
        "prompt_estimate": {"bytes_per_token": 4.0},
    }], "priority_classes": [{"name": "default", "max_wait_s": 30}]}


def _envoy_least_request(listen: int, admin: int, engines: list[Address]) -> dict[str, Any]:
    endpoints = [{"endpoint": {"address": {"socket_address": {"address": a.host, "port_value": a.port}}}}
                 for a in engines]
    return {
        "admin": {"address": {"socket_address": {"address": HOST, "port_value": admin}}},
        "static_resources": {
            "listeners": [{"name": "http", "address": {"socket_address": {"address": HOST, "port_value": listen}},
                           "filter_chains": [{"filters": [{
                               "name": "envoy.filters.network.http_connection_manager",
                               "typed_config": {
                                   "@type": "type.googleapis.com/envoy.extensions.filters.network."
                                            "http_connection_manager.v3.HttpConnectionManager",
                                   "stat_prefix": "http",
                                   "route_config": {"virtual_hosts": [{
                                       "name": "all", "domains": ["*"],
                                       "routes": [{"match": {"prefix": "/"},
                                                   "route": {"cluster": "engines", "timeout": "300s"}}]}]},
                                   "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                                       "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
                               }}]}]}],
            "clusters": [{"name": "engines", "type": "STATIC", "connect_timeout": "1s", "lb_policy": "LEAST_REQUEST",
                          "circuit_breakers": {"thresholds": [{"max_requests": 100000, "max_pending_requests": 100000,
                                                                "max_connections": 100000}]},
                          "load_assignment": {"cluster_name": "engines", "endpoints": [{"lb_endpoints": endpoints}]}}],
        },
    }


@contextmanager
def started(setup: str, e: Engines, run_dir: Path) -> Iterator[tuple[str, list[Address]]]:
    """Fresh engines and the set-up in front of them: (the URL the load goes to, the engines)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    supervisor = Supervisor(run_dir)
    try:
        engines = [Address(host=HOST, port=free_port()) for _ in range(e.count)]
        for i, a in enumerate(engines):
            supervisor.start(f"sim-{i}", _sim_argv(e, a.port))
        for a in engines:
            wait(supervisor, lambda a=a: status(f"http://{a}/v1/completions",
                                                  {"model": MODEL, "prompt": "x", "max_tokens": 1}) == 200, str(a))
        if setup == "least-request":
            listen, admin = free_port(), free_port()
            (run_dir / "envoy.yaml").write_text(yaml.safe_dump(_envoy_least_request(listen, admin, engines)))
            supervisor.start("envoy", [envoy_binary(), "-c", str(run_dir / "envoy.yaml"), "--log-level", "warn",
                                       "--disable-hot-restart"])
            url = f"http://{HOST}:{listen}"
            wait(supervisor, lambda: status(f"{url}/v1/completions",
                                              {"model": MODEL, "prompt": "x", "max_tokens": 1}) == 200, "envoy")
            yield url, engines
            return
        routing = "headroom" if setup == "headroom" else "prefix"
        cat = parse_catalog(catalog(engines, e, routing))
        gateway = Gateway(cat, run_dir=run_dir / "gateway", port=free_port())
        gateway.start()
        try:
            wait(supervisor, lambda: status(*probe(gateway.url, cat.models[0])) == 200, "gateway")
            yield gateway.url, engines
        finally:
            gateway.stop()
    finally:
        supervisor.stop_all()


async def _engine_counters(engines: list[Address]) -> dict[str, float]:
    names = ("vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total", "kvgate_sim_kv_exhaustion_events_total")
    out = dict.fromkeys(names, 0.0)
    async with aiohttp.ClientSession() as session:
        for a in engines:
            async with session.get(f"http://{a}/metrics") as r:
                for line in (await r.text()).splitlines():
                    name = line.split("{", 1)[0].split(" ", 1)[0]
                    if name in out:
                        out[name] += float(line.rsplit(" ", 1)[1])
    return out


def run_setup(setup: str, w: Workload, e: Engines, run_dir: Path) -> Result:
    result = Result(setup)
    with started(setup, e, run_dir / setup) as (url, engines):
        before = asyncio.run(_engine_counters(engines))  # the readiness probes' own
        asyncio.run(run_load(url, w, result))
        after = asyncio.run(_engine_counters(engines))
    result.hits = after["vllm:prefix_cache_hits_total"] - before["vllm:prefix_cache_hits_total"]
    result.queries = after["vllm:prefix_cache_queries_total"] - before["vllm:prefix_cache_queries_total"]
    result.exhaustion = after["kvgate_sim_kv_exhaustion_events_total"] - before["kvgate_sim_kv_exhaustion_events_total"]
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

def render(results: list[Result], costs: list[IndexCost], entry_bytes: float) -> str:
    base = results[0]

    def ratio(x: float, b: float) -> str:
        return f"{x / b:.2f}x" if b else "-"

    lines = ["| set-up | requests | failed | TTFT p50 ms | TTFT p99 ms | req/s | prefix-cache hit rate | "
             "KV exhaustion |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.setup} | {len(r.ttft_s)} | {r.failed} | {r.ttft_ms(0.5):.0f} ({ratio(r.ttft_ms(0.5), base.ttft_ms(0.5))}) | "
                     f"{r.ttft_ms(0.99):.0f} ({ratio(r.ttft_ms(0.99), base.ttft_ms(0.99))}) | "
                     f"{r.throughput:.2f} ({ratio(r.throughput, base.throughput)}) | {r.hit_rate:.1%} | {r.exhaustion:.0f} |")
    lines += ["", f"Ratios against {base.setup}, measured in the same run.", "",
              "| prompt | prefix index per request (hash, 4 lookups, record) |", "|---|---|"]
    lines += [f"| {c.prompt_kb} KB | {c.us_per_request:.0f} µs |" for c in costs]
    lines += ["", f"Index memory: {entry_bytes:.0f} B per entry."]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.prefix", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny run (smoke test): the numbers mean nothing")
    parser.add_argument("--users", type=int, help="override the workload's number of users")
    parser.add_argument("--run-dir", type=Path, help="where logs go (default: a temporary directory)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[Result]:
    args = parse_args(argv)
    w = QUICK_WORKLOAD if args.quick else Workload()
    w = replace(w, users=args.users) if args.users else w
    costs = [index_cost(2), index_cost(200)]
    entry_bytes = bytes_per_entry(10_000 if args.quick else 100_000)
    with tempfile.TemporaryDirectory(prefix="kvgate-prefix-") as tmp:
        run_dir = args.run_dir or Path(tmp)
        results = [run_setup(s, w, Engines(), run_dir) for s in SETUPS]
    print(f"python -m bench.prefix{' --quick' if args.quick else ''}: {w}")
    print(describe(envoy_binary()))
    print(render(results, costs, entry_bytes))
    return results


if __name__ == "__main__":
    main()
