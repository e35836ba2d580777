"""The admission decision: context check, max_tokens clamp, KV bytes, and which endpoint holds them.

`plan` is pure arithmetic on a parsed request and its model's policy; `choose` picks the endpoint
by its expected prefix-cache hit and its headroom; `admit` reserves there or says why not. Waiting is
server.py's (waitqueue).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvgate.kv_math import reservation_bytes
from ext_proc import tokens
from ext_proc.ledger import Ledger, Reservation
from ext_proc.policy import Policy
from ext_proc.request import LLMRequest

if TYPE_CHECKING:
    from ext_proc.tokenizer import TokenCounter


@dataclass(frozen=True)
class Plan:
    max_tokens: int
    prompt_tokens: int  # the longest prompt
    nbytes: int
    long: bool  # claims more than the policy's long-request threshold of the largest endpoint
    tokens: int  # prompt + output tokens of every sequence: what a tokens-per-minute limit charges
    prompt_tokens_total: int = 0  # prompt tokens of every sequence: what the engine will prefill


@dataclass(frozen=True)
class Refusal:
    status: int
    code: str
    message: str
    type_: str = "invalid_request_error"
    param: str | None = None
    retry_after: int | None = None


def plan(req: LLMRequest, policy: Policy, counter: TokenCounter | None) -> Plan | Refusal:
    prompts = tokens.prompt_tokens(req, policy, counter)
    longest = max(prompts)
    room = policy.max_context_tokens - longest
    if room < 1:
        return Refusal(400, "context_length_exceeded",
                       f"This model's maximum context length is {policy.max_context_tokens} tokens. However, "
                       f"your prompt may use up to {longest} tokens, leaving no room "
                       "for output. Please reduce the length of the prompt.", param=req.prompt_param)
    max_tokens = min(req.requested_max_tokens or policy.max_output_tokens, policy.max_output_tokens, room)
    # Blocks as the engine takes them: for the longest the sequence can get (the clamp keeps it within
    # the context), rounded up to whole blocks.
    nbytes = req.sequences_per_prompt * sum(
        reservation_bytes(policy.sequence_tokens(p, max_tokens), policy.tokens_per_block, policy.kv_bytes_per_token)
        for p in prompts)
    if nbytes > policy.largest_budget:
        # Would never fit, however long the client waits: a 429 would only invite retries.
        return Refusal(400, "request_too_large",
                       f"This request may claim {nbytes} bytes of KV cache, more than any engine of model "
                       f"{policy.name!r} holds ({policy.largest_budget}). Send fewer prompts or a smaller n.")
    return Plan(max_tokens=max_tokens, prompt_tokens=longest, nbytes=nbytes,
                long=nbytes > policy.long_request_threshold * policy.largest_budget,
                tokens=req.sequences_per_prompt * sum(p + max_tokens for p in prompts),
                prompt_tokens_total=req.sequences_per_prompt * sum(prompts))


def _long_ok(ledger: Ledger, p: Plan, policy: Policy, now: float) -> bool:
    """Long requests share at most max_share of the endpoint while short ones use it (one holds budget,
    or did within the policy's window): the cap keeps room for them. One long request alone may take
    more, or a request bigger than that share could never run; and with no short traffic to protect, a
    flood of long requests may fill the engine rather than leave it idle."""
    short_traffic = ledger.reserved > ledger.reserved_long or now - ledger.short_at < policy.long_requests_short_window_s
    return (not p.long or ledger.reserved_long == 0 or not short_traffic
            or ledger.reserved_long + p.nbytes <= policy.long_requests_max_share * ledger.capacity)


# What a whole-prompt prefix hit is worth against free KV, in fractions of the largest endpoint's budget:
# with 2, the endpoint expected to hold a prompt's prefix keeps getting it until it is half a cache
# fuller than the emptiest endpoint (a part hit: that part of half). Past that, another endpoint takes
# the prompt and caches the prefix too: a hot prefix spreads over as many endpoints as its load needs,
# instead of piling onto one engine whose prefill queue would then cost more than the hit saves.
# Lower, and a hit rarely outweighs an imbalance (headroom routing); higher, and one engine takes a hot
# prefix's whole load until its KV is full (bench/prefix.py compares them).
HEADROOM_WEIGHT = 2.0


def choose(ledgers: list[Ledger], p: Plan, policy: Policy, now: float,
           hits: Mapping[str, float] | None = None) -> Ledger | None:
    """Of the endpoints the request fits, those of the first failover level (primary before
    overflow); of those, the one with the best score: the fraction of the prompt expected in its prefix
    cache (`hits`, by endpoint address) plus HEADROOM_WEIGHT times its headroom over the largest
    capacity of the model's endpoints. With no hit anywhere that is the most headroom. Ties go to the one with the
    fewest requests in flight, then to the catalog's order. A hit never makes a request fit: only
    endpoints with room for its reservation are scored."""
    fitting = [lg for lg in ledgers if lg.fits(p.nbytes) and _long_ok(lg, p, policy, now)]
    if not fitting:
        return None
    level = {e.address: e.priority for e in policy.endpoints}
    hits = hits or {}
    scale = HEADROOM_WEIGHT / max(1, max(lg.capacity for lg in ledgers))
    return max(fitting, key=lambda lg: (-level.get(lg.endpoint, 0), hits.get(lg.endpoint, 0.0) + scale * lg.headroom,
                                        -lg.active))


def admit(p: Plan, policy: Policy, ledgers: list[Ledger], now: float, ttl_s: float,
          hits: Mapping[str, float] | None = None) -> Reservation | Refusal | None:
    """The reservation, a refusal that waiting cannot cure, or None: it does not fit now. `hits`: the
    prompt's expected prefix-cache hit by endpoint (choose)."""
    # A replica given no share yet (it has just joined) waits for one instead.
    if ledgers and ledgers[0].share > 0 and p.nbytes > max(lg.capacity for lg in ledgers):
        return Refusal(400, "request_too_large",
                       f"This request may claim {p.nbytes} bytes of KV cache, more than this gateway replica "
                       f"may hand out on any engine of model {policy.name!r} "
                       f"({max(lg.capacity for lg in ledgers)}). Send fewer prompts or a smaller n.")
    ledger = choose(ledgers, p, policy, now, hits)
    return None if ledger is None else ledger.try_reserve(p.nbytes, now, ttl_s, p.long)


def busy(p: Plan, policy: Policy, ledgers: list[Ledger], now: float) -> Refusal:
    """The 429 of a request that waited its class's longest and still does not fit; a 503 when no
    engine of the model can be seen at all (every one's metrics stale): that is not a full cache."""
    if ledgers and all(lg.blind for lg in ledgers):
        return Refusal(503, "engine_unavailable", f"No engine of model {policy.name!r} is reachable right now.",
                       type_="service_unavailable", retry_after=max(1, min(60, math.ceil(policy.metrics_stale_after_s))))
    retry = min((lg.retry_after(p.nbytes, now) for lg in ledgers), default=60)
    return Refusal(429, "rate_limit_exceeded",
                   f"Model {policy.name!r} has no KV-cache budget free for this request "
                   f"({p.prompt_tokens} prompt + {p.max_tokens} output tokens). Retry after {retry} s.",
                   type_="rate_limit_error", retry_after=retry)
