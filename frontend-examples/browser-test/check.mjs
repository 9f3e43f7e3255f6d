// Drives frontend-examples/browser/index.html in headless Debian Chromium against a running
// gateway and checks (a) REST/JSON KeyValue, (b) gRPC-Web Get, (c) SSE subscribe + publish.
//
//   PAGE_URL=http://127.0.0.1:5173/ GATEWAY_URL=http://127.0.0.1:8080 node check.mjs
//
// Serve the page from a different origin than the gateway so that CORS is exercised.
// Exits 1 with the reason (and the browser console's errors) when a check fails.

import { chromium } from "playwright-core";

const PAGE_URL = process.env.PAGE_URL ?? "http://127.0.0.1:5173/";
const GATEWAY_URL = process.env.GATEWAY_URL ?? "http://127.0.0.1:8080";
const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";
const TIMEOUT_MS = Number(process.env.CHECK_TIMEOUT_MS ?? 10_000);

const CHROMIUM_ARGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
  "--no-first-run",
];

class CheckFailed extends Error {}

function expect(condition, message) {
  if (!condition) throw new CheckFailed(message);
}

// Clicks a button and waits until its output element holds a final "ok: …" / "error: …".
async function clickFor(page, button, output) {
  await page.locator(output).evaluate((el) => (el.textContent = ""));
  await page.click(button);
  await page.waitForFunction(
    (sel) => /^(ok|error):/.test(document.querySelector(sel).textContent),
    output,
    { timeout: TIMEOUT_MS },
  );
  return (await page.locator(output).textContent()).trim();
}

async function checkRest(page, key, value) {
  await page.fill("#kv-key", key);
  await page.fill("#kv-value", value);
  const session = await clickFor(page, "#kv-session", "#kv-session-result");
  expect(session.startsWith("ok: session "), `#kv-session-result: expected "ok: session …", got ${JSON.stringify(session)}`);

  const set = await clickFor(page, "#kv-set", "#kv-set-result");
  expect(/^ok: etag \S+$/.test(set), `#kv-set-result: expected "ok: etag …", got ${JSON.stringify(set)}`);

  const got = await clickFor(page, "#kv-get", "#kv-result");
  expect(got === `ok: ${value}`, `#kv-result: expected ${JSON.stringify(`ok: ${value}`)}, got ${JSON.stringify(got)}`);

  await page.fill("#kv-key", `${key}-missing`);
  const missing = await clickFor(page, "#kv-get", "#kv-result");
  expect(missing.startsWith("error: NOT_FOUND "), `#kv-result for a missing key: expected "error: NOT_FOUND …", got ${JSON.stringify(missing)}`);
  await page.fill("#kv-key", key);
}

async function checkGrpcWeb(page, key, value) {
  const status = () => page.locator("#grpcweb-status").textContent();
  await page.selectOption("#grpcweb-format", "binary");
  await page.fill("#grpcweb-key", key);
  const got = await clickFor(page, "#grpcweb-get", "#grpcweb-result");
  expect(got === `ok: ${value}`, `#grpcweb-result (binary): expected ${JSON.stringify(`ok: ${value}`)}, got ${JSON.stringify(got)}`);
  expect((await status()) === "grpc-status: 0 OK", `#grpcweb-status: expected "grpc-status: 0 OK", got ${JSON.stringify(await status())}`);

  // A failure before any message: the gateway sends grpc-status both as HTTP headers
  // (exposed by CORS) and as a trailer frame in the body; the page must report it either way.
  await page.fill("#grpcweb-key", `${key}-missing`);
  const missing = await clickFor(page, "#grpcweb-get", "#grpcweb-result");
  expect(missing.startsWith("error: NOT_FOUND "), `#grpcweb-result for a missing key: expected "error: NOT_FOUND …", got ${JSON.stringify(missing)}`);
  expect((await status()) === "grpc-status: 5 NOT_FOUND", `#grpcweb-status: expected "grpc-status: 5 NOT_FOUND", got ${JSON.stringify(await status())}`);

  await page.selectOption("#grpcweb-format", "text");
  await page.fill("#grpcweb-key", key);
  const text = await clickFor(page, "#grpcweb-get", "#grpcweb-result");
  expect(text === `ok: ${value}`, `#grpcweb-result (grpc-web-text): expected ${JSON.stringify(`ok: ${value}`)}, got ${JSON.stringify(text)}`);
  await page.selectOption("#grpcweb-format", "binary");
}

