"""The one KeyValue read every section measures, and the calls that prepare it.

A session for config ``kv`` (SQLite, the embedded default), one key set beforehand, and its
Get: the same request and the same response bytes on every transport and baseline.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import struct
import urllib.request
from dataclasses import dataclass

import grpc

from prism.v1 import keyvalue_pb2, session_pb2

KEY = "bench-key"
VALUE = hashlib.sha512(b"prism benchmark value").digest() + hashlib.sha256(b"prism").digest()[:36]  # 100 bytes
GET_PATH = "/prism.v1.KeyValueService/Get"
SESSION_HEADER = "x-prism-session"


def grpc_frame(payload: bytes) -> bytes:
    """One length-prefixed gRPC message: flag 0, 4-byte big-endian length, the message."""
    return struct.pack(">BI", 0, len(payload)) + payload


API_KEY_HEADER = "x-api-key"


def _unary(channel: grpc.Channel, path: str, request: bytes, token: str = "", api_key: str = "") -> bytes:
    metadata = ((SESSION_HEADER, token),) if token else ()
    if api_key:
        metadata += ((API_KEY_HEADER, api_key),)
    return channel.unary_unary(path)(request, metadata=metadata, timeout=10)


def create_session(target: str, config_name: str, api_key: str = "") -> str:
    """A session for a named config; with ``api_key``, authenticated by ``x-api-key``."""
    with grpc.insecure_channel(target) as channel:
        raw = _unary(
            channel,
            "/prism.v1.SessionService/CreateSession",
            session_pb2.CreateSessionRequest(config_name=config_name).SerializeToString(),
            api_key=api_key,
        )
    return session_pb2.CreateSessionResponse.FromString(raw).token


@dataclass(frozen=True)
class Prepared:
    token: str
    request: bytes  # serialized GetRequest
    response: bytes  # serialized GetResponse, as the gateway answers it
    json_body: bytes  # the REST answer to GET /v1/kv/<key>

    def write(self, workdir: pathlib.Path) -> dict[str, pathlib.Path]:
        """Body files: h2load's pre-framed gRPC requests and the HTTP baselines' JSON."""
        files = {
            "gateway_grpc": workdir / "get-request.grpc",
            # The echo answers with what it is sent: send it the gateway's response bytes.
            "echo_grpc": workdir / "echo-request.grpc",
            "json": workdir / "get-response.json",
        }
        files["gateway_grpc"].write_bytes(grpc_frame(self.request))
        files["echo_grpc"].write_bytes(grpc_frame(self.response))
        files["json"].write_bytes(self.json_body)
        return files


def prepare(grpc_target: str, http_port: int | None = None, config: str = "kv", api_key: str = "") -> Prepared:
    """Create a session for ``config`` (``kv`` by default), set the key, and check that a real
    client reads it back."""
    token = create_session(grpc_target, config, api_key)
    request = keyvalue_pb2.GetRequest(key=KEY).SerializeToString()
    with grpc.insecure_channel(grpc_target) as channel:
        _unary(channel, "/prism.v1.KeyValueService/Set",
               keyvalue_pb2.SetRequest(key=KEY, value=VALUE).SerializeToString(), token)
        response = _unary(channel, GET_PATH, request, token)
    got = keyvalue_pb2.GetResponse.FromString(response)
    if got.key != KEY or got.value != VALUE:
        raise RuntimeError(f"gateway Get returned {got!r}, expected the value just set")
    json_body = b""
    if http_port is not None:
        json_body = http_get(http_port, f"/v1/kv/{KEY}", token)
        decoded = json.loads(json_body)
        if decoded.get("key") != KEY:
            raise RuntimeError(f"REST Get returned {json_body!r}")
    return Prepared(token, request, response, json_body)


def delete(grpc_target: str, token: str, key: str = KEY) -> None:
    """Remove the benchmark's key through the gateway (the sections clean up after themselves)."""
    with grpc.insecure_channel(grpc_target) as channel:
        _unary(channel, "/prism.v1.KeyValueService/Delete",
               keyvalue_pb2.DeleteRequest(key=key).SerializeToString(), token)


def http_get(port: int, path: str, token: str = "") -> bytes:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={SESSION_HEADER: token} if token else {})
    with urllib.request.urlopen(req, timeout=10) as response:
        if response.status != 200:
            raise RuntimeError(f"GET {path}: HTTP {response.status}")
        return response.read()


def check_grpc(target: str, request: bytes, token: str, expect: bytes) -> None:
    """One real gRPC call (grpc-status checked by the client library) with h2load's exact request."""
    with grpc.insecure_channel(target) as channel:
        try:
            got = _unary(channel, GET_PATH, request, token)
        except grpc.RpcError as exc:
            raise RuntimeError(f"gRPC check against {target} failed: {exc.code()} {exc.details()}") from None
    if got != expect:
        raise RuntimeError(f"gRPC check against {target}: {len(got)} bytes back, expected {len(expect)}")
