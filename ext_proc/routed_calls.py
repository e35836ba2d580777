"""Calls routed to a model's engine by the body's `model`, with nothing reserved: vLLM's /tokenize and
/detokenize, and Anthropic's /v1/messages/count_tokens. They run no generation and hold no KV cache, so
admission only checks that the caller may use the model, then renames it to the engine's name. Pure
functions over bytes; parse errors are `ProtocolError`s.
"""

from __future__ import annotations

from collections.abc import Mapping

from ext_proc.request import LLMRequest, ModelOnly, identity_encoding, json_object, model_name


def parse(model: str | None, headers: Mapping[str, str], raw: bytes) -> ModelOnly:
    """`model` is the path's (never, for these calls). vLLM takes a body without `model` (its one model);
    the gateway needs it to know which engine to ask."""
    identity_encoding(headers)
    body = json_object(raw)
    return ModelOnly(LLMRequest(model=model_name(body), admit=False), body)
