"""A first benchmark harness for verani (run by hand; never collected by pytest).

    python tests/bench/run.py [--scenario rtt|revive|persist|all] [--quick]
    python -m tests.bench [--scenario rtt|revive|persist|all] [--quick]   (from the repository root)

Scenarios, over loopback, on the counter room of ``rooms/counter.py`` or the bench room below:

- ``rtt``: one client sends ``counter:increment`` and waits for its ``counter:update`` before the
  next. Three servers in the same run: verani with the default (fsync) file store, verani with
  ``FileStore(dir, durability="os")``, and a naive counter written directly on trio-websocket.
- ``revive``: connect-to-first-``counter:sync`` time of a hibernated room, with ~1 KB of
  persisted state and with ~1 MB of it, against the same for an awake room and against
  ``Store.load`` alone.
- ``persist``: persisted increments per second on one room instance, whose whole document
  (~1 KB or ~100 KB) is rewritten on every group commit, with ``durability="fsync"`` and
  ``"os"``; ``serial`` (one client, one increment outstanding: p50/p99 and ops/s) and
  ``pipelined`` (8 clients, 16 increments outstanding each). The store's saves are counted, so
  saves/event shows how many increments each write carried.

Prints one table, then one JSON line per scenario.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, Literal

import attrs
import orjson
import trio
import trio_websocket

from verani import RoomContext, Server, define_room, open_server
from verani.loader import load_rooms
from verani.store import FileStore, Store
from verani.store.base import JSONValue

ROOT = pathlib.Path(__file__).resolve().parents[2]
COUNTER = ROOT / "rooms" / "counter.py"
IDLE = 3600.0  # no room hibernates by itself during a run; the harness hibernates them

CAVEAT = (
    "caveat: a shared 2-core machine, noisy; compare ratios measured in the same run, not "
    "absolute figures across runs. Server and load generator run in one process and one Trio "
    "loop (issue #8 moves the load generator out), so client work is counted in every figure."
)


# --- the bench room: a count and a payload of persisted strings -----------------------------


@attrs.define
class BenchState:
    count: int = 0
    items: list[str] = attrs.Factory(list)


bench_room = define_room(
    name="bench",
    websocket_path="/ws/bench",
    state=BenchState,
    persisted_keys=["count", "items"],
)


@bench_room.on_connect
def bench_sync(ctx: RoomContext[BenchState]) -> None:
    state = ctx.actor.room_state
    ctx.emit.emit("counter:sync", {"count": state.count, "items": len(state.items)})


@bench_room.on("bench:fill")
def bench_fill(ctx: RoomContext[BenchState], data: Any) -> None:
    # ``bytes`` of persisted strings, 100 characters each (distinct, so nothing is shared).
    state = ctx.actor.room_state
    state.items = [f"{i:08d}" + "x" * 92 for i in range(data["bytes"] // 100)]
    state.count += 1
    ctx.emit.emit("counter:update", {"count": state.count, "updatedBy": ctx.meta.user_id})


@bench_room.on("bench:inc")
def bench_inc(ctx: RoomContext[BenchState], data: Any) -> None:
    # Dirties ``count`` only, but a save writes the whole document, items included.
    state = ctx.actor.room_state
    state.count += 1
    ctx.emit.emit("counter:update", {"count": state.count})


class CountingFileStore(FileStore):
    """A FileStore that counts its saves."""

    saves = 0

    async def save(
        self,
        room: str,
        instance: str,
        state: Mapping[str, JSONValue],
        storage: Mapping[str, JSONValue] | None = None,
    ) -> None:
        self.saves += 1
        await super().save(room, instance, state, storage)


# Payload bytes giving a document of about the named size (each 100-character string takes ~110
# bytes of indented JSON, plus ~250 bytes of envelope); the measured size is reported.
DOC_1KB = 700
DOC_100KB = 90_000
DOC_1MB = 900_000


# --- measuring -----------------------------------------------------------------------------------


def rss_kb() -> dict[str, int]:
    """Current RSS (VmRSS) and peak RSS (ru_maxrss) of this process, in KiB."""
    current = 0
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            current = int(line.split()[1])
    return {"rss_kb": current, "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}


def summary(samples: list[float], elapsed: float | None = None) -> dict[str, Any]:
    """n, p50 and p99 in ms (and ops/s when the samples ran back to back in ``elapsed`` s)."""
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    out: dict[str, Any] = {
        "n": len(samples),
        "p50_ms": round(statistics.median(ordered) * 1e3, 3),
        "p99_ms": round(p99 * 1e3, 3),
    }
    if elapsed is not None:
        out["ops_s"] = round(len(samples) / elapsed, 1)
    return out


class Client:
    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self.ws = ws

    async def emit(self, event: str, data: Any = None) -> None:
        await self.ws.send_message(orjson.dumps({"type": event, "data": data}).decode())

    async def next_event(self, name: str) -> dict[str, Any]:
        while True:
            frame = orjson.loads(await self.ws.get_message())
            if frame.get("type") == "event" and frame["data"]["type"] == name:
                return frame["data"]  # type: ignore[no-any-return]


@asynccontextmanager
async def connect(url: str) -> AsyncIterator[Client]:
    async with trio_websocket.open_websocket_url(url, message_queue_size=64) as ws:
        try:
            yield Client(ws)
        finally:
            # trio-websocket's client may leave its TCP stream open when the server closed first.
            await trio.aclose_forcefully(ws._stream)


# --- rtt -----------------------------------------------------------------------------------------


async def increments(url: str, n: int, warmup: int) -> dict[str, Any]:
    async with connect(url) as client:
        await client.next_event("counter:sync")
        samples = []
        for i in range(warmup + n):
            if i == warmup:
                start = time.perf_counter()
            t0 = time.perf_counter()
            await client.emit("counter:increment", {"amount": 1})
            await client.next_event("counter:update")
            samples.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - start
    return summary(samples[warmup:], elapsed)


async def rtt_verani(rooms: list[Any], make_store: Callable[[str], Store | str], n: int) -> Any:
    with tempfile.TemporaryDirectory(prefix="verani-bench-") as tmp:
        async with open_server(rooms, store=make_store(tmp), idle_timeout=IDLE, control=False) as s:
            return await increments(f"{s.url}/ws/counter/rtt?userId=bench", n, n // 20)


async def naive_counter(request: trio_websocket.WebSocketRequest) -> None:
    """What you would write by hand: one int, no persistence, one send per frame."""
    ws = await request.accept()
    user = request.path.partition("userId=")[2] or "anonymous"
    await ws.send_message(
        orjson.dumps(
            {"type": "event", "channel": "default", "data": {"type": "counter:sync", "count": 0}}
        ).decode()
    )
    count = 0
    try:
        while True:
            frame = orjson.loads(await ws.get_message())
            if frame.get("type") == "counter:increment":
                count += (frame.get("data") or {}).get("amount", 1)
                data = {"type": "counter:update", "count": count, "updatedBy": user}
                event = {"type": "event", "channel": "default", "data": data}
                await ws.send_message(orjson.dumps(event).decode())
    except trio_websocket.ConnectionClosed:
        pass


async def rtt_naive(n: int) -> dict[str, Any]:
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            trio_websocket.serve_websocket, naive_counter, "127.0.0.1", 0, None
        )
        result = await increments(
            f"ws://127.0.0.1:{server.port}/ws/counter?userId=bench", n, n // 20
        )
        nursery.cancel_scope.cancel()
    return result


async def scenario_rtt(quick: bool) -> dict[str, Any]:
    n = 300 if quick else 2000
    rooms = load_rooms([COUNTER])
    variants = {
        "verani_fsync": await rtt_verani(rooms, lambda d: d, n),
        "verani_os": await rtt_verani(rooms, lambda d: FileStore(d, durability="os"), n),
        "naive": await rtt_naive(n),
    }
    naive = variants["naive"]["ops_s"]
    ratios = {f"{k}_vs_naive": round(v["ops_s"] / naive, 4) for k, v in variants.items()}
    ratios["verani_os_vs_fsync"] = round(
        variants["verani_os"]["ops_s"] / variants["verani_fsync"]["ops_s"], 2
    )
    return {"variants": variants, "ratios": ratios}


# --- revive --------------------------------------------------------------------------------------


async def wait_no_sessions(server: Server, room: str, instance: str) -> None:
    """Until the room has seen the last client's disconnect (so it sleeps with no sessions)."""
    while any(
        s.room == room and s.instance == instance and s.sessions for s in server.supervisor.status()
    ):
        await trio.sleep(0.001)


