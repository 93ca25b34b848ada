// The benchmark load generator: runs in its own process, so the server under test never shares
// an event loop with its clients. Node (V8, no dependency) with a minimal WebSocket client costs
// the client side far less per message than a Python client would; the harness reports this
// process's CPU time next to every figure, and measures its ceiling against a trivial server
// (tests/bench/trivial_server.mjs).
//
// Usage: node tests/bench/loadgen.mjs '{"mode": ..., ...}'
// Prints one JSON line with the results (modes "idle" and "revive" talk over stdin/stdout).
//
// Protocols: "verani" (DESIGN.md §5; also the naive baselines) and "socketio" (Engine.IO 4 over
// a WebSocket, Socket.IO 5 packets: the python-socketio baseline).

import { randomBytes } from "node:crypto";
import { connect as connectTcp } from "node:net";
import { createInterface } from "node:readline";

const args = JSON.parse(process.argv[2]);
const now = () => performance.now();

// A minimal RFC 6455 client on a raw TCP socket: masked frames out (a random key per frame),
// server frames parsed straight from the stream buffer. Node's built-in WebSocket (undici)
// spends several times more CPU per message, which made the load generator, not the server,
// the bottleneck of the first runs.
class Conn {
  // One client: connects, answers protocol pings, hands events to onEvent(name, data).
  constructor(userId, instance, onEvent, serverUrl = args.url) {
    this.userId = userId;
    this.onEvent = onEvent;
    this.url = serverUrl;
    this.instance = instance;
    this.ready = new Promise((resolve, reject) => {
      this._ready = resolve;
      this._fail = reject;
    });
    this.closed = new Promise((resolve) => (this._closed = resolve));
    const q = `userId=${encodeURIComponent(userId)}`;
    const target =
      args.protocol === "socketio"
        ? `/socket.io/?EIO=4&transport=websocket&${q}&room=${encodeURIComponent(instance)}`
        : `${args.path}/${encodeURIComponent(instance)}?${q}`;
    const url = new URL(serverUrl);
    this.open = false;
    this.buf = Buffer.alloc(0);
    this.parts = [];
    this.sock = connectTcp({ host: url.hostname, port: Number(url.port) }, () => {
      const key = randomBytes(16).toString("base64");
      this.sock.write(
        `GET ${target} HTTP/1.1\r\nHost: ${url.host}\r\nUpgrade: websocket\r\n` +
          `Connection: Upgrade\r\nSec-WebSocket-Key: ${key}\r\nSec-WebSocket-Version: 13\r\n\r\n`,
      );
    });
    this.sock.setNoDelay(true);
    this.sock.on("data", (chunk) => this._data(chunk));
    this.sock.on("error", (err) => {
      if (!this.closing) this._fail(new Error(`${userId}: ${err.message}`));
    });
    this.sock.on("close", () => {
      this._closed();
      if (!this.closing) this._fail(new Error(`connection of ${userId} closed`));
    });
  }

  _data(chunk) {
    this.buf = this.buf.length ? Buffer.concat([this.buf, chunk]) : chunk;
    if (!this.open) {
      const end = this.buf.indexOf("\r\n\r\n");
      if (end < 0) return;
      const status = this.buf.subarray(0, 12).toString("latin1");
      if (!status.startsWith("HTTP/1.1 101")) {
        return this._fail(new Error(`${this.userId}: upgrade refused: ${status}`));
      }
      this.open = true;
      this.buf = this.buf.subarray(end + 4);
    }
    let buf = this.buf;
    while (buf.length >= 2) {
      const fin = buf[0] & 0x80;
      const opcode = buf[0] & 15;
      let len = buf[1] & 127;
      let off = 2;
      if (len === 126) {
        if (buf.length < 4) break;
        len = buf.readUInt16BE(2);
        off = 4;
      } else if (len === 127) {
        if (buf.length < 10) break;
        len = Number(buf.readBigUInt64BE(2));
        off = 10;
      }
      if (buf.length < off + len) break;
      const payload = buf.subarray(off, off + len);
      buf = buf.subarray(off + len);
      if (opcode === 9) {
        this._send(0xa, payload);
      } else if (opcode === 8) {
        if (!this.closing) this._fail(new Error(`${this.userId}: server closed`));
        this.sock.end();
      } else if (opcode === 1 || opcode === 0) {
        this.parts.push(payload);
        if (fin) {
          const text = Buffer.concat(this.parts).toString();
          this.parts = [];
          this._message(text);
        }
      }
    }
    this.buf = buf;
  }

