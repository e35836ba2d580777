"""The admission rules of each model, as received from xds_server (ModelPolicy resources)."""

from __future__ import annotations

from dataclasses import dataclass

from kvgate.v1 import policy_pb2


@dataclass(frozen=True)
class Policy:
    name: str
    protocol: str
    backend_model: str
    max_context_tokens: int
    max_output_tokens: int
    kv_bytes_per_token: int
    tokens_per_block: int
    budget_bytes: int  # all endpoints together, until budgets are kept per endpoint
    estimate_bytes_per_token: float
    estimate_per_message: int
    estimate_per_request: int

    @classmethod
    def from_proto(cls, p: policy_pb2.ModelPolicy) -> Policy:
        est = p.prompt_estimate
        if not (p.name and p.max_context_tokens and p.max_output_tokens and p.kv_bytes_per_token and p.tokens_per_block
                and p.endpoints and est.bytes_per_token > 0):
            raise ValueError(f"ModelPolicy {p.name!r} lacks a required field")
        return cls(
            name=p.name,
            protocol=p.protocol,
            backend_model=p.backend_model or p.name,
            max_context_tokens=p.max_context_tokens,
            max_output_tokens=p.max_output_tokens,
            kv_bytes_per_token=p.kv_bytes_per_token,
            tokens_per_block=p.tokens_per_block,
            budget_bytes=sum(e.kv_budget_bytes for e in p.endpoints),
            estimate_bytes_per_token=est.bytes_per_token,
            estimate_per_message=est.per_message_tokens,
            estimate_per_request=est.per_request_tokens,
        )
