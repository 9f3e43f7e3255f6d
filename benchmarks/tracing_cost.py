"""The cost of tracing per request (issue 15), by ``variants.py``: two gateways from the same
server configuration, tracing off (the default: the pipeline takes no span) and tracing on,
every call sampled, spans exported to an in-process exporter that drops them (``exporter:
discard``): the server span, its step spans and the batching processor, without a collector's
network cost.
"""

from __future__ import annotations

from typing import Any

from benchmarks import variants
from benchmarks.context import Context

TITLE = "Cost of tracing: every call traced (spans made and dropped in process) vs tracing off"


def run(ctx: Context) -> dict[str, Any]:
    work = ctx.subdir("tracing-configs")
    traced = {**variants.base_config(), "tracing": {"exporter": "discard", "sample_ratio": 1.0}}
    configs = {
        "off": variants.write(work / "prism-off.yaml", variants.base_config()),
        "on": variants.write(work / "prism-on.yaml", traced),
    }
    return {"title": TITLE, "rows": variants.measure(ctx, "tracing", configs, "off"), "namespace": variants.NAMESPACE}
