"""A bare grpc.aio server: one generic unary handler that answers every method with the
request bytes unchanged. Same process model as the gateway's gRPC port: one process, uvloop,
no serializer on either side (the gateway's handlers also take and return bytes).

    python -m benchmarks.baselines.grpc_echo --port 50051
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import grpc
import uvloop


async def _echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return request


class EchoEverything(grpc.GenericRpcHandler):
    """Any path is the echo method, so the gateway's own path and body work unchanged."""

    handler = grpc.unary_unary_rpc_method_handler(_echo)

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        return self.handler


async def serve(host: str, port: int) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((EchoEverything(),))
    server.add_insecure_port(f"{host}:{port}")
    await server.start()
    print(f"grpc echo on {host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvloop.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
