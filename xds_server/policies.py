"""Render a catalog into ModelPolicy resources, the admission rules each ext_proc replica needs."""

from __future__ import annotations

from kvgate.catalog import Catalog, Model
from kvgate.v1 import policy_pb2

POLICY_TYPE_URL = "type.googleapis.com/kvgate.v1.ModelPolicy"


def model_policy(model: Model) -> policy_pb2.ModelPolicy:
    est = model.prompt_estimate
    return policy_pb2.ModelPolicy(
        name=model.name,
        protocol=model.protocol,
        backend_model=model.engine_model,
        max_context_tokens=model.max_context_tokens,
        max_output_tokens=model.max_output_tokens,
        kv_bytes_per_token=model.kv_bytes_per_token,
        tokens_per_block=model.block_tokens,
        endpoints=[policy_pb2.Endpoint(address=str(a), kv_budget_bytes=model.kv.budget_per_endpoint)
                   for a in model.addresses()],
        prompt_estimate=policy_pb2.PromptEstimate(
            bytes_per_token=est.bytes_per_token,
            per_message_tokens=est.per_message_tokens,
            per_request_tokens=est.per_request_tokens),
    )


def policies(catalog: Catalog) -> list[policy_pb2.ModelPolicy]:
    return [model_policy(m) for m in catalog.models]