async def connect_to_sync(url: str) -> float:
    t0 = time.perf_counter()
    async with connect(url) as client:
        await client.next_event("counter:sync")
        took = time.perf_counter() - t0
    return took


async def revive_case(
    server: Server,
    store: FileStore,
    room: str,
    instance: str,
    setup: Callable[[Client], Awaitable[Any]],
    n: int,
) -> dict[str, Any]:
    path = {"counter": "/ws/counter", "bench": "/ws/bench"}[room]
    url = f"{server.url}{path}/{instance}?userId=bench"
    async with connect(url) as client:
        await client.next_event("counter:sync")
        await setup(client)
    await wait_no_sessions(server, room, instance)
    # The setup's reply left once its write was durable, so the document is on disk.
    size = (await trio.Path(store.path_for(room, instance)).stat()).st_size

    awake, asleep, loads = [], [], []
    for _ in range(n):
        # Awake: the room is up (idle timeout far away), with no client connected.
        awake.append(await connect_to_sync(url))
        await wait_no_sessions(server, room, instance)
        # Hibernated: persisted keys on disk, actor gone.
        await server.hibernate(room, instance)
        assert not any(
            s.room == room and s.instance == instance for s in server.supervisor.status()
        )
        asleep.append(await connect_to_sync(url))
        await wait_no_sessions(server, room, instance)
        # The store read alone, the floor of a revival.
        t0 = time.perf_counter()
        await store.load(room, instance)
        loads.append(time.perf_counter() - t0)
    return {
        "doc_bytes": size,
        "awake": summary(awake),
        "hibernated": summary(asleep),
        "store_load": summary(loads),
    }


