"""Call any Prism RPC over native gRPC with JSON in and out, discovering the API through
server reflection — no generated code, like grpcurl.

    python clients/python/grpc_call.py list
    python clients/python/grpc_call.py prism.v1.KeyValueService/Get '{"key": "greeting"}' \\
        -H "x-prism-session: $TOKEN"

Server-streaming RPCs print one JSON line per message until the stream ends (Ctrl-C stops).
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("method", help="'list', or Service/Method, e.g. prism.v1.KeyValueService/Get")
    parser.add_argument("body", nargs="?", default="{}", help="request as JSON (default {})")
    parser.add_argument("--target", default=os.environ.get("GRPC_TARGET", "127.0.0.1:8980"))
    parser.add_argument("-H", "--header", action="append", default=[], help="metadata 'name: value'")
    args = parser.parse_args()

    channel = grpc.insecure_channel(args.target, options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)])
    reflection = ProtoReflectionDescriptorDatabase(channel)
    if args.method == "list":
        print("\n".join(sorted(reflection.get_services())))
        return 0
    service_name, _, method_name = args.method.partition("/")
    pool = descriptor_pool.DescriptorPool(reflection)
    method = pool.FindServiceByName(service_name).FindMethodByName(method_name)
    request_type, response_type = GetMessageClass(method.input_type), GetMessageClass(method.output_type)
    request = json_format.Parse(args.body, request_type())
    metadata = [tuple(part.strip() for part in h.split(":", 1)) for h in args.header]
    path = f"/{service_name}/{method_name}"
    try:
        if method.server_streaming:
            call = channel.unary_stream(path, request_type.SerializeToString, response_type.FromString)
            for response in call(request, metadata=metadata):
                print(json.dumps(json_format.MessageToDict(response)), flush=True)
        else:
            call = channel.unary_unary(path, request_type.SerializeToString, response_type.FromString)
            print(json.dumps(json_format.MessageToDict(call(request, metadata=metadata)), indent=2))
    except grpc.RpcError as exc:
        print(f"{exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