  _send(opcode, payload) {
    const n = payload.length;
    const head = n < 126 ? 2 : 4;
    const frame = Buffer.allocUnsafe(head + 4 + n);
    frame[0] = 0x80 | opcode;
    if (n < 126) frame[1] = 0x80 | n;
    else {
      frame[1] = 0x80 | 126;
      frame.writeUInt16BE(n, 2);
    }
    const mask = randomBytes(4);
    mask.copy(frame, head);
    for (let i = 0; i < n; i++) frame[head + 4 + i] = payload[i] ^ mask[i & 3];
    this.sock.write(frame);
  }

  send(text) {
    this._send(1, Buffer.from(text));
  }

  _message(text) {
    if (args.protocol === "socketio") {
      // Engine.IO: 0 open, 2 ping, 4 message; Socket.IO inside: 0 connect, 2 event.
      const kind = text[0];
      if (kind === "2") return this.send("3");
      if (kind === "0") return this.send("40");
      if (kind !== "4") return;
      if (text[1] === "2") {
        const [name, data] = JSON.parse(text.slice(2));
        return this._event(name, data);
      }
      // Connected to the namespace: ask for the count (the server's answer is counter:sync).
      if (text[1] === "0") this.send('42["counter:get",{}]');
      return;
    }
    const frame = JSON.parse(text);
    if (frame.type === "event") this._event(frame.data.type, frame.data);
  }

  _event(name, data) {
    if (name === "counter:sync") this._ready(data);
    this.onEvent(name, data);
  }

  increment() {
    this.send(
      args.protocol === "socketio"
        ? '42["counter:increment",{}]'
        : '{"type":"counter:increment","data":{}}',
    );
  }

  close() {
    this.closing = true;
    if (this.open) this._send(8, Buffer.from([0x03, 0xe8]));
    this.sock.end();
  }
}

function pct(samples, p) {
  if (!samples.length) return null;
  const sorted = Float64Array.from(samples).sort();
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];
}

function latency(samples) {
  return { p50_ms: pct(samples, 50), p99_ms: pct(samples, 99), n: samples.length };
}

function urlFor(j) {
  // With `urls` (several servers, e.g. the nodes of a cluster), client j goes to
  // urls[(j + url_offset) % urls.length]; otherwise to `url`.
  if (!args.urls) return args.url;
  return args.urls[(j + (args.url_offset ?? 0)) % args.urls.length];
}

async function openAll(n, instance, onEvent, prefix = "u") {
  // Opens in batches so a connect storm does not overflow the listen backlog. `instance` is a
  // name, or a function of the client's index giving its instance's name.
  const conns = [];
  for (let i = 0; i < n; i += 100) {
    const batch = [];
    for (let j = i; j < Math.min(n, i + 100); j++) {
      const name = typeof instance === "function" ? instance(j) : instance;
      const c = new Conn(`${prefix}${j}`, name, (event, data) => onEvent(c, event, data), urlFor(j));
      batch.push(c);
    }
    await Promise.all(batch.map((c) => c.ready));
    conns.push(...batch);
  }
  return conns;
}

function measure(fn) {
  return async () => {
    const cpu0 = process.cpuUsage();
    const t0 = now();
    const result = await fn();
    const elapsed = (now() - t0) / 1000;
    const cpu = process.cpuUsage(cpu0);
    return { ...result, elapsed_s: elapsed, loadgen_cpu_s: (cpu.user + cpu.system) / 1e6 };
  };
}

async function rtt() {
  let waiting = null;
  const [c] = await openAll(1, args.instance, (conn, name, data) => {
    if (name === "counter:update" && data.updatedBy === conn.userId && waiting) waiting();
  });
  const one = () =>
    new Promise((resolve) => {
      waiting = resolve;
      c.increment();
    });
  for (let i = 0; i < args.warmup; i++) await one();
  const samples = [];
  const result = await measure(async () => {
    for (let i = 0; i < args.count; i++) {
      const t = now();
      await one();
      samples.push(now() - t);
    }
    return {};
  })();
  c.close();
  return { ops: args.count, ops_per_s: args.count / result.elapsed_s, ...latency(samples), ...result };
}

