from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ModelPolicy(_message.Message):
    __slots__ = ("name", "protocol", "max_context_tokens", "max_output_tokens", "kv_bytes_per_token", "tokens_per_block", "endpoints", "prompt_estimate", "backend_model")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_BLOCK_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_ESTIMATE_FIELD_NUMBER: _ClassVar[int]
    BACKEND_MODEL_FIELD_NUMBER: _ClassVar[int]
    name: str
    protocol: str
    max_context_tokens: int
    max_output_tokens: int
    kv_bytes_per_token: int
    tokens_per_block: int
    endpoints: _containers.RepeatedCompositeFieldContainer[Endpoint]
    prompt_estimate: PromptEstimate
    backend_model: str
    def __init__(self, name: _Optional[str] = ..., protocol: _Optional[str] = ..., max_context_tokens: _Optional[int] = ..., max_output_tokens: _Optional[int] = ..., kv_bytes_per_token: _Optional[int] = ..., tokens_per_block: _Optional[int] = ..., endpoints: _Optional[_Iterable[_Union[Endpoint, _Mapping]]] = ..., prompt_estimate: _Optional[_Union[PromptEstimate, _Mapping]] = ..., backend_model: _Optional[str] = ...) -> None: ...

class Endpoint(_message.Message):
    __slots__ = ("address", "kv_budget_bytes")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    KV_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    address: str
    kv_budget_bytes: int
    def __init__(self, address: _Optional[str] = ..., kv_budget_bytes: _Optional[int] = ...) -> None: ...

class PromptEstimate(_message.Message):
    __slots__ = ("bytes_per_token", "per_message_tokens", "per_request_tokens")
    BYTES_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    PER_MESSAGE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PER_REQUEST_TOKENS_FIELD_NUMBER: _ClassVar[int]
    bytes_per_token: float
    per_message_tokens: int
    per_request_tokens: int
    def __init__(self, bytes_per_token: _Optional[float] = ..., per_message_tokens: _Optional[int] = ..., per_request_tokens: _Optional[int] = ...) -> None: ...