async function checkEvents(page, stamp) {
  await page.fill("#events-pattern", "demo.*");
  const live = await clickFor(page, "#events-subscribe", "#events-status");
  expect(live.startsWith("ok: subscribed "), `#events-status: expected "ok: subscribed …", got ${JSON.stringify(live)}`);

  // `*` is one token: demo.deep.nested must not arrive, demo.hello must. Published in that
  // order, so by the time demo.hello shows, a wrong delivery would already be listed.
  for (const [subject, data] of [["demo.deep.nested", `nested ${stamp}`], ["demo.hello", `hi ${stamp}`]]) {
    await page.fill("#events-subject", subject);
    await page.fill("#events-data", data);
    const published = await clickFor(page, "#events-publish", "#events-publish-result");
    expect(published.startsWith("ok: published "), `#events-publish-result for ${subject}: expected "ok: published …", got ${JSON.stringify(published)}`);
  }
  const expected = `demo.hello: hi ${stamp}`;
  try {
    await page.waitForFunction(
      (text) => [...document.querySelectorAll("#events li")].some((li) => li.textContent === text),
      expected,
      { timeout: TIMEOUT_MS },
    );
  } catch {
    throw new CheckFailed(`#events: ${JSON.stringify(expected)} never arrived; list: ${JSON.stringify(await page.locator("#events li").allTextContents())}`);
  }
  const items = await page.locator("#events li").allTextContents();
  expect(items.length === 1 && items[0] === expected, `#events: expected exactly [${JSON.stringify(expected)}], got ${JSON.stringify(items)}`);
  const status = await page.locator("#events-status").textContent();
  expect(status.startsWith("ok: subscribed "), `#events-status after publishing: expected the subscription still live, got ${JSON.stringify(status)}`);
  await page.click("#events-close");
}

async function main() {
  if (new URL(PAGE_URL).origin === new URL(GATEWAY_URL).origin) {
    console.warn(`warning: page and gateway share the origin ${new URL(PAGE_URL).origin}; CORS is not exercised`);
  }
  const browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: CHROMIUM_ARGS });
  const consoleErrors = [];
  let passed = 0;
  let failed = 0;
  try {
    const page = await browser.newPage();
    page.on("console", (msg) => msg.type() === "error" && consoleErrors.push(msg.text()));
    page.on("pageerror", (err) => consoleErrors.push(`page error: ${err.message}`));
    page.on("requestfailed", (req) => consoleErrors.push(`request failed: ${req.method()} ${req.url()}: ${req.failure()?.errorText}`));

    const response = await page.goto(PAGE_URL, { timeout: TIMEOUT_MS });
    if (!response?.ok()) throw new Error(`could not load ${PAGE_URL}: HTTP ${response?.status()}`);
    await page.fill("#gateway-url", GATEWAY_URL);

    const stamp = `${Date.now()}`;
    const key = `browser-check/${stamp}`;
    const value = `héllo ✓ ${stamp}`;
    const checks = [
      ["(a) KeyValue over REST/JSON", () => checkRest(page, key, value)],
      ["(b) KeyValue Get over gRPC-Web", () => checkGrpcWeb(page, key, value)],
      ["(c) PubSub over SSE + REST", () => checkEvents(page, stamp)],
    ];
    for (const [name, run] of checks) {
      const seen = consoleErrors.length;
      try {
        await run();
        passed++;
        console.log(`ok   ${name}`);
      } catch (err) {
        failed++;
        console.log(`FAIL ${name}: ${err instanceof CheckFailed ? err.message : err.stack ?? err}`);
        for (const line of consoleErrors.slice(seen)) console.log(`     browser: ${line}`);
      }
    }
  } finally {
    await browser.close();
  }
  console.log(`browser check: ${passed} passed, ${failed} failed`);
  return failed === 0 ? 0 : 1;
}

main().then(
  (code) => process.exit(code),
  (err) => {
    console.error(`browser check: could not run: ${err.stack ?? err}`);
    process.exit(1);
  },
);
