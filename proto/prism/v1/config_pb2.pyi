import datetime

from google.api import annotations_pb2 as _annotations_pb2
from google.api import field_behavior_pb2 as _field_behavior_pb2
from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AccessPattern(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACCESS_PATTERN_UNSPECIFIED: _ClassVar[AccessPattern]
    ACCESS_PATTERN_KEY_VALUE: _ClassVar[AccessPattern]
    ACCESS_PATTERN_QUEUE: _ClassVar[AccessPattern]
    ACCESS_PATTERN_PUBSUB: _ClassVar[AccessPattern]
    ACCESS_PATTERN_READER: _ClassVar[AccessPattern]
    ACCESS_PATTERN_TRANSACT: _ClassVar[AccessPattern]

class BackendType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BACKEND_TYPE_UNSPECIFIED: _ClassVar[BackendType]
    BACKEND_TYPE_MEMORY: _ClassVar[BackendType]
    BACKEND_TYPE_SQLITE: _ClassVar[BackendType]
    BACKEND_TYPE_POSTGRES: _ClassVar[BackendType]
    BACKEND_TYPE_REDIS: _ClassVar[BackendType]
    BACKEND_TYPE_KAFKA: _ClassVar[BackendType]
    BACKEND_TYPE_NATS: _ClassVar[BackendType]

class ConsistencyLevel(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CONSISTENCY_LEVEL_UNSPECIFIED: _ClassVar[ConsistencyLevel]
    CONSISTENCY_LEVEL_EVENTUAL: _ClassVar[ConsistencyLevel]
    CONSISTENCY_LEVEL_STRONG: _ClassVar[ConsistencyLevel]
    CONSISTENCY_LEVEL_BOUNDED_STALENESS: _ClassVar[ConsistencyLevel]
ACCESS_PATTERN_UNSPECIFIED: AccessPattern
ACCESS_PATTERN_KEY_VALUE: AccessPattern
ACCESS_PATTERN_QUEUE: AccessPattern
ACCESS_PATTERN_PUBSUB: AccessPattern
ACCESS_PATTERN_READER: AccessPattern
ACCESS_PATTERN_TRANSACT: AccessPattern
BACKEND_TYPE_UNSPECIFIED: BackendType
BACKEND_TYPE_MEMORY: BackendType
BACKEND_TYPE_SQLITE: BackendType
BACKEND_TYPE_POSTGRES: BackendType
BACKEND_TYPE_REDIS: BackendType
BACKEND_TYPE_KAFKA: BackendType
BACKEND_TYPE_NATS: BackendType
CONSISTENCY_LEVEL_UNSPECIFIED: ConsistencyLevel
CONSISTENCY_LEVEL_EVENTUAL: ConsistencyLevel
CONSISTENCY_LEVEL_STRONG: ConsistencyLevel
CONSISTENCY_LEVEL_BOUNDED_STALENESS: ConsistencyLevel

class BackendConfig(_message.Message):
    __slots__ = ("type", "instance", "options")
    class OptionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TYPE_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    type: BackendType
    instance: str
    options: _containers.ScalarMap[str, str]
    def __init__(self, type: _Optional[_Union[BackendType, str]] = ..., instance: _Optional[str] = ..., options: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ConsistencyConfig(_message.Message):
    __slots__ = ("level", "max_staleness")
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    MAX_STALENESS_FIELD_NUMBER: _ClassVar[int]
    level: ConsistencyLevel
    max_staleness: _duration_pb2.Duration
    def __init__(self, level: _Optional[_Union[ConsistencyLevel, str]] = ..., max_staleness: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class CacheConfig(_message.Message):
    __slots__ = ("enabled", "ttl", "max_entries")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    MAX_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    ttl: _duration_pb2.Duration
    max_entries: int
    def __init__(self, enabled: _Optional[bool] = ..., ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., max_entries: _Optional[int] = ...) -> None: ...

class RateLimitConfig(_message.Message):
    __slots__ = ("requests_per_second", "burst")
    REQUESTS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    BURST_FIELD_NUMBER: _ClassVar[int]
    requests_per_second: float
    burst: int
    def __init__(self, requests_per_second: _Optional[float] = ..., burst: _Optional[int] = ...) -> None: ...

class ClientConfig(_message.Message):
    __slots__ = ("name", "version", "pattern", "backend", "consistency", "cache", "rate_limit", "namespace")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PATTERN_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    CONSISTENCY_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    RATE_LIMIT_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    pattern: AccessPattern
    backend: BackendConfig
    consistency: ConsistencyConfig
    cache: CacheConfig
    rate_limit: RateLimitConfig
    namespace: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., pattern: _Optional[_Union[AccessPattern, str]] = ..., backend: _Optional[_Union[BackendConfig, _Mapping]] = ..., consistency: _Optional[_Union[ConsistencyConfig, _Mapping]] = ..., cache: _Optional[_Union[CacheConfig, _Mapping]] = ..., rate_limit: _Optional[_Union[RateLimitConfig, _Mapping]] = ..., namespace: _Optional[str] = ...) -> None: ...

class ListConfigsRequest(_message.Message):
    __slots__ = ("pattern",)
    PATTERN_FIELD_NUMBER: _ClassVar[int]
    pattern: AccessPattern
    def __init__(self, pattern: _Optional[_Union[AccessPattern, str]] = ...) -> None: ...

class ListConfigsResponse(_message.Message):
    __slots__ = ("configs",)
    CONFIGS_FIELD_NUMBER: _ClassVar[int]
    configs: _containers.RepeatedCompositeFieldContainer[ClientConfig]
    def __init__(self, configs: _Optional[_Iterable[_Union[ClientConfig, _Mapping]]] = ...) -> None: ...

class GetConfigRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class GetConfigResponse(_message.Message):
    __slots__ = ("config",)
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    config: ClientConfig
    def __init__(self, config: _Optional[_Union[ClientConfig, _Mapping]] = ...) -> None: ...

class RegisterConfigRequest(_message.Message):
    __slots__ = ("config",)
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    config: ClientConfig
    def __init__(self, config: _Optional[_Union[ClientConfig, _Mapping]] = ...) -> None: ...

class RegisterConfigResponse(_message.Message):
    __slots__ = ("config",)
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    config: ClientConfig
    def __init__(self, config: _Optional[_Union[ClientConfig, _Mapping]] = ...) -> None: ...

class ValidateConfigRequest(_message.Message):
    __slots__ = ("config",)
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    config: ClientConfig
    def __init__(self, config: _Optional[_Union[ClientConfig, _Mapping]] = ...) -> None: ...

class ConfigViolation(_message.Message):
    __slots__ = ("field", "description")
    FIELD_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    field: str
    description: str
    def __init__(self, field: _Optional[str] = ..., description: _Optional[str] = ...) -> None: ...

class ValidateConfigResponse(_message.Message):
    __slots__ = ("valid", "violations")
    VALID_FIELD_NUMBER: _ClassVar[int]
    VIOLATIONS_FIELD_NUMBER: _ClassVar[int]
    valid: bool
    violations: _containers.RepeatedCompositeFieldContainer[ConfigViolation]
    def __init__(self, valid: _Optional[bool] = ..., violations: _Optional[_Iterable[_Union[ConfigViolation, _Mapping]]] = ...) -> None: ...
