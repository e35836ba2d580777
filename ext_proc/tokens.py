"""Prompt tokens of a request: counted with the model's tokenizer when ext_proc has it, else an upper bound.

With the tokenizer, a chat is rendered with the model's chat template (the policy's, kvgate/chat_template.py)
and the prompt text counted as the engine counts it: exact. Other prompts (completions, Triton's
text_input) are their text plus the special tokens the tokenizer adds to a text (Llama 3's BOS), as the
engines tokenize them. A chat without a template (or one the template cannot render) is the sum of its
pieces plus the policy's estimate of the template (prompt_estimate: per_message_tokens for each message,
per_request_tokens once).

Without a tokenizer the bound comes from UTF-8 bytes: byte-level BPE never yields more tokens than
bytes, so with bytes_per_token = 1.0 it is never below the count. Operators who know their traffic may
raise bytes_per_token in the catalog (docs/catalog.md) and accept the risk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import islice

from kvgate.chat_template import Unrenderable
from ext_proc.policy import Policy
from ext_proc.request import LLMRequest
from ext_proc.tokenizer import TokenCounter


@dataclass(frozen=True)
class Texts:
    """What a counter encodes for a request's prompts, and the tokens of each prompt besides them."""

    pieces: tuple[tuple[str, ...], ...]  # per prompt, the texts to encode (cached one by one)
    fixed: tuple[int, ...]  # per prompt, tokens that need no encoding (special tokens, template estimate)

    @property
    def flat(self) -> list[str]:
        return [piece for pieces in self.pieces for piece in pieces]


def _template_overhead(req: LLMRequest, policy: Policy) -> int:
    return policy.estimate_per_message * req.messages + policy.estimate_per_request


def texts(req: LLMRequest, policy: Policy, counter: TokenCounter) -> Texts:
    """The texts `counter` counts for `req`: the rendered chat cut at its special tokens; or each text
    prompt with the tokenizer's added specials; or a chat's pieces with the template estimated."""
    if req.chat is not None and policy.chat_template is not None:
        try:
            rendered = policy.chat_template.render(req.chat)
        except Unrenderable:
            pass  # vLLM refuses most of these; the estimate below bounds the rest
        else:
            specials, pieces = counter.split(rendered)
            # vLLM adds no BOS to a chat prompt unless asked to (the template writes it).
            added = counter.specials_added if req.chat.get("add_special_tokens") is True else 0
            return Texts((tuple(pieces),), (specials + added,))
    if req.messages:
        return Texts(req.prompts, tuple(_template_overhead(req, policy) for _ in req.prompts))
    return Texts(req.prompts, tuple(counter.specials_added for _ in req.prompts))


def prompt_tokens(req: LLMRequest, policy: Policy, counter: TokenCounter | None) -> tuple[int, ...]:
    """Tokens of each prompt of the request: token ids given directly are counted as given; text is
    counted with `counter` (the model's tokenizer), or bounded from its bytes when there is none."""
    if req.exact_prompt_tokens:
        return req.exact_prompt_tokens
    if counter is None:
        overhead = _template_overhead(req, policy)
        return tuple(math.ceil(b / policy.estimate_bytes_per_token) + overhead for b in req.prompt_bytes)
    t = texts(req, policy, counter)
    # Every piece of every prompt in one call: one encode batch for whatever is not cached.
    counts = iter(counter.count(t.flat))
    return tuple(sum(islice(counts, len(pieces))) + fixed for pieces, fixed in zip(t.pieces, t.fixed))
