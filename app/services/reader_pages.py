"""Reader pages encoded straight from an adapter's columns: the protobuf bytes of a ``Page`` for
gRPC, gRPC-Web and Connect, and its canonical JSON for SSE and Connect JSON, with no protobuf
``Struct`` built per row.

Built the obvious way, a page of 1,000 rows cost ~5 µs a row to fill (``Struct.update``, a
``ByteSize`` per row for the byte budget) and another ~8 µs a row to print as JSON
(``json_format.MessageToDict`` per Struct). Here each column of a page is encoded in a few
passes of C calls (``map`` over ``struct.pack``, ``str.encode``, ``json``'s string encoder,
table look-ups), and a page is one ``join``. What the client receives is the same message:

- protobuf: every row a ``google.protobuf.Struct`` whose ``fields`` map holds each projected
  field: ``null_value``, ``number_value`` (a double), ``string_value`` or ``bool_value``, as
  ``Struct.update`` sets them (the same wire size, so the same byte budget; the fixed-size
  entries first, then the strings: protobuf leaves a map's order free);
- JSON: what ``json_format.MessageToDict`` and ``json.dumps(separators=(",", ":"),
  ensure_ascii=False)`` print for that message: numbers as doubles (``1.0``), strings through
  ``json``'s own encoder, ``{"rows":[…],"nextCursor":"…"}`` (a row's keys in projection order).

A column whose values are all of one plain type (numbers, strings, booleans, or nulls) takes
the fast path; any other column goes value by value through the same rules (a value that is
none of null, a boolean, a number or a string is a ValueError, as ``Struct.update`` raises).
``tests/test_reader_pages.py`` checks both encodings against protobuf's own for many pages.

A :class:`PageRows` is the rows a page may hold: the service takes as many as fit the byte
budget (:meth:`PageRows.fitting`: all of them when a cheap upper bound of their size fits, the
usual case; else each row is sized as protobuf sizes it), then an :class:`EncodedPage` of that many rows
encodes them for whichever transport sends it, once (``SerializeToString`` or ``to_json``;
``json_codec.to_json`` asks it for its JSON). It stands for a ``reader_pb2.Page``;
:meth:`EncodedPage.as_message` is that message, for anything that wants one.
"""

from __future__ import annotations

import json
import math
import struct
from bisect import bisect_right
from collections.abc import Callable, Iterable, Sequence
from collections.abc import Set as AbstractSet
from functools import cache
from itertools import accumulate, islice, repeat
from operator import add
from typing import Any

from app.services.protowire import varint, varint_size
from prism.v1 import reader_pb2 as r

_NONE = type(None)
_pack_double = struct.Struct("<d").pack
_json_string: Callable[[str], str] = json.encoder.encode_basestring  # type: ignore[attr-defined]  # json.dumps's, in C
_float_repr = float.__repr__  # what json.dumps prints for a finite double

SMALL = 16384  # lengths below this have a varint of one or two bytes
STRING_TABLE = 512  # string lengths (UTF-8 bytes) whose entry prefix is looked up, not built


@cache
def _row_frames() -> list[bytes]:
    """``Page.rows`` tag and length, by length (below SMALL): the bytes before each row."""
    return [b"\x0a" + varint(n) for n in range(SMALL)]


def _frame(length: int) -> bytes:
    return b"\x0a" + varint(length)


def _entry(key: bytes, value: bytes) -> bytes:
    """One ``Struct.fields`` map entry: key (field 1) and Value (field 2), as the map field (1)."""
    body = key + b"\x12" + varint(len(value)) + value
    return b"\x0a" + varint(len(body)) + body


