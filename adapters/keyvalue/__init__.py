"""KeyValue adapters: one module per backend, all implementing :class:`KeyValueAdapter`."""

from adapters.keyvalue.base import KeyValueAdapter, Record

__all__ = ["KeyValueAdapter", "Record"]
