from google.protobuf import descriptor_pb2 as _descriptor_pb2
from prism.v1 import config_pb2 as _config_pb2
from google.protobuf import descriptor as _descriptor
from typing import ClassVar as _ClassVar

DESCRIPTOR: _descriptor.FileDescriptor
PII_FIELD_NUMBER: _ClassVar[int]
pii: _descriptor.FieldDescriptor
ACCESS_PATTERN_FIELD_NUMBER: _ClassVar[int]
access_pattern: _descriptor.FieldDescriptor
REQUIRES_SESSION_FIELD_NUMBER: _ClassVar[int]
requires_session: _descriptor.FieldDescriptor
