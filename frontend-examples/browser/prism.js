// A tiny Prism client for the browser: plain fetch, EventSource, no dependencies, no build.
//
//   REST/JSON   createSession, kvSet, kvGet, publish      (JSON bodies, bytes as base64)
//   SSE         subscribe                                 (EventSource, token in the query)
//   gRPC-Web    grpcWebCall, kvGetGrpcWeb                 (5-byte frames, hand-written protobuf)
//
// Every failure is thrown as a PrismError carrying the gateway's status code name
// (NOT_FOUND, UNAUTHENTICATED, ...) and message, whichever transport it came from.

export const SESSION_HEADER = "x-prism-session";
export const SESSION_QUERY = "prism_session";

// gRPC status numbers, in order (https://grpc.github.io/grpc/core/md_doc_statuscodes.html).
export const GRPC_CODES = [
  "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
  "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED",
  "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
];

export class PrismError extends Error {
  // code: a gRPC status name, or NETWORK when no answer could be read at all.
  constructor(code, message, { httpStatus = 0, grpcStatus = null } = {}) {
    super(message);
    this.name = "PrismError";
    this.code = code;
    this.httpStatus = httpStatus;
    this.grpcStatus = grpcStatus;
  }
}

// ---- bytes ---------------------------------------------------------------------------------

const utf8 = new TextEncoder();

export function toBytes(text) {
  return utf8.encode(text);
}

// The bytes as text when they are valid UTF-8, otherwise as "base64:...".
export function showBytes(bytes) {
  try {
    return new TextDecoder("utf-8", { fatal: true }).decode(bytes);
  } catch {
    return "base64:" + bytesToBase64(bytes);
  }
}

export function bytesToBase64(bytes) {
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    binary += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  }
  return btoa(binary);
}

export function base64ToBytes(text) {
  // JSON bytes are standard base64; accept the URL-safe alphabet as well.
  const binary = atob(text.replace(/-/g, "+").replace(/_/g, "/"));
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return bytes;
}

// gRPC-Web-text bodies are base64 chunk by chunk, so padding may sit mid-stream
// ("...AA==gAAA..."): decode each padded run on its own.
export function base64StreamToBytes(text) {
  const runs = text.replace(/\s+/g, "").match(/[^=]+=*/g) ?? [];
  return concat(runs.map(base64ToBytes));
}

function concat(chunks) {
  const out = new Uint8Array(chunks.reduce((n, c) => n + c.length, 0));
  let at = 0;
  for (const chunk of chunks) {
    out.set(chunk, at);
    at += chunk.length;
  }
  return out;
}

// ---- protobuf: just enough for string and bytes fields ---------------------------------------
//
// A message is a run of fields; each is a varint key (field_number << 3 | wire_type) and a
// value. Strings, bytes and nested messages are wire type 2: a varint length, then the bytes.

const WIRE_VARINT = 0;
const WIRE_I64 = 1;
const WIRE_LEN = 2;
const WIRE_I32 = 5;

export function encodeVarint(value) {
  if (!Number.isSafeInteger(value) || value < 0) throw new RangeError(`varint out of range: ${value}`);
  const out = [];
  while (value > 0x7f) {
    out.push((value % 0x80) | 0x80);
    value = Math.floor(value / 0x80);
  }
  out.push(value);
  return Uint8Array.from(out);
}

function decodeVarint(bytes, at) {
  let value = 0;
  let scale = 1;
  for (;;) {
    if (at >= bytes.length) throw new PrismError("INTERNAL", "protobuf: truncated varint");
    const byte = bytes[at++];
    value += (byte & 0x7f) * scale;
    if (byte < 0x80) return [value, at];
    scale *= 0x80;
    if (scale > 2 ** 63) throw new PrismError("INTERNAL", "protobuf: varint too long");
  }
}

// fields: [[fieldNumber, string | Uint8Array], ...]. Proto3 leaves empty values off the wire.
export function encodeMessage(fields) {
  const chunks = [];
  for (const [number, value] of fields) {
    const bytes = typeof value === "string" ? utf8.encode(value) : value;
    if (bytes.length === 0) continue;
    chunks.push(encodeVarint(number * 8 + WIRE_LEN), encodeVarint(bytes.length), bytes);
  }
  return concat(chunks);
}

