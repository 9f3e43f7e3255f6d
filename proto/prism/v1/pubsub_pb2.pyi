import datetime

from prism.v1 import config_pb2 as _config_pb2
from prism.v1 import options_pb2 as _options_pb2
from google.api import annotations_pb2 as _annotations_pb2
from google.api import field_behavior_pb2 as _field_behavior_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PubSubPublishRequest(_message.Message):
    __slots__ = ("subject", "data", "headers")
    class HeadersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    subject: str
    data: bytes
    headers: _containers.ScalarMap[str, str]
    def __init__(self, subject: _Optional[str] = ..., data: _Optional[bytes] = ..., headers: _Optional[_Mapping[str, str]] = ...) -> None: ...

class PubSubPublishResponse(_message.Message):
    __slots__ = ("message_id",)
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    message_id: str
    def __init__(self, message_id: _Optional[str] = ...) -> None: ...

class PublishStreamResponse(_message.Message):
    __slots__ = ("published", "last_message_id")
    PUBLISHED_FIELD_NUMBER: _ClassVar[int]
    LAST_MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    published: int
    last_message_id: str
    def __init__(self, published: _Optional[int] = ..., last_message_id: _Optional[str] = ...) -> None: ...

class PubSubSubscribeRequest(_message.Message):
    __slots__ = ("subject", "queue_group", "start_time", "start_after", "cursor", "max_batch", "linger_ms")
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    QUEUE_GROUP_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    START_AFTER_FIELD_NUMBER: _ClassVar[int]
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    LINGER_MS_FIELD_NUMBER: _ClassVar[int]
    subject: str
    queue_group: str
    start_time: _timestamp_pb2.Timestamp
    start_after: str
    cursor: str
    max_batch: int
    linger_ms: int
    def __init__(self, subject: _Optional[str] = ..., queue_group: _Optional[str] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., start_after: _Optional[str] = ..., cursor: _Optional[str] = ..., max_batch: _Optional[int] = ..., linger_ms: _Optional[int] = ...) -> None: ...

class PubSubMessage(_message.Message):
    __slots__ = ("message_id", "subject", "data", "headers", "published_at")
    class HeadersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    PUBLISHED_AT_FIELD_NUMBER: _ClassVar[int]
    message_id: str
    subject: str
    data: bytes
    headers: _containers.ScalarMap[str, str]
    published_at: _timestamp_pb2.Timestamp
    def __init__(self, message_id: _Optional[str] = ..., subject: _Optional[str] = ..., data: _Optional[bytes] = ..., headers: _Optional[_Mapping[str, str]] = ..., published_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class PubSubSubscribeResponse(_message.Message):
    __slots__ = ("subscription_id", "message")
    SUBSCRIPTION_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    subscription_id: str
    message: PubSubMessage
    def __init__(self, subscription_id: _Optional[str] = ..., message: _Optional[_Union[PubSubMessage, _Mapping]] = ...) -> None: ...

class PubSubMessageBatch(_message.Message):
    __slots__ = ("subscription_id", "messages")
    SUBSCRIPTION_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    subscription_id: str
    messages: _containers.RepeatedCompositeFieldContainer[PubSubMessage]
    def __init__(self, subscription_id: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[PubSubMessage, _Mapping]]] = ...) -> None: ...

class UnsubscribeRequest(_message.Message):
    __slots__ = ("subscription_id",)
    SUBSCRIPTION_ID_FIELD_NUMBER: _ClassVar[int]
    subscription_id: str
    def __init__(self, subscription_id: _Optional[str] = ...) -> None: ...

class UnsubscribeResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
