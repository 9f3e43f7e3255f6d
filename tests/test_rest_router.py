"""Every REST route of the contract is reached by a path built from its own template, and the
segment index never hides a route: what the router matches is what the proto declares."""

from __future__ import annotations

import re
import urllib.parse

import pytest

from app.methods import all_methods
from app.transports.rest import RestRouter
from prism.errors import PrismError

ROUTER = RestRouter(all_methods(), None, 1 << 20, 15.0)  # type: ignore[arg-type]  # matching needs no pipeline


def sample_path(template: str) -> tuple[str, dict[str, str]]:
    """The template with every variable filled in, and the values expected back."""
    values: dict[str, str] = {}

    def fill(found: re.Match[str]) -> str:
        name, _, pattern = found.group(1).partition("=")
        values[name] = "a/b c" if pattern == "**" else "x-1"
        return values[name].replace(" ", "%20")

    return re.sub(r"\{([^}]+)\}", fill, template), values


@pytest.mark.parametrize("method", ROUTER.routes, ids=lambda m: f"{m.http.verb} {m.http.template}")
def test_each_route_is_matched_by_its_template(method) -> None:
    path, values = sample_path(method.http.template)
    matched, params = ROUTER.match(method.http.verb, path)
    assert matched is method
    # Path parameters come back still percent-encoded: decoding them belongs to reading the request.
    assert {k: urllib.parse.unquote(v) for k, v in params.items()} == values


@pytest.mark.parametrize("verb", ["GET", "PUT", "DELETE"])
def test_a_verb_route_is_not_a_one_segment_variable(verb: str) -> None:
    """"/v1/topics/x:publish" is the publish route (POST), never GetTopicInfo of "x:publish"."""
    with pytest.raises(PrismError) as refused:
        ROUTER.match(verb, "/v1/topics/x:publish")
    assert refused.value.http_status == 405 and refused.value.allowed == ["POST"]
    method, params = ROUTER.match("GET", "/v1/topics/orders")
    assert method.name == "GetTopicInfo" and params == {"topic": "orders"}