// Returns a Map of fieldNumber → Uint8Array for every length-delimited field (the last
// occurrence wins, as protobuf says for singular fields). Other wire types are skipped.
export function decodeMessage(bytes) {
  const fields = new Map();
  let at = 0;
  while (at < bytes.length) {
    let key;
    [key, at] = decodeVarint(bytes, at);
    const number = Math.floor(key / 8);
    const wire = key % 8;
    if (wire === WIRE_VARINT) {
      [, at] = decodeVarint(bytes, at);
    } else if (wire === WIRE_I64) {
      at += 8;
    } else if (wire === WIRE_I32) {
      at += 4;
    } else if (wire === WIRE_LEN) {
      let length;
      [length, at] = decodeVarint(bytes, at);
      if (at + length > bytes.length) throw new PrismError("INTERNAL", "protobuf: truncated field");
      fields.set(number, bytes.subarray(at, at + length));
      at += length;
    } else {
      throw new PrismError("INTERNAL", `protobuf: unsupported wire type ${wire}`);
    }
    if (at > bytes.length) throw new PrismError("INTERNAL", "protobuf: truncated field");
  }
  return fields;
}

// ---- gRPC-Web framing ------------------------------------------------------------------------
//
// Body = frames of [flag: 1 byte][length: 4 bytes big-endian][payload]. Flag 0x00 is a message,
// 0x80 the trailers ("grpc-status:0\r\ngrpc-message:\r\n"). The -text variant is base64 of that.

const TRAILER_FLAG = 0x80;

export function frame(payload) {
  const out = new Uint8Array(5 + payload.length);
  new DataView(out.buffer).setUint32(1, payload.length);
  out.set(payload, 5);
  return out;
}

export function parseFrames(body) {
  const messages = [];
  const trailers = {};
  const view = new DataView(body.buffer, body.byteOffset, body.byteLength);
  let at = 0;
  while (at < body.length) {
    if (at + 5 > body.length) throw new PrismError("INTERNAL", "gRPC-Web: truncated frame header");
    const flag = body[at];
    const length = view.getUint32(at + 1);
    const payload = body.subarray(at + 5, at + 5 + length);
    if (payload.length !== length) throw new PrismError("INTERNAL", "gRPC-Web: truncated frame");
    at += 5 + length;
    if (flag & TRAILER_FLAG) {
      for (const line of new TextDecoder().decode(payload).split("\r\n")) {
        const colon = line.indexOf(":");
        if (colon > 0) trailers[line.slice(0, colon).trim().toLowerCase()] = line.slice(colon + 1).trim();
      }
    } else {
      messages.push(payload);
    }
  }
  return { messages, trailers };
}

function grpcMessage(raw) {
  try {
    return decodeURIComponent(raw ?? "");
  } catch {
    return raw ?? "";
  }
}

// ---- the client ------------------------------------------------------------------------------

export class PrismClient {
  constructor(baseUrl) {
    this.baseUrl = baseUrl.replace(/\/+$/, "");
  }

  // REST/JSON: one call, the gateway's {"code","message"} error body turned into a PrismError.
  async rest(verb, path, { token, body } = {}) {
    const headers = {};
    if (token) headers[SESSION_HEADER] = token;
    if (body !== undefined) headers["content-type"] = "application/json";
    let response;
    try {
      response = await fetch(this.baseUrl + path, {
        method: verb,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
      });
    } catch (err) {
      // fetch tells a refused connection and a CORS refusal apart only in the console.
      throw new PrismError("NETWORK", `${err.message} (gateway down, wrong URL, or CORS refused)`);
    }
    const text = await response.text();
    let json = null;
    try {
      json = text ? JSON.parse(text) : {};
    } catch {
      // Not JSON: reported below with the HTTP status.
    }
    if (!response.ok) {
      throw new PrismError(json?.code ?? `HTTP_${response.status}`, json?.message ?? text, {
        httpStatus: response.status,
      });
    }
    if (json === null) throw new PrismError("INTERNAL", `not JSON: ${text.slice(0, 100)}`);
    return json;
  }

  // → {token, session}
  createSession(configName) {
    return this.rest("POST", "/v1/sessions", { body: { configName } });
  }

  // → {etag}
  kvSet(token, key, valueBytes) {
    return this.rest("PUT", `/v1/kv/${keyPath(key)}`, { token, body: { value: bytesToBase64(valueBytes) } });
  }

  // → {key, value: Uint8Array, etag}
  async kvGet(token, key) {
    const got = await this.rest("GET", `/v1/kv/${keyPath(key)}`, { token });
    return { ...got, value: base64ToBytes(got.value ?? "") };
  }

  // → {messageId}
  publish(token, subject, dataBytes) {
    return this.rest("POST", `/v1/subjects/${encodeURIComponent(subject)}:publish`, {
      token,
      body: { data: bytesToBase64(dataBytes) },
    });
  }

