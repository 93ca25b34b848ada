"""Hostile clients against a real server: what a flood costs the others, what a slow reader costs
memory (run by hand; never collected by pytest).

    python -m tests.bench.hostile [--quick] [--scenario flood|slow|all]

Run from the repository root. Every server is ``verani serve ... --durability os`` in its own
process, started by the harness of ``tests/bench/run.py`` (``Server``: CPU seconds and VmRSS
from ``/proc``); every client talks raw RFC 6455 over 127.0.0.1 (frames built by
``tests.helpers.frame``), so it may break the protocol on purpose.

Scenarios:

- ``flood``: a victim client in this process connects to ``/ws/counter`` and sends
  ``{"type":"ping"}`` every ~10 ms, timing each ping → ``{"type":"pong"}`` round trip. Meanwhile
  0, 1 or 4 attacker processes connect to the same room and write floods of 10,000 frames per
  write, reconnecting at once whenever the server closes them: (a) ``pong``, unsolicited empty
  Pong frames; (b) ``fragments``, one message never finished (an empty first fragment, then
  empty continuations). Run against a server with its default caps (100 control frames/s,
  1,024 fragments: an attacker is closed with 1008 almost at once, so it mostly costs
  handshakes) and one with the caps lifted (``lifted``: never closed, so only the reader's
  fairness — it yields every 256 frames — protects the victim). Per run: victim p50/p99/max,
  attacker reconnects and the close codes they read after being cut off, the bytes per second
  their writes got into the kernel (read by the server or not), the server's CPU seconds and
  the lines it logged. ``attackers=0`` is the baseline of the same run; ``4 (elsewhere)``
  aims the four attackers at a second server, so the victim's figure shows what sharing two
  cores costs without any unfairness in its own server.
- ``slow``: ``rooms/notifications.py``; K sockets (1, 4) of user ``victim`` (``?userId=victim``)
  connect with a 4 KiB receive buffer and never read, while a sender sends ``notify`` events
  ``{to: "victim", body}`` of 100 KB, then 1 MB, waiting for each ``notify:sent``. Server RSS is
  read before, every 100 ms during (the peak), and 2 s after the victims are closed; the victims
  then read what they were sent, to see how the server ended them (1008: a Close frame; 1006:
  the stream ended without one; ``open``: nothing more came for 1 s and the socket is still
  open). Once with the default outbound budget (``max_outbound_bytes``, 4 MiB per socket) and
  once with it lifted (``--max-outbound-bytes 1099511627776``: only the 1,024-frame queue limit
  is left, as before the byte budget existed). ``bound`` is what the limits allow: budget *
  sockets, or 1,024 frames * frame size * sockets when the budget is lifted. A last run has its
  victim read only after the server's ``close_timeout``; one more notify, sent then, shows
  whether the room still counts the victim (``delivered``: first→last→that one).

Prints a table per scenario, then one JSON line per scenario. Everything is bounded in count and
time; ``--quick`` (a smoke run, under a minute) shortens the windows and drops some variants.
The machine has 2 shared, noisy cores: compare figures with the baseline of the same run.
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing
import os
import selectors
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import orjson
from tests.bench.run import ROOT, Server, serving
from tests.bench.run import latency as run_latency
from tests.helpers import CONTINUATION, TEXT, frame, upgrade_request

from verani.server import ServerConfig

HOST = "127.0.0.1"
CLOSE_OP, PING_OP, PONG_OP = 0x8, 0x9, 0xA
CAVEAT = (
    "machine: 2 shared cores, noisy; the server, the victim and the attackers share them. "
    "Compare each figure with the baseline of the same run, not across runs."
)

# --- flood ---------------------------------------------------------------------------------------

FLOOD_PATH = "/ws/counter"
FRAMES_PER_WRITE = 10_000
PING_INTERVAL = 0.01  # the victim's pace
PONG_TIMEOUT = 5.0  # a pong later than this ends the victim's run (it could not be matched)
CAPS_LIFTED = ["--max-control-frames", "1000000000", "--max-fragments", "1000000000"]
#: An attacker stops after this many connections whatever the clock says (a bound on the loop).
MAX_ATTACKER_CONNECTIONS = 1_000_000

# --- slow consumer -------------------------------------------------------------------------------

NOTIFY_PATH = "/ws/notifications"
VICTIM_RCVBUF = 4096
DEFAULTS = ServerConfig()  # the limits `verani serve` uses unless told otherwise
DEFAULT_BUDGET = DEFAULTS.max_outbound_bytes
LIFTED_BUDGET = 1 << 40
SAMPLE_EVERY = 0.1
NOTIFY_PHASE_LIMIT = 120.0  # seconds; the notify loop stops there even if not done


# --- a raw client --------------------------------------------------------------------------------


class Refused(ConnectionError):
    """The server answered the upgrade with something other than 101."""


class RawClient:
    """A blocking WebSocket client on a bare socket: the upgrade is sent by hand, frames from
    the server are parsed here, frames to it come from ``tests.helpers.frame``."""

    def __init__(
        self, port: int, target: str, *, rcvbuf: int | None = None, timeout: float = 5.0
    ) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            # Before connect, so the window the client advertises is small from the start.
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.buf = bytearray()
        self.received = 0
        try:
            self.sock.connect((HOST, port))
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock.sendall(upgrade_request(target))
            deadline = time.monotonic() + timeout
            while b"\r\n\r\n" not in self.buf:
                self._fill(deadline)
        except BaseException:
            self.sock.close()
            raise
        head, _, rest = bytes(self.buf).partition(b"\r\n\r\n")
        # Whatever came after the head (a first frame) stays buffered for read_frame.
        self.buf = bytearray(rest)
        status = head.split(b" ", 2)[1]
        if status != b"101":
            self.sock.close()
            raise Refused(f"upgrade answered with HTTP {status.decode(errors='replace')}")

    def _fill(self, deadline: float) -> None:
        while True:
            if time.monotonic() >= deadline:
                raise TimeoutError("no data from the server in time")
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue  # the socket's own timeout is a poll interval; the deadline decides
            if not data:
                raise ConnectionError("the server closed the connection")
            self.buf += data
            self.received += len(data)
            return

    def read_frame(self, deadline: float) -> tuple[int, bytes]:
        """The next frame from the server, as (opcode, payload)."""
        while True:
            parsed = parse_frame(self.buf)
            if parsed is not None:
                return parsed
            self._fill(deadline)

    def read_event(self, name: str, deadline: float) -> dict[str, Any]:
        """The next event frame named ``name`` (others are skipped); its data."""
        while True:
            opcode, payload = self.read_frame(deadline)
            if opcode == CLOSE_OP:
                raise ConnectionError(f"closed by the server with {close_code(payload)}")
            if opcode != TEXT:
                continue
            message = orjson.loads(payload)
            data = message.get("data") if message.get("type") == "event" else None
            if isinstance(data, dict) and data.get("type") == name:
                return data

    def close(self) -> None:
        self.sock.close()


def parse_frame(buf: bytearray) -> tuple[int, bytes] | None:
    """Take one whole (unmasked, server) frame off the front of ``buf``; None if incomplete."""
    have = len(buf)
    if have < 2:
        return None
    opcode, size, start = buf[0] & 0x0F, buf[1] & 0x7F, 2
    if size == 126:
        if have < 4:
            return None
        size, start = int.from_bytes(buf[2:4], "big"), 4
    elif size == 127:
        if have < 10:
            return None
        size, start = int.from_bytes(buf[2:10], "big"), 10
    end = start + size
    if have < end:
        return None
    payload = bytes(buf[start:end])
    del buf[:end]
    return opcode, payload


def close_code(payload: bytes) -> int:
    # RFC 6455 §7.1.5: a Close frame without a code reads as 1005.
    return int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005


def close_code_in(buf: bytearray) -> tuple[int | None, int]:
    """Parse every whole frame in ``buf``: the Close frame's code if one came (else None), and
    how many text frames came before it."""
    texts = 0
    while (parsed := parse_frame(buf)) is not None:
        opcode, payload = parsed
        if opcode == CLOSE_OP:
            return close_code(payload), texts
        texts += opcode == TEXT
    return None, texts


# --- flood: the attackers (each in its own process) ----------------------------------------------


def flood_bytes(kind: str) -> tuple[bytes, bytes]:
    """What an attacker sends once per connection, then repeats: 10,000 frames per write."""
    if kind == "pong":
        # 8A 80 + mask: an unsolicited, empty Pong (a control frame: costs the sender 6 bytes).
        return b"", b"".join(frame(PONG_OP) for _ in range(FRAMES_PER_WRITE))
    # 01 80 + mask: the first fragment of a text message that is never finished; then empty
    # continuations (00 80 + mask), each a frame the server must parse and count.
    first = frame(TEXT, b"", fin=False)
    rest = b"".join(frame(CONTINUATION, b"", fin=False) for _ in range(FRAMES_PER_WRITE))
    return first, rest


def attacker(
    port: int,
    kind: str,
    window: float,
    go: Any,
    stop: Any,
    results: Any,
) -> None:
    """One attacker process: connect, upgrade, flood; reconnect at once when closed."""
    opening, repeated = flood_bytes(kind)
    go.wait(60)
    cpu0 = time.process_time()
    deadline = time.monotonic() + window
    connections, sent = 0, 0
    codes: collections.Counter[str] = collections.Counter()
    refused: collections.Counter[str] = collections.Counter()
    while time.monotonic() < deadline and not stop.is_set():
        if connections >= MAX_ATTACKER_CONNECTIONS:
            break
        try:
            client = RawClient(port, f"{FLOOD_PATH}?userId=attacker", timeout=2.0)
        except (OSError, IndexError) as exc:
            refused[type(exc).__name__] += 1
            time.sleep(0.01)  # refused (e.g. 503): do not spin on the listener
            continue
        connections += 1
        try:
            outcome, n = _flood(client, opening, repeated, deadline, stop)
        finally:
            client.close()
        codes[outcome] += 1
        sent += n
    results.put(
        {
            "connections": connections,
            "bytes_sent": sent,
            "closes": dict(codes),
            "refused": dict(refused),
            "cpu_s": time.process_time() - cpu0,
        }
    )


def _flood(
    client: RawClient, opening: bytes, repeated: bytes, deadline: float, stop: Any
) -> tuple[str, int]:
    """Write the flood until the server ends the connection or time is up; how it ended
    (``"1008"`` etc. from the Close frame read afterwards, ``"no close frame"``, or ``"open"``)
    and the bytes written."""
    sock = client.sock
    # A short timeout so a server that stops reading cannot hold the attacker past its deadline.
    sock.settimeout(0.5)
    sent = 0
    try:
        if opening:
            sock.sendall(opening)
            sent += len(opening)
        view, offset = memoryview(repeated), 0
        while time.monotonic() < deadline and not stop.is_set():
            try:
                n = sock.send(view[offset:])
            except TimeoutError:
                continue  # nothing written: the server is reading someone else
            # ``send`` (not ``sendall``) keeps the offset exact, so frames stay whole.
            offset = (offset + n) % len(repeated)
            sent += n
    except OSError:
        # EPIPE / ECONNRESET: the server closed us. Whatever it sent before is still readable.
        return _read_close(client), sent
    return "open", sent


def _read_close(client: RawClient) -> str:
    client.sock.setblocking(False)
    try:
        for _ in range(64):  # bounded: a few reads of what is already buffered
            data = client.sock.recv(65536)
            if not data:
                break
            client.buf += data
    except OSError:
        pass  # nothing more (EAGAIN), or the reset itself
    code, _ = close_code_in(client.buf)
    return str(code) if code is not None else "no close frame"


# --- flood: the victim and one measured run ------------------------------------------------------


def victim_pings(client: RawClient, window: float) -> dict[str, Any]:
    """Ping every PING_INTERVAL for ``window`` seconds; round-trip times in ms."""
    ping = frame(TEXT, b'{"type":"ping"}')
    samples: list[float] = []
    lost, error = 0, None
    end = time.monotonic() + window
    next_at = time.perf_counter()
    for _ in range(int(window / PING_INTERVAL) + 1):  # bounded in count as well as in time
        if time.monotonic() >= end:
            break
        wait = next_at - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        t0 = time.perf_counter()
        try:
            client.sock.sendall(ping)
            _await_pong(client, time.monotonic() + PONG_TIMEOUT)
        except TimeoutError:
            lost += 1  # pongs carry no id: a late one could not be matched, so stop here
            break
        except OSError as exc:
            error = f"{type(exc).__name__}: {exc}"
            break
        samples.append((time.perf_counter() - t0) * 1000)
        next_at = t0 + PING_INTERVAL
    return {**latency(samples), "lost": lost, "error": error}


def _await_pong(client: RawClient, deadline: float) -> None:
    while True:
        opcode, payload = client.read_frame(deadline)
        if opcode == TEXT and payload == b'{"type":"pong"}':
            return
        if opcode == PING_OP:  # the server's liveness ping: answer as a browser would
            client.sock.sendall(frame(PONG_OP, payload))
        elif opcode == CLOSE_OP:
            raise ConnectionError(f"victim closed by the server with {close_code(payload)}")


def flood_run(
    server: Server, kind: str, attackers: int, window: float, target: Server | None = None
) -> dict[str, Any]:
    """One measured window: ``attackers`` processes flood ``target`` (default: the victim's
    server) with ``kind`` while the victim pings ``server``."""
    target = target or server
    quiesce(server, target)
    # Fork before the victim's socket exists, so no attacker holds a copy of it.
    ctx = multiprocessing.get_context("fork")
    go, stop, results = ctx.Event(), ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(
            target=attacker,
            args=(target.port, kind, window + 1.0, go, stop, results),
            daemon=True,
        )
        for _ in range(attackers)
    ]
    for proc in procs:
        proc.start()
    log0 = _log_lines(target)
    victim = RawClient(server.port, f"{FLOOD_PATH}?userId=victim")
    try:
        victim.read_event("counter:sync", time.monotonic() + 10)  # the room has the victim
        cpu0, target_cpu0 = server.cpu_s(), target.cpu_s()
        go.set()
        t0 = time.monotonic()
        measured = victim_pings(victim, window)
        elapsed = time.monotonic() - t0
        cpu, target_cpu = server.cpu_s() - cpu0, target.cpu_s() - target_cpu0
        rss_kb = target.rss_kb()
    finally:
        stop.set()
        go.set()  # an attacker still waiting for the start goes straight to its end
        victim.close()
    reports = []
    for _ in procs:
        try:
            reports.append(results.get(timeout=15))
        except Exception:  # queue.Empty: an attacker that never reported
            break
    for proc in procs:
        proc.join(10)
        if proc.is_alive():
            proc.terminate()
            proc.join(5)
    closes: collections.Counter[str] = collections.Counter()
    refused: collections.Counter[str] = collections.Counter()
    for r in reports:
        closes.update(r["closes"])
        refused.update(r["refused"])
    connections = sum(r["connections"] for r in reports)
    result = {
        "kind": kind,
        "caps": "default",
        "attackers": attackers,
        "target": "same server" if target is server else "another server",
        "window_s": round(elapsed, 2),
        "victim": measured,
        "attacker_reports": len(reports),
        "attacker_connections": connections,
        "reconnects": connections - len([r for r in reports if r["connections"]]),
        "attacker_closes": dict(closes),
        "attacker_refused": dict(refused),
        # Bytes the attackers' writes accepted, read by the server or not (with the caps, most
        # sit in the kernel's buffers until the server's close resets the connection).
        "attack_mb_per_s": round(sum(r["bytes_sent"] for r in reports) / 2**20 / elapsed, 1),
        "attacker_cpu_s": round(sum(r["cpu_s"] for r in reports), 2),
        "server_cpu_s": round(cpu, 2),
        "server_cpu_share": round(cpu / elapsed, 2),
        "server_rss_mib": round(rss_kb / 1024, 1),
        "server_log_lines": _log_lines(target) - log0,
    }
    if target is not server:
        result["target_server_cpu_s"] = round(target_cpu, 2)
    return result


def quiesce(*servers: Server, limit: float = 15.0) -> None:
    """Wait (bounded) until the servers are idle: after a flood a server may still be parsing
    what sat in its receive buffers, which would land in the next run's figures."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        before = [s.cpu_s() for s in servers]
        time.sleep(0.25)
        if all(s.cpu_s() - c < 0.025 for s, c in zip(servers, before, strict=True)):
            return


