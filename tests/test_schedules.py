"""Schedules: made in a turn, saved with the room, waking it when due — across hibernation,
restarts and crashes — on Trio's clock (MockClock) or the wall clock."""

from __future__ import annotations

import datetime as dt
import itertools
import pathlib
import signal
import subprocess
import sys
import textwrap
from typing import Any

import orjson
import pytest
import trio

from verani import (
    RoomContext,
    RoomDefinitionError,
    ScheduleContext,
    define_room,
    open_server,
)
from verani.store import FileStore, MemoryStore

from helpers import connect

HOUR = 3600.0


def reminder_room(runs: list[tuple[str, Any, float, dt.datetime]]) -> Any:
    room = define_room(
        name="reminder",
        state={"fired": 0},
        persisted_keys=["fired"],
        idle_timeout=60,
    )

    @room.on("remind")
    def remind(ctx: RoomContext[Any], data: Any) -> None:
        when = data.get("in", HOUR)
        sid = ctx.actor.schedule(when, "ring", data.get("payload"), id=data.get("id"))
        ctx.emit.emit("scheduled", {"id": sid})

    @room.on("every")
    def every(ctx: RoomContext[Any], data: Any) -> None:
        ctx.actor.schedule_every(data["interval"], "ring", data.get("payload"), id="tick")
        ctx.emit.emit("scheduled", {"id": "tick"})

    @room.on("cancel")
    def cancel(ctx: RoomContext[Any], data: Any) -> None:
        ctx.emit.emit("cancelled", {"ok": ctx.actor.cancel_schedule(data["id"])})

    @room.on("list")
    def listing(ctx: RoomContext[Any], data: Any) -> None:
        ctx.emit.emit(
            "schedules",
            {"ids": [s.id for s in ctx.actor.list_schedules()]},
        )

    @room.on("bad")
    def bad(ctx: RoomContext[Any], data: Any) -> None:
        ctx.actor.schedule(1, "no-such-event")

    @room.on("unstorable")
    def unstorable(ctx: RoomContext[Any], data: Any) -> None:
        ctx.actor.schedule(1, "ring", {"cb": lambda: None})

    @room.on_schedule("ring")
    def ring(ctx: ScheduleContext[Any], data: Any) -> None:
        ctx.actor.room_state.fired += 1
        runs.append((ctx.schedule.id, data, ctx.schedule.late_by, ctx.schedule.due))
        ctx.actor.emit.emit("rang", {"id": ctx.schedule.id})

    return room


async def test_a_schedule_survives_hibernation_and_a_restart_and_runs_once_on_time(
    autojump_clock: Any,
) -> None:
    runs: list[tuple[str, Any, float, dt.datetime]] = []
    store = MemoryStore()
    payload = {"when": dt.datetime(2030, 1, 2, 3, 4, tzinfo=dt.UTC), "tags": {"a", "b"}}
    async with open_server([reminder_room(runs)], store=store) as server:
        async with connect(server.url, "/ws/reminder") as client:
            await client.emit("remind", {"in": HOUR, "id": "r1", "payload": None})
            assert (await client.next_event("scheduled"))[1]["id"] == "r1"
        started = trio.current_time()
        await server.hibernate("reminder")
        # The payload with special types goes in through a room call, as a handler would.
        await server.room("reminder").call(
            lambda actor: actor.schedule(HOUR, "ring", payload, id="r2")
        )
        await server.hibernate("reminder")
        assert runs == []
    assert {key for key in store.due_times()} == {("reminder", "default")}
    # A new server on the same store: nothing awake, the index says when to wake.
    async with open_server([reminder_room(runs)], store=store) as server:
        await trio.sleep(HOUR - (trio.current_time() - started) - 1)
        assert runs == []
        await trio.sleep(2)
        assert [(r[0], r[1]) for r in runs] == [("r1", None), ("r2", payload)]
        assert all(late < 2 for _, _, late, _ in runs)
        await trio.sleep(5 * HOUR)
        assert len(runs) == 2  # once each
        await server.hibernate("reminder")
    doc = await store.load("reminder", "default")
    assert doc is not None and doc.state["fired"] == 2 and doc.schedules == {}
    assert store.due_times() == {}


async def test_a_recurring_schedule_does_not_drift_across_hibernation(
    autojump_clock: Any,
) -> None:
    runs: list[tuple[str, Any, float, dt.datetime]] = []
    async with open_server([reminder_room(runs)], store=MemoryStore()) as server:
        async with connect(server.url, "/ws/reminder") as client:
            await client.emit("every", {"interval": 600})
            await client.next_event("scheduled")
        for _ in range(3):
            await trio.sleep(1000)  # past a due time, and past the idle timeout: asleep
            await server.hibernate("reminder")
        await trio.sleep(1)
        dues = [due for _, _, _, due in runs]
        assert len(dues) == 5
        step = dt.timedelta(seconds=600)
        assert all(later - earlier == step for earlier, later in itertools.pairwise(dues))


