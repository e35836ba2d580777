"""The admission decision: context check, max_tokens clamp, KV bytes, and the reservation.

`plan` is pure arithmetic on a parsed request and its model's policy; `admit` adds the ledger.
"""

from __future__ import annotations

from dataclasses import dataclass

from engines.kv_math import reservation_bytes
from ext_proc import tokens
from ext_proc.ledger import Ledger, Reservation
from ext_proc.request import LLMRequest
from ext_proc.policy import Policy


@dataclass(frozen=True)
class Plan:
    max_tokens: int
    prompt_tokens: int  # the longest prompt, upper bound
    nbytes: int


@dataclass(frozen=True)
class Refusal:
    status: int
    code: str
    message: str
    type_: str = "invalid_request_error"
    param: str | None = None
    retry_after: int | None = None


def plan(req: LLMRequest, policy: Policy) -> Plan | Refusal:
    prompts = tokens.prompt_tokens(req, policy)
    longest = max(prompts)
    room = policy.max_context_tokens - longest
    if room < 1:
        return Refusal(400, "context_length_exceeded",
                       f"This model's maximum context length is {policy.max_context_tokens} tokens. However, "
                       f"your prompt may use up to {longest} tokens (upper-bound estimate), leaving no room "
                       "for output. Please reduce the length of the prompt.", param=req.prompt_param)
    max_tokens = min(req.requested_max_tokens or policy.max_output_tokens, policy.max_output_tokens, room)
    nbytes = req.sequences_per_prompt * sum(
        reservation_bytes(p + max_tokens, policy.tokens_per_block, policy.kv_bytes_per_token) for p in prompts)
    if nbytes > policy.budget_bytes:
        # Would never fit, however long the client waits: a 429 would only invite retries.
        return Refusal(400, "request_too_large",
                       f"This request may claim {nbytes} bytes of KV cache, more than model "
                       f"{policy.name!r} has in total ({policy.budget_bytes}). Send fewer prompts or a smaller n.")
    return Plan(max_tokens=max_tokens, prompt_tokens=longest, nbytes=nbytes)


def admit(p: Plan, model: str, ledger: Ledger, now: float, ttl_s: float) -> Reservation | Refusal:
    reservation = ledger.try_reserve(model, p.nbytes, now, ttl_s)
    if reservation is not None:
        return reservation
    retry = ledger.retry_after(p.nbytes, now)
    return Refusal(429, "rate_limit_exceeded",
                   f"Model {model!r} has no KV-cache budget free for this request "
                   f"({p.prompt_tokens} prompt + {p.max_tokens} output tokens). Retry after {retry} s.",
                   type_="rate_limit_error", retry_after=retry)