def _log_lines(server: Server) -> int:
    # The server's stdout/stderr file (the harness' log): each 1008 close may write a line.
    with open(server.log.name, "rb") as f:
        return f.read().count(b"\n")


def scenario_flood(quick: bool) -> dict[str, Any]:
    window = 3.0 if quick else 10.0
    counts = (0, 4) if quick else (0, 1, 4)
    runs = []
    for caps, extra in (("default", []), ("lifted", CAPS_LIFTED)):
        with serving("verani_os", extra=extra) as server:
            for kind in ("pong", "fragments"):
                for n in counts:
                    print(
                        f"... flood {kind} caps={caps} attackers={n}", file=sys.stderr, flush=True
                    )
                    run = flood_run(server, kind, n, window)
                    run["caps"] = caps
                    runs.append(run)
    if not quick:
        # The control: four attackers on another server; the victim's server sees no attack.
        with serving("verani_os") as server, serving("verani_os") as other:
            for kind in ("pong", "fragments"):
                print(f"... flood {kind} attackers=4 elsewhere", file=sys.stderr, flush=True)
                runs.append(flood_run(server, kind, 4, window, target=other))
    return {"window_s": window, "frames_per_write": FRAMES_PER_WRITE, "runs": runs}


# --- slow consumer -------------------------------------------------------------------------------


