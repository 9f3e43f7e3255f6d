"""Call any Prism RPC over native gRPC with JSON in and out, discovering the API through
server reflection — no generated code, like grpcurl.

    python clients/python/grpc_call.py list
    python clients/python/grpc_call.py prism.v1.KeyValueService/Get '{"key": "greeting"}' \\
        -H "x-prism-session: $TOKEN"

Server-streaming RPCs print one JSON line per message until the stream ends (Ctrl-C stops).
Exit status: 0 done, 1 the call failed (its status code and message are printed), 2 bad usage
(a body that is not JSON or not the request message, an unknown method).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import grpc
from google.protobuf import descriptor_pool, json_format
from google.protobuf.message_factory import GetMessageClass
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase


def fail(message: str, status: int = 2) -> int:
    print(f"grpc_call.py: {message}", file=sys.stderr)
    return status


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("method", help="'list', or Service/Method, e.g. prism.v1.KeyValueService/Get")
    parser.add_argument("body", nargs="?", default="{}", help="request as JSON (default {})")
    parser.add_argument("--target", default=os.environ.get("GRPC_TARGET", "127.0.0.1:8980"))
    parser.add_argument("-H", "--header", action="append", default=[], help="metadata 'name: value'")
    args = parser.parse_args()

    # Usage errors exit 2 with one line, before any network call where possible.
    try:
        body = json.loads(args.body)
    except json.JSONDecodeError as exc:
        return fail(f"the request body is not valid JSON: {exc}")
    if not isinstance(body, dict):
        return fail(f"the request body must be a JSON object, not {type(body).__name__}")
    service_name, _, method_name = args.method.partition("/")
    if args.method != "list" and not (service_name and method_name):
        return fail(f"{args.method!r}: expected 'list' or Service/Method, e.g. prism.v1.KeyValueService/Get")
    headers = [h.split(":", 1) for h in args.header]
    if any(len(h) != 2 for h in headers):
        return fail("a header must be 'name: value'")
    metadata = [(name.strip().lower(), value.strip()) for name, value in headers]

    channel = grpc.insecure_channel(args.target, options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)])
    reflection = ProtoReflectionDescriptorDatabase(channel)
    try:
        if args.method == "list":
            print("\n".join(sorted(reflection.get_services())))
            return 0
        pool = descriptor_pool.DescriptorPool(reflection)
        try:
            method = pool.FindServiceByName(service_name).FindMethodByName(method_name)
        except KeyError:
            return fail(f"{args.method}: no such method on {args.target} (try 'list')")
        request_type, response_type = GetMessageClass(method.input_type), GetMessageClass(method.output_type)
        try:
            request = json_format.ParseDict(body, request_type())
        except json_format.ParseError as exc:
            return fail(f"the request body is not a {method.input_type.full_name}: {' '.join(str(exc).split())}")
        path = f"/{service_name}/{method_name}"
        if method.server_streaming:
            call = channel.unary_stream(path, request_type.SerializeToString, response_type.FromString)
            for response in call(request, metadata=metadata):
                print(json.dumps(json_format.MessageToDict(response)), flush=True)
        else:
            call = channel.unary_unary(path, request_type.SerializeToString, response_type.FromString)
            print(json.dumps(json_format.MessageToDict(call(request, metadata=metadata)), indent=2))
    except grpc.RpcError as exc:
        return fail(f"{exc.code().name}: {exc.details()}", 1)
    except KeyboardInterrupt:
        return 130
    return 0

if __name__ == "__main__":
    sys.exit(main())
