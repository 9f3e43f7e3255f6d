import datetime

from prism.v1 import config_pb2 as _config_pb2
from prism.v1 import options_pb2 as _options_pb2
from google.api import annotations_pb2 as _annotations_pb2
from google.api import field_behavior_pb2 as _field_behavior_pb2
from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.rpc import status_pb2 as _status_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StartPosition(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    START_POSITION_UNSPECIFIED: _ClassVar[StartPosition]
    START_POSITION_EARLIEST: _ClassVar[StartPosition]
    START_POSITION_LATEST: _ClassVar[StartPosition]
    START_POSITION_COMMITTED: _ClassVar[StartPosition]
START_POSITION_UNSPECIFIED: StartPosition
START_POSITION_EARLIEST: StartPosition
START_POSITION_LATEST: StartPosition
START_POSITION_COMMITTED: StartPosition

class QueueEntry(_message.Message):
    __slots__ = ("payload", "partition_key", "headers", "idempotency_token")
    class HeadersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    PARTITION_KEY_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_TOKEN_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    partition_key: str
    headers: _containers.ScalarMap[str, str]
    idempotency_token: str
    def __init__(self, payload: _Optional[bytes] = ..., partition_key: _Optional[str] = ..., headers: _Optional[_Mapping[str, str]] = ..., idempotency_token: _Optional[str] = ...) -> None: ...

class QueuePublishRequest(_message.Message):
    __slots__ = ("topic", "entry")
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    ENTRY_FIELD_NUMBER: _ClassVar[int]
    topic: str
    entry: QueueEntry
    def __init__(self, topic: _Optional[str] = ..., entry: _Optional[_Union[QueueEntry, _Mapping]] = ...) -> None: ...

class QueuePublishResponse(_message.Message):
    __slots__ = ("message_id", "partition", "offset")
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    message_id: str
    partition: int
    offset: int
    def __init__(self, message_id: _Optional[str] = ..., partition: _Optional[int] = ..., offset: _Optional[int] = ...) -> None: ...

class PublishBatchRequest(_message.Message):
    __slots__ = ("topic", "entries")
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    topic: str
    entries: _containers.RepeatedCompositeFieldContainer[QueueEntry]
    def __init__(self, topic: _Optional[str] = ..., entries: _Optional[_Iterable[_Union[QueueEntry, _Mapping]]] = ...) -> None: ...

class PublishResult(_message.Message):
    __slots__ = ("status", "message_id", "partition", "offset")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    status: _status_pb2.Status
    message_id: str
    partition: int
    offset: int
    def __init__(self, status: _Optional[_Union[_status_pb2.Status, _Mapping]] = ..., message_id: _Optional[str] = ..., partition: _Optional[int] = ..., offset: _Optional[int] = ...) -> None: ...

class PublishBatchResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[PublishResult]
    def __init__(self, results: _Optional[_Iterable[_Union[PublishResult, _Mapping]]] = ...) -> None: ...

class QueueSubscribeRequest(_message.Message):
    __slots__ = ("topic", "consumer_group", "start", "ack_deadline", "max_in_flight", "max_delivery_attempts", "dead_letter_topic", "max_batch", "linger_ms")
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    CONSUMER_GROUP_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    ACK_DEADLINE_FIELD_NUMBER: _ClassVar[int]
    MAX_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    MAX_DELIVERY_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    DEAD_LETTER_TOPIC_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    LINGER_MS_FIELD_NUMBER: _ClassVar[int]
    topic: str
    consumer_group: str
    start: StartPosition
    ack_deadline: _duration_pb2.Duration
    max_in_flight: int
    max_delivery_attempts: int
    dead_letter_topic: str
    max_batch: int
    linger_ms: int
    def __init__(self, topic: _Optional[str] = ..., consumer_group: _Optional[str] = ..., start: _Optional[_Union[StartPosition, str]] = ..., ack_deadline: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., max_in_flight: _Optional[int] = ..., max_delivery_attempts: _Optional[int] = ..., dead_letter_topic: _Optional[str] = ..., max_batch: _Optional[int] = ..., linger_ms: _Optional[int] = ...) -> None: ...

class QueueMessage(_message.Message):
    __slots__ = ("message_id", "topic", "partition", "offset", "payload", "partition_key", "headers", "delivery_attempt", "published_at")
    class HeadersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    PARTITION_KEY_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    DELIVERY_ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    PUBLISHED_AT_FIELD_NUMBER: _ClassVar[int]
    message_id: str
    topic: str
    partition: int
    offset: int
    payload: bytes
    partition_key: str
    headers: _containers.ScalarMap[str, str]
    delivery_attempt: int
    published_at: _timestamp_pb2.Timestamp
    def __init__(self, message_id: _Optional[str] = ..., topic: _Optional[str] = ..., partition: _Optional[int] = ..., offset: _Optional[int] = ..., payload: _Optional[bytes] = ..., partition_key: _Optional[str] = ..., headers: _Optional[_Mapping[str, str]] = ..., delivery_attempt: _Optional[int] = ..., published_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class QueueMessageBatch(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[QueueMessage]
    def __init__(self, messages: _Optional[_Iterable[_Union[QueueMessage, _Mapping]]] = ...) -> None: ...

class AcknowledgeRequest(_message.Message):
    __slots__ = ("topic", "consumer_group", "message_ids")
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    CONSUMER_GROUP_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_IDS_FIELD_NUMBER: _ClassVar[int]
    topic: str
    consumer_group: str
    message_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, topic: _Optional[str] = ..., consumer_group: _Optional[str] = ..., message_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class AcknowledgeResponse(_message.Message):
    __slots__ = ("acknowledged",)
    ACKNOWLEDGED_FIELD_NUMBER: _ClassVar[int]
    acknowledged: int
    def __init__(self, acknowledged: _Optional[int] = ...) -> None: ...

class NackRequest(_message.Message):
    __slots__ = ("topic", "consumer_group", "message_ids")
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    CONSUMER_GROUP_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_IDS_FIELD_NUMBER: _ClassVar[int]
    topic: str
    consumer_group: str
    message_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, topic: _Optional[str] = ..., consumer_group: _Optional[str] = ..., message_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class NackResponse(_message.Message):
    __slots__ = ("nacked",)
    NACKED_FIELD_NUMBER: _ClassVar[int]
    nacked: int
    def __init__(self, nacked: _Optional[int] = ...) -> None: ...

class CommitRequest(_message.Message):
    __slots__ = ("topic", "consumer_group", "partition", "offset")
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    CONSUMER_GROUP_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    topic: str
    consumer_group: str
    partition: int
    offset: int
    def __init__(self, topic: _Optional[str] = ..., consumer_group: _Optional[str] = ..., partition: _Optional[int] = ..., offset: _Optional[int] = ...) -> None: ...

class CommitResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SeekRequest(_message.Message):
    __slots__ = ("topic", "consumer_group", "partition", "offset", "timestamp", "position")
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    CONSUMER_GROUP_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    topic: str
    consumer_group: str
    partition: int
    offset: int
    timestamp: _timestamp_pb2.Timestamp
    position: StartPosition
    def __init__(self, topic: _Optional[str] = ..., consumer_group: _Optional[str] = ..., partition: _Optional[int] = ..., offset: _Optional[int] = ..., timestamp: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., position: _Optional[_Union[StartPosition, str]] = ...) -> None: ...

class SeekResponse(_message.Message):
    __slots__ = ("offset",)
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    offset: int
    def __init__(self, offset: _Optional[int] = ...) -> None: ...

class GetTopicInfoRequest(_message.Message):
    __slots__ = ("topic", "consumer_group")
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    CONSUMER_GROUP_FIELD_NUMBER: _ClassVar[int]
    topic: str
    consumer_group: str
    def __init__(self, topic: _Optional[str] = ..., consumer_group: _Optional[str] = ...) -> None: ...

class PartitionInfo(_message.Message):
    __slots__ = ("partition", "low_offset", "high_offset", "committed_offset", "lag")
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    LOW_OFFSET_FIELD_NUMBER: _ClassVar[int]
    HIGH_OFFSET_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_OFFSET_FIELD_NUMBER: _ClassVar[int]
    LAG_FIELD_NUMBER: _ClassVar[int]
    partition: int
    low_offset: int
    high_offset: int
    committed_offset: int
    lag: int
    def __init__(self, partition: _Optional[int] = ..., low_offset: _Optional[int] = ..., high_offset: _Optional[int] = ..., committed_offset: _Optional[int] = ..., lag: _Optional[int] = ...) -> None: ...

class GetTopicInfoResponse(_message.Message):
    __slots__ = ("topic", "partitions")
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    PARTITIONS_FIELD_NUMBER: _ClassVar[int]
    topic: str
    partitions: _containers.RepeatedCompositeFieldContainer[PartitionInfo]
    def __init__(self, topic: _Optional[str] = ..., partitions: _Optional[_Iterable[_Union[PartitionInfo, _Mapping]]] = ...) -> None: ...