class RssSampler:
    """Reads the server's VmRSS every SAMPLE_EVERY seconds in a thread; keeps the peak."""

    def __init__(self, server: Server, limit_s: float) -> None:
        self.server = server
        self.peak_kb = server.rss_kb()
        self.samples = 0
        self._stop = threading.Event()
        self._max_samples = int(limit_s / SAMPLE_EVERY)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        for _ in range(self._max_samples):
            if self._stop.wait(SAMPLE_EVERY):
                return
            self.peak_kb = max(self.peak_kb, self.server.rss_kb())
            self.samples += 1

    @contextmanager
    def running(self) -> Iterator[RssSampler]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join(5)


def notify_frame(to: str, body_size: int) -> bytes:
    event = {"type": "notify", "data": {"to": to, "title": "hostile", "body": "x" * body_size}}
    return frame(TEXT, orjson.dumps(event))


def server_frame_bytes(body_size: int, unread: int) -> int:
    """The size of one ``notification`` frame the server sends (same shape, same encoder)."""
    data = {"from": "sender", "title": "hostile", "body": "x" * body_size, "unread": unread}
    event = {"type": "event", "channel": "default", "data": {**data, "type": "notification"}}
    size = len(orjson.dumps(event))
    return size + (2 if size < 126 else 4 if size < 65536 else 10)


