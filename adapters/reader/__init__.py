"""Reader adapters: one module per backend, all implementing :class:`ReaderAdapter`; the SQL
both compile to is ``sql.py``'s."""

from adapters.reader.base import Collection, Query, ReaderAdapter, Row, Schema, SortKey

__all__ = ["Collection", "Query", "ReaderAdapter", "Row", "Schema", "SortKey"]
