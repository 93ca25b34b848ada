"""The benchmark harness (run by hand; never collected by pytest).

    python -m tests.bench [--scenario NAME|all] [--repeat N] [--quick] [--servers a,b,...]

Every server runs in its own process, started as a user would (``verani serve rooms/counter.py``
for verani; the baselines' scripts for the others); the load generator runs in another
(``tests/bench/loadgen.mjs``, Node's built-in WebSocket: far cheaper per message than a Python
client, so the server, not the client, is what is measured). Each figure comes with the load
generator's own CPU use, and ``ceiling`` lines show what the load generator reaches against a
trivial Node server — the most any server could show here.

Servers: ``verani`` (file store, ``durability="fsync"``), ``verani_os`` (``durability="os"``),
``verani_memory`` (the same server on the in-memory store: ``verani serve`` has no option for
it, so ``tests/bench/verani_memory.py`` runs the CLI's ``serve`` with a ``MemoryStore``),
``naive_trio`` (the counter by hand on trio-websocket, one count per instance, no persistence),
``websockets`` (the same on the asyncio ``websockets`` library; its broadcasts go through
``websockets.broadcast()``), ``socketio`` (python-socketio under uvicorn; needs
``pip install -e '.[bench]'``), ``trivial`` (Node, the ceiling).

Scenarios (on the seed's counter room unless said otherwise, over loopback):

- ``rtt``: one client, increment → its own ``counter:update`` → next; ops/s, p50/p99.
- ``pipeline``: 20 clients on one instance each keep 16 increments outstanding; increments/s and
  deliveries/s (the room sends each update to all 20).
- ``fanout``: 500 clients on one instance; one more sends 200 increments back to back;
  deliveries/s and send→receipt p50/p99.
- ``connect``: 500 connections opened at once; time until all have ``counter:sync``.
- ``revive``: connect → first ``counter:sync`` of a hibernated room with ~1 KB and ~1 MB stored,
  vs the same room awake; and the server-side part (store read and state rebuilt).
- ``durable``: ``pipeline`` with ``durability="fsync"`` vs ``"os"``, and store writes per event.
- ``memory``: server RSS per idle connection (1,000 connections), and RSS added by 10,000 room
  instances created then hibernated (vs never created).
- ``rooms``: 200 instances (``/ws/counter/r0`` ... ``r199``), one client each, every client doing
  increment → its own ``counter:update`` → next, all at once for a fixed time; ops/s over all
  rooms, reply p50/p99. ``verani``, ``verani_os``, ``verani_memory``, ``naive_trio``.
- ``broadcast``: 500 clients and one sender on one instance, one broadcast at a time (the sender
  increments, all 500 get the update, then the next) for a fixed time; broadcasts/s, send → last
  receipt p50/p99. ``verani`` on the counter room (each broadcast also a durable write) and
  ``verani_nopersist`` on ``bench_room.py``'s ``broadcast`` room (nothing persisted: the
  broadcast alone), against ``websockets`` (``broadcast()``) and ``naive_trio``.
- ``large-state``: ``bench_room.py``'s ``large`` room, ~1 MB persisted in one key and the count in
  another; one client's sequential increments each change only the count. Turns/s, and per turn
  the bytes the server process wrote (``wchar`` of ``/proc/PID/io``: every ``write``, before the
  page cache; sockets are not counted), the bytes it sent toward the disk (``write_bytes``, in
  pages) and its store writes, next to the encoded size of the change. ``verani``,
  ``verani_os``.

Prints one table, then one JSON line per scenario. On a shared 2-core machine absolute figures
move from run to run; compare the ratios measured in one run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import trio

from verani.control import control_request
from verani.store import FileStore

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
PY = sys.executable
NODE = [shutil.which("node") or "node"]
CAVEAT = (
    "machine: 2 shared cores, noisy; server and load generator share them. Compare ratios "
    "measured in one run, not absolute figures across runs."
)


# --- servers -------------------------------------------------------------------------------------


def _verani(durability: str) -> list[str]:
    return [
        str(pathlib.Path(PY).with_name("verani")),
        "serve",
        str(ROOT / "rooms" / "counter.py"),
        str(HERE / "bench_room.py"),
        "--port",
        "0",
        "--durability",
        durability,
        "--idle-timeout",
        "3600",
        "--log-level",
        "warning",
        "--max-connections-per-room",
        "5000",
        "--max-connections",
        "20000",
        "--max-awake-rooms",
        "20000",
    ]


SERVERS: dict[str, list[str]] = {
    "verani": _verani("fsync"),
    "verani_os": _verani("os"),
    "verani_memory": [PY, str(HERE / "verani_memory.py"), *_verani("os")[2:]],
    "naive_trio": [PY, str(HERE / "naive_trio.py"), "0"],
    "websockets": [PY, str(ROOT / "tests" / "interop" / "websockets_counter_server.py"), "0"],
    "socketio": [PY, str(HERE / "naive_socketio.py"), "0"],
    "trivial": [NODE[0], str(HERE / "trivial_server.mjs"), "0"],
}
PORT_LINE = re.compile(r"(?:LISTENING |ws://127\.0\.0\.1:)(\d+)")


class Server:
    """A server under test in its own process."""

    def __init__(self, name: str, store: pathlib.Path, extra: list[str]) -> None:
        self.name = name
        self.store = store
        self.protocol = "socketio" if name == "socketio" else "verani"
        cmd = SERVERS[name] + (["--store", str(store)] if name.startswith("verani") else [])
        cmd += extra
        self.log = open(store.parent / f"{name}.out", "w+b")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.monotonic() + 30
        while True:
            self.log.seek(0)
            found = PORT_LINE.search(self.log.read().decode(errors="replace"))
            if found:
                self.port = int(found.group(1))
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.log.seek(0)
                raise RuntimeError(f"{name} did not start: {self.log.read().decode()[-2000:]}")
            time.sleep(0.05)
        self.url = f"ws://127.0.0.1:{self.port}"

    def cpu_s(self) -> float:
        fields = pathlib.Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def io(self) -> dict[str, int]:
        """The server process's /proc/PID/io counters (``wchar``, ``write_bytes``, ...)."""
        lines = pathlib.Path(f"/proc/{self.proc.pid}/io").read_text().splitlines()
        return {k: int(v) for k, v in (line.split(": ") for line in lines)}

    def rss_kb(self) -> int:
        for line in pathlib.Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def control(self, request: dict[str, Any]) -> dict[str, Any]:
        return trio.run(control_request, self.store, request)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@contextlib.contextmanager
