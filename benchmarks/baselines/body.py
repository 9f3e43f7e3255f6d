"""The JSON body the HTTP baselines answer with: the gateway's own KeyValue Get response,
saved by the benchmark runner in the file named by ``BENCH_BODY_FILE``."""

from __future__ import annotations

import os
import pathlib


def load() -> bytes:
    path = os.environ.get("BENCH_BODY_FILE")
    if not path:
        raise RuntimeError("BENCH_BODY_FILE is not set: the runner writes the gateway's Get response there")
    return pathlib.Path(path).read_bytes()