def filler(payload_bytes: int) -> Callable[[Client], Awaitable[None]]:
    async def fill(client: Client) -> None:
        await client.emit("bench:fill", {"bytes": payload_bytes})
        await client.next_event("counter:update")

    return fill


async def scenario_revive(quick: bool) -> dict[str, Any]:
    n = 10 if quick else 50
    with tempfile.TemporaryDirectory(prefix="verani-bench-") as tmp:
        store = FileStore(tmp)
        rooms = [bench_room]
        async with open_server(rooms, store=store, idle_timeout=IDLE, control=False) as server:
            cases = {
                "1kb": await revive_case(server, store, "bench", "1kb", filler(DOC_1KB), n),
                "1mb": await revive_case(server, store, "bench", "1mb", filler(DOC_1MB), n),
            }
    ratios = {}
    for name, case in cases.items():
        p50 = case["hibernated"]["p50_ms"]
        ratios[f"{name}_hibernated_vs_awake_p50"] = round(p50 / case["awake"]["p50_ms"], 2)
        ratios[f"{name}_hibernated_vs_store_load_p50"] = round(
            p50 / case["store_load"]["p50_ms"], 2
        )
    return {"cases": cases, "ratios": ratios}


# --- persist -------------------------------------------------------------------------------------


async def persist_serial(url: str, n: int, warmup: int) -> dict[str, Any]:
    async with connect(url) as client:
        await client.next_event("counter:sync")
        samples = []
        for i in range(warmup + n):
            if i == warmup:
                start = time.perf_counter()
            t0 = time.perf_counter()
            await client.emit("bench:inc")
            await client.next_event("counter:update")
            samples.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - start
    return summary(samples[warmup:], elapsed)


async def persist_pipelined(url: str, clients: int, depth: int, per_client: int) -> dict[str, Any]:
    """``clients`` sockets, each keeping ``depth`` increments outstanding, ``per_client`` each."""
    samples: list[float] = []
    go = trio.Event()
    ready = 0

    async def one(k: int) -> None:
        nonlocal ready
        async with connect(url.replace("userId=bench", f"userId=bench{k}")) as client:
            await client.next_event("counter:sync")
            window = trio.Semaphore(depth)
            sent: collections.deque[float] = collections.deque()

            async def sender() -> None:
                for _ in range(per_client):
                    await window.acquire()
                    sent.append(time.perf_counter())
                    await client.emit("bench:inc")

            ready += 1
            await go.wait()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sender)
                for _ in range(per_client):
                    await client.next_event("counter:update")
                    # One socket's replies come back in the order its increments went out.
                    samples.append(time.perf_counter() - sent.popleft())
                    window.release()

    async with trio.open_nursery() as nursery:
        for k in range(clients):
            nursery.start_soon(one, k)
        while ready < clients:
            await trio.sleep(0.001)
        start = time.perf_counter()
        go.set()
    elapsed = time.perf_counter() - start
    return summary(samples, elapsed)


