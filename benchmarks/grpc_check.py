"""Count gRPC statuses the way h2load cannot: h2load reads the HTTP status only, and a gRPC error
is HTTP 200 with ``grpc-status`` in the trailers. This client sends h2load's exact request (the
same pre-framed body and headers) ``calls`` times over one h2c connection with up to ``streams``
in flight, reads every response's trailers, and counts what came back.

    ok                  :status 200, one frame holding exactly the expected message, grpc-status 0
    grpc-status N       any other status (a trailers-only error included), with its grpc-message
    wrong body, http N, no grpc-status, reset   everything else

Blocking socket and the ``h2`` library (Hypercorn's own HTTP/2 stack, in the locked environment).
"""

from __future__ import annotations

import socket
import struct
from collections import Counter
from typing import Any

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import DataReceived, ResponseReceived, StreamEnded, StreamReset, TrailersReceived


def _classify(stream: dict[str, Any], expect: bytes) -> str:
    fields = {**stream["headers"], **stream["trailers"]}  # a trailers-only answer has it in the headers
    if fields.get(":status") != "200":
        return f"http {fields.get(':status')}"
    status = fields.get("grpc-status")
    if status is None:
        return "no grpc-status"
    if status != "0":
        return f"grpc-status {status}: {fields.get('grpc-message', '')}"[:200]
    if bytes(stream["data"]) != struct.pack(">BI", 0, len(expect)) + expect:
        return f"wrong body ({len(stream['data'])} bytes)"
    return "ok"


def check(
    port: int, path: str, frame: bytes, headers: list[tuple[str, str]], expect: bytes, *,
    calls: int = 1000, streams: int = 64, host: str = "127.0.0.1", timeout: float = 30,
) -> dict[str, Any]:
    """``calls`` unary calls; the counts by outcome (all ``ok`` when the target answers right)."""
    conn = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
    request = [(":method", "POST"), (":scheme", "http"), (":authority", f"{host}:{port}"), (":path", path),
               ("content-type", "application/grpc"), ("te", "trailers"), *headers]
    outcomes: Counter[str] = Counter()
    open_streams: dict[int, dict[str, Any]] = {}
    sent = 0
    with socket.create_connection((host, port), timeout=timeout) as sock:
        conn.initiate_connection()
        sock.sendall(conn.data_to_send())
        while sent < calls or open_streams:
            limit = min(streams, conn.remote_settings.max_concurrent_streams)
            while sent < calls and len(open_streams) < limit:
                stream_id = conn.get_next_available_stream_id()
                conn.send_headers(stream_id, request)
                conn.send_data(stream_id, frame, end_stream=True)
                open_streams[stream_id] = {"headers": {}, "trailers": {}, "data": bytearray()}
                sent += 1
            sock.sendall(conn.data_to_send())
            data = sock.recv(65536)
            if not data:
                raise ConnectionError(f"127.0.0.1:{port} closed the connection after {sum(outcomes.values())} answers")
            for event in conn.receive_data(data):
                stream = open_streams.get(getattr(event, "stream_id", 0))
                if stream is None:
                    continue
                if isinstance(event, ResponseReceived):
                    stream["headers"] = dict(event.headers)
                elif isinstance(event, TrailersReceived):
                    stream["trailers"] = dict(event.headers)
                elif isinstance(event, DataReceived):
                    stream["data"] += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, StreamEnded):
                    outcomes[_classify(open_streams.pop(event.stream_id), expect)] += 1
                elif isinstance(event, StreamReset):
                    open_streams.pop(event.stream_id)
                    outcomes[f"reset ({event.error_code!r})"] += 1
            sock.sendall(conn.data_to_send())
        conn.close_connection()
        sock.sendall(conn.data_to_send())
    return {"calls": calls, "ok": outcomes.pop("ok", 0), "not_ok": dict(outcomes)}
