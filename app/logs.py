"""Process logs: JSON lines for machines, or text for a terminal (``--log-format``).

A JSON line carries time (UTC, RFC 3339), level, logger and message, and — when the line is
written while a call is being served — the call's session id and identity, which the pipeline
binds for the call's task (:func:`bind_call`), and the trace and span ids of the current
OpenTelemetry span when there is one. The audit log is a separate stream (``app/audit.py``).

``prism serve`` configures its own process and exports ``PRISM_LOG_FORMAT`` and
``PRISM_LOG_LEVEL``; every worker process configures itself from them when it imports the app.
"""

from __future__ import annotations

import contextvars
import datetime
import json
import logging
import os
import sys
from typing import Any

FORMATS = ("json", "text")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# (session id, identity) of the call the current task serves.
_CALL: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar("prism_call", default=None)


def bind_call(session_id: str, identity: str) -> None:
    """Name the call being served in every line logged from this task from now on."""
    _CALL.set((session_id, identity))


def default_format() -> str:
    """Text for a person at a terminal, JSON lines anywhere else."""
    return "text" if sys.stderr.isatty() else "json"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if (call := _CALL.get()) is not None:
            line["session_id"], line["identity"] = call
        line.update(_trace_ids())
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def _trace_ids() -> dict[str, str]:
    trace = sys.modules.get("opentelemetry.trace")  # only when tracing is in use
    if trace is None:
        return {}
    context = trace.get_current_span().get_span_context()  # type: ignore[attr-defined]
    if not context.is_valid:
        return {}
    return {"trace_id": f"{context.trace_id:032x}", "span_id": f"{context.span_id:016x}"}


def configure(level: str, log_format: str) -> None:
    """Replace the root logger's handlers with one on stderr in ``log_format``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def configure_from_environment() -> None:
    """In a worker process: as ``prism serve`` was told (nothing when run another way)."""
    log_format = os.environ.get("PRISM_LOG_FORMAT")
    if log_format in FORMATS:
        configure(os.environ.get("PRISM_LOG_LEVEL", "info"), log_format)