class Field:
    """A field's encodings: its map entry for each constant value, the entry's prefix for a
    number (then the double's 8 bytes) and for a string of each length (then its UTF-8)."""

    def __init__(self, name: str) -> None:
        self.name = name
        encoded = name.encode()
        self.key = b"\x0a" + varint(len(encoded)) + encoded  # MapEntry.key
        self.null = _entry(self.key, b"\x08\x00")  # Value.null_value = NULL_VALUE
        self.true = _entry(self.key, b"\x20\x01")  # Value.bool_value
        self.false = _entry(self.key, b"\x20\x00")
        self.booleans = {True: self.true, False: self.false}
        self.number = _entry(self.key, b"\x11" + bytes(8))[:-8]  # Value.number_value, a double
        self.number_size = len(self.number) + 8
        self.string_prefixes = [self.string_prefix(n) for n in range(STRING_TABLE)]
        self.string_sizes = [len(p) + n for n, p in enumerate(self.string_prefixes)]
        # Strings up to this many bytes all have a prefix of ``short_prefix`` bytes.
        self.short_prefix = len(self.string_prefixes[0])
        self.short = max(n for n, p in enumerate(self.string_prefixes) if len(p) == self.short_prefix)
        self.json_key = _json_string(name) + ":"

    def string_prefix(self, length: int) -> bytes:
        """The entry's bytes before a string value of ``length`` UTF-8 bytes."""
        value = 1 + varint_size(length) + length  # Value.string_value: tag, length, bytes
        body = len(self.key) + 1 + varint_size(value) + value
        return b"\x0a" + varint(body) + self.key + b"\x12" + varint(value) + b"\x1a" + varint(length)

    def entry(self, value: Any) -> bytes:
        """Any value's entry, by ``Struct.update``'s rules."""
        if value is None:
            return self.null
        if isinstance(value, bool):
            return self.true if value else self.false
        if isinstance(value, str):
            encoded = value.encode()
            return self.string_prefix(len(encoded)) + encoded
        if isinstance(value, (int, float)):
            return self.number + _pack_double(value)
        raise ValueError("Unexpected type")  # what Struct.update raises


_fields: dict[str, Field] = {}


def field(name: str) -> Field:
    found = _fields.get(name)
    if found is None:
        if len(_fields) > 4096:  # names come from the configuration only; bound it all the same
            _fields.clear()
        found = _fields[name] = Field(name)
    return found


