"""Render a catalog into ModelPolicy resources, the admission rules each ext_proc replica needs."""

from __future__ import annotations

from kvgate.catalog import Address, Catalog, Model
from kvgate.v1 import policy_pb2


def _endpoint(model: Model, addr: Address) -> policy_pb2.Endpoint:
    return policy_pb2.Endpoint(
        address=str(addr), kv_budget_bytes=model.kv_budget_bytes,
        grpc_address=str(addr.grpc()) if addr.grpc_port else "",
        metrics_url=addr.metrics_url(model.protocol, model.engine), priority=addr.priority,
        kv_pool=model.kv_pool_key(addr))


def model_policy(model: Model, catalog: Catalog) -> policy_pb2.ModelPolicy:
    est = model.prompt_estimate
    policy = policy_pb2.ModelPolicy(
        name=model.name,
        protocol=model.protocol,
        backend_model=model.engine_model,
        max_context_tokens=model.max_context_tokens,
        max_output_tokens=model.max_output_tokens,
        kv_bytes_per_token=model.kv_bytes_per_token,
        tokens_per_block=model.block_tokens,
        endpoints=[_endpoint(model, a) for a in model.addresses()],
        prompt_estimate=policy_pb2.PromptEstimate(
            bytes_per_token=est.bytes_per_token,
            per_message_tokens=est.per_message_tokens,
            per_request_tokens=est.per_request_tokens),
        priority_classes=[policy_pb2.PriorityClass(name=c.name, max_wait_ms=round(c.max_wait_s * 1000))
                          for c in catalog.priority_classes],
        default_priority_class=catalog.priority_class_of(model),
        long_request_threshold=model.long_requests.threshold,
        long_requests_max_share=model.long_requests.max_share,
        long_requests_short_window_ms=round(model.long_requests.short_window_s * 1000),
        engine=model.engine,
        routing=model.routing,
    )
    if model.tokenizer is not None:
        policy.tokenizer.CopyFrom(policy_pb2.Tokenizer(path=str(model.tokenizer), sha256=model.tokenizer_sha256))
    if (template := model.chat_template_source) is not None:
        policy.chat_template.CopyFrom(policy_pb2.ChatTemplate(
            template=template.template, tool_use_template=template.tool_use_template,
            special_tokens=dict(template.special_tokens), origin=template.origin))
    if model.engine_metrics.scrape:
        policy.engine_metrics.CopyFrom(policy_pb2.EngineMetrics(
            interval_ms=round(model.engine_metrics.interval_s * 1000),
            stale_after_ms=round(model.engine_metrics.stale_after_s * 1000),
            model=model.engine_metrics.model or ""))
    return policy


def policies(catalog: Catalog) -> list[policy_pb2.ModelPolicy]:
    return [model_policy(m, catalog) for m in catalog.models]


def tenants(catalog: Catalog) -> list[policy_pb2.Tenant]:
    """Who may call what, and how much: key hashes only, never keys."""
    return [policy_pb2.Tenant(name=t.name, api_key_sha256=sorted(t.key_hashes), models=list(t.models),
                              requests_per_minute=t.requests_per_minute or 0, tokens_per_minute=t.tokens_per_minute or 0,
                              priority_class=t.priority_class or "")
            for t in catalog.tenants]
