"""The seed scenario of bench/spike: what is sent when, and the one model every set-up serves.

Steady traffic is a seeded Poisson stream of chat requests for 512 output tokens; the burst is a
handful of requests for 4,000 output tokens arriving within a short window after a warm-up. The
steady stream and the burst come from two independent random streams, so the plan without the burst
is the same steady traffic, request for request (`without_burst`).

The same scenario scaled to a real vLLM on this machine's CPU (`VLLM_SEED`, `vllm_catalog`): the tiny
Llama of engines/real/vllm.py with a cache of the same proportions, in blocks, as the simulator's.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from engines.sim.text import VOCAB, count_chat_tokens, count_prompt_tokens

MODEL = "llama-2-7b"
VLLM_MODEL = "tiny-llama"  # engines/real/vllm.py's served name
STEADY, BURST = "steady", "burst"


@dataclass(frozen=True)
class Scenario:
    seed: int = 1
    # req/s, Poisson: ~4 requests in flight (each lives ~6.5 s) at ~27 KV blocks of 512 each, which
    # the engine serves comfortably (KV peak 36% without the burst). At 1.0 the steady peak alone
    # reaches 91% of the cache (docs/benchmarks.md, stress variant).
    steady_rate: float = 0.7
    steady_output_tokens: int = 512
    prompt_words: tuple[int, int] = (200, 400)  # user message, uniform; the simulator counts a token per word
    burst_count: int = 8
    burst_output_tokens: int = 4000
    burst_start_s: float = 10.0  # the warm-up before it brings the engine to its steady occupancy
    burst_window_s: float = 2.0  # burst arrivals are uniform in [start, start + window)
    duration_s: float = 60.0  # steady arrivals stop here
    drain_s: float = 10.0  # after the last arrival, steady requests still running get this long; then all stop
    give_up_s: float = 30.0  # a client gives up when no token came this long after its request was due
    slo_ttft_s: float = 1.0
    slo_itl_s: float = 0.050  # per request: mean gap between tokens

    @property
    def window(self) -> tuple[float, float]:
        """Steady arrivals measured: from the burst to the end of arrivals (the same window without it)."""
        return self.burst_start_s, self.duration_s


# A smoke run, no meaningful numbers. The burst keeps its full size, enough to overflow the cache, so
# refusals and engine queueing happen too; it is cut when the short run ends.
QUICK = Scenario(steady_rate=3.0, steady_output_tokens=24, prompt_words=(40, 80), burst_count=5,
                 burst_start_s=1.0, burst_window_s=0.5, duration_s=3.0, drain_s=2.0, give_up_s=2.0)

# The seed scenario on vLLM (VLLM_BLOCKS blocks of 32 tokens, the tiny Llama's tokenizer making about
# three tokens of each of the scenario's words): a steady request (a ~240-token prompt, 128 output
# tokens) holds ~12 blocks, 5% of the cache, for a second or so; 2 req/s is what vLLM on two CPU cores,
# which it shares with Envoy, ext_proc and the client (its worker alone spins one), serves comfortably.
# A burst request (~1,750 output tokens) holds ~62 blocks, 26%, and the 8 of the burst claim 2.1
# caches, as the seed's do on the simulator.
VLLM_BLOCKS = 240
VLLM_CONTEXT = 2048
# The tiny Llama's random weights end a generation at any step: every request asks for all its tokens.
VLLM_FIELDS = {"ignore_eos": True}
VLLM_SEED = Scenario(steady_rate=2.0, steady_output_tokens=128, prompt_words=(20, 40), burst_output_tokens=1750)
VLLM_QUICK = Scenario(steady_rate=4.0, steady_output_tokens=16, prompt_words=(10, 20), burst_count=5,
                      burst_output_tokens=1750, burst_start_s=1.0, burst_window_s=0.5, duration_s=3.0, drain_s=2.0,
                      give_up_s=5.0)


@dataclass(frozen=True)
class Planned:
    index: int
    kind: str  # STEADY or BURST
    due_s: float  # from the start of the run
    max_tokens: int
    prompt_tokens: int  # as the engine counts them
    content_bytes_per_token: float  # UTF-8 bytes of the message contents per simulator token
    body: bytes


# Prompt tokens of a chat's messages, as the engine counts them.
ChatCounter = Callable[[Sequence[dict[str, str]]], int]


def sim_chat_tokens(messages: Sequence[dict[str, str]]) -> int:
    return count_chat_tokens([m["content"] for m in messages])


# Shared by every request, as a deployment's system prompt is.
_SYSTEM_WORDS = 40


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(VOCAB) for _ in range(n))


def _request(index: int, kind: str, due_s: float, max_tokens: int, system: str, user: str, model: str,
             count: ChatCounter, fields: dict[str, Any]) -> Planned:
    contents = [system, user]
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    body = orjson.dumps({"model": model, "stream": True, "max_tokens": max_tokens, "messages": messages, **fields})
    return Planned(index=index, kind=kind, due_s=due_s, max_tokens=max_tokens, prompt_tokens=count(messages),
                   content_bytes_per_token=min(len(c.encode()) / count_prompt_tokens(c) for c in contents),
                   body=body)


def build_plan(s: Scenario, model: str = MODEL, count: ChatCounter = sim_chat_tokens,
               fields: dict[str, Any] | None = None) -> list[Planned]:
    """Every request of the run with the burst, by due time, for `model`, whose engine counts prompts
    with `count`; `fields` go into every body."""
    system = _words(random.Random(f"{s.seed}-system"), _SYSTEM_WORDS)
    steady_rng, burst_rng = random.Random(f"{s.seed}-steady"), random.Random(f"{s.seed}-burst")
    timed: list[tuple[float, str, str]] = []
    t = steady_rng.expovariate(s.steady_rate)
    while t < s.duration_s:
        timed.append((t, STEADY, _words(steady_rng, steady_rng.randint(*s.prompt_words))))
        t += steady_rng.expovariate(s.steady_rate)
    for _ in range(s.burst_count):
        due = s.burst_start_s + burst_rng.uniform(0, s.burst_window_s)
        timed.append((due, BURST, _words(burst_rng, burst_rng.randint(*s.prompt_words))))
    timed.sort()
    out = {STEADY: s.steady_output_tokens, BURST: s.burst_output_tokens}
    return [_request(i, kind, due, out[kind], system, user, model, count, fields or {})
            for i, (due, kind, user) in enumerate(timed)]


def without_burst(plan: list[Planned]) -> list[Planned]:
    return [p for p in plan if p.kind == STEADY]


def estimate_bytes_per_token(plan: list[Planned]) -> float:
    """kvgate's prompt estimate for this text, calibrated as an operator would calibrate it to their
    tokenizer: the largest quarter step that still bounds every prompt from above. kvgate's default
    (1.0, safe for any byte-level BPE) would reserve ~6x the prompt of this text, and the benchmark
    would measure the estimate instead of admission."""
    return math.floor(4 * min(p.content_bytes_per_token for p in plan)) / 4


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def catalog(plan: list[Planned], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The catalog of the benchmark's one model, with `extra` merged into its entry (for catalog fields
    that land later: wait queues, priority classes, ...).

    Llama-2-7B in fp16 holds 512 KiB of KV per token (docs/reference.md); 8 GiB of KV on a 40 GB GPU is
    16,384 tokens, about 16 concurrent 1,000-token requests, in 512 blocks of 32 tokens. Every
    set-up's engine is started from this entry (kvgate.cli.gateway.sim_argv), so they are identical, and
    kvgate's ledger has exactly the engine's blocks. max_output_tokens is above the burst's 4,000:
    the clamp alone would otherwise cut the burst down, and the benchmark measures admission.
    """
    model = {
        "name": MODEL, "endpoints": ["sim"], "max_context_tokens": 8192, "max_output_tokens": 4096,
        "tokens_per_block": 32, "kv": {"bytes_per_token": 512 * 1024, "budget_per_endpoint": "8GiB"},
        "prompt_estimate": {"bytes_per_token": estimate_bytes_per_token(plan)},
        # A 7B fp16 model on an A100-40GB-class GPU, in real time: ~10 ms per token at batch 1 (14 GB of
        # weights read per step at ~1.5 TB/s), 2% slower per extra running request (decode stays
        # memory-bound), prefill ~0.1 ms per prompt token.
        "sim": {"ttft_base_ms": 20, "ttft_per_token_ms": 0.1, "itl_ms": 10, "batch_slowdown": 0.02,
                "on_full": "queue"},
    }
    return {"models": [_merge(model, extra or {})]}


def vllm_catalog(model_dir: Path, s: Scenario, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The catalog of the tiny Llama behind vLLM: its cache of VLLM_BLOCKS blocks (vLLM keeps one aside,
    and ext_proc reads that from the engine), its context, its tokenizer and chat template (exact
    prompt counts), vLLM's KV rules. kvgate's defaults for everything else."""
    model = {
        "name": VLLM_MODEL, "endpoints": ["sim"], "engine": "vllm", "max_context_tokens": VLLM_CONTEXT,
        "max_output_tokens": max(s.burst_output_tokens, s.steady_output_tokens), "tokens_per_block": 32,
        "tokenizer": str(model_dir / "tokenizer.json"),
        "kv": {"config_json": str(model_dir / "config.json"), "budget_per_endpoint": VLLM_BLOCKS * 32 * 512},
    }
    return {"models": [_merge(model, extra or {})]}
