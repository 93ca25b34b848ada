"""Recovery logs: bytes a commit writes for one broadcast (run by hand; never collected by pytest).

    PYTHONPATH=src python tests/bench/recovery_log.py [--sessions 100] [--frames 500] [--size 120]

``--sessions`` recoverable sessions in one room, each with a full log (``--frames`` kept frames
of about ``--size`` bytes), get one broadcast: one turn, one frame each. Prints what the commit
of that turn writes, before (every touched log whole, as verani did before logs were committed
as what changed) and now (each log's new frame and what it no longer keeps): the file store's
journal record, measured by committing to a real FileStore, and the Redis fields and arguments
the commit's script call sends (``_fields``). Also the CPU time the actor spends making them.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time
from typing import Any

import orjson
import trio

from verani.cluster.redis_store import _fields
from verani.recovery import Recovery, SessionLog
from verani.sessions import ConnectionMeta
from verani.store import FileStore
from verani.store.base import Changes, JSONValue


def _frame(i: int, size: int) -> bytes:
    text = (f"message {i} " * (size // 10 + 1))[: max(size - 60, 1)]
    return orjson.dumps({"type": "event", "channel": "default", "data": {"text": text}})


def _sessions(n: int, frames: int, size: int) -> list[tuple[SessionLog, ConnectionMeta]]:
    config = Recovery(max_frames=frames, max_bytes=1 << 30)
    out = []
    for s in range(n):
        log = SessionLog(config, f"token{s:04d}xxxxxxxxxxxxxxxxxxxxxx")
        for i in range(frames):
            log.number(_frame(i, size))
        meta = ConnectionMeta(f"user{s}", f"client{s}", ["default"])
        log.stored = log.changes(meta)[2]  # committed already
        out.append((log, meta))
    return out


def _old(sessions: list[tuple[SessionLog, ConnectionMeta]]) -> Changes:
    return Changes(recovery_put={log.token: log.encode(meta) for log, meta in sessions})


def _new(sessions: list[tuple[SessionLog, ConnectionMeta]]) -> Changes:
    put: dict[str, JSONValue] = {}
    frames: dict[str, JSONValue] = {}
    for log, meta in sessions:
        p, delta, _ = log.changes(meta)
        if p is not None:
            put[log.token] = p
        if delta is not None:
            frames[log.token] = delta
    return Changes(recovery_put=put, recovery_frames=frames)


def _redis_old(changes: Changes) -> int:
    """The old layout: each log whole in its ``r:`` field."""
    return sum(len(f"r:{t}") + len(orjson.dumps(v)) for t, v in changes.recovery_put.items())


def _redis_new(changes: Changes) -> int:
    fields = _fields("chat", "lobby", changes)
    size = sum(len(f) + len(v) for f, v in fields.puts if f != "meta")
    size += sum(len(t) + len(str(o)) for t, o in fields.trims)
    return size + sum(len(t) for t in fields.drops) + sum(len(f) for f in fields.deletes)


async def _journal_bytes(changes: Changes, directory: pathlib.Path) -> tuple[int, float]:
    store = FileStore(directory, durability="os")
    try:
        await store.commit("chat", "warmup", Changes({"n": 0}))
        journal = directory / "journal"
        before = sum(p.stat().st_size for p in journal.glob("*.wal"))
        started = time.perf_counter()
        await store.commit("chat", "lobby", changes)
        elapsed = time.perf_counter() - started
        after = sum(p.stat().st_size for p in journal.glob("*.wal"))
    finally:
        await store.aclose()
    return after - before, elapsed


def _timed(make: Any, sessions: Any) -> tuple[Changes, float]:
    started = time.perf_counter()
    changes = make(sessions)
    return changes, time.perf_counter() - started


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=100)
    parser.add_argument("--frames", type=int, default=500)
    parser.add_argument("--size", type=int, default=120)
    args = parser.parse_args()
    sessions = _sessions(args.sessions, args.frames, args.size)
    for log, _ in sessions:  # the broadcast: one frame each
        log.number(_frame(args.frames, args.size))
    old, old_cpu = _timed(_old, sessions)
    new, new_cpu = _timed(_new, sessions)
    with tempfile.TemporaryDirectory() as tmp:
        old_journal, old_commit = await _journal_bytes(old, pathlib.Path(tmp, "old"))
        new_journal, new_commit = await _journal_bytes(new, pathlib.Path(tmp, "new"))
    old_redis, new_redis = _redis_old(old), _redis_new(new)
    print(
        f"one broadcast to {args.sessions} recoverable sessions, {args.frames} frames of"
        f" ~{len(_frame(0, args.size))} B kept each"
    )
    rows = [
        ("file store journal record", old_journal, new_journal),
        ("Redis fields and arguments", old_redis, new_redis),
    ]
    for what, before, after in rows:
        print(
            f"  {what:28} before {before:>12,} B   now {after:>9,} B"
            f"   ({before / max(after, 1):,.0f}x less)"
        )
    print(
        f"  making the changes (actor)   before {old_cpu * 1000:>10.2f} ms   now"
        f" {new_cpu * 1000:>7.2f} ms"
    )
    print(
        f"  file store commit (os sync)  before {old_commit * 1000:>10.2f} ms   now"
        f" {new_commit * 1000:>7.2f} ms"
    )


if __name__ == "__main__":
    sys.exit(trio.run(main))