async function pipeline() {
  // Every client keeps `depth` increments outstanding until it has sent `count`; every update
  // (the room broadcasts each to all its clients) counts as a delivery.
  let deliveries = 0;
  let finished = 0;
  let done;
  const allDone = new Promise((resolve) => (done = resolve));
  const samples = [];
  const state = new Map();
  const conns = await openAll(args.clients, args.instance, (conn, name, data) => {
    if (name !== "counter:update") return;
    deliveries++;
    if (data.updatedBy !== conn.userId) return;
    const s = state.get(conn);
    if (!s) return;
    samples.push(now() - s.sentAt.shift());
    s.received++;
    if (s.sent < args.count) {
      s.sentAt.push(now());
      s.sent++;
      conn.increment();
    } else if (s.received === args.count) {
      if (++finished === conns.length) done();
    }
  });
  const result = await measure(async () => {
    for (const c of conns) {
      const s = { sent: 0, received: 0, sentAt: [] };
      state.set(c, s);
      for (let i = 0; i < args.depth && s.sent < args.count; i++) {
        s.sentAt.push(now());
        s.sent++;
        c.increment();
      }
    }
    await allDone;
    return {};
  })();
  for (const c of conns) c.close();
  const increments = args.clients * args.count;
  return {
    increments,
    deliveries,
    increments_per_s: increments / result.elapsed_s,
    deliveries_per_s: deliveries / result.elapsed_s,
    ...latency(samples),
    ...result,
  };
}

async function fanout() {
  // `clients` receivers and one sender on one instance; the sender sends `count` increments back
  // to back; each delivery's latency is its receipt time minus its increment's send time.
  let base = null;
  const sentAt = [];
  const samples = [];
  let got = 0;
  let done;
  const allDone = new Promise((resolve) => (done = resolve));
  const total = args.clients * args.count;
  const onEvent = (conn, name, data) => {
    if (name !== "counter:update" || base === null || conn.role !== "receiver") return;
    const t = sentAt[data.count - base - 1];
    if (t !== undefined) samples.push(now() - t);
    if (++got === total) done();
  };
  const receivers = await openAll(args.clients, args.instance, onEvent, "r");
  for (const r of receivers) r.role = "receiver";
  const [sender] = await openAll(1, args.instance, onEvent, "sender");
  const sync = await sender.ready;
  base = sync.count;
  const result = await measure(async () => {
    for (let i = 0; i < args.count; i++) {
      sentAt.push(now());
      sender.increment();
    }
    await allDone;
    return {};
  })();
  for (const c of [...receivers, sender]) c.close();
  return {
    deliveries: got,
    deliveries_per_s: got / result.elapsed_s,
    ...latency(samples),
    ...result,
  };
}

async function multiroom() {
  // One client on each of `rooms` instances (`${instance}0` ... `${instance}${rooms - 1}`), each
  // doing increment -> its own counter:update -> next, all at once, for `warmup_s` seconds
  // unmeasured and then `duration_s` measured: ops/s over all rooms, reply p50/p99.
  const pending = new Map();
  const conns = await openAll(
    args.rooms,
    (j) => `${args.instance}${j}`,
    (conn, name, data) => {
      if (name === "counter:update" && data.updatedBy === conn.userId) pending.get(conn)?.();
    },
  );
  let recording = false;
  let stopping = false;
  let ops = 0;
  const samples = [];
  diagnose = () => {
    // On a timeout: the clients still waiting for their own counter:update.
    const stuck = conns.filter((c) => pending.has(c)).map((c) => `${c.userId}@${c.url}/${c.instance}`);
    return { stopping, waiting: stuck.length, clients: stuck.slice(0, 20) };
  };
  const loop = async (c) => {
    while (!stopping) {
      const t = now();
      await new Promise((resolve) => {
        pending.set(c, resolve);
        c.increment();
      });
      pending.delete(c);
      if (recording) {
        ops++;
        samples.push(now() - t);
      }
    }
  };
  const loops = conns.map(loop);
  await new Promise((resolve) => setTimeout(resolve, args.warmup_s * 1000));
  const result = await measure(async () => {
    recording = true;
    await new Promise((resolve) => setTimeout(resolve, args.duration_s * 1000));
    recording = false;
    return {};
  })();
  stopping = true;
  await Promise.all(loops);
  for (const c of conns) c.close();
  return { rooms: args.rooms, ops, ops_per_s: ops / result.elapsed_s, ...latency(samples), ...result };
}

async function broadcast() {
  // `clients` receivers and one sender on one instance; one broadcast at a time: the sender
  // sends an increment, every receiver gets the room's counter:update, then the next. After
  // `warmup_s` seconds unmeasured, `duration_s` measured: broadcasts/s, and send -> last
  // receipt p50/p99.
  let expected = null;
  let got = 0;
  let allGot = null;
  const onEvent = (conn, name, data) => {
    if (name !== "counter:update" || conn.role !== "receiver" || expected === null) return;
    if (data.count !== expected) {
      throw new Error(`${conn.userId}: count ${data.count}, expected ${expected}`);
    }
    if (++got === args.clients) allGot();
  };
  const receivers = await openAll(args.clients, args.instance, onEvent, "r");
  for (const r of receivers) r.role = "receiver";
  const [sender] = await openAll(1, args.instance, onEvent, "sender");
  let count = (await sender.ready).count;
  const one = () =>
    new Promise((resolve) => {
      got = 0;
      allGot = resolve;
      expected = ++count;
      sender.increment();
    });
  const warmupEnd = now() + args.warmup_s * 1000;
  while (now() < warmupEnd) await one();
  const samples = [];
  const result = await measure(async () => {
    const end = now() + args.duration_s * 1000;
    while (now() < end) {
      const t = now();
      await one();
      samples.push(now() - t);
    }
    return {};
  })();
  for (const c of [...receivers, sender]) c.close();
  return {
    clients: args.clients,
    broadcasts: samples.length,
    broadcasts_per_s: samples.length / result.elapsed_s,
    ...latency(samples),
    ...result,
  };
}

