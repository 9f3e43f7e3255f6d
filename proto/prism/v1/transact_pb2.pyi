import datetime

from prism.v1 import config_pb2 as _config_pb2
from prism.v1 import options_pb2 as _options_pb2
from google.api import annotations_pb2 as _annotations_pb2
from google.api import field_behavior_pb2 as _field_behavior_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WriteOperation(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WRITE_OPERATION_UNSPECIFIED: _ClassVar[WriteOperation]
    WRITE_OPERATION_INSERT: _ClassVar[WriteOperation]
    WRITE_OPERATION_UPSERT: _ClassVar[WriteOperation]
    WRITE_OPERATION_UPDATE: _ClassVar[WriteOperation]
    WRITE_OPERATION_DELETE: _ClassVar[WriteOperation]
WRITE_OPERATION_UNSPECIFIED: WriteOperation
WRITE_OPERATION_INSERT: WriteOperation
WRITE_OPERATION_UPSERT: WriteOperation
WRITE_OPERATION_UPDATE: WriteOperation
WRITE_OPERATION_DELETE: WriteOperation

class DataWrite(_message.Message):
    __slots__ = ("table", "operation", "row")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    ROW_FIELD_NUMBER: _ClassVar[int]
    table: str
    operation: WriteOperation
    row: _struct_pb2.Struct
    def __init__(self, table: _Optional[str] = ..., operation: _Optional[_Union[WriteOperation, str]] = ..., row: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class MailboxWrite(_message.Message):
    __slots__ = ("mailbox", "payload", "headers", "destination")
    class HeadersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MAILBOX_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    mailbox: str
    payload: bytes
    headers: _containers.ScalarMap[str, str]
    destination: str
    def __init__(self, mailbox: _Optional[str] = ..., payload: _Optional[bytes] = ..., headers: _Optional[_Mapping[str, str]] = ..., destination: _Optional[str] = ...) -> None: ...

class WriteRequest(_message.Message):
    __slots__ = ("data", "mailbox", "idempotency_key")
    DATA_FIELD_NUMBER: _ClassVar[int]
    MAILBOX_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    data: DataWrite
    mailbox: MailboxWrite
    idempotency_key: str
    def __init__(self, data: _Optional[_Union[DataWrite, _Mapping]] = ..., mailbox: _Optional[_Union[MailboxWrite, _Mapping]] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class WriteResponse(_message.Message):
    __slots__ = ("mailbox_sequence", "committed_at", "replayed")
    MAILBOX_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_AT_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    mailbox_sequence: int
    committed_at: _timestamp_pb2.Timestamp
    replayed: bool
    def __init__(self, mailbox_sequence: _Optional[int] = ..., committed_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., replayed: _Optional[bool] = ...) -> None: ...

class TransactionRequest(_message.Message):
    __slots__ = ("begin", "data", "mailbox", "commit", "rollback")
    class Begin(_message.Message):
        __slots__ = ("timeout_ms",)
        TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
        timeout_ms: int
        def __init__(self, timeout_ms: _Optional[int] = ...) -> None: ...
    class Commit(_message.Message):
        __slots__ = ()
        def __init__(self) -> None: ...
    class Rollback(_message.Message):
        __slots__ = ()
        def __init__(self) -> None: ...
    BEGIN_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    MAILBOX_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    ROLLBACK_FIELD_NUMBER: _ClassVar[int]
    begin: TransactionRequest.Begin
    data: DataWrite
    mailbox: MailboxWrite
    commit: TransactionRequest.Commit
    rollback: TransactionRequest.Rollback
    def __init__(self, begin: _Optional[_Union[TransactionRequest.Begin, _Mapping]] = ..., data: _Optional[_Union[DataWrite, _Mapping]] = ..., mailbox: _Optional[_Union[MailboxWrite, _Mapping]] = ..., commit: _Optional[_Union[TransactionRequest.Commit, _Mapping]] = ..., rollback: _Optional[_Union[TransactionRequest.Rollback, _Mapping]] = ...) -> None: ...

class TransactionResponse(_message.Message):
    __slots__ = ("transaction_id", "rows_affected", "mailbox_sequence", "committed_at", "rolled_back")
    TRANSACTION_ID_FIELD_NUMBER: _ClassVar[int]
    ROWS_AFFECTED_FIELD_NUMBER: _ClassVar[int]
    MAILBOX_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_AT_FIELD_NUMBER: _ClassVar[int]
    ROLLED_BACK_FIELD_NUMBER: _ClassVar[int]
    transaction_id: str
    rows_affected: int
    mailbox_sequence: int
    committed_at: _timestamp_pb2.Timestamp
    rolled_back: bool
    def __init__(self, transaction_id: _Optional[str] = ..., rows_affected: _Optional[int] = ..., mailbox_sequence: _Optional[int] = ..., committed_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., rolled_back: _Optional[bool] = ...) -> None: ...
