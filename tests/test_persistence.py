"""Persisted keys over real sockets and real files: failures, the output gate, group commit.

``GatedStore`` and ``FlakyStore`` are Store implementations that wrap the real FileStore and only
add a gate or a switchable failure in front of ``save``: they inject latency and faults at the
store interface, the way a slow or full disk would.
"""

from __future__ import annotations

import logging
import pathlib
from collections.abc import Mapping
from typing import Any

import orjson
import pytest
import trio
import trio_websocket

from verani import RoomContext, StoreError, define_room, open_server
from verani.store import FileStore, JSONValue

from helpers import connect


class GatedStore(FileStore):
    """Saves wait until ``gate`` is set (the store counts its saves itself)."""

    def __init__(self, directory: pathlib.Path) -> None:
        super().__init__(directory)
        self.gate = trio.Event()

    async def save(
        self,
        room: str,
        instance: str,
        state: Mapping[str, JSONValue],
        storage: Mapping[str, JSONValue] | None = None,
    ) -> None:
        await self.gate.wait()
        await super().save(room, instance, state, storage)


class FlakyStore(FileStore):
    """Saves fail while ``broken`` is true, as on a full disk."""

    broken = False

    async def save(
        self,
        room: str,
        instance: str,
        state: Mapping[str, JSONValue],
        storage: Mapping[str, JSONValue] | None = None,
    ) -> None:
        if self.broken:
            raise StoreError(f"cannot save {room}/{instance}: No space left on device")
        await super().save(room, instance, state, storage)


def stored(store: FileStore, room: str, instance: str = "default") -> Any:
    return orjson.loads(store.path_for(room, instance).read_bytes())["state"]


def bag_room(events: list[Any], **options: Any) -> Any:
    room = define_room(
        name="bag",
        state={"items": [], "label": "none"},
        persisted_keys=["items", "label"],
        on_persist_error=lambda key, error: events.append(("persist_error", key, str(error))),
        on_error=lambda error, ctx: events.append(("error", type(error).__name__)),
        **options,
    )

    @room.on("put")
    def put(ctx: RoomContext[Any], data: Any) -> None:
        ctx.actor.room_state.items = [*ctx.actor.room_state.items, data]
        ctx.emit.emit("put:ok", {"items": len(ctx.actor.room_state.items)})

    @room.on("put_fn")
    def put_fn(ctx: RoomContext[Any], data: Any) -> None:
        ctx.actor.room_state.items = [*ctx.actor.room_state.items, print]
        ctx.emit.emit("put:ok", {})

    @room.on("append")
    def append(ctx: RoomContext[Any], data: Any) -> None:
        ctx.actor.room_state.items.append(data)  # in place: no assignment
        ctx.emit.emit("put:ok", {})

    return room


async def test_unpersistable_value_is_reported_and_previous_value_kept(tmp_path: Any) -> None:
    events: list[Any] = []
    store = FileStore(tmp_path)
    with trio.fail_after(10):
        async with open_server([bag_room(events)], store=store) as server:
            async with connect(server.url, "/ws/bag") as client:
                await client.emit("put", "a")
                await client.next_event("put:ok")
                await client.emit("put_fn")
                await client.next_event("put:ok")
                await client.emit("put", "b")  # still holds the function: fails again
                await client.next_event("put:ok")
            assert stored(store, "bag")["items"] == ["a"]
            expected = (
                "persist_error",
                "items",
                "cannot persist key 'items': items[1]: function "
                "is not persistable; the previous stored value is kept",
            )
            assert events == [expected, ("error", "PersistenceError")] * 2


async def test_throw_on_error_false_only_reports(tmp_path: Any) -> None:
    events: list[Any] = []
    room = bag_room(events, persist_options={"throw_on_error": False})
    with trio.fail_after(10):
        async with open_server([room], store=str(tmp_path)) as server:
            async with connect(server.url, "/ws/bag") as client:
                await client.emit("put_fn")
                await client.next_event("put:ok")
    # Reported when the turn ends and again when hibernation tries a full save; never on_error.
    assert [e[0] for e in events] == ["persist_error", "persist_error"]