async def persist_case(
    durability: Literal["fsync", "os"], payload_bytes: int, quick: bool
) -> dict[str, Any]:
    serial_n = 100 if quick else 2000
    clients, depth = 8, 16
    per_client = 25 if quick else 1000
    with tempfile.TemporaryDirectory(prefix="verani-bench-") as tmp:
        store = CountingFileStore(tmp, durability=durability)
        async with open_server([bench_room], store=store, idle_timeout=IDLE, control=False) as s:
            url = f"{s.url}/ws/bench/persist?userId=bench"
            async with connect(url) as client:
                await client.next_event("counter:sync")
                # The reply leaves once the filled document is durable.
                await filler(payload_bytes)(client)
            size = (await trio.Path(store.path_for("bench", "persist")).stat()).st_size
            shapes = {}
            # Every reply is released only once its write is durable, so when the last reply is
            # in no save is pending and the count covers exactly the measured increments.
            store.saves = 0
            serial = await persist_serial(url, serial_n, serial_n // 20)
            serial["saves"] = store.saves
            serial["saves_per_event"] = round(store.saves / (serial_n + serial_n // 20), 3)
            shapes["serial"] = serial
            store.saves = 0
            pipelined = await persist_pipelined(url, clients, depth, per_client)
            pipelined["saves"] = store.saves
            pipelined["saves_per_event"] = round(store.saves / pipelined["n"], 3)
            pipelined["clients"], pipelined["depth"] = clients, depth
            shapes["pipelined"] = pipelined
    return {"doc_bytes": size, **shapes}


async def scenario_persist(quick: bool) -> dict[str, Any]:
    cases: dict[str, Any] = {}
    for size_name, payload_bytes in (("1kb", DOC_1KB), ("100kb", DOC_100KB)):
        for durability in ("fsync", "os"):
            cases[f"{durability}_{size_name}"] = await persist_case(
                durability, payload_bytes, quick
            )
    ratios = {}
    for size_name in ("1kb", "100kb"):
        fsync, os_ = cases[f"fsync_{size_name}"], cases[f"os_{size_name}"]
        for shape in ("serial", "pipelined"):
            ratios[f"{size_name}_{shape}_os_vs_fsync"] = round(
                os_[shape]["ops_s"] / fsync[shape]["ops_s"], 2
            )
        for durability, case in (("fsync", fsync), ("os", os_)):
            ratios[f"{durability}_{size_name}_pipelined_vs_serial"] = round(
                case["pipelined"]["ops_s"] / case["serial"]["ops_s"], 2
            )
    for durability in ("fsync", "os"):
        for shape in ("serial", "pipelined"):
            ratios[f"{durability}_{shape}_100kb_vs_1kb"] = round(
                cases[f"{durability}_100kb"][shape]["ops_s"]
                / cases[f"{durability}_1kb"][shape]["ops_s"],
                3,
            )
    return {"cases": cases, "ratios": ratios}


# --- output --------------------------------------------------------------------------------------


def table_rows(name: str, result: dict[str, Any]) -> list[tuple[str, ...]]:
    rows = []
    if name == "rtt":
        for variant, s in result["variants"].items():
            ratio = result["ratios"][f"{variant}_vs_naive"]
            rows.append(
                ("rtt", variant, str(s["n"]), f"{s['ops_s']:.0f}", f"{s['p50_ms']:.3f}",
                 f"{s['p99_ms']:.3f}", f"{ratio:.3f} of naive ops/s")
            )  # fmt: skip
    elif name == "persist":
        for case, c in result["cases"].items():
            for shape in ("serial", "pipelined"):
                s = c[shape]
                note = f"{s['saves_per_event']:.3f} saves/event"
                if shape == "pipelined":
                    note += f", {s['ops_s'] / c['serial']['ops_s']:.1f}x serial ops/s"
                rows.append(
                    ("persist", f"{case} ({c['doc_bytes']} B doc) {shape}", str(s["n"]),
                     f"{s['ops_s']:.0f}", f"{s['p50_ms']:.3f}", f"{s['p99_ms']:.3f}", note)
                )  # fmt: skip
    else:
        for case, c in result["cases"].items():
            awake = c["awake"]["p50_ms"]
            for kind in ("awake", "hibernated", "store_load"):
                s = c[kind]
                rows.append(
                    ("revive", f"{case} ({c['doc_bytes']} B doc) {kind}", str(s["n"]), "-",
                     f"{s['p50_ms']:.3f}", f"{s['p99_ms']:.3f}",
                     f"{s['p50_ms'] / awake:.2f}x awake p50")
                )  # fmt: skip
    return rows


def print_table(rows: list[tuple[str, ...]]) -> None:
    header = ("scenario", "variant", "n", "ops/s", "p50 ms", "p99 ms", "ratio")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))


SCENARIOS = {"rtt": scenario_rtt, "revive": scenario_revive, "persist": scenario_persist}


async def run(scenarios: list[str], quick: bool) -> None:
    results = {}
    for name in scenarios:
        before = rss_kb()
        result = await SCENARIOS[name](quick)
        results[name] = {"scenario": name, "quick": quick, **result}
        results[name]["rss_before"], results[name]["rss_after"] = before, rss_kb()
    rows = [row for name, result in results.items() for row in table_rows(name, result)]
    print_table(rows)
    print()
    for name, result in results.items():
        b, a = result["rss_before"]["rss_kb"], result["rss_after"]["rss_kb"]
        print(f"RSS {name}: {b / 1024:.1f} MiB before, {a / 1024:.1f} MiB after")
    print(CAVEAT)
    print(f"python {sys.version.split()[0]}, trio {trio.__version__}, {os.cpu_count()} CPUs")
    print()
    for result in results.values():
        print(json.dumps(result, separators=(",", ":")))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", choices=[*SCENARIOS, "all"], default="all")
    parser.add_argument("--quick", action="store_true", help="fewer operations, for a smoke run")
    args = parser.parse_args(argv)
    scenarios = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    trio.run(run, scenarios, args.quick)


if __name__ == "__main__":
    main()
