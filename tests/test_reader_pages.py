"""Reader pages encoded from columns (``app/services/reader_pages.py``) are the messages protobuf
would build: every page here is also built the obvious way — a ``Struct.update`` per row, then
``SerializeToString`` and ``json_codec``'s printer (``json_format`` for Structs) — and both
encodings must agree, as must the byte budget's cut. The adapters' column converters are checked
the same way against their value-by-value functions.
"""

from __future__ import annotations

import datetime
import decimal
import json
import math
import random
from typing import Any

import pytest

from adapters.reader import postgres, sqlite
from adapters.reader.base import Column, Kind, rfc3339
from app.services.reader_pages import EncodedPage, PageRows
from app.transports import json_codec
from prism.v1 import reader_pb2 as r

NAMES = ["id", "a", "bb", "name_x", "x" * 63, "é"]
STRINGS = ["", "a", "é", "日本", "😀", '"\\\n\t\x00\x1f\u2028', "x" * 127, "y" * 128, "z" * 300, "é" * 600, "w" * 20000]
NUMBERS = [0, 1, -5, 2**53, -(2**53), 10**15, 0.25, -0.0, 1e300, 5e-324, 1e16, 123456.789, -1e-7]


def value(rng: random.Random, kind: str) -> Any:
    if kind == "number":
        return rng.choice([*NUMBERS, rng.uniform(-1e6, 1e6), rng.randint(-(10**12), 10**12)])
    if kind == "int":
        return rng.choice([0, 1, -7, 2**53, rng.randint(-(2**53), 2**53)])
    if kind == "string":
        return rng.choice(STRINGS)
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "null":
        return None
    return rng.choice([None, True, False, 3, 2.5, "q", "日本", 0])  # a mix, nulls among them


def reference(fields: tuple[str, ...], columns: list[list[Any]], count: int, cursor: str) -> r.Page:
    page = r.Page(next_cursor=cursor)
    for i in range(count):
        page.rows.add().update({name: column[i] for name, column in zip(fields, columns, strict=True)})
    return page


def canonical(data: bytes) -> str:
    """JSON with keys sorted, every value printed as json prints it (1.0 stays 1.0, 1 stays 1)."""
    return json.dumps(json.loads(data), sort_keys=True, ensure_ascii=False)