async def test_shallow_tracking_saves_in_place_changes_at_hibernation(tmp_path: Any) -> None:
    store = FileStore(tmp_path)
    with trio.fail_after(10):
        async with open_server([bag_room([])], store=store) as server:
            async with connect(server.url, "/ws/bag") as client:
                await client.emit("put", "a")
                await client.next_event("put:ok")
                await client.emit("append", "in-place")
                await client.next_event("put:ok")
                await client.emit("put", "b")  # assignment: saves the in-place change too
                await client.next_event("put:ok")
                await client.emit("append", "late")
                await client.next_event("put:ok")
                assert stored(store, "bag")["items"] == ["a", "in-place", "b"]
                await server.hibernate("bag")
                assert stored(store, "bag")["items"] == ["a", "in-place", "b", "late"]


async def test_deep_tracking_saves_in_place_changes_each_turn(tmp_path: Any) -> None:
    store = FileStore(tmp_path)
    room = bag_room([], persist_options={"shallow": False})
    with trio.fail_after(10):
        async with open_server([room], store=store) as server:
            async with connect(server.url, "/ws/bag") as client:
                await client.emit("append", "in-place")
                await client.next_event("put:ok")
                assert stored(store, "bag")["items"] == ["in-place"]


async def test_output_waits_for_durability_and_writes_coalesce(tmp_path: Any) -> None:
    store = GatedStore(tmp_path)
    with trio.fail_after(10):
        async with open_server([bag_room([])], store=store) as server:
            async with connect(server.url, "/ws/bag") as client:
                for i in range(10):
                    await client.emit("put", i)
                # Nothing the puts emitted may leave before their change is on disk.
                with trio.move_on_after(0.3):
                    await client.next_event("put:ok")
                    pytest.fail("a frame left before its state change was durable")
                assert not store.path_for("bag", "default").exists()
                store.gate.set()
                seen = [(await client.next_event("put:ok"))[1]["items"] for _ in range(10)]
                assert seen == list(range(1, 11))
                assert stored(store, "bag")["items"] == list(range(10))
                # Ten turns, far fewer writes: the first, then the rest coalesced.
                assert store.saves <= 3