def send_notify(sender: RawClient, raw: bytes) -> int:
    """Send one notify; wait for its ``notify:sent``; how many sockets it reached."""
    sender.sock.sendall(raw)
    return int(sender.read_event("notify:sent", time.monotonic() + 30)["delivered"])


def drain(victims: list[RawClient], seconds: float, quiet: float) -> list[dict[str, Any]]:
    """The victims read at last, all at once: each one's close code (1006 when the stream
    ended without a Close frame; None, "open", when nothing more came for ``quiet`` seconds or
    ``seconds`` passed)."""
    codes: dict[int, int] = {}
    texts = dict.fromkeys(range(len(victims)), 0)
    now = time.monotonic()
    deadline, last_data = now + seconds, dict.fromkeys(range(len(victims)), now)
    with selectors.DefaultSelector() as sel:
        for i, v in enumerate(victims):
            v.sock.setblocking(False)
            sel.register(v.sock, selectors.EVENT_READ, i)
        while sel.get_map() and (now := time.monotonic()) < deadline:
            for key in list(sel.get_map().values()):
                if now - last_data[key.data] > quiet:
                    sel.unregister(key.fileobj)  # still open, and the server sends nothing more
            for key, _ in sel.select(min(quiet, deadline - now) / 4):
                i, v = key.data, victims[key.data]
                try:
                    data = v.sock.recv(1 << 20)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""  # ECONNRESET: ended, with no more bytes
                last_data[i] = time.monotonic()
                v.buf += data
                v.received += len(data)
                code, more = close_code_in(v.buf)
                texts[i] += more
                if code is None and not data:
                    code = 1006
                if code is not None:
                    codes[i] = code
                    sel.unregister(v.sock)
    return [
        {"close_code": codes.get(i), "notifications_read": texts[i], "bytes_read": v.received}
        for i, v in enumerate(victims)
    ]