def old_fitting(page: r.Page, budget: int) -> int:
    """The rows a page took before: a Struct's size per row, added while within the budget."""
    size = taken = 0
    for row in page.rows:
        encoded = row.ByteSize()
        cost = 1 + max(1, (encoded.bit_length() + 6) // 7) + encoded
        if taken and size + cost > budget:
            break
        size, taken = size + cost, taken + 1
    return taken


@pytest.mark.parametrize("seed", range(6))
def test_pages_encode_as_protobuf_and_json_format_would(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(60):
        fields = tuple(rng.sample(NAMES, rng.randint(1, len(NAMES))))
        kinds = [rng.choice(["number", "int", "string", "bool", "null", "mixed"]) for _ in fields]
        rows = rng.choice([1, 2, 7, 40, 150])
        columns = [[value(rng, kind) for _ in range(rows)] for kind in kinds]
        count = rng.randint(1, rows)
        cursor = rng.choice(["", "WyIwM2Fi.MzA-yjKVu6Y3aKgcEGwI0g", "c" * 300])
        page = EncodedPage(PageRows(fields, columns, count), count, cursor)
        expected = reference(fields, columns, count, cursor)

        data = page.SerializeToString()
        assert r.Page.FromString(data) == expected
        assert len(data) == expected.ByteSize() == page.ByteSize()
        assert page.as_message() == expected and page.rows == expected.rows
        assert page.to_json() == json_codec.to_json(page)
        assert canonical(page.to_json()) == canonical(json_codec.to_json(expected))

        budgeted = PageRows(fields, columns, count)
        for budget in (0, 1, 40, 300, 3000, 40000, 10**7):
            assert budgeted.fitting(budget) == old_fitting(expected, budget), budget
        for taken in {1, count}:
            size = reference(fields, columns, taken, cursor).ByteSize()
            assert budgeted.size(taken, cursor) == size
            assert budgeted.within(taken, cursor, size) and not budgeted.within(taken, cursor, size - 1)


def test_a_page_cut_by_the_budget_encodes_its_first_rows_only() -> None:
    fields = ("id", "label")
    columns = [list(range(1, 11)), ["é" * n for n in range(10)]]
    rows = PageRows(fields, columns, 10)
    page = EncodedPage(rows, 4, "next")
    expected = reference(fields, columns, 4, "next")
    assert r.Page.FromString(page.SerializeToString()) == expected
    assert canonical(page.to_json()) == canonical(json_codec.to_json(expected))


def test_the_json_is_what_clients_got_before_but_for_the_order_of_a_rows_keys() -> None:
    columns = [[1, 2**53], [0.1, None], ["a\u2028\"", "日本"], [True, False], ["2026-01-05T09:00:00.000000Z", None]]
    fields = ("id", "amount", "label", "flag", "at")
    page = EncodedPage(PageRows(fields, columns, 2), 2, "")
    assert page.to_json() == (
        '{"rows":[{"id":1.0,"amount":0.1,"label":"a\u2028\\"","flag":true,"at":"2026-01-05T09:00:00.000000Z"},'
        '{"id":9007199254740992.0,"amount":null,"label":"日本","flag":false,"at":null}],"nextCursor":""}'
    ).encode()
    expected = json_codec.to_json(reference(fields, columns, 2, ""))
    assert json.loads(page.to_json(), object_pairs_hook=sorted) == json.loads(expected, object_pairs_hook=sorted)


@pytest.mark.parametrize("bad", [b"blob", decimal.Decimal("1.5"), datetime.date(2026, 1, 5)])
def test_a_value_no_struct_can_hold_fails_as_struct_update_does(bad: Any) -> None:
    columns = [[1, bad]]
    with pytest.raises(ValueError):
        reference(("v",), columns, 2, "")
    with pytest.raises(ValueError):
        EncodedPage(PageRows(("v",), columns, 2), 2, "").SerializeToString()
    with pytest.raises(ValueError):
        EncodedPage(PageRows(("v",), columns, 2), 2, "").to_json()


@pytest.mark.parametrize("number", [math.inf, -math.inf, math.nan])
def test_a_number_json_cannot_hold_fails_in_json_only_as_before(number: float) -> None:
    columns = [[1.5, number]]
    expected = reference(("v",), columns, 2, "")
    page = EncodedPage(PageRows(("v",), columns, 2), 2, "")
    assert r.Page.FromString(page.SerializeToString()).SerializeToString() == expected.SerializeToString()
    with pytest.raises(ValueError):
        json_codec.to_json(expected)
    with pytest.raises(ValueError):
        page.to_json()


# --- the adapters' column converters: the same values as their value-by-value functions ----------

UTC = datetime.UTC
PLUS_TWO = datetime.timezone(datetime.timedelta(hours=2))
RAW: dict[Kind, list[Any]] = {
    Kind.INTEGER: [0, 1, -1, 2**53, 2**53 + 1, -(2**53) - 1, 2**63 - 1, 7.5, float("nan"), "12", b"x", None],
    Kind.NUMBER: [0.5, -0.0, 1e308, float("inf"), float("-inf"), float("nan"), 3, 2**60, None, "x"],
    Kind.STRING: ["", "a", "日本", None, 5, b"b"],
    Kind.BOOLEAN: [0, 1, 2, True, False, None, "x"],
    Kind.TIMESTAMP: [
        "2026-01-05T09:00:00.000000Z",
        "2026-01-05T09:00:00Z",
        "2026-01-05 09:00:00+02:00",
        "not a time",
        datetime.datetime(2026, 1, 5, 9, 0, 0, 1, tzinfo=UTC),
        datetime.datetime(2026, 1, 5, 9, tzinfo=PLUS_TWO),
        datetime.datetime(2026, 1, 5, 9),
        datetime.datetime(999, 12, 31, 23, 59, tzinfo=UTC),
        datetime.datetime(1, 1, 1),
        datetime.datetime.max.replace(tzinfo=UTC),
        decimal.Decimal("1.5"),
        None,
    ],
}
PG_NUMERIC = [decimal.Decimal("1.25"), decimal.Decimal("NaN"), decimal.Decimal("1e400"), decimal.Decimal("-0"), 2.5]


def same(a: list[Any], b: list[Any]) -> bool:
    """Equal value by value, types included (1, 1.0 and True differ), NaN equal to NaN."""
    return len(a) == len(b) and all(type(x) is type(y) and (x == y or (x != x and y != y)) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("dialect", [sqlite.DIALECT, postgres.DIALECT], ids=["sqlite", "postgres"])
@pytest.mark.parametrize("kind", list(Kind))
def test_column_converters_give_what_the_value_converters_give(dialect: Any, kind: Kind) -> None:
    sql_type = {Kind.NUMBER: "float8", Kind.TIMESTAMP: "timestamptz"}.get(kind, "")
    column = Column("c", kind, True, sql_type)
    one, whole = dialect.output(column), dialect.output_column(column)
    raw = RAW[kind] + (PG_NUMERIC if kind is Kind.NUMBER and dialect is postgres.DIALECT else [])
    selected = dialect.selected(column)
    rng = random.Random(7)
    for _ in range(300):
        values = tuple(rng.choice(raw) for _ in range(rng.randint(1, 12)))
        pure = tuple(v for v in values if type(v) is type(values[0]))  # one type: the fast passes
        for sample in (values, pure):
            if len(selected) == 2:  # PostgreSQL's timestamps: its text for the years 1000–9999, else the value
                inside = [isinstance(v, datetime.datetime) and v.year >= 1000 and (v.tzinfo is None) == (sql_type == "timestamp") for v in sample]
                inputs: tuple[Any, ...] = (
                    tuple(rfc3339(v) if ok else None for v, ok in zip(sample, inside, strict=True)),
                    tuple(None if ok else v for v, ok in zip(sample, inside, strict=True)),
                )
            else:
                inputs = (sample,)
            try:
                expected = [one(v) for v in sample]
            except Exception as exc:  # the value-by-value path refuses it: so must the column pass
                with pytest.raises(type(exc)):
                    whole(*inputs)
                continue
            converted, types = whole(*inputs)
            assert same(list(converted), expected), sample
            assert types is None or types == set(map(type, converted)), sample


def test_rfc3339_is_utc_microseconds_and_four_digit_years() -> None:
    rng = random.Random(3)
    for _ in range(2000):
        stamp = datetime.datetime(rng.randint(1, 9999), rng.randint(1, 12), rng.randint(1, 28), rng.randint(0, 23),
                                  rng.randint(0, 59), rng.randint(0, 59), rng.choice([0, 1, 999999, rng.randint(0, 999999)]))
        zone = rng.choice([None, UTC, PLUS_TWO])
        if zone is PLUS_TWO and stamp.year == 1:
            continue  # before the first instant a datetime holds, once in UTC
        stamp = stamp.replace(tzinfo=zone)
        utc = stamp.astimezone(UTC).replace(tzinfo=None) if zone else stamp
        assert rfc3339(stamp) == f"{utc.year:04d}" + utc.strftime("-%m-%dT%H:%M:%S.%fZ")


def test_an_sse_event_of_a_page_is_what_server_sent_event_writes() -> None:
    from sse_starlette.sse import ServerSentEvent

    from app.transports.rest import _event

    columns = [[1, 2], ["a\u2028b", "日本\n"], [None, 0.5]]
    fields = ("id", "label", "amount")
    for cursor in ("", "WyIwM2Fi.MzA-yjKVu6Y3aKgcEGwI0g"):
        page = EncodedPage(PageRows(fields, columns, 2), 2, cursor)
        expected = ServerSentEvent(data=page.to_json().decode(), event="message", id=cursor or "7").encode()
        assert _event(page, 7).encode() == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("label_length", [3, 40, 200, 20000])
def test_rows_of_fixed_size_parts_and_strings_encode_as_protobuf_would(label_length: int) -> None:
    """The Reader's common page: numbers, a boolean, timestamps (strings all of one length: packed
    with the numbers) and a string of varying length, rows shorter and longer than 127 bytes
    (their tag and length packed too while every row's take the same bytes)."""
    rng = random.Random(label_length)
    count = 300
    labels = ["é" * rng.randint(0, label_length) if label_length < 100 else "x" * rng.randint(label_length - 80, label_length) for _ in range(count)]
    columns = [
        list(range(count)),
        labels,
        [rng.uniform(-1e6, 1e6) for _ in range(count)],
        [rng.random() < 0.5 for _ in range(count)],
        [f"2026-01-0{i % 9 + 1}T09:00:00.000000Z" for i in range(count)],
        [None] * count,
    ]
    fields = ("id", "label", "amount", "paid", "at", "note")
    expected = reference(fields, columns, count, "cursor")
    page = EncodedPage(PageRows(fields, columns, count), count, "cursor")
    assert r.Page.FromString(page.SerializeToString()) == expected
    assert len(page.SerializeToString()) == expected.ByteSize()