def serving(name: str, prepare: Any = None, extra: list[str] | None = None) -> Iterator[Server]:
    with tempfile.TemporaryDirectory(prefix=f"verani-bench-{name}-") as tmp:
        store = pathlib.Path(tmp) / "store"
        store.mkdir()
        if prepare is not None:
            prepare(store)
        server = Server(name, store, extra or [])
        try:
            yield server
        finally:
            server.stop()


def available(name: str) -> bool:
    if name == "socketio":
        try:
            import socketio  # type: ignore[import-untyped]  # noqa: F401
            import uvicorn  # noqa: F401
        except ImportError:
            return False
    return True


# --- the load generator --------------------------------------------------------------------------


def _loadgen_command(server: Server, mode: str, args: dict[str, Any]) -> list[str]:
    spec = {
        "mode": mode,
        "url": server.url,
        "path": "/ws/counter",
        "protocol": server.protocol,
        "instance": f"{mode}-{time.monotonic_ns()}",
        **args,
    }
    return [*NODE, str(HERE / "loadgen.mjs"), json.dumps(spec)]


def interactive_loadgen(server: Server, mode: str, **args: Any) -> subprocess.Popen[str]:
    """A load-generator process of a line-driven mode ("idle", "revive") against ``server``:
    each line written to its stdin gets one JSON line back; closing stdin ends it."""
    return subprocess.Popen(
        _loadgen_command(server, mode, args),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def loadgen(server: Server, mode: str, **args: Any) -> dict[str, Any]:
    """Run one load-generator process against ``server``; its JSON result, with the server's
    CPU seconds over the same run."""
    cpu0 = server.cpu_s()
    out = subprocess.run(
        _loadgen_command(server, mode, args),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"loadgen {mode} against {server.name} failed: {out.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    result["server_cpu_s"] = round(server.cpu_s() - cpu0, 3)
    if "elapsed_s" in result:
        result["loadgen_cpu_share"] = round(result["loadgen_cpu_s"] / result["elapsed_s"], 2)
    return result


def rounded(result: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}


# --- scenarios -----------------------------------------------------------------------------------

BASELINES = ["naive_trio", "websockets", "socketio"]


def scenario_rtt(servers: list[str], quick: bool) -> dict[str, Any]:
    n = 300 if quick else 2000
    names = [s for s in ["verani", "verani_os", *BASELINES, "trivial"] if s in servers]
    variants = {}
    for name in names:
        with serving(name) as server:
            variants[name] = rounded(loadgen(server, "rtt", count=n, warmup=n // 10))
    return {"variants": variants, "key": "ops_per_s"}


def scenario_pipeline(servers: list[str], quick: bool) -> dict[str, Any]:
    per_client = 100 if quick else 500
    names = [s for s in ["verani", *BASELINES, "trivial"] if s in servers]
    variants = {}
    for name in names:
        with serving(name) as server:
            variants[name] = rounded(
                loadgen(server, "pipeline", clients=20, depth=16, count=per_client)
            )
    return {"variants": variants, "key": "increments_per_s"}


def scenario_fanout(servers: list[str], quick: bool) -> dict[str, Any]:
    clients, count = (100, 50) if quick else (500, 200)
    names = [s for s in ["verani", *BASELINES, "trivial"] if s in servers]
    variants = {}
    for name in names:
        with serving(name) as server:
            variants[name] = rounded(loadgen(server, "fanout", clients=clients, count=count))
    return {"variants": variants, "key": "deliveries_per_s"}


def scenario_connect(servers: list[str], quick: bool) -> dict[str, Any]:
    clients = 100 if quick else 500
    names = [s for s in ["verani", *BASELINES, "trivial"] if s in servers]
    variants = {}
    for name in names:
        with serving(name) as server:
            result = loadgen(server, "connect", clients=clients)
            result["connections_per_s"] = clients / result["elapsed_s"]
            variants[name] = rounded(result)
    return {"variants": variants, "key": "connections_per_s"}


def scenario_durable(servers: list[str], quick: bool) -> dict[str, Any]:
    per_client = 100 if quick else 500
    variants = {}
    for name in ("verani", "verani_os"):
        with serving(name) as server:
            saves0 = server.control({"op": "status"})["store_saves"]
            result = loadgen(server, "pipeline", clients=20, depth=16, count=per_client)
            saves = server.control({"op": "status"})["store_saves"] - saves0
            result["store_writes"] = saves
            result["writes_per_event"] = saves / result["increments"]
            variants[name] = rounded(result)
    return {"variants": variants, "key": "increments_per_s"}


def scenario_revive(servers: list[str], quick: bool) -> dict[str, Any]:
    from tests.bench.bench_room import items_for

    n = 10 if quick else 50
    cases = {"1kb": 1_000, "1mb": 1_000_000}

    def prepare(store: pathlib.Path) -> None:
        async def write() -> None:
            fs = FileStore(store)
            for case, size in cases.items():
                await fs.save("bench", case, {"count": 0, "items": items_for(size)})  # type: ignore[dict-item]
            await fs.aclose()

        trio.run(write)

    results: dict[str, Any] = {}
    with serving("verani", prepare) as server:
        for case in cases:
            doc_bytes = (server.store / "rooms" / "bench" / f"{case}.json").stat().st_size
            proc = interactive_loadgen(server, "revive", path="/ws/bench", instance=case)
            assert proc.stdin is not None and proc.stdout is not None
            awake, asleep = [], []
            _revive_sample(proc)  # the first revival also warms the server's code paths
            _wait_no_sessions(server)
            for _ in range(n):
                awake.append(_revive_sample(proc))
                _wait_no_sessions(server)
                server.control({"op": "hibernate", "room": "bench", "instance": case})
                asleep.append(_revive_sample(proc))
                _wait_no_sessions(server)
            proc.stdin.close()
            proc.wait(timeout=30)
            server_side = server.control({"op": "status"})["revive_ms"][-n:]
            results[case] = {
                "doc_bytes": doc_bytes,
                "awake": latency(awake),
                "hibernated": latency(asleep),
                "server_side": latency(server_side),
            }
            server.control({"op": "hibernate", "room": "bench", "instance": case})
    return {"cases": results}


def _revive_sample(proc: subprocess.Popen[str]) -> float:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("go\n")
    proc.stdin.flush()
    return float(json.loads(proc.stdout.readline())["ms"])


def _wait_no_sessions(server: Server) -> None:
    # Until the room has seen the client's disconnect.
    while any(i["sessions"] for i in server.control({"op": "status"})["instances"]):
        time.sleep(0.002)


def scenario_memory(servers: list[str], quick: bool) -> dict[str, Any]:
    conns, rooms = (200, 1000) if quick else (1000, 10_000)
    names = [s for s in ["verani_os", *BASELINES] if s in servers or s == "verani_os"]
    per_conn = {}
    for name in names:
        with serving(name) as server:
            # One connection first, so what is measured is the cost of more of them.
            loadgen(server, "connect", clients=10)
            before = server.rss_kb()
            proc = interactive_loadgen(server, "idle", instance="idle", clients=conns, instances=1)
            assert proc.stdin is not None and proc.stdout is not None
            ready = json.loads(proc.stdout.readline())
            time.sleep(1)
            after = server.rss_kb()
            proc.stdin.close()
            proc.wait(timeout=60)
            per_conn[name] = {
                "connections": ready["ready"],
                "rss_before_kb": before,
                "rss_after_kb": after,
                "kb_per_connection": round((after - before) / ready["ready"], 2),
            }
    # Rooms hibernate on their own half a second after their last client leaves, as idle rooms
    # do in production (with every room awake at once, the peak would be measured instead).
    with serving("verani_os", extra=["--idle-timeout", "0.5"]) as server:
        loadgen(server, "rooms", count=100, batch=100)  # code paths warm
        time.sleep(1)
        before = server.rss_kb()
        touched = loadgen(server, "rooms", count=rooms, batch=100)
        awake_kb = server.rss_kb()
        time.sleep(1.5)
        server.control({"op": "hibernate"})
        after = server.rss_kb()
        awake_left = sum(i["awake"] for i in server.control({"op": "status"})["instances"])
        # The same again with other rooms: the allocator's high-water mark from touching rooms
        # (100 sockets at once, a few hundred rooms awake) is reached now, so what this adds is
        # the cost of the hibernated rooms themselves.
        loadgen(server, "rooms", count=rooms, batch=100, instance="more")
        time.sleep(1.5)
        server.control({"op": "hibernate"})
        marginal = server.rss_kb() - after
        hibernated = {
            "rooms": rooms,
            "rss_never_created_kb": before,
            "rss_awake_kb": awake_kb,
            "rss_hibernated_kb": after,
            "awake_after": awake_left,
            "marginal_kb": marginal,
            "added_kb": after - before,
            "rooms_per_s": round(rooms / touched["elapsed_s"], 1),
        }
    return {"per_connection": per_conn, "hibernated_rooms": hibernated}


def scenario_rooms(servers: list[str], quick: bool) -> dict[str, Any]:
    warmup_s, duration_s = (0.5, 2) if quick else (2, 8)
    names = [s for s in ["verani", "verani_os", "verani_memory", "naive_trio"] if s in servers]
    variants = {}
    for name in names:
        with serving(name) as server:
            counted = name in ("verani", "verani_os")  # servers with a control endpoint
            before = server.control({"op": "status"}) if counted else {}
            result = loadgen(server, "multiroom", rooms=200, instance="r", warmup_s=warmup_s,
                             duration_s=duration_s)  # fmt: skip
            if counted:
                after = server.control({"op": "status"})
                saves = after["store_saves"] - before["store_saves"]
                writes = after["store_writes"] - before["store_writes"]
                # Group commit across rooms: how many rooms' commits each durable write carried.
                result["commits_per_write"] = saves / max(writes, 1)
            variants[name] = rounded(result)
    return {"variants": variants, "key": "ops_per_s"}


def scenario_broadcast(servers: list[str], quick: bool) -> dict[str, Any]:
    clients, warmup_s, duration_s = (100, 0.5, 2) if quick else (500, 2, 8)
    # (variant, server, room path): verani twice, on the counter room and on a room that
    # persists nothing.
    cases = [
        ("verani", "verani", "/ws/counter"),
        ("verani_nopersist", "verani", "/ws/broadcast"),
        ("websockets", "websockets", "/ws/counter"),
        ("naive_trio", "naive_trio", "/ws/counter"),
    ]
    variants = {}
    for variant, name, path in cases:
        if name not in servers:
            continue
        with serving(name) as server:
            variants[variant] = rounded(
                loadgen(server, "broadcast", path=path, clients=clients, warmup_s=warmup_s,
                        duration_s=duration_s)
            )  # fmt: skip
    return {"variants": variants, "key": "broadcasts_per_s"}


def scenario_large_state(servers: list[str], quick: bool) -> dict[str, Any]:
    from tests.bench.bench_room import LARGE_BYTES

    turns = 50 if quick else 300
    names = [s for s in ["verani", "verani_os"] if s in servers]
    variants = {}
    for name in names:
        with serving(name) as server:
            room = {"path": "/ws/large", "instance": "large"}
            # The first connect fills the big key (and writes it); a few turns warm the server.
            loadgen(server, "rtt", **room, count=20, warmup=0)
            io0, saves0 = server.io(), server.control({"op": "status"})["store_saves"]
            result = loadgen(server, "rtt", **room, count=turns, warmup=0)
            io1, saves1 = server.io(), server.control({"op": "status"})["store_saves"]
            count = 20 + turns  # the count the last turn set
            result["turns_per_s"] = result.pop("ops_per_s")
            result["wchar_per_turn"] = (io1["wchar"] - io0["wchar"]) / turns
            result["write_bytes_per_turn"] = (io1["write_bytes"] - io0["write_bytes"]) / turns
            result["store_writes_per_turn"] = (saves1 - saves0) / turns
            result["store_bytes"] = sum(
                f.stat().st_size for f in server.store.rglob("*") if f.is_file()
            )
            result["large_key_bytes"] = LARGE_BYTES
            # The change a turn makes: the count key, encoded.
            result["change_bytes"] = len(json.dumps({"count": count}, separators=(",", ":"))) - 2
            variants[name] = rounded(result)
    return {"variants": variants, "key": "turns_per_s"}


def latency(samples: list[float]) -> dict[str, Any]:
    ordered = sorted(samples)
    if not ordered:
        return {"n": 0}
    return {
        "n": len(ordered),
        "p50_ms": round(statistics.median(ordered), 3),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 3),
    }


SCENARIOS = {
    "rtt": scenario_rtt,
    "pipeline": scenario_pipeline,
    "fanout": scenario_fanout,
    "connect": scenario_connect,
    "revive": scenario_revive,
    "durable": scenario_durable,
    "memory": scenario_memory,
    "rooms": scenario_rooms,
    "broadcast": scenario_broadcast,
    "large-state": scenario_large_state,
}


# --- report --------------------------------------------------------------------------------------


def table_rows(name: str, result: dict[str, Any]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    if "variants" in result:
        key = result["key"]
        variants = result["variants"]
        ref = {b: variants[b][key] for b in ("naive_trio", "websockets", "socketio", "verani_os")
               if b in variants}  # fmt: skip
        for variant, r in variants.items():
            ratios = ", ".join(
                f"{r[key] / v:.2f}x {b}" for b, v in ref.items() if b != variant and v
            )
            cpu = f"lg cpu {r.get('loadgen_cpu_share', 0):.0%}"
            rows.append(
                (name, variant, f"{r[key]:,.0f} {key.removesuffix('_per_s')}/s",
                 _ms(r.get("p50_ms")), _ms(r.get("p99_ms")), f"{ratios}; {cpu}")
            )  # fmt: skip
            if name == "durable":
                rows[-1] = (
                    *rows[-1][:-1],
                    f"{rows[-1][-1]}; {r['writes_per_event']:.3f} writes/event",
                )
            if name == "rooms" and "commits_per_write" in r:
                rows[-1] = (
                    *rows[-1][:-1],
                    f"{rows[-1][-1]}; {r['commits_per_write']:.1f} commits/write",
                )
            if name == "large-state":
                rows[-1] = (
                    *rows[-1][:-1],
                    f"{rows[-1][-1]}; per turn {r['wchar_per_turn']:,.0f} B written "
                    f"({r['wchar_per_turn'] / r['change_bytes']:,.0f}x the "
                    f"{r['change_bytes']} B change), {r['write_bytes_per_turn']:,.0f} B to disk, "
                    f"{r['store_writes_per_turn']:.2f} store writes",
                )
    elif name == "revive":
        for case, c in result["cases"].items():
            for kind in ("awake", "hibernated", "server_side"):
                s = c[kind]
                rows.append(
                    (name, f"{case} ({c['doc_bytes']:,} B) {kind}", f"n={s['n']}",
                     _ms(s.get("p50_ms")), _ms(s.get("p99_ms")),
                     f"{s['p50_ms'] / c['awake']['p50_ms']:.2f}x awake p50")
                )  # fmt: skip
    elif name == "memory":
        for variant, m in result["per_connection"].items():
            rows.append(
                (name, f"{variant} idle connections", f"{m['connections']}", "-", "-",
                 f"{m['kb_per_connection']:.1f} KB RSS per connection")
            )  # fmt: skip
        h = result["hibernated_rooms"]
        rows.append(
            (name, f"{h['rooms']:,} rooms hibernated", "-", "-", "-",
             f"+{h['added_kb'] / 1024:.1f} MiB RSS vs never created (the peak of touching "
             f"them); {h['rooms']:,} more: +{h['marginal_kb'] / 1024:.2f} MiB")
        )  # fmt: skip
    return rows


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """For each server, the run with its median figure (the machine is noisy: one run of N
    decides nothing); every run's figure is kept under ``all``."""
    key = runs[0]["key"]
    variants = {}
    for server in runs[0]["variants"]:
        ordered = sorted((r["variants"][server] for r in runs), key=lambda v: v[key])
        chosen = dict(ordered[len(ordered) // 2])
        chosen["all"] = [round(v[key], 1) for v in ordered]
        variants[server] = chosen
    return {"variants": variants, "key": key, "repeat": len(runs)}


def _ms(value: Any) -> str:
    return "-" if value is None else f"{value:.2f}"


def print_table(rows: list[tuple[str, ...]]) -> None:
    header = ("scenario", "server", "throughput", "p50 ms", "p99 ms", "ratios")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="all", help=f"{', '.join(SCENARIOS)} or all")
    parser.add_argument("--quick", action="store_true", help="fewer operations, for a smoke run")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run each throughput scenario N times; report each server's median run",
    )
    parser.add_argument(
        "--servers", default=",".join(SERVERS), help="comma-separated servers to include"
    )
    args = parser.parse_args(argv)
    names = list(SCENARIOS) if args.scenario == "all" else args.scenario.split(",")
    servers = [s for s in args.servers.split(",") if available(s)]
    skipped = sorted(set(args.servers.split(",")) - set(servers))
    results = {}
    for name in names:
        print(f"... {name}", file=sys.stderr, flush=True)
        result = SCENARIOS[name](servers, args.quick)
        if "variants" in result and args.repeat > 1:
            more = [SCENARIOS[name](servers, args.quick) for _ in range(args.repeat - 1)]
            result = median_run([result, *more])
        results[name] = {"scenario": name, "quick": args.quick, **result}
    print_table([row for name, r in results.items() for row in table_rows(name, r)])
    print()
    if skipped:
        print(f"not run: {', '.join(skipped)} (pip install -e '.[bench]')")
    node = subprocess.run([NODE[0], "--version"], capture_output=True, text=True).stdout.strip()
    print(CAVEAT)
    print(f"python {sys.version.split()[0]}, node {node}, {os.cpu_count()} CPUs")
    print()
    for result in results.values():
        print(json.dumps(result, separators=(",", ":")))


if __name__ == "__main__":
    main()
