// A client that stays quiet: it connects to the counter room, sends nothing for QUIET_MS while
// the server pings it (WebSocket Ping frames, which Node's WebSocket answers by itself, as
// browsers do), then increments and expects its update. A server that took the quiet client for
// a dead one would have closed it (1011) before that.
//
// Usage: node --experimental-websocket tests/js/quiet_client.mjs ws://HOST:PORT QUIET_MS
// Prints one JSON line ({"ok": true, "count": N}) and exits 0, or prints
// "quiet_client: FAIL: ..." to stderr and exits 1.

const [base, quietArg] = process.argv.slice(2);
const QUIET_MS = Number(quietArg);

function fail(message) {
  process.stderr.write(`quiet_client: FAIL: ${message}\n`);
  process.exit(1);
}

setTimeout(() => fail("timed out"), QUIET_MS + 10_000);

const ws = new WebSocket(`${base}/ws/counter?userId=quiet`);
let quietOver = false;
ws.addEventListener("close", (event) => {
  if (!quietOver) fail(`closed by the server while quiet: ${event.code} ${event.reason}`);
});
ws.addEventListener("error", () => fail("socket error"));
ws.addEventListener("message", (message) => {
  const frame = JSON.parse(message.data);
  if (frame.type !== "event") return;
  if (frame.data.type === "counter:sync") {
    setTimeout(() => {
      quietOver = true;
      ws.send(JSON.stringify({ type: "counter:increment", data: { amount: 1 } }));
    }, QUIET_MS);
  } else if (frame.data.type === "counter:update") {
    process.stdout.write(`${JSON.stringify({ ok: true, count: frame.data.count })}\n`);
    ws.close(1000);
    process.exit(0);
  }
});
