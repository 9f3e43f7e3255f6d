"""KeyValue adapters: one module per backend, all implementing :class:`KeyValueAdapter`, and
``chunked.py``, the decorator that stores large values in chunks over any of them."""

from adapters.keyvalue.base import KeyValueAdapter, Record

__all__ = ["KeyValueAdapter", "Record"]