def slow_run(
    budget: int, body_size: int, sockets: int, notifies: int, quick: bool, read_after: float = 0.3
) -> dict[str, Any]:
    """One server; ``sockets`` victims that do not read while ``notifies`` notifies of
    ``body_size`` go to them; they read ``read_after`` seconds after the last one."""
    extra = [str(ROOT / "rooms" / "notifications.py")]
    if budget != DEFAULT_BUDGET:
        extra += ["--max-outbound-bytes", str(budget)]
    settle = 1.0 if quick else 2.0
    late = read_after > DEFAULTS.close_timeout
    with serving("verani_os", extra=extra) as server, ExitStack() as clients:
        sender = RawClient(server.port, f"{NOTIFY_PATH}?userId=sender")
        clients.callback(sender.close)
        sender.read_event("notifications:unread", time.monotonic() + 10)
        # Warm-up with one notify of the same size to no one: the room is awake and a message
        # of this size has been through the server once, so "before" is not a cold process.
        send_notify(sender, notify_frame("nobody", body_size))
        time.sleep(0.5)
        before = server.rss_kb()
        victims = []
        for _ in range(sockets):
            v = RawClient(server.port, f"{NOTIFY_PATH}?userId=victim", rcvbuf=VICTIM_RCVBUF)
            clients.callback(v.close)
            # Read up to the connect event only (so the room has the socket); nothing more
            # until the drain below.
            v.read_event("notifications:unread", time.monotonic() + 10)
            victims.append(v)
        rcvbuf = victims[0].sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        raw = notify_frame("victim", body_size)
        delivered: list[int] = []
        sampler = RssSampler(server, limit_s=NOTIFY_PHASE_LIMIT + read_after + 30)
        with sampler.running():
            t0 = time.monotonic()
            for _ in range(notifies):
                if time.monotonic() - t0 > NOTIFY_PHASE_LIMIT:
                    break
                delivered.append(send_notify(sender, raw))
            notify_s = time.monotonic() - t0
            time.sleep(read_after)  # at least one more sample with everything queued
            # Past the server's close_timeout, one more notify shows whether the room still
            # counts the victims' sockets as there.
            delivered_late = send_notify(sender, raw) if late else None
            read = drain(victims, seconds=20.0, quiet=1.0)
            for v in victims:
                v.close()
            time.sleep(settle)
        after = server.rss_kb()
    if budget == DEFAULT_BUDGET:
        limit = budget * sockets
    else:  # only the frame limit is left
        limit = DEFAULTS.outbound_queue * server_frame_bytes(body_size, notifies) * sockets
    short = [i for i, d in enumerate(delivered) if d < sockets]
    return {
        "budget": "default" if budget == DEFAULT_BUDGET else "lifted",
        "max_outbound_bytes": budget,
        "body_bytes": body_size,
        "sockets": sockets,
        "victim_rcvbuf": rcvbuf,
        "notifies": len(delivered),
        "notify_s": round(notify_s, 2),
        "read_after_s": read_after,
        "delivered_first": delivered[0] if delivered else None,
        "delivered_last": delivered[-1] if delivered else None,
        "first_notify_missing_a_socket": short[0] + 1 if short else None,
        "delivered_after_close_timeout": delivered_late,
        "rss_before_mib": round(before / 1024, 1),
        "rss_peak_mib": round(sampler.peak_kb / 1024, 1),
        "rss_after_mib": round(after / 1024, 1),
        "rss_samples": sampler.samples,
        "bound_mib": round(limit / 2**20, 1),
        "victims": read,
    }


