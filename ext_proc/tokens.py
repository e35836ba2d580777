"""Prompt tokens without the model's tokenizer: an upper bound, because a budget must not be overrun.

Byte-level BPE never yields more tokens than UTF-8 bytes, so with bytes_per_token = 1.0 the estimate
is a strict bound (plus the chat template's tokens per message and per request). Operators who know
their traffic may raise bytes_per_token in the catalog (docs/catalog.md) and accept the risk.
"""

from __future__ import annotations

import math

from ext_proc.request import LLMRequest
from ext_proc.policy import Policy


def prompt_tokens(req: LLMRequest, policy: Policy) -> tuple[int, ...]:
    """Tokens of each prompt of the request; token ids given directly are counted exactly."""
    if req.exact_prompt_tokens:
        return req.exact_prompt_tokens
    overhead = policy.estimate_per_message * req.messages + policy.estimate_per_request
    return tuple(math.ceil(b / policy.estimate_bytes_per_token) + overhead for b in req.prompt_bytes)