  // Server-sent events. An EventSource cannot send headers, so the token rides in the query.
  // handlers: onLive(subscriptionId), onMessage({subject, data: Uint8Array, messageId,
  // publishedAt}), onEnd(), onError(PrismError). Returns the EventSource; close() to stop.
  subscribe(token, pattern, { onLive, onMessage, onEnd, onError }) {
    const url =
      `${this.baseUrl}/v1/subjects/${encodeURIComponent(pattern)}:subscribe` +
      `?${SESSION_QUERY}=${encodeURIComponent(token)}`;
    const source = new EventSource(url);
    source.addEventListener("message", (event) => {
      const response = JSON.parse(event.data);
      if (!response.message) {
        onLive?.(response.subscriptionId);
        return;
      }
      const m = response.message;
      onMessage?.({ ...m, data: base64ToBytes(m.data ?? "") });
    });
    // The stream ended cleanly (e.g. unsubscribed). Close, or EventSource would reconnect.
    source.addEventListener("end", () => {
      source.close();
      onEnd?.();
    });
    // Two kinds arrive here: the gateway's own `event: error` (a MessageEvent with a JSON
    // body) and EventSource's connection errors (a plain Event, no detail by design).
    source.addEventListener("error", (event) => {
      if (typeof event.data === "string") {
        source.close();
        const body = JSON.parse(event.data);
        onError?.(new PrismError(body.code, body.message));
      } else if (source.readyState === EventSource.CLOSED) {
        onError?.(
          new PrismError("NETWORK", "subscription refused or gateway unreachable (EventSource hides the HTTP status)"),
        );
      }
      // readyState CONNECTING: the browser is reconnecting by itself.
    });
    return source;
  }

  // gRPC-Web unary call. requestBytes: an encoded protobuf message. text: use
  // application/grpc-web-text (base64 body) instead of binary. → response message bytes.
  async grpcWebCall(path, requestBytes, { token, text = false } = {}) {
    const contentType = text ? "application/grpc-web-text" : "application/grpc-web+proto";
    const headers = { "content-type": contentType, accept: contentType, "x-grpc-web": "1" };
    if (token) headers[SESSION_HEADER] = token;
    const framed = frame(requestBytes);
    let response;
    try {
      response = await fetch(this.baseUrl + path, {
        method: "POST",
        headers,
        body: text ? bytesToBase64(framed) : framed,
      });
    } catch (err) {
      throw new PrismError("NETWORK", `${err.message} (gateway down, wrong URL, or CORS refused)`);
    }
    let body = new Uint8Array(await response.arrayBuffer());
    if (text) body = base64StreamToBytes(new TextDecoder().decode(body));
    if (!response.ok) {
      throw new PrismError(`HTTP_${response.status}`, new TextDecoder().decode(body).slice(0, 200), {
        httpStatus: response.status,
      });
    }
    const { messages, trailers } = parseFrames(body);
    // A call that fails before any message may be "trailers-only": the status then comes in
    // the HTTP headers (readable cross-origin only if CORS exposes them), not in the body.
    // Prism answers an early failure that way, so the headers are the fallback.
    const rawStatus = trailers["grpc-status"] ?? response.headers.get("grpc-status");
    const rawMessage = trailers["grpc-message"] ?? response.headers.get("grpc-message");
    if (rawStatus === null || rawStatus === undefined) {
      throw new PrismError("INTERNAL", "gRPC-Web: no grpc-status in trailers or headers (is it exposed by CORS?)");
    }
    const status = Number(rawStatus);
    if (status !== 0) {
      throw new PrismError(GRPC_CODES[status] ?? `STATUS_${status}`, grpcMessage(rawMessage), {
        httpStatus: response.status,
        grpcStatus: status,
      });
    }
    if (messages.length !== 1) throw new PrismError("INTERNAL", `gRPC-Web: expected 1 message, got ${messages.length}`);
    return { message: messages[0], grpcStatus: status };
  }

  // KeyValueService.Get over gRPC-Web. GetRequest {1: key}; GetResponse {1: key, 2: value,
  // 3: etag, 4: ttl_remaining (a Duration, not decoded here)}.
  async kvGetGrpcWeb(token, key, { text = false } = {}) {
    const { message, grpcStatus } = await this.grpcWebCall(
      "/prism.v1.KeyValueService/Get",
      encodeMessage([[1, key]]),
      { token, text },
    );
    const fields = decodeMessage(message);
    const decoder = new TextDecoder();
    return {
      key: decoder.decode(fields.get(1) ?? new Uint8Array()),
      value: fields.get(2) ?? new Uint8Array(),
      etag: decoder.decode(fields.get(3) ?? new Uint8Array()),
      grpcStatus,
    };
  }
}

// Keys may hold "/": the route is /v1/kv/{key=**}, so escape each segment, keep the slashes.
function keyPath(key) {
  return key.split("/").map(encodeURIComponent).join("/");
}
