"""The admission rules of each model, as received from xds_server (ModelPolicy resources)."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

from kvgate.chat_template import ChatTemplate, TemplateSource
from kvgate.v1 import policy_pb2


@dataclass(frozen=True)
class EndpointPolicy:
    address: str  # "host:port", the key of its ledger
    budget_bytes: int  # the whole engine's; this replica's share is applied by the ledgers
    grpc_address: str  # Triton: the same engine as Envoy's gRPC cluster names it
    metrics_url: str
    priority: int = 0  # failover level: 0 primary
    # The engine KV pool drawn on here, shared by every model with the same key; "": the address's.
    kv_pool: str = ""

    @property
    def pool(self) -> str:
        return self.kv_pool or self.address

    def upstream(self, grpc: bool) -> str:
        """The host Envoy's override_host policy must pick in the cluster that carries the call."""
        return self.grpc_address if grpc and self.grpc_address else self.address


@dataclass(frozen=True)
class Policy:
    name: str
    protocol: str
    backend_model: str
    max_context_tokens: int
    max_output_tokens: int
    kv_bytes_per_token: int
    tokens_per_block: int
    endpoints: tuple[EndpointPolicy, ...]
    estimate_bytes_per_token: float
    estimate_per_message: int
    estimate_per_request: int
    tokenizer_path: str = ""
    tokenizer_sha256: str = ""
    # Rendered and counted with the tokenizer for exact chat prompts; None: the template is estimated.
    chat_template: ChatTemplate | None = field(default=None, compare=False)
    # "vllm": a sequence's KV holds prompt + max_tokens - 1 tokens at most; "trtllm": prompt + max_tokens.
    engine: str = "trtllm"
    # (name, max wait in seconds), highest priority first.
    priority_classes: tuple[tuple[str, float], ...] = (("default", 0.0),)
    default_priority_class: str = "default"
    # Engine metrics: scrape interval and staleness, seconds; 0: not scraped.
    metrics_interval_s: float = 0.0
    metrics_stale_after_s: float = 0.0
    # Triton: whose series describe the pool (engine_metrics.py); "": found from the values.
    metrics_model: str = ""
    # Fractions of an endpoint's budget: above the threshold a request is long; long ones together
    # hold at most max_share (1.0, 1.0: no such rule).
    long_request_threshold: float = 1.0
    long_requests_max_share: float = 1.0
    long_requests_short_window_s: float = 0.0  # the cap applies while short requests held budget this recently
    # "prefix": endpoints scored by the prompt's expected prefix-cache hit and headroom; "headroom": headroom only.
    routing: str = "prefix"

    def endpoint(self, address: str) -> EndpointPolicy | None:
        return next((e for e in self.endpoints if e.address == address), None)

    @property
    def largest_budget(self) -> int:
        return max(e.budget_bytes for e in self.endpoints)

    def sequence_tokens(self, prompt: int, max_tokens: int) -> int:
        """The most tokens a sequence holds in the engine's KV cache: vLLM never writes the KV of the last
        token it samples (measured on vLLM 0.32: docs/vllm.md); TensorRT-LLM reserves room for it."""
        return prompt + max_tokens - (1 if self.engine == "vllm" else 0)

    def max_wait_s(self, priority_class: str) -> float | None:
        """None: not a class of this model."""
        return dict(self.priority_classes).get(priority_class)

    def rank(self, priority_class: str) -> int:
        """0 is the highest priority."""
        return [name for name, _ in self.priority_classes].index(priority_class)

    @classmethod
    def from_proto(cls, p: policy_pb2.ModelPolicy) -> Policy:
        est = p.prompt_estimate
        if not (p.name and p.max_context_tokens and p.max_output_tokens and p.kv_bytes_per_token and p.tokens_per_block
                and p.endpoints and est.bytes_per_token > 0):
            raise ValueError(f"ModelPolicy {p.name!r} lacks a required field")
        classes = tuple((c.name, c.max_wait_ms / 1000) for c in p.priority_classes) or cls.priority_classes
        default_class = p.default_priority_class or classes[0][0]
        if default_class not in dict(classes):
            raise ValueError(f"ModelPolicy {p.name!r}: default class {default_class!r} is not one of its classes")
        return cls(
            name=p.name,
            protocol=p.protocol,
            backend_model=p.backend_model or p.name,
            max_context_tokens=p.max_context_tokens,
            max_output_tokens=p.max_output_tokens,
            kv_bytes_per_token=p.kv_bytes_per_token,
            tokens_per_block=p.tokens_per_block,
            endpoints=tuple(EndpointPolicy(e.address, e.kv_budget_bytes, e.grpc_address, e.metrics_url, e.priority,
                                           e.kv_pool) for e in p.endpoints),
            estimate_bytes_per_token=est.bytes_per_token,
            estimate_per_message=est.per_message_tokens,
            estimate_per_request=est.per_request_tokens,
            tokenizer_path=p.tokenizer.path,
            tokenizer_sha256=p.tokenizer.sha256,
            priority_classes=classes,
            default_priority_class=default_class,
            metrics_interval_s=p.engine_metrics.interval_ms / 1000,
            metrics_stale_after_s=p.engine_metrics.stale_after_ms / 1000,
            metrics_model=p.engine_metrics.model,
            long_request_threshold=p.long_request_threshold or 1.0,
            long_requests_max_share=p.long_requests_max_share or 1.0,
            long_requests_short_window_s=p.long_requests_short_window_ms / 1000,
            chat_template=_chat_template(p.chat_template) if p.HasField("chat_template") else None,
            engine=p.engine or "trtllm",
            routing=p.routing or "prefix",
        )


def _chat_template(t: policy_pb2.ChatTemplate) -> ChatTemplate:
    """Compiled once per distinct template, not at every policy update."""
    return _compiled(TemplateSource(t.template, tuple(sorted(t.special_tokens.items())), t.tool_use_template,
                                    t.origin))


@lru_cache(maxsize=64)
def _compiled(source: TemplateSource) -> ChatTemplate:
    return ChatTemplate(source)
