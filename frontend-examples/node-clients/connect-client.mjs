// Connect-ES clients against a running Prism gateway: `node connect-client.mjs <scenario>`.
//   TRANSPORT=grpc-web  createGrpcWebTransport, HTTP/1.1, BASE_URL = the HTTP port
//   TRANSPORT=grpc      createGrpcTransport, HTTP/2, BASE_URL = the native gRPC port
//   TRANSPORT=connect   createConnectTransport, JSON over HTTP/1.1, BASE_URL = the HTTP port
//   TRANSPORT=connect-proto  the same with binary protobuf
// It imports the code protoc-gen-es generated from proto/ (GEN_DIR, default ./dist; README.md)
// and prints what it observed as one JSON object: tests/test_js_clients.py judges it.
import path from "node:path";
import { pathToFileURL } from "node:url";

import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createConnectTransport, createGrpcTransport, createGrpcWebTransport } from "@connectrpc/connect-node";

const { TRANSPORT = "grpc-web", BASE_URL = "http://127.0.0.1:8080", GEN_DIR = "dist" } = process.env;
const SESSION_HEADER = "x-prism-session";

const load = (file) => import(pathToFileURL(path.resolve(GEN_DIR, file)).href);
const { SessionService } = await load("prism/v1/session_pb.js");
const { KeyValueService } = await load("prism/v1/keyvalue_pb.js");
const { PubSubService } = await load("prism/v1/pubsub_pb.js");
const { BadRequestSchema } = await load("google/rpc/error_details_pb.js");

const transports = {
  grpc: () => createGrpcTransport({ baseUrl: BASE_URL }),
  "grpc-web": () => createGrpcWebTransport({ baseUrl: BASE_URL, httpVersion: "1.1" }),
  connect: () => createConnectTransport({ baseUrl: BASE_URL, httpVersion: "1.1" }),
  "connect-proto": () => createConnectTransport({ baseUrl: BASE_URL, httpVersion: "1.1", useBinaryFormat: true }),
};
const transport = transports[TRANSPORT]();
const sessions = createClient(SessionService, transport);
const kv = createClient(KeyValueService, transport);
const pubsub = createClient(PubSubService, transport);

/** Call options carrying a new session's token. */
async function session(configName) {
  const { token } = await sessions.createSession({ configName });
  if (!token) throw new Error("CreateSession returned no token");
  return { headers: { [SESSION_HEADER]: token }, timeoutMs: 10_000 };
}

/** What a failed call looked like to the client: code, message and decoded details. */
async function failure(call) {
  try {
    await call();
  } catch (error) {
    if (!(error instanceof ConnectError)) throw error;
    return {
      code: Code[error.code],
      message: error.rawMessage,
      detailTypes: error.details.map((detail) => ("type" in detail ? detail.type : detail.desc.typeName)),
      badRequests: error.findDetails(BadRequestSchema).map((detail) => ({
        fieldViolations: detail.fieldViolations.map(({ field, description }) => ({ field, description })),
      })),
    };
  }
  return { code: "OK" };
}

const scenarios = {
  /** CreateSession, then a byte-exact Set/Get round trip. */
  async kv() {
    const call = await session("kv");
    const key = `connect-es/${TRANSPORT}/${process.pid}`;
    const value = new Uint8Array([0, 1, 2, 127, 128, 253, 254, 255]);
    const set = await kv.set({ key, value }, call);
    const got = await kv.get({ key }, call);
    return { key: got.key, value: Array.from(got.value), etag: got.etag, setEtag: set.etag };
  },

  /** Bad input: INVALID_ARGUMENT with a google.rpc.BadRequest naming the field. */
  async invalidArgument() {
    const call = await session("kv");
    return failure(() => kv.get({ key: "" }, call));
  },

  /** A refused call (no session), then an ordinary call from the same client. */
  async refusedThenOk() {
    const refused = await failure(() => kv.get({ key: "k" }, { timeoutMs: 10_000 }));
    const call = await session("kv");
    const after = await failure(() => kv.exists({ key: "k" }, call));
    return { refused, after };
  },

  /** Server streaming: the first response carries the subscription id, then the messages. */
  async pubsub() {
    const call = await session("events");
    const abort = new AbortController();
    const subject = `connect_es.${TRANSPORT.replace("-", "_")}.orders`;
    const stream = pubsub.subscribe({ subject: "connect_es.*.orders" }, { ...call, timeoutMs: 20_000, signal: abort.signal });
    const responses = stream[Symbol.asyncIterator]();
    const first = (await responses.next()).value;
    await pubsub.publish({ subject, data: new TextEncoder().encode("hello"), headers: { from: "connect-es" } }, call);
    const { message } = (await responses.next()).value;
    abort.abort();
    await responses.return?.().catch(() => {});
    return {
      subscriptionId: first.subscriptionId,
      subject: message.subject,
      data: new TextDecoder().decode(message.data),
      headers: message.headers,
    };
  },
};

const name = process.argv[2];
if (!(name in scenarios)) {
  console.error(`usage: node connect-client.mjs <${Object.keys(scenarios).join("|")}>`);
  process.exit(2);
}
console.log(JSON.stringify(await scenarios[name]()));
