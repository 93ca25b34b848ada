"""Schedules at scale (run by hand; never collected by pytest).

    python tests/bench/schedules.py [--rooms 10000] [--spread 5]

Stores ``--rooms`` room instances, each with one schedule, due over ``--spread`` seconds a few
seconds from now, as a stopped server leaves them; then starts a server on that store and
reports how long it took to start (it reads the index of due times, not the documents), the
memory that added, and how the due runs came: all of them, in due-time order, and how late.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import pathlib
import resource
import statistics
import sys
import tempfile
import time
from typing import Any

import trio

from verani import ScheduleContext, define_room, open_server
from verani.store import FileStore


def _rss_kb() -> int:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


async def main(rooms: int, spread: float) -> None:
    runs: list[tuple[int, float]] = []
    room = define_room(name="timer", state={"n": 0}, persisted_keys=["n"], idle_timeout=1)

    @room.on_schedule("tick")
    def tick(ctx: ScheduleContext[Any], data: Any) -> None:
        ctx.actor.room_state.n += 1
        runs.append((data, ctx.schedule.late_by))

    with tempfile.TemporaryDirectory() as tmp:
        store = FileStore(tmp, durability="os")
        first_due = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=10)
        step = spread / rooms

        async def fill(start: int) -> None:
            for i in range(start, rooms, 8):
                due = first_due + dt.timedelta(seconds=i * step)
                entry = {"event": "tick", "data": i, "due": due.isoformat(), "every": None}
                await store.save("timer", f"r{i}", {"n": 0}, schedules={"t": entry})

        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for start in range(8):
                nursery.start_soon(fill, start)
        await store.aclose()
        print(f"stored {rooms:,} instances with a schedule in {time.perf_counter() - started:.1f}s")

        rss_before = _rss_kb()
        started = time.perf_counter()
        fresh = FileStore(tmp, durability="os")
        async with open_server([room], store=fresh, control=False):
            start_s = time.perf_counter() - started
            rss_after = _rss_kb()
            print(f"server started in {start_s * 1000:.0f} ms (the index, not a scan); "
                  f"+{(rss_after - rss_before) / 1024:.1f} MiB RSS")  # fmt: skip
            with trio.move_on_after(10 + spread + 60):
                while len(runs) < rooms:
                    await trio.sleep(0.1)
            done_s = time.perf_counter() - started
        order = [i for i, _ in runs]
        late = sorted(late for _, late in runs)
        inversions = sum(1 for a, b in itertools.pairwise(order) if b < a)
        print(
            f"runs: {len(runs):,} of {rooms:,} in {done_s:.1f}s after start; "
            f"out of due order: {inversions}; late p50 {statistics.median(late) * 1000:.0f} ms, "
            f"p99 {late[int(len(late) * 0.99) - 1] * 1000:.0f} ms, max {late[-1] * 1000:.0f} ms"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rooms", type=int, default=10_000)
    parser.add_argument("--spread", type=float, default=5.0)
    args = parser.parse_args()
    sys.exit(trio.run(main, args.rooms, args.spread))