def json_value(value: Any) -> str:
    """Any value as JSON text, by ``MessageToDict``'s rules for a Value, then ``json.dumps``'s."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return _json_string(value)
    if isinstance(value, (int, float)):
        number = float(value)
        if not math.isfinite(number):  # MessageToDict refuses them (they would read back as strings)
            raise ValueError("Fail to serialize Infinity or NaN for Value.number_value")
        return _float_repr(number)
    raise ValueError("Unexpected type")


NUMBER, STRING, BOOL, NULL, ANY = "number", "string", "bool", "null", "any"
_BOOLEAN_JSON = {True: "true", False: "false"}
_ESCAPED = bytes(range(0x20)) + b'"\\'  # what JSON's string encoder escapes in ASCII text


def _interleave(template: list[Any], count: int, varying: Sequence[tuple[int, Iterable[Any]]]) -> list[Any]:
    """``template`` (one row's pieces) repeated ``count`` times, the pieces that vary put in
    place (``varying``: a piece's index in the template, and its value for every row): the
    rows' pieces in order, ready to join, with no tuple made per row."""
    out = template * count
    width = len(template)
    for index, values in varying:
        out[index::width] = values  # type: ignore[assignment]
    return out


class _Column:
    """One field of a page's rows, its values classified by type: all numbers, all strings, all
    booleans, all null, or any mix (then value by value). ``types``, when the adapter already
    knows them, saves a pass."""

    __slots__ = ("_joined", "_lengths", "_longest", "_shortest", "_utf8", "field", "ints", "kind", "values")

    def __init__(self, field: Field, values: Sequence[Any], types: AbstractSet[type] | None = None) -> None:
        self.field, self.values = field, values
        self._utf8: list[bytes] | None = None  # strings' UTF-8, or a mixed column's entries
        self._lengths: list[int] | None = None  # strings' UTF-8 lengths
        self._joined: str | None = None  # strings, end to end
        self._longest = self._shortest = -1  # the longest and shortest string's UTF-8 length, once known
        if types is None:
            types = set(map(type, values))
        self.ints = False  # numbers that are all ints
        if not values:
            self.kind = NULL
        elif types <= {int, float}:
            self.kind, self.ints = NUMBER, float not in types
        elif types == {str}:
            self.kind = STRING
        elif types == {bool}:
            self.kind = BOOL
        elif types == {_NONE}:
            self.kind = NULL
        else:
            self.kind = ANY

    def joined(self) -> str:
        """A string column's values end to end: one pass tells what holds for all of them."""
        if self._joined is None:
            self._joined = "".join(self.values)
        return self._joined

    def utf8(self) -> list[bytes]:
        """A string column's UTF-8, or a mixed column's entries (made once)."""
        if self._utf8 is None:
            if self.kind == STRING:
                self._utf8 = list(map(str.encode, self.values))
            else:
                self._utf8 = list(map(self.field.entry, self.values))
        return self._utf8

    def lengths(self) -> list[int]:
        """A string column's UTF-8 lengths."""
        if self._lengths is None:
            ascii_only = self.joined().isascii()  # then UTF-8 length = length
            self._lengths = list(map(len, self.values if ascii_only else self.utf8()))
            self._longest, self._shortest = max(self._lengths), min(self._lengths)
        return self._lengths

    def longest(self) -> int:
        self.lengths()
        return self._longest

    def uniform(self) -> bool:
        """Strings all of one UTF-8 length (timestamps, codes): entries of one size."""
        return self.kind == STRING and self.longest() < STRING_TABLE and self._shortest == self._longest

    def packed(self) -> tuple[str, list[Iterable[Any]]] | None:
        """A fixed-size entry (number, boolean, null, string of a uniform length) as ``struct``
        format and arguments."""
        field = self.field
        if self.kind == NUMBER:
            return f"{len(field.number)}sd", [repeat(field.number), self.values]
        if self.kind == BOOL:  # Value.bool_value is one varint byte, 0 or 1
            return f"{len(field.true) - 1}s?", [repeat(field.true[:-1]), self.values]
        if self.kind == NULL:
            return f"{len(field.null)}s", [repeat(field.null)]
        if self.uniform():
            prefix = field.string_prefixes[self._longest]
            return f"{len(prefix)}s{self._longest}s", [repeat(prefix), self.utf8()]
        return None

    def size(self) -> int | None:
        """The size of every entry, when they all have one."""
        field = self.field
        if self.kind == NUMBER:
            return field.number_size
        if self.kind == BOOL:
            return len(field.true)
        if self.kind == NULL:
            return len(field.null)
        return None

    def sizes(self) -> list[int]:
        """Each row's entry size (strings and mixed columns)."""
        if self.kind == ANY:
            return list(map(len, self.utf8()))
        lengths = self.lengths()
        if self.longest() < STRING_TABLE:
            return list(map(self.field.string_sizes.__getitem__, lengths))
        return [len(self.field.string_prefix(n)) + n for n in lengths]

    def most(self) -> int:
        """At least the total size of the column's entries, cheaply (no UTF-8 made)."""
        size = self.size()
        if size is not None:
            return size * len(self.values)
        if self.kind == ANY:
            return sum(self.sizes())
        # A string entry: its prefix (the key, three tags, three varints of at most 5 bytes) and
        # at most 4 bytes a character.
        return len(self.values) * (len(self.field.key) + 18) + 4 * len(self.joined())

    def pieces(self) -> list[Iterable[bytes]]:
        """A string or mixed column's bytes, row by row, as iterables to interleave."""
        if self.kind == ANY:
            return [self.utf8()]
        encoded, lengths = self.utf8(), self.lengths()
        if self.longest() < STRING_TABLE:
            return [map(self.field.string_prefixes.__getitem__, lengths), encoded]
        return [map(self.field.string_prefix, lengths), encoded]

    def json(self) -> tuple[str, Iterable[str] | None, str]:
        """The values' JSON text, as ``MessageToDict`` then ``json.dumps`` print them: text
        before each value, the values (None: nothing varies), text after each."""
        values = self.values
        if self.kind == NUMBER:
            if self.ints:  # an integral double below 1e16 prints as the integer, then ".0"
                return "", map(int.__repr__, values), ".0"
            if not all(map(math.isfinite, values)):
                return "", list(map(json_value, values)), ""  # raises, as MessageToDict does
            return "", map(_float_repr, map(float, values)), ""
        if self.kind == STRING:
            joined = self.joined()
            if joined.isascii():  # a control character, quote or backslash is escaped, nothing else
                plain = len(joined.encode("ascii").translate(None, _ESCAPED)) == len(joined)
            else:  # every control character is unprintable
                plain = joined.isprintable() and '"' not in joined and "\\" not in joined
            if plain:  # nothing to escape: the text is the string in quotes
                return '"', values, '"'
            return "", map(_json_string, values), ""
        if self.kind == BOOL:
            return "", map(_BOOLEAN_JSON.__getitem__, values), ""
        if self.kind == NULL:
            return "null", None, ""
        return "", list(map(json_value, values)), ""


class PageRows:
    """The rows a page may hold: the first ``count`` of a batch's columns."""

    def __init__(
        self,
        fields: Sequence[str],
        columns: Sequence[Sequence[Any]],
        count: int,
        types: Sequence[AbstractSet[type] | None] | None = None,
    ) -> None:
        self.count = count
        self.columns = [
            _Column(field(name), values[:count] if count < len(values) else values, None if types is None else types[i])
            for i, (name, values) in enumerate(zip(fields, columns, strict=True))
        ]
        self._lengths: list[int] | None = None
        self._totals: list[int] | None = None

    def _first(self, count: int) -> PageRows:
        """These rows but the first ``count`` only (a page the byte budget cut)."""
        if count == self.count:
            return self
        return PageRows([c.field.name for c in self.columns], [c.values for c in self.columns], count)

    def lengths(self) -> list[int]:
        """Each row's encoded Struct: the sum of its entries' sizes."""
        if self._lengths is None:
            constant, varying = 0, []
            for column in self.columns:
                size = column.size()
                if size is not None:
                    constant += size
                elif column.uniform():
                    constant += column.field.string_sizes[column.longest()]
                elif column.kind == STRING and column.longest() <= column.field.short:
                    constant += column.field.short_prefix  # each entry: that prefix, then the string
                    varying.append(column.lengths())
                else:
                    varying.append(column.sizes())
            if not varying:
                self._lengths = [constant] * self.count
            else:
                total: Iterable[int] = varying[0]
                for sizes in varying[1:]:
                    total = map(add, total, sizes)
                self._lengths = list(map(add, total, repeat(constant))) if constant else list(total)
        return self._lengths

    def longest(self) -> int:
        """The longest row's length: at most the sum of each column's longest entry."""
        bound = 0
        for column in self.columns:
            size = column.size()
            if size is not None:
                bound += size
            elif column.kind == STRING and column.longest() < STRING_TABLE:
                bound += column.field.string_sizes[column.longest()]
            else:
                return max(self.lengths(), default=0)
        return bound

    def totals(self) -> list[int]:
        """The page's size with the first 1, 2, … rows: each row adds its tag, its length's
        varint and itself."""
        if self._totals is None:
            lengths = self.lengths()
            if max(lengths, default=0) < 128:
                costs: Iterable[int] = map(add, lengths, repeat(2))
            else:
                costs = [n + 1 + varint_size(n) for n in lengths]
            self._totals = list(accumulate(costs))
        return self._totals

    def most(self) -> int:
        """At least the encoded size of all the rows, without sizing each (a row adds at most
        6 bytes of tag and length to its fields)."""
        return 6 * self.count + sum(column.most() for column in self.columns)

    def fitting(self, budget: int) -> int:
        """How many rows the page takes within ``budget`` bytes: every row that fits, and the
        first even when it alone does not (a page always advances the stream)."""
        if not self.count or self.most() <= budget:  # all fit: the common case, no row sized
            return self.count
        return max(1, bisect_right(self.totals(), budget))

    def within(self, count: int, cursor: str, limit: int) -> bool:
        """Whether the page of the first ``count`` rows and ``cursor`` takes at most ``limit`` bytes."""
        extra = 1 + varint_size(len(cursor)) + len(cursor) if cursor else 0
        if count == self.count and self.most() + extra <= limit:
            return True
        return self.size(count, cursor) <= limit

    def size(self, count: int, cursor: str) -> int:
        """The encoded page's size with the first ``count`` rows and ``cursor``."""
        rows = self.totals()[count - 1] if count else 0
        return rows + (1 + varint_size(len(cursor)) + len(cursor) if cursor else 0)

    def proto(self, count: int, cursor: str) -> bytes:
        """``Page`` bytes, row by row in as few pieces as it takes: the row's tag and length
        (when every row's take as many bytes) and its fixed-size entries (numbers, booleans,
        nulls, strings of one length) packed by one ``struct`` call with the entry prefix of
        its first short string, then that string's bytes, then the other strings' entries;
        the cursor last."""
        if count != self.count:
            return self._first(count).proto(count, cursor)
        lengths = self.lengths()
        pieces: list[Iterable[bytes]] = []
        run_format, run_args = "<", []  # the fixed-size run being gathered

        def end_run() -> None:
            nonlocal run_format, run_args
            if run_args:  # (islice: a run of constants only is made of endless repeats)
                pieces.append(islice(map(struct.Struct(run_format).pack, *run_args), count))
            run_format, run_args = "<", []

        frames = map(_row_frames().__getitem__, lengths) if self.longest() < SMALL else map(_frame, lengths)
        if count and varint_size(max(lengths)) == varint_size(min(lengths)) < 3:  # every frame one size
            run_format, run_args = f"<{1 + varint_size(lengths[0])}s", [frames]
        else:
            pieces.append(frames)
        others = []  # entries of varying size, after the fixed ones (a map's entries may come in any order)
        for column in self.columns:
            found = column.packed()
            if found is None:
                others.append(column)
            else:
                run_format += found[0]
                run_args += found[1]
        for column in others:
            if column.kind == STRING and column.longest() <= column.field.short:  # its prefix joins the run
                run_format += f"{column.field.short_prefix}s"
                run_args.append(map(column.field.string_prefixes.__getitem__, column.lengths()))
                end_run()
                pieces.append(column.utf8())
            else:
                end_run()
                pieces += column.pieces()
        end_run()
        rows = b"".join(_interleave([b""] * len(pieces), count, list(enumerate(pieces))))
        if not cursor:
            return rows
        encoded = cursor.encode()
        return rows + b"\x12" + varint(len(encoded)) + encoded

    def json(self, count: int, cursor: str) -> bytes:
        """``{"rows":[…],"nextCursor":…}``: each row's text between its values is the same,
        so a row is its values interleaved with constant pieces."""
        if count != self.count:
            return self._first(count).json(count, cursor)
        if not count:
            rows = ""
        else:
            constants, varying = [], []
            text = ",{"  # every row opens with a comma: the first one's is cut off below
            for i, column in enumerate(self.columns):
                before, values, after = column.json()
                text += ("," if i else "") + column.field.json_key + before
                if values is None:
                    text += after
                    continue
                constants.append(text)
                varying.append(values)
                text = after
            constants.append(text + "}")
            template: list[str] = []
            for constant in constants:
                template += [constant, ""]
            template.pop()
            rows = "".join(_interleave(template, count, [(2 * i + 1, v) for i, v in enumerate(varying)]))[1:]
        return f'{{"rows":[{rows}],"nextCursor":{_json_string(cursor)}}}'.encode()


class EncodedPage:
    """A ``reader_pb2.Page`` of the first ``count`` rows and ``next_cursor``, encoded when a
    transport asks (once either way): what the transports call on a message, and
    :meth:`as_message` for the message itself."""

    __slots__ = ("_count", "_json", "_proto", "_rows", "next_cursor")
    DESCRIPTOR = r.Page.DESCRIPTOR

    def __init__(self, rows: PageRows, count: int, next_cursor: str) -> None:
        self._rows, self._count, self.next_cursor = rows, count, next_cursor
        self._proto: bytes | None = None
        self._json: bytes | None = None

    def SerializeToString(self, **_options: Any) -> bytes:
        if self._proto is None:
            self._proto = self._rows.proto(self._count, self.next_cursor)
        return self._proto

    def ByteSize(self) -> int:
        return len(self.SerializeToString())

    def to_json(self) -> bytes:
        """Canonical JSON, as ``json_codec.to_json`` prints a Page."""
        if self._json is None:
            self._json = self._rows.json(self._count, self.next_cursor)
        return self._json

    def as_message(self) -> r.Page:
        return r.Page.FromString(self.SerializeToString())

    @property
    def rows(self) -> Any:
        return self.as_message().rows
