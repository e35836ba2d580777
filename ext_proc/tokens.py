"""Prompt tokens of a request: counted with the model's tokenizer when ext_proc has it, else an upper bound.

Both add the chat template's overhead from the policy (the catalog's prompt_estimate):
per_message_tokens for each chat message (role markup, separators, end-of-turn) and
per_request_tokens once (BOS, the assistant header the template opens for the answer). The pieces
themselves (tokenizer.TokenCounter) are counted without special tokens.

Without a tokenizer the bound comes from UTF-8 bytes: byte-level BPE never yields more tokens than
bytes, so with bytes_per_token = 1.0 it is never below the count. Operators who know their traffic may
raise bytes_per_token in the catalog (docs/catalog.md) and accept the risk.
"""

from __future__ import annotations

import math
from itertools import islice

from ext_proc.policy import Policy
from ext_proc.request import LLMRequest
from ext_proc.tokenizer import TokenCounter


def text_pieces(req: LLMRequest) -> list[str]:
    """Every text piece of every prompt, in order: what a counter counts (or prefetches) for `req`."""
    return [piece for pieces in req.prompts for piece in pieces]


def _template_overhead(req: LLMRequest, policy: Policy) -> int:
    return policy.estimate_per_message * req.messages + policy.estimate_per_request


def prompt_tokens(req: LLMRequest, policy: Policy, counter: TokenCounter | None) -> tuple[int, ...]:
    """Tokens of each prompt of the request: token ids given directly are counted as given; text is
    counted with `counter` (the model's tokenizer), or bounded from its bytes when there is none."""
    if req.exact_prompt_tokens:
        return req.exact_prompt_tokens
    overhead = _template_overhead(req, policy)
    if counter is None:
        return tuple(math.ceil(b / policy.estimate_bytes_per_token) + overhead for b in req.prompt_bytes)
    # Every piece of every prompt in one call: one encode batch for whatever is not cached.
    counts = iter(counter.count(text_pieces(req)))
    return tuple(sum(islice(counts, len(pieces))) + overhead for pieces in req.prompts)
