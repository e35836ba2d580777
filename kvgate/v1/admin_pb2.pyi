from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("catalog_yaml", "version")
    CATALOG_YAML_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    catalog_yaml: str
    version: str
    def __init__(self, catalog_yaml: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class ApplyModelsRequest(_message.Message):
    __slots__ = ("models_yaml",)
    MODELS_YAML_FIELD_NUMBER: _ClassVar[int]
    models_yaml: str
    def __init__(self, models_yaml: _Optional[str] = ...) -> None: ...

class RemoveModelRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ChangeResponse(_message.Message):
    __slots__ = ("version", "changed")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    version: str
    changed: bool
    def __init__(self, version: _Optional[str] = ..., changed: _Optional[bool] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("version", "nodes")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    version: str
    nodes: _containers.RepeatedCompositeFieldContainer[NodeStatus]
    def __init__(self, version: _Optional[str] = ..., nodes: _Optional[_Iterable[_Union[NodeStatus, _Mapping]]] = ...) -> None: ...

class NodeStatus(_message.Message):
    __slots__ = ("id", "group", "connected_since_unix", "acked_versions", "last_nack", "budget_share")
    class AckedVersionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_SINCE_UNIX_FIELD_NUMBER: _ClassVar[int]
    ACKED_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    LAST_NACK_FIELD_NUMBER: _ClassVar[int]
    BUDGET_SHARE_FIELD_NUMBER: _ClassVar[int]
    id: str
    group: str
    connected_since_unix: float
    acked_versions: _containers.ScalarMap[str, str]
    last_nack: Nack
    budget_share: float
    def __init__(self, id: _Optional[str] = ..., group: _Optional[str] = ..., connected_since_unix: _Optional[float] = ..., acked_versions: _Optional[_Mapping[str, str]] = ..., last_nack: _Optional[_Union[Nack, _Mapping]] = ..., budget_share: _Optional[float] = ...) -> None: ...

class Nack(_message.Message):
    __slots__ = ("type_url", "version", "error_detail")
    TYPE_URL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ERROR_DETAIL_FIELD_NUMBER: _ClassVar[int]
    type_url: str
    version: str
    error_detail: str
    def __init__(self, type_url: _Optional[str] = ..., version: _Optional[str] = ..., error_detail: _Optional[str] = ...) -> None: ...
