from google.api import annotations_pb2 as _annotations_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PluginRole(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PLUGIN_ROLE_UNSPECIFIED: _ClassVar[PluginRole]
    PLUGIN_ROLE_GATEWAY: _ClassVar[PluginRole]
    PLUGIN_ROLE_PUBLISHER: _ClassVar[PluginRole]
    PLUGIN_ROLE_CONSUMER: _ClassVar[PluginRole]
    PLUGIN_ROLE_PROCESSOR: _ClassVar[PluginRole]
    PLUGIN_ROLE_LISTENER: _ClassVar[PluginRole]
PLUGIN_ROLE_UNSPECIFIED: PluginRole
PLUGIN_ROLE_GATEWAY: PluginRole
PLUGIN_ROLE_PUBLISHER: PluginRole
PLUGIN_ROLE_CONSUMER: PluginRole
PLUGIN_ROLE_PROCESSOR: PluginRole
PLUGIN_ROLE_LISTENER: PluginRole

class LiveRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LiveResponse(_message.Message):
    __slots__ = ("live",)
    LIVE_FIELD_NUMBER: _ClassVar[int]
    live: bool
    def __init__(self, live: _Optional[bool] = ...) -> None: ...

class ReadyRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReadyResponse(_message.Message):
    __slots__ = ("ready", "checks")
    class ChecksEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    READY_FIELD_NUMBER: _ClassVar[int]
    CHECKS_FIELD_NUMBER: _ClassVar[int]
    ready: bool
    checks: _containers.ScalarMap[str, str]
    def __init__(self, ready: _Optional[bool] = ..., checks: _Optional[_Mapping[str, str]] = ...) -> None: ...

class MetricsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class MetricsResponse(_message.Message):
    __slots__ = ("text",)
    TEXT_FIELD_NUMBER: _ClassVar[int]
    text: str
    def __init__(self, text: _Optional[str] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("name", "version", "role", "backends")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    BACKENDS_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    role: PluginRole
    backends: _containers.RepeatedCompositeFieldContainer[BackendInfo]
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., role: _Optional[_Union[PluginRole, str]] = ..., backends: _Optional[_Iterable[_Union[BackendInfo, _Mapping]]] = ...) -> None: ...

class BackendInfo(_message.Message):
    __slots__ = ("name", "pattern", "type", "capabilities")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PATTERN_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    name: str
    pattern: str
    type: str
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., pattern: _Optional[str] = ..., type: _Optional[str] = ..., capabilities: _Optional[_Iterable[str]] = ...) -> None: ...
