"""deploy/grafana/prism.json reads only metrics the gateway exports (app/metrics.py and the
families beside it), with the label names they carry: a renamed metric fails here, not on an
operator's empty panel."""

from __future__ import annotations

import json
import re

from prometheus_client import REGISTRY

import adapters.queue.base  # noqa: F401
import app.health
import app.pipeline
import app.services.read_cache  # noqa: F401
from tests.gateway_process import ROOT

SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}


def exported() -> dict[str, set[str]]:
    """Sample name → its label names, for every prism family."""
    names: dict[str, set[str]] = {}
    for family in REGISTRY.collect():
        if not family.name.startswith("prism_"):
            continue
        labels = set(getattr(REGISTRY._names_to_collectors.get(family.name + "_total") or REGISTRY._names_to_collectors.get(family.name), "_labelnames", ()))
        for suffix in SUFFIXES.get(family.type, ("",)):
            names[family.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return names


def test_every_panel_queries_exported_metrics_and_labels() -> None:
    dashboard = json.loads((ROOT / "deploy/grafana/prism.json").read_text())
    known = exported()
    assert dashboard["panels"]
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            expr = target["expr"]
            metrics = set(re.findall(r"\b(prism_[a-z_]+)\b", expr))
            assert metrics, (panel["title"], expr)
            for metric in metrics:
                assert metric in known, f"{panel['title']}: {metric} is not exported"
            grouped = {label.strip() for group in re.findall(r"by \(([^)]*)\)", expr) for label in group.split(",")}
            selected = set(re.findall(r"([a-z_]+)\s*[=!]~?\"", expr))
            for label in grouped | selected:
                assert any(label in known[m] for m in metrics), f"{panel['title']}: no label {label!r} on {metrics}"
