"""Continuation cursors (app/services/cursors.py): client input, so fuzzed as well as checked."""

from __future__ import annotations

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.services.cursors import Cursors
from prism.errors import PrismError

KEY = b"k" * 32


def test_a_cursor_round_trips_within_its_scope_and_query() -> None:
    cursors = Cursors(KEY)
    token = cursors.issue("ns", {"scan": "a/"}, "a/last")
    assert cursors.redeem(token, "ns", {"scan": "a/"}) == "a/last"
    assert Cursors(KEY).redeem(token, "ns", {"scan": "a/"}) == "a/last"  # any worker sharing the key


@pytest.mark.parametrize(
    ("scope", "query", "fragment"),
    [
        ("other-ns", {"scan": "a/"}, "not a cursor this gateway issued"),
        ("ns", {"scan": "b/"}, "belongs to another query"),
        ("ns", {"filter": "x", "sort": ["id"]}, "belongs to another query"),
    ],
)
def test_a_cursor_is_refused_elsewhere(scope: str, query: dict, fragment: str) -> None:
    cursors = Cursors(KEY)
    token = cursors.issue("ns", {"scan": "a/"}, "a/last")
    with pytest.raises(PrismError) as refused:
        cursors.redeem(token, scope, query)
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT and fragment in refused.value.message
    assert refused.value.field == "pageToken"


def test_altered_foreign_and_expired_cursors_are_refused() -> None:
    now = [1000.0]
    cursors = Cursors(KEY, ttl_seconds=60, clock=lambda: now[0])
    token = cursors.issue("ns", {"q": 1}, 5)
    payload, signature = token.split(".")
    for forged in (payload[:-1] + ("A" if payload[-1] != "A" else "B") + "." + signature, Cursors(b"x" * 32).issue("ns", {"q": 1}, 5)):
        with pytest.raises(PrismError, match="not a cursor this gateway issued"):
            cursors.redeem(forged, "ns", {"q": 1})
    now[0] += 61
    with pytest.raises(PrismError, match="has expired"):
        cursors.redeem(token, "ns", {"q": 1})


@settings(max_examples=500, derandomize=True, deadline=None)
@given(st.one_of(st.text(), st.text(alphabet="ABCabc0123-_.=", max_size=80)))
def test_any_string_is_a_cursor_or_invalid_argument(token: str) -> None:
    try:
        Cursors(KEY).redeem(token, "ns", {"scan": ""})
    except PrismError as refused:
        assert refused.code == grpc.StatusCode.INVALID_ARGUMENT
