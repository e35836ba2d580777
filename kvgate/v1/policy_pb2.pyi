from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ModelPolicy(_message.Message):
    __slots__ = ("name", "protocol", "max_context_tokens", "max_output_tokens", "kv_bytes_per_token", "tokens_per_block", "endpoints", "prompt_estimate", "backend_model", "tokenizer", "priority_classes", "default_priority_class", "engine_metrics", "long_request_threshold", "long_requests_max_share", "chat_template", "engine", "long_requests_short_window_ms", "routing")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_BLOCK_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_ESTIMATE_FIELD_NUMBER: _ClassVar[int]
    BACKEND_MODEL_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_CLASSES_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_PRIORITY_CLASS_FIELD_NUMBER: _ClassVar[int]
    ENGINE_METRICS_FIELD_NUMBER: _ClassVar[int]
    LONG_REQUEST_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    LONG_REQUESTS_MAX_SHARE_FIELD_NUMBER: _ClassVar[int]
    CHAT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    LONG_REQUESTS_SHORT_WINDOW_MS_FIELD_NUMBER: _ClassVar[int]
    ROUTING_FIELD_NUMBER: _ClassVar[int]
    name: str
    protocol: str
    max_context_tokens: int
    max_output_tokens: int
    kv_bytes_per_token: int
    tokens_per_block: int
    endpoints: _containers.RepeatedCompositeFieldContainer[Endpoint]
    prompt_estimate: PromptEstimate
    backend_model: str
    tokenizer: Tokenizer
    priority_classes: _containers.RepeatedCompositeFieldContainer[PriorityClass]
    default_priority_class: str
    engine_metrics: EngineMetrics
    long_request_threshold: float
    long_requests_max_share: float
    chat_template: ChatTemplate
    engine: str
    long_requests_short_window_ms: int
    routing: str
    def __init__(self, name: _Optional[str] = ..., protocol: _Optional[str] = ..., max_context_tokens: _Optional[int] = ..., max_output_tokens: _Optional[int] = ..., kv_bytes_per_token: _Optional[int] = ..., tokens_per_block: _Optional[int] = ..., endpoints: _Optional[_Iterable[_Union[Endpoint, _Mapping]]] = ..., prompt_estimate: _Optional[_Union[PromptEstimate, _Mapping]] = ..., backend_model: _Optional[str] = ..., tokenizer: _Optional[_Union[Tokenizer, _Mapping]] = ..., priority_classes: _Optional[_Iterable[_Union[PriorityClass, _Mapping]]] = ..., default_priority_class: _Optional[str] = ..., engine_metrics: _Optional[_Union[EngineMetrics, _Mapping]] = ..., long_request_threshold: _Optional[float] = ..., long_requests_max_share: _Optional[float] = ..., chat_template: _Optional[_Union[ChatTemplate, _Mapping]] = ..., engine: _Optional[str] = ..., long_requests_short_window_ms: _Optional[int] = ..., routing: _Optional[str] = ...) -> None: ...

class Endpoint(_message.Message):
    __slots__ = ("address", "kv_budget_bytes", "grpc_address", "metrics_url", "priority", "kv_pool")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    KV_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    GRPC_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    METRICS_URL_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    KV_POOL_FIELD_NUMBER: _ClassVar[int]
    address: str
    kv_budget_bytes: int
    grpc_address: str
    metrics_url: str
    priority: int
    kv_pool: str
    def __init__(self, address: _Optional[str] = ..., kv_budget_bytes: _Optional[int] = ..., grpc_address: _Optional[str] = ..., metrics_url: _Optional[str] = ..., priority: _Optional[int] = ..., kv_pool: _Optional[str] = ...) -> None: ...

class Tokenizer(_message.Message):
    __slots__ = ("path", "sha256")
    PATH_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    path: str
    sha256: str
    def __init__(self, path: _Optional[str] = ..., sha256: _Optional[str] = ...) -> None: ...

class ChatTemplate(_message.Message):
    __slots__ = ("template", "tool_use_template", "special_tokens", "origin")
    class SpecialTokensEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    TOOL_USE_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    SPECIAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    template: str
    tool_use_template: str
    special_tokens: _containers.ScalarMap[str, str]
    origin: str
    def __init__(self, template: _Optional[str] = ..., tool_use_template: _Optional[str] = ..., special_tokens: _Optional[_Mapping[str, str]] = ..., origin: _Optional[str] = ...) -> None: ...

class PriorityClass(_message.Message):
    __slots__ = ("name", "max_wait_ms")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MAX_WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    name: str
    max_wait_ms: int
    def __init__(self, name: _Optional[str] = ..., max_wait_ms: _Optional[int] = ...) -> None: ...

class EngineMetrics(_message.Message):
    __slots__ = ("interval_ms", "stale_after_ms", "model")
    INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    STALE_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    interval_ms: int
    stale_after_ms: int
    model: str
    def __init__(self, interval_ms: _Optional[int] = ..., stale_after_ms: _Optional[int] = ..., model: _Optional[str] = ...) -> None: ...

class Tenant(_message.Message):
    __slots__ = ("name", "api_key_sha256", "models", "requests_per_minute", "tokens_per_minute", "priority_class")
    NAME_FIELD_NUMBER: _ClassVar[int]
    API_KEY_SHA256_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_PER_MINUTE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_MINUTE_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_CLASS_FIELD_NUMBER: _ClassVar[int]
    name: str
    api_key_sha256: _containers.RepeatedScalarFieldContainer[str]
    models: _containers.RepeatedScalarFieldContainer[str]
    requests_per_minute: int
    tokens_per_minute: int
    priority_class: str
    def __init__(self, name: _Optional[str] = ..., api_key_sha256: _Optional[_Iterable[str]] = ..., models: _Optional[_Iterable[str]] = ..., requests_per_minute: _Optional[int] = ..., tokens_per_minute: _Optional[int] = ..., priority_class: _Optional[str] = ...) -> None: ...

class BudgetShares(_message.Message):
    __slots__ = ("fraction",)
    class FractionEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    fraction: _containers.ScalarMap[str, float]
    def __init__(self, fraction: _Optional[_Mapping[str, float]] = ...) -> None: ...

class PromptEstimate(_message.Message):
    __slots__ = ("bytes_per_token", "per_message_tokens", "per_request_tokens")
    BYTES_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    PER_MESSAGE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PER_REQUEST_TOKENS_FIELD_NUMBER: _ClassVar[int]
    bytes_per_token: float
    per_message_tokens: int
    per_request_tokens: int
    def __init__(self, bytes_per_token: _Optional[float] = ..., per_message_tokens: _Optional[int] = ..., per_request_tokens: _Optional[int] = ...) -> None: ...
