"""Cluster benchmarks: verani serve --cluster on 1, 2, 3 nodes (run by hand; never collected by
pytest).

    python tests/bench/cluster.py [--scenario rooms,owner|all] [--nodes 1,2,3] [--rooms 200]
        [--warmup 1] [--duration 4] [--round-trips 400] [--rounds 4] [--quick]

Run from the repository root. Every process is started as a user would: one ``redis-server`` per
configuration (``tests/redis_server.py``: a free port, its own directory, ``appendfsync
always``, so every commit is on disk before Redis answers, as the file store's fsync), each node
``verani serve rooms/counter.py --cluster redis://... --node-id nN --port 0`` in its own process
(stdout and stderr kept in files, scanned for errors at the end), and the load generator of
``tests/bench/run.py`` (``tests/bench/loadgen.mjs``) in another. All of them share the
machine's cores: more nodes on 2 cores is not more hardware, so the ratios show what the cluster
costs per event, not how it scales across machines.

Scenarios (on the seed's counter room, over loopback):

- ``rooms``: the ``rooms`` scenario of run.py (``--rooms`` instances ``/ws/counter/r0`` ...,
  one client each, every client doing increment -> its own ``counter:update`` -> next, all at
  once for ``--duration`` seconds after ``--warmup``) against a plain ``verani serve`` (file
  store, fsync: the baseline) and 1, 2, 3 cluster nodes, client j on node j % N. A room is owned
  by the node that first gets one of its sockets, so here every socket is on its room's owner.
  The ``forwarded`` row makes the opposite case: every room is first touched through node
  j + 1 (which takes it), then measured with client j on node j, so every event and every
  frame goes through Redis streams. ops/s, reply p50/p99, ratio to 1 node, and the CPU used by
  the load generator and by all nodes (share of one core).
- ``owner``: two nodes; one room with a client on its owner node (``local``) and one on the
  other node (``forwarded``), plus a room alone on the owner (``local, alone``: no remote
  socket, so no frame leaves the owner). Each client does ``--round-trips`` sequential round
  trips (increment -> its own ``counter:update``), in ``--rounds`` alternating batches. Reply
  p50/p99 for each, the difference, and Redis commands per event: ``INFO`` before and after
  each batch (``total_commands_processed``, which counts the commands run inside Lua scripts
  too, and ``commandstats`` for the breakdown), minus what the nodes send while idle (lease
  renewals, heartbeats, blocking inbox reads) over the same time.

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
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script: ``tests`` is imported from the repository
    sys.path.insert(0, str(ROOT))

from tests.bench.run import NODE, _loadgen_command, latency, print_table  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402

PY = sys.executable
VERANI = str(pathlib.Path(PY).with_name("verani"))
CAVEAT = (
    "machine: 2 shared cores, noisy; every node, redis-server and the load generator share them "
    "(more nodes here is not more hardware). Compare ratios measured in one run, not absolute "
    "figures across runs."
)
SERVING = re.compile(r"verani serving on (ws://\S+) \(([^)]*)\)")
ERRORS = re.compile(r"\b(ERROR|CRITICAL|Traceback)\b|\bWARNING\b")


# --- processes -----------------------------------------------------------------------------------


class Node:
    """One ``verani serve`` process: a cluster node (``cluster`` given) or a plain server on a
    file store in ``directory``."""

    def __init__(self, name: str, directory: pathlib.Path, cluster: str | None) -> None:
        self.name = name
        cmd = [
            VERANI, "serve", str(ROOT / "rooms" / "counter.py"),
            "--port", "0",
            "--idle-timeout", "3600",
            "--log-level", "warning",
            "--max-connections-per-room", "5000",
            "--max-connections", "20000",
            "--max-awake-rooms", "20000",
        ]  # fmt: skip
        if cluster is None:
            store = directory / f"{name}-store"
            cmd += ["--store", str(store), "--durability", "fsync"]
        else:
            cmd += ["--cluster", cluster, "--node-id", name]
        self.out_path = directory / f"{name}.out"
        self.err_path = directory / f"{name}.err"
        self._out = open(self.out_path, "w+b")  # noqa: SIM115 - closed in stop()
        self._err = open(self.err_path, "w+b")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self._out, stderr=self._err, cwd=ROOT)
        self.returncode: int | None = None
        deadline = time.monotonic() + 30
        while True:
            self._out.seek(0)
            first = self._out.read().decode(errors="replace").split("\n", 1)
            found = SERVING.match(first[0]) if len(first) > 1 else None
            if found:
                self.url, self.where = found.group(1), found.group(2)
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{name} did not start: {self.log()[-2000:]}")
            time.sleep(0.05)

    def cpu_s(self) -> float:
        fields = pathlib.Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def log(self) -> str:
        return self.out_path.read_text(errors="replace") + self.err_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.returncode = self.proc.returncode
        self._out.close()
        self._err.close()


class Logs:
    """What the processes of a run wrote: every stderr line that looks like a problem, and
    every non-zero exit, reported at the end of the run."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def collect(self, label: str, node: Node) -> None:
        if node.returncode not in (0, None):
            self.problems.append(f"{label}/{node.name}: exited with {node.returncode}")
        lines = node.err_path.read_text(errors="replace").splitlines()
        flagged = [line for line in lines if ERRORS.search(line)]
        for line in flagged[:5]:
            self.problems.append(f"{label}/{node.name}: {line[:300]}")
        if len(flagged) > 5:
            self.problems.append(f"{label}/{node.name}: ... {len(flagged) - 5} more such lines")