def scenario_slow(quick: bool) -> dict[str, Any]:
    notifies = 50 if quick else 200
    socket_counts = (4,) if quick else (1, 4)
    cases = [
        (budget, body, sockets, 0.3)
        for budget in (DEFAULT_BUDGET, LIFTED_BUDGET)
        for body in (100_000, 1_000_000)
        for sockets in socket_counts
    ]
    if not quick:
        # A victim that reads only after the server's close_timeout: the write it never drained
        # is cut off, and with it the Close frame.
        cases.append((DEFAULT_BUDGET, 1_000_000, 1, DEFAULTS.close_timeout + 1.5))
    runs = []
    for budget, body, sockets, read_after in cases:
        name = "default" if budget == DEFAULT_BUDGET else "lifted"
        print(
            f"... slow budget={name} body={body:,} sockets={sockets} read after {read_after}s",
            file=sys.stderr,
            flush=True,
        )
        runs.append(slow_run(budget, body, sockets, notifies, quick, read_after))
    return {"notifies": notifies, "runs": runs}


# --- report --------------------------------------------------------------------------------------


def latency(samples: list[float]) -> dict[str, Any]:
    """The harness' n/p50/p99, plus the worst sample (an attack shows in the tail)."""
    figures = run_latency(samples)
    if samples:
        figures["max_ms"] = round(max(samples), 3)
    return figures


