"""A bounded soak of a verani server in a child process (run by hand; never collected by pytest).

    python tests/bench/soak.py [--seconds 120] [--rooms 200] [--clients 50]

The server (``verani serve rooms/counter.py``, fsync store, 2 s idle timeout) runs in a child
process, so its fds, threads and RSS can be read from ``/proc/PID``. Here, on loopback, each of
``--clients`` workers owns a share of the rooms ``/ws/counter/room-N`` (one writer per room) and
loops: connect to one of its rooms, check ``counter:sync`` against the count it expects, send 1-5
pipelined increments, check each ``counter:update`` is the previous count + its amount,
disconnect, think. ``verani hibernate --all`` runs every ``--hibernate-every`` seconds besides
the idle timeout; the control endpoint is polled to count hibernations (a lower bound). Samples:
start (after a warm-up touching every room, then all hibernated), mid (under load), end (clients
gone, all hibernated). Then SIGTERM (must exit 0) and every stored count must equal its worker's.
A lost or invented increment fails the run. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import collections
import functools
import itertools
import json
import math
import os
import pathlib
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

import attrs
import orjson
import trio
import trio_websocket

from verani.control import control_request
from verani.errors import VeraniError

ROOT = pathlib.Path(__file__).resolve().parents[2]
COUNTER = ROOT / "rooms" / "counter.py"
IDLE = 2.0  # the server's --idle-timeout
CYCLE_TIMEOUT = 15.0  # one connect/increments/disconnect cycle
THINK = 0.5  # a worker pauses up to this long between cycles
POLL = 0.2  # status polls of the control endpoint, to see hibernations
VERANI = [sys.executable, "-m", "verani"]
URL_RE = re.compile(rb"verani serving on (ws://\S+)")
CAVEAT = (
    "caveat: 2 shared cores, loopback only, noisy; the server and this load generator share the "
    "cores, so compare start/mid/end of one run, not absolute figures across runs."
)


@attrs.define
class Room:
    name: str
    expected: int = 0
    #: Counts the server may also hold after a cycle broke before all its updates came back.
    maybe: list[int] = attrs.Factory(list)
    left_at: float = -math.inf  # when its worker last disconnected (trio clock)


@attrs.define
class Soak:
    store: str
    url: str
    pid: int
    counts: collections.Counter[str] = attrs.Factory(collections.Counter)
    errors: collections.Counter[str] = attrs.Factory(collections.Counter)
    examples: list[str] = attrs.Factory(list)
    #: When the last ``verani hibernate --all`` that succeeded began.
    hibernate_began: float = -math.inf
    open_clients: int = 0
    #: Held while reading /proc and while polling, so a sample never counts the poll's socket.
    quiet: trio.Lock = attrs.Factory(trio.Lock)

    def error(self, kind: str, detail: str) -> None:
        self.errors[kind] += 1
        if len(self.examples) < 10:
            self.examples.append(f"{kind}: {detail}")


# --- the load ------------------------------------------------------------------------------------


async def next_event(soak: Soak, ws: trio_websocket.WebSocketConnection, name: str) -> Any:
    while True:
        frame = orjson.loads(await ws.get_message())
        soak.counts["received"] += 1
        data = frame.get("data") if frame.get("type") == "event" else None
        if isinstance(data, dict) and data.get("type") == name:
            return data
        soak.error("unexpected_frame", f"waiting for {name}: {frame}")


def check_sync(soak: Soak, room: Room, count: int) -> None:
    if count != room.expected and count not in room.maybe:
        soak.error("correctness", f"{room.name}: counter:sync {count}, expected {room.expected}")
    # A client-side estimate of a revival: the room was idle past the timeout, or a
    # `hibernate --all` began after its last client left.
    idle = trio.current_time() - room.left_at > IDLE + 0.1
    if count > 0 and (idle or soak.hibernate_began > room.left_at):
        soak.counts["revivals"] += 1
    room.expected, room.maybe = count, []


async def cycle(soak: Soak, user: str, room: Room) -> None:
    url = f"{soak.url}/ws/counter/{room.name}?userId={user}"
    amounts = [random.randint(1, 3) for _ in range(random.randint(1, 5))]
    async with trio_websocket.open_websocket_url(url, message_queue_size=64) as ws:
        soak.open_clients += 1
        try:
            soak.counts["cycles"] += 1
            check_sync(soak, room, (await next_event(soak, ws, "counter:sync"))["count"])
            room.maybe = list(itertools.accumulate(amounts, initial=room.expected))[1:]
            for amount in amounts:
                frame = {"type": "counter:increment", "data": {"amount": amount}}
                await ws.send_message(orjson.dumps(frame).decode())
                soak.counts["sent"] += 1
            for amount in amounts:
                update = await next_event(soak, ws, "counter:update")
                want = room.expected + amount
                if update["count"] != want or update["updatedBy"] != user:
                    soak.error("correctness", f"{room.name}: {update}, expected count {want}")
                # Follow the server after a mismatch, so one fault is counted once.
                room.expected = update["count"]
                room.maybe = room.maybe[1:]
        finally:
            soak.open_clients -= 1
            # trio-websocket's client may leave its TCP stream open when the server closed first.
            await trio.aclose_forcefully(ws._stream)
    room.left_at = trio.current_time()


async def guarded_cycle(soak: Soak, user: str, room: Room) -> None:
    try:
        with trio.fail_after(CYCLE_TIMEOUT):
            await cycle(soak, user, room)
    except trio.TooSlowError:
        soak.error("timeout", f"{room.name}: a cycle took over {CYCLE_TIMEOUT}s")
    except (OSError, trio_websocket.HandshakeError, trio_websocket.ConnectionClosed) as exc:
        soak.error("transport", f"{room.name}: {type(exc).__name__}: {exc}")
    except (KeyError, TypeError, ValueError) as exc:  # a frame not shaped as the room sends it
        soak.error("protocol", f"{room.name}: {type(exc).__name__}: {exc}")


async def worker(soak: Soak, user: str, rooms: list[Room], deadline: float) -> None:
    while trio.current_time() < deadline:
        await guarded_cycle(soak, user, random.choice(rooms))
        await trio.sleep(random.uniform(0, THINK))


# --- hibernation: the CLI, and polls of the control endpoint -------------------------------------


async def run_cli(soak: Soak, *args: str) -> subprocess.CompletedProcess[bytes] | None:
    try:
        cmd = [*VERANI, *args, "--store", soak.store]
        with trio.fail_after(60):
            result = await trio.run_process(
                cmd, capture_stdout=True, capture_stderr=True, check=False
            )
    except trio.TooSlowError:
        soak.error("cli", f"verani {' '.join(args)} took over 60s")
        return None
    if result.returncode != 0:
        err = result.stderr.decode(errors="replace").strip()
        soak.error("cli", f"verani {' '.join(args)} exited {result.returncode}: {err}")
    return result


async def hibernate_all(soak: Soak) -> None:
    start = trio.current_time()
    result = await run_cli(soak, "hibernate", "--all")
    if result is not None:
        lines = result.stdout.decode().splitlines()
        soak.counts["hibernated_by_cli"] += sum(line.startswith("hibernated ") for line in lines)
        soak.hibernate_began = start


async def hibernate_periodically(soak: Soak, every: float, deadline: float) -> None:
    while trio.current_time() + every < deadline:
        await trio.sleep(every)
        await hibernate_all(soak)


async def poll_hibernations(soak: Soak) -> None:
    awake: set[str] = set()
    while True:
        async with soak.quiet:
            try:
                reply = await control_request(soak.store, {"op": "status"}, timeout=10)
            except VeraniError as exc:
                soak.error("control", str(exc))
                reply = None
        if reply is not None:
            now_awake = {i["instance"] for i in reply["instances"] if i["awake"]}
            soak.counts["hibernations"] += len(awake - now_awake)
            awake = now_awake
        await trio.sleep(POLL)


# --- samples of the server -----------------------------------------------------------------------


def proc_figures(pid: int) -> dict[str, int]:
    status = pathlib.Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    rss_kb, fds = int(fields["VmRSS"].split()[0]), len(os.listdir(f"/proc/{pid}/fd"))
    return {"fds": fds, "threads": int(fields["Threads"]), "rss_kb": rss_kb}


async def sample(soak: Soak) -> dict[str, Any]:
    async with soak.quiet:
        figures: dict[str, Any] = proc_figures(soak.pid)
    figures["clients"] = soak.open_clients
    figures["stored"] = figures["awake"] = None
    result = await run_cli(soak, "inspect", "--json")
    if result is not None and result.returncode == 0:
        instances = orjson.loads(result.stdout)["instances"]
        figures["stored"] = sum(i["bytes"] is not None for i in instances)
        figures["awake"] = sum(i["status"] == "awake" for i in instances)
    return figures


async def quiesce(soak: Soak) -> None:
    """Every room hibernated (all clients are gone), then a short wait."""
    await hibernate_all(soak)
    await trio.sleep(1.0)


# --- the run -------------------------------------------------------------------------------------


def stored_counts(store: str, rooms: list[Room]) -> list[str]:
    """Rooms whose stored count differs from the expected one, described."""
    bad = []
    for room in rooms:
        path = pathlib.Path(store, "rooms", "counter", f"{room.name}.json")
        stored = orjson.loads(path.read_bytes())["state"]["count"] if path.exists() else 0
        if stored != room.expected and stored not in room.maybe:
            bad.append(f"{room.name}: stored {stored}, expected {room.expected}")
    return bad


async def read_all(stream: trio.abc.ReceiveStream, out: bytearray) -> None:
    async for chunk in stream:
        out += chunk


async def drive(tmp: str, log: Any, args: argparse.Namespace) -> dict[str, Any]:
    store = os.path.join(tmp, "store")
    cmd = [*VERANI, "serve", str(COUNTER), "--port", "0", "--store", store, "--durability"]
    cmd += ["fsync", "--idle-timeout", str(IDLE), "--log-level", "warning"]
    serve = functools.partial(
        trio.run_process, cmd, stdout=subprocess.PIPE, stderr=log, check=False
    )
    out = bytearray()
    async with trio.open_nursery() as nursery:
        # Should anything here fail, run_process ends the server (SIGTERM, then SIGKILL).
        proc: trio.Process = await nursery.start(serve)
        assert proc.stdout is not None
        nursery.start_soon(read_all, proc.stdout, out)
        with trio.fail_after(30):
            while not (match := URL_RE.search(out)):
                if proc.returncode is not None:
                    raise RuntimeError(f"the server exited before serving: {out.decode()}")
                await trio.sleep(0.05)
        soak = Soak(store, match.group(1).decode(), proc.pid)
        clients = min(args.clients, args.rooms)
        rooms = [Room(f"room-{i}") for i in range(args.rooms)]
        shares = [rooms[k::clients] for k in range(clients)]
        began = time.monotonic()

        async with trio.open_nursery() as warm:
            for i, room in enumerate(rooms):  # one cycle on every room, by its own worker
                warm.start_soon(guarded_cycle, soak, f"w{i % clients}", room)
        await quiesce(soak)
        soak.counts.clear()  # the warm-up is not counted
        samples = {"start": await sample(soak)}

        start = trio.current_time()
        deadline = start + args.seconds
        async with trio.open_nursery() as background:
            background.start_soon(poll_hibernations, soak)
            background.start_soon(hibernate_periodically, soak, args.hibernate_every, deadline)
            async with trio.open_nursery() as workers:
                for k, share in enumerate(shares):
                    workers.start_soon(worker, soak, f"w{k}", share, deadline)
                await trio.sleep_until(start + args.seconds / 2)
                samples["mid"] = await sample(soak)
            load_seconds = trio.current_time() - start
            await quiesce(soak)
            samples["end"] = await sample(soak)
            background.cancel_scope.cancel()

        proc.send_signal(signal.SIGTERM)
        with trio.move_on_after(60):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
            soak.error("server", "no exit within 60s of SIGTERM; killed")
    mismatched = stored_counts(store, rooms)
    return {
        "seconds": args.seconds,
        "rooms": args.rooms,
        "clients": clients,
        "load_seconds": round(load_seconds, 1),
        "total_seconds": round(time.monotonic() - began, 1),
        "counts": dict(soak.counts),
        "errors": dict(soak.errors),
        "samples": samples,
        "server_exit": proc.returncode,
        "server_stopped_line": b"\nstopped" in out,
        "stored_mismatches": len(mismatched),
        "examples": soak.examples + mismatched[:10],
    }


def print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    print()


def report(r: dict[str, Any], log_tail: list[str]) -> bool:
    c, errors, seconds = r["counts"], r["errors"], r["load_seconds"]
    cycles, messages = c.get("cycles", 0), c.get("sent", 0) + c.get("received", 0)
    error_text = ", ".join(f"{k} {v}" for k, v in sorted(errors.items())) or "none"
    print(f"soak: {seconds}s of load, {r['rooms']} rooms, {r['clients']} clients")
    print_table([
        ("cycles (connect/disconnect)", f"{cycles} ({cycles / seconds:.1f}/s)"),
        ("messages (sent + received)", f"{messages} ({messages / seconds:.1f}/s; "
         f"{c.get('sent', 0)} increments)"),
        ("hibernations observed", f"{c.get('hibernations', 0)} (polled every {POLL}s; "
         f"{c.get('hibernated_by_cli', 0)} by `verani hibernate --all`)"),
        ("revivals (est.)", str(c.get("revivals", 0))),
        ("errors", f"{sum(errors.values())} ({error_text})"),
    ])  # fmt: skip
    rows = [("server", "start", "mid", "end")]
    for key, label in (("fds", "fds"), ("threads", "threads"), ("rss_kb", "RSS MiB"),
                       ("stored", "stored instances"), ("awake", "awake instances"),
                       ("clients", "open clients")):  # fmt: skip
        cells = [r["samples"][when][key] for when in ("start", "mid", "end")]
        rows.append((label, *(f"{v / 1024:.1f}" if key == "rss_kb" else str(v) for v in cells)))
    print_table(rows)
    server_ok = r["server_exit"] == 0 and r["server_stopped_line"]
    checks = {
        f"server exits 0 on SIGTERM (exit {r['server_exit']})": server_ok,
        f"stored counts == expected ({r['rooms']} rooms)": r["stored_mismatches"] == 0,
        "no lost or invented increment": errors.get("correctness", 0) == 0,
    }
    for check, ok in checks.items():
        print(f"{check}: {'OK' if ok else 'FAIL'}")
    for example in r["examples"]:
        print(f"  e.g. {example}")
    print(f"server log (warnings and errors): {r['server_log_lines']} lines")
    for line in log_tail:
        print(f"  {line}")
    print(CAVEAT)
    print(f"python {sys.version.split()[0]}, trio {trio.__version__}, {os.cpu_count()} CPUs, "
          f"whole run {r['total_seconds']}s")  # fmt: skip
    print()
    print(json.dumps(r, separators=(",", ":")))
    return all(checks.values())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120.0, help="seconds of load")
    parser.add_argument("--rooms", type=int, default=200, help="room instances")
    parser.add_argument("--clients", type=int, default=50, help="concurrent client workers")
    parser.add_argument("--hibernate-every", type=float, default=10.0, help="seconds between "
                        "runs of `verani hibernate --all`")  # fmt: skip
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="verani-soak-") as tmp:
        with pathlib.Path(tmp, "server.log").open("wb") as log:  # the server's stderr
            result = trio.run(drive, tmp, log, args)
        server_log = pathlib.Path(tmp, "server.log").read_text(errors="replace").splitlines()
    result["server_log_lines"] = len(server_log)
    ok = report(result, server_log[-5:])
    print("OK" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
