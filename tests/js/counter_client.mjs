// A browser-style client for the counter room, written from the wire protocol (DESIGN.md §5)
// the way an app using Verani's VeraniClient behaves: plain WebSocket, JSON text frames,
// `{"type": EVENT, "data": PAYLOAD}` out, server frames unwrapped by `data.type`, protocol-level
// `{"type": "ping"}` keepalive answered by `{"type": "pong"}`.
//
// Usage: node --experimental-websocket tests/js/counter_client.mjs ws://127.0.0.1:PORT
// Prints one JSON summary line to stdout and exits 0, or prints "counter_client: FAIL: ..." to
// stderr and exits 1 (a mismatch) or 2 (the overall 15 s timeout).

const OVERALL_TIMEOUT_MS = 15_000;
const STEP_TIMEOUT_MS = 5_000;
const PING_EVERY_MS = 200;
const PING_FOR_MS = 2_000;

let waitingFor = "start";

function fail(message, status = 1) {
  process.stderr.write(`counter_client: FAIL: ${message}\n`);
  process.exit(status);
}

function same(actual, expected) {
  return JSON.stringify(actual) === JSON.stringify(expected);
}

function expectEqual(actual, expected, what) {
  if (!same(actual, expected)) {
    fail(`${what}: expected ${JSON.stringify(expected)}, got ${JSON.stringify(actual)}`);
  }
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

if (typeof WebSocket !== "function") {
  fail("this Node has no built-in WebSocket (run it with --experimental-websocket, Node >= 20)");
}
const base = process.argv[2];
if (!base || !/^wss?:\/\//.test(base)) {
  fail(`usage: counter_client.mjs ws://HOST:PORT (got ${JSON.stringify(base)})`);
}
const overall = setTimeout(
  () => fail(`overall ${OVERALL_TIMEOUT_MS} ms timeout, waiting for ${waitingFor}`, 2),
  OVERALL_TIMEOUT_MS,
);

class Client {
  constructor(userId) {
    this.userId = userId;
    this.log = []; // every application event, [name, data] in arrival order
    this.queues = new Map(); // event name -> events not yet consumed by next()
    this.waiters = new Map(); // event name -> resolve functions of pending next() calls
    this.pongs = 0;
    this.onPong = null;
    this.closing = false;
    this.closeCode = null;
    this.ws = new WebSocket(`${base.replace(/\/+$/, "")}/ws/counter?userId=${userId}`);
    this.opened = new Promise((resolve) => {
      this.ws.addEventListener("open", resolve, { once: true });
    });
    this.closed = new Promise((resolve) => {
      this.ws.addEventListener("close", (ev) => {
        this.closeCode = ev.code;
        if (!this.closing) {
          fail(`${userId} was dropped by the server (close ${ev.code} ${ev.reason || ""})`);
        }
        resolve(ev);
      });
    });
    this.ws.addEventListener("error", () => {
      if (!this.closing) fail(`${userId}: WebSocket error (waiting for ${waitingFor})`);
    });
    this.ws.addEventListener("message", (ev) => this.handle(ev.data));
  }

  // Decode and dispatch one server frame, as VeraniClient's handleWebSocketMessage does.
  handle(raw) {
    if (typeof raw !== "string") fail(`${this.userId}: got a non-text frame`);
    let msg;
    try {
      msg = JSON.parse(raw);
    } catch {
      fail(`${this.userId}: got a frame that is not JSON: ${raw}`);
    }
    if (!msg || typeof msg !== "object" || typeof msg.type !== "string") {
      fail(`${this.userId}: got a frame without a string type: ${raw}`);
    }
    if (msg.type === "pong") {
      this.pongs += 1;
      if (this.onPong) this.onPong();
      return;
    }
    let name = msg.type;
    let data = msg.data;
    if (msg.type === "event" && msg.data && typeof msg.data === "object" && "type" in msg.data) {
      name = msg.data.type;
      data = msg.data;
      // VeraniClient ignores the channel; the counter room only has the default one.
      if (msg.channel !== "default") {
        fail(`${this.userId}: ${name} came on channel ${JSON.stringify(msg.channel)}: ${raw}`);
      }
    } else {
      fail(`${this.userId}: got a frame that is neither an event nor a pong: ${raw}`);
    }
    if (name === "verani:error") fail(`${this.userId}: the server refused a frame: ${raw}`);
    this.log.push([name, data]);
    const waiting = this.waiters.get(name);
    if (waiting && waiting.length) {
      waiting.shift()(data);
    } else {
      if (!this.queues.has(name)) this.queues.set(name, []);
      this.queues.get(name).push(data);
    }
  }

  // The next event `name` this client receives (or has received and not consumed yet).
  next(name) {
    const queued = this.queues.get(name);
    if (queued && queued.length) return Promise.resolve(queued.shift());
    return new Promise((resolve, reject) => {
      const timer = setTimeout(
        () => reject(new Error(`${this.userId}: no ${name} within ${STEP_TIMEOUT_MS} ms`)),
        STEP_TIMEOUT_MS,
      );
      if (!this.waiters.has(name)) this.waiters.set(name, []);
      this.waiters.get(name).push((data) => {
        clearTimeout(timer);
        resolve(data);
      });
    });
  }

  emit(type, data) {
    this.ws.send(JSON.stringify({ type, data }));
  }

  close() {
    this.closing = true;
    this.ws.close(1000, "done");
    return this.closed;
  }
}

// Strip the event name that unwrapping leaves in data, so payloads compare as the room sent them.
function payload(data) {
  const { type, ...rest } = data;
  return rest;
}

async function expectOnBoth(clients, name, expected, what) {
  waitingFor = `${name} (${what})`;
  const got = await Promise.all(clients.map((c) => c.next(name)));
  got.forEach((data, i) => {
    expectEqual(data.type, name, `${clients[i].userId}: data.type of ${what}`);
    expectEqual(payload(data), expected, `${clients[i].userId}: ${what}`);
  });
}

async function main() {
  const alice = new Client("alice");
  const bob = new Client("bob");
  const both = [alice, bob];
  waitingFor = "both sockets to open";
  await Promise.all(both.map((c) => c.opened));

  // A fresh store: each connection is sent the current (initial) count.
  await expectOnBoth(both, "counter:sync", { count: 0, lastUpdatedBy: null }, "sync on connect");

  for (let i = 0; i < 3; i++) alice.emit("counter:increment", { amount: 1 });
  for (let count = 1; count <= 3; count++) {
    await expectOnBoth(both, "counter:update", { count, updatedBy: "alice" }, `increment ${count}`);
  }
  bob.emit("counter:decrement", { amount: 2 });
  await expectOnBoth(both, "counter:update", { count: 1, updatedBy: "bob" }, "decrement");

  // alice resets, so lastUpdatedBy changes from bob (the last to decrement) to alice.
  alice.emit("counter:reset", {});
  await expectOnBoth(both, "counter:reset", { resetBy: "alice" }, "reset");

  // counter:get answers the asker only (a socket-level emit).
  bob.emit("counter:get", {});
  waitingFor = "counter:sync after counter:get";
  const synced = await bob.next("counter:sync");
  expectEqual(payload(synced), { count: 0, lastUpdatedBy: "alice" }, "bob: sync after get");

  // Keepalive, as VeraniClient's KeepaliveManager: protocol pings on a timer, each answered.
  waitingFor = "pongs";
  let pings = 0;
  let maxPongMs = 0;
  const sentAt = [];
  alice.onPong = () => {
    const at = sentAt.shift();
    if (at === undefined) fail("alice: got a pong she did not ping for");
    maxPongMs = Math.max(maxPongMs, Date.now() - at);
  };
  const started = Date.now();
  while (Date.now() - started < PING_FOR_MS) {
    if (alice.ws.readyState !== WebSocket.OPEN) fail("alice's socket is not open while pinging");
    alice.ws.send(JSON.stringify({ type: "ping" }));
    sentAt.push(Date.now());
    pings += 1;
    await sleep(PING_EVERY_MS);
  }
  const lastPing = Date.now();
  while (alice.pongs < pings && Date.now() - lastPing < STEP_TIMEOUT_MS) await sleep(20);
  expectEqual(alice.pongs, pings, "pongs for alice's pings");
  expectEqual(bob.pongs, 0, "pongs bob got without pinging");
  for (const c of both) {
    expectEqual(c.ws.readyState, WebSocket.OPEN, `${c.userId}'s socket after the keepalive`);
  }

  // Nothing else arrived meanwhile: the whole event log of each client, in order.
  const updates = [1, 2, 3].map((count) => ["counter:update", { count, updatedBy: "alice" }]);
  const shared = [
    ["counter:sync", { count: 0, lastUpdatedBy: null }],
    ...updates,
    ["counter:update", { count: 1, updatedBy: "bob" }],
    ["counter:reset", { resetBy: "alice" }],
  ];
  const logOf = (c) => c.log.map(([name, data]) => [name, payload(data)]);
  expectEqual(logOf(alice), shared, "alice's events");
  const bobLog = [...shared, ["counter:sync", { count: 0, lastUpdatedBy: "alice" }]];
  expectEqual(logOf(bob), bobLog, "bob's events");

  waitingFor = "the sockets to close";
  await Promise.all(both.map((c) => c.close()));
  clearTimeout(overall);
  const summary = {
    ok: true,
    events: Object.fromEntries(both.map((c) => [c.userId, c.log.map(([, data]) => data)])),
    final: payload(synced),
    pings,
    pongs: alice.pongs,
    maxPongMs,
    closeCodes: Object.fromEntries(both.map((c) => [c.userId, c.closeCode])),
  };
  process.stdout.write(JSON.stringify(summary) + "\n");
  process.exit(0);
}

main().catch((err) => fail(err && err.message ? err.message : String(err)));
