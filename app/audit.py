"""The audit log (RFC §8.4): one JSON line per session event and operation — session, identity,
operation, resource, time, outcome — never the values. Lines go through a bounded queue to a
writer thread, so a slow disk never blocks the event loop; if the queue is full the line is
counted as dropped and a warning is logged, rather than stalling requests.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from queue import Full, Queue
from typing import IO, Any

log = logging.getLogger("prism.audit")
_STOP = None


class AuditLog:
    def __init__(self, sink: str | None, capacity: int = 10_000) -> None:
        self.sink = sink
        self.dropped = 0
        self._queue: Queue[str | None] = Queue(maxsize=capacity)
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return self.sink is not None

    def start(self) -> None:
        if self.sink is not None and self._thread is None:
            stream: IO[str] = sys.stderr if self.sink == "-" else open(self.sink, "a", encoding="utf-8")
            self._thread = threading.Thread(target=self._write, args=(stream,), name="audit", daemon=True)
            self._thread.start()

    def _write(self, stream: IO[str]) -> None:
        try:
            while (line := self._queue.get()) is not _STOP:
                stream.write(line)
                while not self._queue.empty():  # flush what is waiting in one go
                    if (line := self._queue.get_nowait()) is _STOP:
                        return
                    stream.write(line)
                stream.flush()
        finally:
            stream.flush()
            if stream is not sys.stderr:
                stream.close()

    def record(self, **fields: Any) -> None:
        if self._thread is None:
            return
        fields.setdefault("time", time.time())
        try:
            self._queue.put_nowait(json.dumps(fields, separators=(",", ":"), ensure_ascii=False) + "\n")
        except Full:
            self.dropped += 1
            if self.dropped in (1, 100, 10_000) or self.dropped % 100_000 == 0:
                log.warning("audit queue full: %d records dropped so far", self.dropped)

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout=5)
            self._thread = None