def flood_rows(result: dict[str, Any]) -> list[tuple[str, ...]]:
    rows = []
    for r in result["runs"]:
        v = r["victim"]
        who = str(r["attackers"]) + (" (elsewhere)" if r["target"] != "same server" else "")
        closes = ", ".join(f"{k} x{n}" for k, n in sorted(r["attacker_closes"].items())) or "-"
        cpu = f"{r['server_cpu_s']:.2f}"
        if "target_server_cpu_s" in r:
            cpu += f" (+{r['target_server_cpu_s']:.2f} other)"
        rows.append(
            (r["kind"], r["caps"], who, str(v["n"]) + (f" lost {v['lost']}" if v["lost"] else ""),
             _ms(v.get("p50_ms")), _ms(v.get("p99_ms")), _ms(v.get("max_ms")),
             str(r["reconnects"]), closes, f"{r['attack_mb_per_s']:,.1f}", cpu,
             str(r["server_log_lines"]))
        )  # fmt: skip
    return rows


def slow_rows(result: dict[str, Any]) -> list[tuple[str, ...]]:
    rows = []
    for r in result["runs"]:
        codes = ",".join(
            "open" if v["close_code"] is None else str(v["close_code"]) for v in r["victims"]
        )
        got = ",".join(str(v["notifications_read"]) for v in r["victims"])
        budget = r["budget"] + (
            f", read after {r['read_after_s']}s" if r["read_after_s"] > 1 else ""
        )
        delivered = f"{r['delivered_first']}→{r['delivered_last']}"
        if r["delivered_after_close_timeout"] is not None:
            delivered += f"→{r['delivered_after_close_timeout']}"
        rows.append(
            (budget, f"{r['body_bytes']:,}", str(r["sockets"]),
             f"{r['notifies']} in {r['notify_s']:.1f}s",
             delivered,
             f"{r['rss_before_mib']:.1f}", f"{r['rss_peak_mib']:.1f}", f"{r['rss_after_mib']:.1f}",
             f"{r['bound_mib']:,.1f}", codes, got)
        )  # fmt: skip
    return rows


FLOOD_HEADER = (
    *("attack", "caps", "attackers", "victim n", "p50 ms", "p99 ms", "max ms", "reconnects"),
    *("attacker closes", "written MB/s", "server cpu s", "log lines"),
)
SLOW_HEADER = (
    *("budget", "body B", "sockets", "notifies", "delivered", "RSS before MiB", "peak MiB"),
    *("after MiB", "bound MiB", "close codes", "notifications read"),
)


def _ms(value: Any) -> str:
    return "-" if value is None else f"{value:.2f}"


def print_table(title: str, header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    print(title)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    print()


SCENARIOS = {"flood": scenario_flood, "slow": scenario_slow}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run, under a minute")
    parser.add_argument("--scenario", default="all", help="flood, slow or all")
    args = parser.parse_args(argv)
    names = list(SCENARIOS) if args.scenario == "all" else args.scenario.split(",")
    started = time.monotonic()
    results = {}
    for name in names:
        results[name] = {"scenario": name, "quick": args.quick, **SCENARIOS[name](args.quick)}
    if "flood" in results:
        print_table("flood: victim ping→pong while attackers flood", FLOOD_HEADER,
                    flood_rows(results["flood"]))  # fmt: skip
    if "slow" in results:
        print_table("slow: sockets of user victim that never read", SLOW_HEADER,
                    slow_rows(results["slow"]))  # fmt: skip
    print(CAVEAT)
    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
        f"total {time.monotonic() - started:.0f}s"
    )
    print()
    for result in results.values():
        print(json.dumps(result, separators=(",", ":")))


if __name__ == "__main__":
    main()