async function connect() {
  const result = await measure(async () => {
    const conns = [];
    const started = [];
    // All at once, as a reconnect storm after a deploy would.
    for (let i = 0; i < args.clients; i++) {
      conns.push(new Conn(`c${i}`, args.instance, () => {}));
      started.push(now());
    }
    await Promise.all(conns.map((c) => c.ready));
    return { conns };
  })();
  for (const c of result.conns) c.close();
  delete result.conns;
  return { connections: args.clients, ...result };
}

async function lines(onLine) {
  const rl = createInterface({ input: process.stdin });
  for await (const line of rl) {
    const reply = await onLine(line.trim());
    process.stdout.write(`${JSON.stringify(reply)}\n`);
  }
}

async function idle() {
  // Opens `clients` connections (spread over `instances` instances), says READY, holds them
  // until stdin closes.
  const conns = [];
  for (let k = 0; k < args.instances; k++) {
    const n = Math.ceil(args.clients / args.instances);
    conns.push(...(await openAll(n, `${args.instance}-${k}`, () => {}, `i${k}-`)));
  }
  process.stdout.write(`${JSON.stringify({ ready: conns.length })}\n`);
  await lines(async () => ({ ok: true }));
  for (const c of conns) c.close();
  return null;
}

async function rooms() {
  // Touches `count` distinct instances (connect, first sync, close), `batch` at a time.
  const result = await measure(async () => {
    for (let i = 0; i < args.count; i += args.batch) {
      const batch = [];
      for (let j = i; j < Math.min(args.count, i + args.batch); j++) {
        batch.push(new Conn("m", `${args.instance}-${j}`, () => {}));
      }
      await Promise.all(batch.map((c) => c.ready));
      for (const c of batch) c.close();
    }
    return {};
  })();
  return { rooms: args.count, ...result };
}

async function revive() {
  // Each stdin line: connect to the instance, time the first counter:sync, close.
  await lines(async () => {
    const t = now();
    const c = new Conn("rv", args.instance, () => {});
    await c.ready;
    const ms = now() - t;
    c.close();
    await c.closed;
    return { ms };
  });
  return null;
}

async function duo() {
  // One client per entry of `clients` ([{url, instance}], user ids d0, d1, ...), all connected
  // at once. Each stdin line "I N": client I does N sequential round trips (increment -> its own
  // counter:update -> next); the reply has every round trip's milliseconds.
  let waiting = null;
  const conns = [];
  for (const [j, spec] of args.clients.entries()) {
    const c = new Conn(`d${j}`, spec.instance, (name, data) => {
      if (name === "counter:update" && data.updatedBy === c.userId && waiting) waiting();
    }, spec.url);
    await c.ready;
    conns.push(c);
  }
  process.stdout.write(`${JSON.stringify({ ready: conns.length })}\n`);
  await lines(async (line) => {
    const [i, n] = line.split(/\s+/).map(Number);
    const c = conns[i];
    const samples = [];
    for (let k = 0; k < n; k++) {
      const t = now();
      await new Promise((resolve) => {
        waiting = resolve;
        c.increment();
      });
      samples.push(now() - t);
    }
    return { samples };
  });
  for (const c of conns) c.close();
  return null;
}

const modes = { rtt, pipeline, fanout, multiroom, broadcast, connect, idle, rooms, revive, duo };
// A mode may set this to say, on a timeout, what it was waiting for.
let diagnose = () => null;
const timer = setTimeout(() => {
  const what = JSON.stringify(diagnose());
  process.stderr.write(`loadgen: ${args.mode} timed out after ${args.timeout_s ?? 300} s: ${what}\n`);
  process.exit(3);
}, (args.timeout_s ?? 300) * 1000);
try {
  const out = await modes[args.mode]();
  if (out !== null) process.stdout.write(`${JSON.stringify(out)}\n`);
  clearTimeout(timer);
  process.exit(0);
} catch (err) {
  process.stderr.write(`loadgen: ${args.mode}: ${err.stack || err}\n`);
  process.exit(1);
}
