// The load generator's ceiling: the counter protocol served by a few lines of Node on raw TCP
// (V8, no framework, no persistence, every frame of a burst in one write). Whatever the load
// generator reaches against it is what the load generator itself can do on this machine.
//
// Usage: node tests/bench/trivial_server.mjs [PORT]; prints "LISTENING <port>".
// Handles only what the load generator sends: small, unfragmented, masked text frames.

import { createHash } from "node:crypto";
import { createServer } from "node:net";

const GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
const rooms = new Map(); // instance -> { count, sockets: Set }

function textFrame(text) {
  const payload = Buffer.from(text);
  const n = payload.length;
  const head = n < 126 ? Buffer.from([0x81, n]) : Buffer.from([0x81, 126, n >> 8, n & 255]);
  return Buffer.concat([head, payload]);
}

function event(data) {
  return textFrame(JSON.stringify({ type: "event", channel: "default", data }));
}

const server = createServer((sock) => {
  sock.setNoDelay(true);
  let buf = Buffer.alloc(0);
  let room = null;
  let user = "anonymous";
  sock.on("data", (chunk) => {
    buf = buf.length ? Buffer.concat([buf, chunk]) : chunk;
    if (room === null) {
      const end = buf.indexOf("\r\n\r\n");
      if (end < 0) return;
      const head = buf.subarray(0, end).toString("latin1");
      buf = buf.subarray(end + 4);
      const [, target] = head.split("\r\n")[0].split(" ");
      const url = new URL(target, "http://x");
      user = url.searchParams.get("userId") || "anonymous";
      const name = url.pathname.replace(/^\/ws\/counter\/?/, "") || "default";
      if (!rooms.has(name)) rooms.set(name, { count: 0, sockets: new Set() });
      room = rooms.get(name);
      room.sockets.add(sock);
      const key = /sec-websocket-key:\s*(\S+)/i.exec(head)[1];
      const accept = createHash("sha1").update(key + GUID).digest("base64");
      sock.write(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
          `Sec-WebSocket-Accept: ${accept}\r\n\r\n`,
      );
      sock.write(event({ type: "counter:sync", count: room.count }));
    }
    const out = new Map();
    while (buf.length >= 6) {
      const opcode = buf[0] & 15;
      let len = buf[1] & 127;
      let off = 2;
      if (len === 126) {
        len = buf.readUInt16BE(2);
        off = 4;
      }
      if (buf.length < off + 4 + len) break;
      const mask = buf.subarray(off, off + 4);
      const payload = Buffer.from(buf.subarray(off + 4, off + 4 + len));
      for (let i = 0; i < len; i++) payload[i] ^= mask[i & 3];
      buf = buf.subarray(off + 4 + len);
      if (opcode === 8) {
        sock.end(Buffer.from([0x88, 0]));
        continue;
      }
      const msg = JSON.parse(payload.toString());
      if (msg.type === "counter:increment") {
        room.count += 1;
        const frame = event({ type: "counter:update", count: room.count, updatedBy: user });
        for (const other of room.sockets) {
          if (!out.has(other)) out.set(other, []);
          out.get(other).push(frame);
        }
      }
    }
    for (const [other, frames] of out) other.write(Buffer.concat(frames));
  });
  const drop = () => room && room.sockets.delete(sock);
  sock.on("close", drop);
  sock.on("error", drop);
});

server.listen(Number(process.argv[2] || 0), "127.0.0.1", () => {
  process.stdout.write(`LISTENING ${server.address().port}\n`);
});