async def test_failed_writes_hold_outputs_until_the_store_recovers(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    events: list[Any] = []
    store = FlakyStore(tmp_path)
    with trio.fail_after(10):
        async with open_server([bag_room(events)], store=store) as server:
            async with connect(server.url, "/ws/bag") as client:
                await client.emit("put", "a")
                await client.next_event("put:ok")
                store.broken = True
                await client.emit("put", "b")
                with trio.move_on_after(0.5):
                    await client.next_event("put:ok")
                    pytest.fail("a frame was released although its write failed")
                assert events[0][:2] == ("persist_error", "items")
                assert "No space left on device" in events[0][2]
                assert "room bag/default: saving state failed" in caplog.text
                store.broken = False
                _, data = await client.next_event("put:ok")
                assert data["items"] == 2
                assert stored(store, "bag")["items"] == ["a", "b"]


async def test_corrupt_document_is_moved_aside_and_room_starts_fresh(
    tmp_path: Any, counter_rooms: Any, caplog: pytest.LogCaptureFixture
) -> None:
    store = FileStore(tmp_path)
    path = store.path_for("counter", "default")
    path.parent.mkdir(parents=True)
    path.write_bytes(b'{"format": "verani.room", "version": 1, "state": {"count": ')
    with trio.fail_after(10):
        async with open_server(counter_rooms, store=store) as server:
            async with connect(server.url) as client:
                _, data = await client.next_event("counter:sync")
                assert data["count"] == 0
                await client.emit("counter:increment")
                await client.next_event("counter:update")
    aside = [p for p in path.parent.iterdir() if ".corrupt-" in p.name]
    assert len(aside) == 1
    assert aside[0].read_bytes().endswith(b'"count": ')  # kept byte for byte, never deleted
    assert stored(store, "counter")["count"] == 1
    assert "room counter/default: stored state unreadable" in caplog.text


async def test_unreadable_store_fails_only_that_room_until_fixed(
    tmp_path: Any, counter_rooms: Any, caplog: pytest.LogCaptureFixture
) -> None:
    store = FileStore(tmp_path)
    broken = store.path_for("counter", "broken")
    broken.mkdir(parents=True)  # a directory where the document should be: reading it fails
    with trio.fail_after(10):
        async with open_server(counter_rooms, store=store) as server:
            async with connect(server.url, "/ws/counter/fine") as fine:
                await fine.next_event("counter:sync")
                async with connect(server.url, "/ws/counter/broken") as victim:
                    with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                        await victim.recv()
                    assert closed.value.reason is not None
                    assert closed.value.reason.code == 1011
                assert "room counter/broken crashed" in caplog.text
                # The other instance never noticed.
                await fine.emit("counter:increment")
                assert (await fine.next_event("counter:update"))[1]["count"] == 1
                # Once the store is readable again, the next connection revives the room.
                broken.rmdir()
                async with connect(server.url, "/ws/counter/broken") as again:
                    assert (await again.next_event("counter:sync"))[1]["count"] == 0


async def test_log_lines_name_room_and_cause_for_bad_frames(
    tmp_path: Any, counter_rooms: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    with trio.fail_after(10):
        async with open_server(counter_rooms, store=str(tmp_path)) as server:
            async with connect(server.url, user_id="mallory") as client:
                await client.next_event("counter:sync")
                await client.send("{not json")
                await client.next_event("verani:error")
                await client.emit("counter:unknown")
                await client.next_event("verani:error")
    assert "room counter/default: dropped a frame from client" in caplog.text
    assert "(user mallory): frame is not valid JSON" in caplog.text
    assert "room counter/default: no handler for event 'counter:unknown'" in caplog.text


class SlowStore(FileStore):
    """Every save takes 50 ms longer, as on a slow disk."""

    async def save(
        self,
        room: str,
        instance: str,
        state: Mapping[str, JSONValue],
        storage: Mapping[str, JSONValue] | None = None,
    ) -> None:
        await trio.sleep(0.05)
        await super().save(room, instance, state, storage)


class CrashingStore(FileStore):
    """Saves raise a non-store error (a bug in a store) while ``crash`` is true."""

    crash = False

    async def save(
        self,
        room: str,
        instance: str,
        state: Mapping[str, JSONValue],
        storage: Mapping[str, JSONValue] | None = None,
    ) -> None:
        if self.crash:
            raise RuntimeError("store driver bug")
        await super().save(room, instance, state, storage)


async def test_a_burst_against_a_slow_store_never_drops_a_prompt_reader(tmp_path: Any) -> None:
    # Thousands of turns coalesce into few writes; releasing their frames must respect the
    # socket's outbound queue (1024) instead of closing a client that reads everything at once.
    store = SlowStore(tmp_path)
    with trio.fail_after(60):
        async with open_server([bag_room([])], store=store) as server:
            async with connect(server.url, "/ws/bag") as client:
                n = 2000

                async def send() -> None:
                    for i in range(n):
                        await client.emit("put", i)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(send)
                    seen = [(await client.next_event("put:ok"))[1]["items"] for _ in range(n)]
                assert seen == list(range(1, n + 1))
                assert len(stored(store, "bag")["items"]) == n


async def test_frames_emitted_before_the_change_in_a_turn_wait_too(tmp_path: Any) -> None:
    store = GatedStore(tmp_path)
    room = define_room(name="ack", state={"count": 0}, persisted_keys=["count"])

    @room.on("inc")
    def inc(ctx: RoomContext[Any], data: Any) -> None:
        ctx.emit.emit("ack")  # emitted first, but the turn then changes persisted state
        ctx.actor.room_state.count += 1

    with trio.fail_after(10):
        async with open_server([room], store=store) as server:
            async with connect(server.url, "/ws/ack") as client:
                await client.emit("inc")
                with trio.move_on_after(0.3):
                    await client.next_event("ack")
                    pytest.fail("the ack left before the turn's change was durable")
                store.gate.set()
                assert (await client.next_event("ack"))[0] == "ack"


async def test_a_crash_while_hibernating_answers_the_request(tmp_path: Any) -> None:
    store = CrashingStore(tmp_path)
    with trio.fail_after(10):
        async with open_server([bag_room([])], store=store) as server:
            async with connect(server.url, "/ws/bag") as client:
                await client.emit("append", "in place")  # unsaved until a full flush
                await client.next_event("put:ok")
                store.crash = True
                results = await server.hibernate("bag")
                assert results == [
                    ("bag", "default", "room bag/default: the room failed while saving its state")
                ]
                with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                    await client.recv()
                assert closed.value.reason is not None and closed.value.reason.code == 1011