@contextlib.contextmanager
def cluster(
    label: str, count: int, logs: Logs, keep: pathlib.Path | None
) -> Iterator[tuple[RedisServer | None, list[Node]]]:
    """``count`` cluster nodes on a fresh ``redis-server`` (``count`` 0: one plain server, no
    Redis). Everything is stopped on the way out, whatever happened."""
    with tempfile.TemporaryDirectory(prefix=f"verani-cluster-{label}-") as tmp:
        directory = pathlib.Path(tmp)
        redis: RedisServer | None = None
        nodes: list[Node] = []
        try:
            if count == 0:
                nodes.append(Node("plain", directory, None))
            else:
                redis = RedisServer(directory / "redis")
                redis.start()
                for i in range(count):
                    nodes.append(Node(f"n{i + 1}", directory, redis.url))
            yield redis, nodes
        finally:
            for node in nodes:
                node.stop()
                logs.collect(label, node)
            if redis is not None:
                redis.stop()
            if keep is not None:
                target = keep / label
                shutil.copytree(directory, target, dirs_exist_ok=True)


# --- Redis ---------------------------------------------------------------------------------------


def redis_command(port: int, *args: str) -> Any:
    """One command to the Redis on ``port`` (a minimal RESP client: no dependency, one
    connection per call, outside every measured batch)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        payload = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
        sock.sendall(payload.encode())
        reader = sock.makefile("rb")
        return _read_reply(reader)


def _read_reply(reader: Any) -> Any:
    line = reader.readline().rstrip(b"\r\n")
    kind, rest = line[:1], line[1:]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise RuntimeError(f"redis: {rest.decode()}")
    if kind == b":":
        return int(rest)
    if kind == b"$":
        size = int(rest)
        if size < 0:
            return None
        data: bytes = reader.read(size + 2)[:-2]
        return data.decode()
    if kind == b"*":
        size = int(rest)
        return None if size < 0 else [_read_reply(reader) for _ in range(size)]
    raise RuntimeError(f"redis: unexpected reply {line!r}")


def command_counts(port: int) -> dict[str, int]:
    """``total_commands_processed`` (under ``"*"``) and the calls of each command, from one
    ``INFO`` (itself counted as the next snapshot's, and left out of the deltas)."""
    counts: dict[str, int] = {}
    for line in redis_command(port, "INFO", "everything").splitlines():
        if line.startswith("total_commands_processed:"):
            counts["*"] = int(line.split(":")[1])
        elif line.startswith("cmdstat_"):
            name, _, stats = line.removeprefix("cmdstat_").partition(":")
            counts[name] = int(stats.split("calls=")[1].split(",")[0])
    return counts


def count_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    delta = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
    info = delta.pop("info", 0)
    delta["*"] = delta.get("*", 0) - info
    return delta


_OWNERS = """
local out = {}
for _, key in ipairs(redis.call('KEYS', 'verani:{counter/*}:lease')) do
  out[#out + 1] = key
  out[#out + 1] = redis.call('GET', key)
end
return out
"""


def owners(port: int) -> dict[str, str]:
    """The owner node of each counter instance, from the leases in Redis."""
    found = redis_command(port, "EVAL", _OWNERS, "0") or []
    return {
        key.split("{counter/", 1)[1].rsplit("}", 1)[0]: value.rsplit(" ", 1)[0].rpartition("#")[0]
        for key, value in zip(found[::2], found[1::2], strict=True)
    }


def ownership(port: int, nodes: list[Node], rooms: int) -> dict[str, Any]:
    """Rooms owned per node, and how many of the ``rooms`` clients (client j on node j % N, in
    room ``r{j}``) are on their room's owner."""
    held = owners(port)
    per_node: dict[str, int] = {}
    for node in held.values():
        per_node[node] = per_node.get(node, 0) + 1
    on_owner = sum(held.get(f"r{j}") == nodes[j % len(nodes)].name for j in range(rooms))
    return {"owned": dict(sorted(per_node.items())), "on_owner": on_owner}


def redis_cpu_s(port: int) -> float:
    info = dict(
        line.split(":", 1)
        for line in redis_command(port, "INFO", "cpu").splitlines()
        if ":" in line
    )
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def owner_of(port: int, instance: str) -> str | None:
    value = redis_command(port, "GET", f"verani:{{counter/{instance}}}:lease")
    return None if value is None else str(value).rsplit(" ", 1)[0].rpartition("#")[0]


# --- the load generator --------------------------------------------------------------------------


class _Target:
    """What ``run._loadgen_command`` needs of a server: the first node's URL; ``urls`` in the
    arguments spreads the clients over all of them."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.protocol = "verani"


def loadgen(nodes: list[Node], mode: str, **args: Any) -> dict[str, Any]:
    """One load-generator run, clients spread over ``nodes``; its JSON result, with the nodes'
    CPU seconds over the same run."""
    cpu0 = sum(n.cpu_s() for n in nodes)
    cmd = _loadgen_command(_Target(nodes[0].url), mode, {"urls": [n.url for n in nodes], **args})  # type: ignore[arg-type]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"loadgen {mode} failed: {out.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    result["nodes_cpu_s"] = round(sum(n.cpu_s() for n in nodes) - cpu0, 3)
    if "elapsed_s" in result:
        result["loadgen_cpu_share"] = round(result["loadgen_cpu_s"] / result["elapsed_s"], 2)
        result["nodes_cpu_share"] = round(result["nodes_cpu_s"] / result["elapsed_s"], 2)
    return result


class Duo:
    """The load generator's ``duo`` mode: a few clients, each on its own node and instance,
    driven one batch of sequential round trips at a time."""

    def __init__(self, clients: list[dict[str, str]]) -> None:
        cmd = _loadgen_command(_Target(clients[0]["url"]), "duo", {"clients": clients})  # type: ignore[arg-type]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        ready = self.proc.stdout.readline()
        if not ready:
            self.close()
            raise RuntimeError("loadgen duo did not connect its clients")

    def round_trips(self, client: int, n: int) -> list[float]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{client} {n}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("loadgen duo stopped")
        samples: list[float] = json.loads(line)["samples"]
        return samples

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# --- scenarios -----------------------------------------------------------------------------------


def measured_rooms(
    nodes: list[Node], redis: RedisServer | None, spec: dict[str, Any]
) -> dict[str, Any]:
    """One measured ``multiroom`` run; with Redis, its CPU share and who owns which room."""
    cpu0 = redis_cpu_s(redis.port) if redis else 0.0
    result = loadgen(nodes, "multiroom", **spec)
    redis_cpu = redis_cpu_s(redis.port) - cpu0 if redis else 0.0
    # Server-side CPU per increment: every verani process, and redis-server.
    result["server_cpu_us_per_op"] = round(
        (result["nodes_cpu_s"] + redis_cpu) / max(result["ops"], 1) * 1e6
    )
    if redis is not None:
        result["redis_cpu_share"] = round(redis_cpu / result["elapsed_s"], 2)
        result |= ownership(redis.port, nodes, spec["rooms"])
    return result


def scenario_rooms(args: argparse.Namespace, logs: Logs) -> dict[str, Any]:
    spec = {"rooms": args.rooms, "instance": "r", "warmup_s": args.warmup,
            "duration_s": args.duration, "timeout_s": args.warmup + args.duration + 30}  # fmt: skip
    variants: dict[str, Any] = {}
    with cluster("plain", 0, logs, args.keep_logs) as (_, nodes):
        variants["plain (file store)"] = measured_rooms(nodes, None, spec)
    for count in args.nodes:
        label = f"{count} node{'s' if count > 1 else ''}"
        with cluster(f"rooms-{count}", count, logs, args.keep_logs) as (redis, nodes):
            assert redis is not None
            result = measured_rooms(nodes, redis, spec)
            variants[label] = result
    if args.forwarded and max(args.nodes) > 1:
        count = max(args.nodes)
        with cluster(f"rooms-{count}-forwarded", count, logs, args.keep_logs) as (redis, nodes):
            assert redis is not None
            # Client j touches its room through node j + 1, which takes it; then the measured
            # run puts client j on node j: every socket is on a node that does not own its room.
            loadgen(nodes, "multiroom", **{**spec, "warmup_s": 0, "duration_s": 0.2},
                    url_offset=1)  # fmt: skip
            result = measured_rooms(nodes, redis, spec)
            variants[f"{count} nodes, forwarded"] = result
    return {"variants": variants, "key": "ops_per_s"}


def scenario_owner(args: argparse.Namespace, logs: Logs) -> dict[str, Any]:
    cases = ["local, alone", "local", "forwarded"]
    samples: dict[str, list[float]] = {c: [] for c in cases}
    commands: dict[str, dict[str, int]] = {c: {} for c in cases}
    seconds: dict[str, float] = dict.fromkeys(cases, 0.0)
    with cluster("owner", 2, logs, args.keep_logs) as (redis, nodes):
        assert redis is not None
        a, b = nodes
        # Client 0 connects first, through node a, which takes the room; client 1 joins it
        # through node b; client 2 is alone in another room owned by a.
        duo = Duo([
            {"url": a.url, "instance": "pair"},
            {"url": b.url, "instance": "pair"},
            {"url": a.url, "instance": "solo"},
        ])  # fmt: skip
        try:
            owner = {"pair": owner_of(redis.port, "pair"), "solo": owner_of(redis.port, "solo")}
            if owner != {"pair": a.name, "solo": a.name}:
                raise RuntimeError(f"unexpected owners {owner} (expected {a.name})")
            client = {"local, alone": 2, "local": 0, "forwarded": 1}
            for case in cases:  # warm every path
                duo.round_trips(client[case], 50)
            # What the nodes send to Redis with nothing to do (lease renewals, heartbeats,
            # blocking reads of their inboxes), per second.
            idle0, t0 = command_counts(redis.port), time.monotonic()
            time.sleep(args.idle)
            idle = count_delta(idle0, command_counts(redis.port))
            idle_s = time.monotonic() - t0
            per_round = max(1, args.round_trips // args.rounds)
            for _ in range(args.rounds):
                for case in cases:
                    before, t = command_counts(redis.port), time.monotonic()
                    samples[case] += duo.round_trips(client[case], per_round)
                    delta = count_delta(before, command_counts(redis.port))
                    seconds[case] += time.monotonic() - t
                    for k, v in delta.items():
                        commands[case][k] = commands[case].get(k, 0) + v
        finally:
            duo.close()
    result: dict[str, Any] = {"owner": owner, "idle_commands_per_s": {
        k: round(v / idle_s, 2) for k, v in sorted(idle.items())}}  # fmt: skip
    for case in cases:
        n = len(samples[case])
        idle_part = idle.get("*", 0) / idle_s * seconds[case]
        result[case] = {
            **latency(samples[case]),
            "mean_ms": round(statistics.fmean(samples[case]), 3),
            "commands": commands[case].get("*", 0),
            "idle_commands_estimate": round(idle_part, 1),
            "commands_per_event": round((commands[case].get("*", 0) - idle_part) / n, 2),
            "per_event": {
                k: round(v / n, 2)
                for k, v in sorted(commands[case].items(), key=lambda kv: -kv[1])
                if k != "*" and v / n >= 0.05
            },
        }
    return result


SCENARIOS = {"rooms": scenario_rooms, "owner": scenario_owner}


# --- report --------------------------------------------------------------------------------------


def table_rows(name: str, result: dict[str, Any]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    if name == "rooms":
        key = result["key"]
        variants = result["variants"]
        one = variants.get("1 node", {}).get(key)
        for variant, r in variants.items():
            ratio = f"{r[key] / one:.2f}x 1 node; " if one else ""
            owned = ""
            if "owned" in r:
                owned = (
                    f", redis cpu {r['redis_cpu_share']:.0%}; sockets on their room's owner "
                    f"{r['on_owner']}/{r['rooms']}"
                )
            rows.append(
                (name, variant, f"{r[key]:,.0f} ops/s", _ms(r.get("p50_ms")),
                 _ms(r.get("p99_ms")),
                 f"{ratio}{r['server_cpu_us_per_op']} us server cpu/op; lg cpu "
                 f"{r['loadgen_cpu_share']:.0%}, nodes cpu {r['nodes_cpu_share']:.0%}{owned}")
            )  # fmt: skip
    elif name == "owner":
        local = result["local"]
        for case in ("local, alone", "local", "forwarded"):
            r = result[case]
            extra = ""
            if case == "forwarded":
                extra = (
                    f"; {r['p50_ms'] - local['p50_ms']:+.2f} ms p50, "
                    f"{r['p99_ms'] - local['p99_ms']:+.2f} ms p99 vs local"
                )
            top = ", ".join(f"{k} {v:g}" for k, v in list(r["per_event"].items())[:6])
            rows.append(
                (name, case, f"n={r['n']}", _ms(r["p50_ms"]), _ms(r["p99_ms"]),
                 f"{r['commands_per_event']:.1f} redis cmds/event ({top}){extra}")
            )  # fmt: skip
    return rows


def _ms(value: Any) -> str:
    return "-" if value is None else f"{value:.2f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="all", help=f"{', '.join(SCENARIOS)} or all")
    parser.add_argument("--quick", action="store_true", help="fewer operations, for a smoke run")
    parser.add_argument("--nodes", default="1,2,3", help="cluster sizes of the rooms scenario")
    parser.add_argument("--rooms", type=int, default=200, help="room instances (one client each)")
    parser.add_argument("--warmup", type=float, default=1.0, help="rooms: seconds unmeasured")
    parser.add_argument("--duration", type=float, default=4.0, help="rooms: seconds measured")
    parser.add_argument(
        "--no-forwarded",
        dest="forwarded",
        action="store_false",
        help="rooms: skip the row where every socket is on a node that does not own its room",
    )
    parser.add_argument(
        "--round-trips", type=int, default=400, help="owner: round trips per client"
    )
    parser.add_argument("--rounds", type=int, default=4, help="owner: alternating batches")
    parser.add_argument(
        "--idle", type=float, default=2.0, help="owner: seconds of idle Redis traffic measured"
    )
    parser.add_argument(
        "--keep-logs",
        type=pathlib.Path,
        default=None,
        help="copy every process's stdout/stderr (and Redis's log) into this directory",
    )
    args = parser.parse_args(argv)
    args.nodes = [int(n) for n in args.nodes.split(",")]
    if args.quick:
        args.rooms, args.warmup, args.duration = 50, 0.5, 1.5
        args.round_trips, args.idle = 100, 1.0
    if args.keep_logs is not None:
        args.keep_logs.mkdir(parents=True, exist_ok=True)
    names = list(SCENARIOS) if args.scenario == "all" else args.scenario.split(",")
    logs = Logs()
    results = {}
    for name in names:
        print(f"... {name}", file=sys.stderr, flush=True)
        results[name] = {"scenario": name, "quick": args.quick, **SCENARIOS[name](args, logs)}
    print_table([row for name, r in results.items() for row in table_rows(name, r)])
    print()
    node = subprocess.run([NODE[0], "--version"], capture_output=True, text=True).stdout.strip()
    redis = subprocess.run(
        [shutil.which("redis-server") or "redis-server", "--version"],
        capture_output=True,
        text=True,
    ).stdout.split()
    print(CAVEAT)
    if "owner" in results:
        print(
            "owner: redis cmds/event counts the commands run inside Lua scripts too (the evalsha "
            "calls are the scripts), minus the idle traffic; breakdown per event in parentheses."
        )
    version = next((w for w in redis if w.startswith("v=")), "v=?")[2:]
    print(f"python {sys.version.split()[0]}, node {node}, redis {version}, {os.cpu_count()} CPUs")
    if logs.problems:
        print("node logs:")
        for problem in logs.problems:
            print(f"  {problem}")
    else:
        print("node logs: no warning, error or traceback; every process exited with 0")
    print()
    for result in results.values():
        print(json.dumps(result, separators=(",", ":")))


if __name__ == "__main__":
    main()