async def test_missed_runs_of_a_recurring_schedule_run_once(autojump_clock: Any) -> None:
    runs: list[tuple[str, Any, float, dt.datetime]] = []
    store = MemoryStore()
    async with open_server([reminder_room(runs)], store=store) as server:
        async with connect(server.url, "/ws/reminder") as client:
            await client.emit("every", {"interval": 60})
            await client.next_event("scheduled")
        await server.hibernate("reminder")
    # The server is down for ten intervals.
    await trio.sleep(600)
    async with open_server([reminder_room(runs)], store=store) as server:
        await trio.sleep(1)
        assert len(runs) == 1 and runs[0][2] > 500  # late, once
        await trio.sleep(60)
        assert len(runs) == 2


async def test_schedule_errors_are_answered_at_the_call(autojump_clock: Any) -> None:
    runs: list[tuple[str, Any, float, dt.datetime]] = []
    async with open_server([reminder_room(runs)], store=MemoryStore()) as server:
        async with connect(server.url, "/ws/reminder") as client:
            await client.emit("bad")
            _, data = await client.next_event("verani:error")
            assert data["code"] == "handler_error"
            await client.emit("unstorable")
            _, data = await client.next_event("verani:error")
            assert data["code"] == "handler_error"
            await client.emit("list")
            assert (await client.next_event("schedules"))[1]["ids"] == []
            await client.emit("remind", {"in": 10, "id": "x"})
            await client.next_event("scheduled")
            await client.emit("cancel", {"id": "x"})
            assert (await client.next_event("cancelled"))[1]["ok"] is True
            await trio.sleep(20)
            assert runs == []


def test_parse_due_refuses_naive_datetimes_and_bad_values() -> None:
    from verani.schedules import parse_due

    now = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    assert parse_due(90, now) == now + dt.timedelta(seconds=90)
    assert parse_due(dt.timedelta(minutes=2), now) == now + dt.timedelta(minutes=2)
    with pytest.raises(ValueError, match="no time zone"):
        parse_due(dt.datetime(2030, 1, 1), now)
    with pytest.raises(TypeError, match="seconds, a timedelta or an aware datetime"):
        parse_due("soon", now)
    with pytest.raises(ValueError, match="finite"):
        parse_due(float("inf"), now)


async def test_an_unknown_event_is_refused_when_scheduled(autojump_clock: Any) -> None:
    room = define_room(name="plain", state={"n": 0})
    async with open_server([room], store=MemoryStore()) as server:
        with pytest.raises(RoomDefinitionError, match="no on_schedule handler for 'tick'"):
            await server.room("plain").call(lambda actor: actor.schedule(5, "tick"))


async def test_the_file_store_keeps_an_index_of_due_times(tmp_path: pathlib.Path) -> None:
    runs: list[tuple[str, Any, float, dt.datetime]] = []
    store = FileStore(tmp_path)
    async with open_server([reminder_room(runs)], store=store) as server:
        for name in ("a", "b"):
            await server.room("reminder", name).call(
                lambda actor: actor.schedule(HOUR, "ring", None, id="later")
            )
    index = orjson.loads((tmp_path / "schedules.json").read_bytes())
    assert [row[:2] for row in index["due"]] == [["reminder", "a"], ["reminder", "b"]]
    # A new store knows the due times from the index alone, without reading the documents.
    for name in ("a", "b"):
        store.path_for("reminder", name).rename(tmp_path / f"{name}.moved")
    fresh = FileStore(tmp_path)
    await fresh.recover()
    assert set(fresh.due_times()) == {("reminder", "a"), ("reminder", "b")}


ROOM_FILE = textwrap.dedent(
    """
    import pathlib
    import trio
    from verani import define_room

    MARKS = pathlib.Path(__file__).with_name("marks")
    room = define_room(name="slow", state={"n": 0}, persisted_keys=["n"])

    @room.on("arm")
    def arm(ctx, data):
        ctx.actor.schedule(0.2, "work", {"n": 1}, id="job")
        ctx.emit.emit("armed", {})

    @room.on_schedule("work")
    async def work(ctx, data):
        with MARKS.open("a") as f:
            f.write("run\\n")
        await trio.sleep(float(open(MARKS.with_name("hang")).read()))
        ctx.actor.room_state.n += data["n"]
    """
)


async def _arm(url: str) -> None:
    async with connect(url, "/ws/slow") as client:
        await client.emit("arm")
        await client.next_event("armed")


def test_a_crash_during_a_scheduled_handler_runs_it_again_after_restart(
    tmp_path: pathlib.Path,
) -> None:
    room_file = tmp_path / "slow.py"
    room_file.write_text(ROOM_FILE)
    (tmp_path / "hang").write_text("3600")
    marks = tmp_path / "marks"
    store = tmp_path / "store"
    command = [sys.executable, "-m", "verani", "serve", str(room_file), "--port", "0"]
    command += ["--store", str(store)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().split("serving on ")[1].split()[0]
        trio.run(_arm, url)
        while not marks.exists():
            trio.run(trio.sleep, 0.05)
        proc.send_signal(signal.SIGKILL)  # in the middle of the handler
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)
    (tmp_path / "hang").write_text("0")
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        proc.stdout.readline()
        for _ in range(200):
            if marks.read_text().count("run") == 2:
                break
            trio.run(trio.sleep, 0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)
    assert marks.read_text() == "run\nrun\n"  # at least once: run again, and then done
    doc = orjson.loads(FileStore(store).path_for("slow", "default").read_bytes())
    assert doc["state"]["n"] == 1 and doc["schedules"] == {}
