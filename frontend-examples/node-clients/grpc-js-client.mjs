// A @grpc/grpc-js client against a running Prism gateway's native gRPC port, with the
// service definitions loaded at run time by @grpc/proto-loader from proto/ alone (no
// generated code): `node grpc-js-client.mjs <scenario>`, GRPC_TARGET=host:port.
// Prints what it observed as one JSON object: tests/test_js_clients.py judges it.
import path from "node:path";
import { fileURLToPath } from "node:url";

import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";

const { GRPC_TARGET = "127.0.0.1:8980" } = process.env;
const PROTO_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../proto");
const SESSION_HEADER = "x-prism-session";

const definition = await protoLoader.load(["prism/v1/session.proto", "prism/v1/keyvalue.proto", "prism/v1/pubsub.proto", "prism/v1/transact.proto"], {
  includeDirs: [PROTO_ROOT],
  keepCase: false,
  longs: String,
  defaults: true,
});
const { prism } = grpc.loadPackageDefinition(definition);
const credentials = grpc.credentials.createInsecure();
const sessions = new prism.v1.SessionService(GRPC_TARGET, credentials);
const kv = new prism.v1.KeyValueService(GRPC_TARGET, credentials);
const pubsub = new prism.v1.PubSubService(GRPC_TARGET, credentials);
const transact = new prism.v1.TransactService(GRPC_TARGET, credentials);

const deadline = () => ({ deadline: Date.now() + 10_000 });

/** A unary call as a promise: grpc-js clients take callbacks. */
function unary(client, method, request, metadata = new grpc.Metadata()) {
  return new Promise((resolve, reject) => {
    client[method](request, metadata, deadline(), (error, response) => (error ? reject(error) : resolve(response)));
  });
}

async function session(configName) {
  const { token } = await unary(sessions, "createSession", { configName });
  const metadata = new grpc.Metadata();
  metadata.set(SESSION_HEADER, token);
  return metadata;
}

/** One step of a bidirectional stream: write a request, read its answer. */
async function step(call, responses, request) {
  call.write(request);
  const { value, done } = await responses.next();
  if (done) throw new Error(`the stream ended after ${JSON.stringify(request)}`);
  return value;
}

const scenarios = {
  /** CreateSession, Set, Get, and an empty key refused with INVALID_ARGUMENT. */
  async unary() {
    const metadata = await session("kv");
    const key = `grpc-js/${process.pid}`;
    await unary(kv, "set", { key, value: Buffer.from([0, 1, 254, 255]) }, metadata);
    const got = await unary(kv, "get", { key }, metadata);
    const refused = await unary(kv, "get", { key: "" }, metadata).then(
      () => ({ code: "OK" }),
      (error) => ({
        code: grpc.status[error.code],
        message: error.details,
        hasStatusDetails: error.metadata.get("grpc-status-details-bin").length > 0,
      }),
    );
    return { key: got.key, value: Array.from(got.value), etag: got.etag, refused };
  },

  /** Bidirectional streaming: one Transaction committed (Begin, a row, a mailbox row,
   *  Commit), one rolled back, each answer read before the next request is sent. */
  async transaction() {
    const metadata = await session("transact");
    const id = `grpc-js-${process.pid}-${Date.now()}`;
    const row = (status) => ({ fields: { id: { stringValue: id }, customer: { stringValue: "grpc-js" }, status: { stringValue: status } } });
    const committed = transact.transaction(metadata, deadline());
    let responses = committed[Symbol.asyncIterator]();
    const begun = await step(committed, responses, { begin: { timeoutMs: 5000 } });
    const written = await step(committed, responses, { data: { table: "orders", operation: "WRITE_OPERATION_INSERT", row: row("new") } });
    const mailed = await step(committed, responses, { mailbox: { mailbox: "orders", payload: Buffer.from(id) } });
    const done = await step(committed, responses, { commit: {} });
    committed.end();

    const rolled = transact.transaction(metadata, deadline());
    responses = rolled[Symbol.asyncIterator]();
    await step(rolled, responses, { begin: {} });
    const updated = await step(rolled, responses, { data: { table: "orders", operation: "WRITE_OPERATION_UPDATE", row: row("changed") } });
    const rolledBack = await step(rolled, responses, { rollback: {} });
    rolled.end();
    return {
      transactionId: begun.transactionId,
      rowsAffected: Number(written.rowsAffected),
      mailboxSequence: Number(mailed.mailboxSequence),
      committed: Boolean(done.committedAt),
      updatedRows: Number(updated.rowsAffected),
      rolledBack: rolledBack.rolledBack,
    };
  },

  /** Client streaming: PublishStream of three messages (each delivered to a subscriber),
   *  then a stream whose second message has a wildcard subject, refused by its place. */
  async publishStream() {
    const metadata = await session("events");
    const call = pubsub.subscribe({ subject: "grpc_js.stream.*" }, metadata);
    const deliveries = call[Symbol.asyncIterator]();
    await deliveries.next(); // live
    const publishStream = (messages) =>
      new Promise((resolve) => {
        const stream = pubsub.publishStream(metadata, deadline(), (error, response) =>
          resolve(error ? { code: grpc.status[error.code], message: error.details } : response),
        );
        for (const message of messages) stream.write(message);
        stream.end();
      });
    const sent = await publishStream(["a", "b", "c"].map((n) => ({ subject: `grpc_js.stream.${n}`, data: Buffer.from(n) })));
    const received = [];
    for (let i = 0; i < 3; i++) received.push((await deliveries.next()).value.message.subject);
    const refused = await publishStream([
      { subject: "grpc_js.stream.d", data: Buffer.from("d") },
      { subject: "grpc_js.stream.*", data: Buffer.from("e") },
    ]);
    const after = (await deliveries.next()).value.message.subject; // what came before the refusal
    call.on("error", () => {});
    call.cancel();
    return { published: Number(sent.published), lastMessageId: sent.lastMessageId, received, refused, after };
  },

  /** Server streaming: Subscribe, Publish, read the delivery, cancel. */
  async subscribe() {
    const metadata = await session("events");
    const call = pubsub.subscribe({ subject: "grpc_js.>" }, metadata);
    const responses = call[Symbol.asyncIterator]();
    const first = (await responses.next()).value;
    await unary(pubsub, "publish", { subject: "grpc_js.orders.eu", data: Buffer.from("hello") }, metadata);
    const { message } = (await responses.next()).value;
    call.on("error", () => {}); // the CANCELLED status that cancel() causes
    call.cancel();
    return { subscriptionId: first.subscriptionId, subject: message.subject, data: message.data.toString() };
  },
};

const name = process.argv[2];
if (!(name in scenarios)) {
  console.error(`usage: node grpc-js-client.mjs <${Object.keys(scenarios).join("|")}>`);
  process.exit(2);
}
try {
  console.log(JSON.stringify(await scenarios[name]()));
} finally {
  for (const client of [sessions, kv, pubsub, transact]) client.close();
}
