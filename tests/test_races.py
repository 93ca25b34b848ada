"""Races around hibernation, made deterministic: the store's save or load is held at a gate
(trio.Event) so the other event lands exactly inside the window under test; the test goes on
once that event is queued for the room, not after a guessed delay.

Each test shows the event is handled exactly once and no state is lost.
"""

from __future__ import annotations

import errno
from typing import Any

import orjson
import pytest
import trio
import trio.testing
import trio_websocket

from faults import FaultyStore, settle
from verani import RoomContext, define_room, open_server
from verani.server import Server
from verani.store import FileStore

from helpers import connect


def tally_room(log: list[str], **options: Any) -> Any:
    room = define_room(name="tally", state={"items": []}, persisted_keys=["items"], **options)

    @room.on_connect
    def hello(ctx: RoomContext[Any]) -> None:
        log.append(f"connect:{ctx.meta.user_id}")
        ctx.emit.emit("sync", {"items": ctx.actor.room_state.items})

    @room.on("add")
    def add(ctx: RoomContext[Any], data: Any) -> None:
        log.append(f"add:{data['item']}")
        ctx.actor.room_state.items = [*ctx.actor.room_state.items, data["item"]]
        ctx.emit.emit("added", {"items": ctx.actor.room_state.items})

    @room.on("slow")
    async def slow(ctx: RoomContext[Any], data: Any) -> None:
        log.append("slow:start")
        slow_started.set()
        await slow_gate.wait()
        ctx.actor.room_state.items = [*ctx.actor.room_state.items, "slow"]
        log.append("slow:end")

    slow_started, slow_gate = trio.Event(), trio.Event()
    room.slow_started = slow_started  # type: ignore[attr-defined]
    room.slow_gate = slow_gate  # type: ignore[attr-defined]
    return room


def stored_items(store: FileStore) -> Any:
    return orjson.loads(store.path_for("tally", "default").read_bytes())["state"]["items"]


async def until_queued(server: Server, room: str, instance: str = "default") -> None:
    """Let the server take in what the clients sent until an event waits in the room's inbox."""
    await settle(server.supervisor.instances[(room, instance)].has_pending)


async def test_a_message_during_the_final_flush_is_handled_once_after_revival(
    tmp_path: Any,
) -> None:
    log: list[str] = []
    store = FaultyStore(tmp_path, durability="os")
    # Assignment-only tracking, so that an in-place change is left for the final flush to write.
    room = tally_room(log, persist_options={"shallow": True})
    with trio.fail_after(10):
        async with open_server([room], store=store) as server:
            async with connect(server.url, "/ws/tally", user_id="ann") as ann:
                await ann.next_event("sync")
                await ann.emit("add", {"item": "a"})
                await ann.next_event("added")
                async with trio.open_nursery() as nursery:
                    results: list[Any] = []
                    store.hold_saves = True
                    # An in-place change makes the hibernation flush write (and wait at the gate).
                    await server.room("tally").call(lambda a: a.room_state.items.append("b"))

                    async def hibernate() -> None:
                        results.extend(await server.hibernate("tally"))

                    nursery.start_soon(hibernate)
                    await store.save_reached.wait()  # the final flush is in progress
                    await ann.emit("add", {"item": "c"})  # arrives while the room hibernates
                    await until_queued(server, "tally")
                    assert "add:c" not in log  # it waits for the flush, then for the revival
                    store.release_saves()
                _, data = await ann.next_event("added")
                assert data["items"] == ["a", "b", "c"]
                assert results == [("tally", "default", None)]
    assert log.count("add:c") == 1
    assert stored_items(store) == ["a", "b", "c"]


async def test_a_connection_during_the_final_flush_sees_the_flushed_state(tmp_path: Any) -> None:
    log: list[str] = []
    store = FaultyStore(tmp_path, durability="os")
    # Assignment-only tracking, so that an in-place change is left for the final flush to write.
    room = tally_room(log, persist_options={"shallow": True})
    with trio.fail_after(10):
        async with open_server([room], store=store) as server:
            async with connect(server.url, "/ws/tally", user_id="ann") as ann:
                await ann.next_event("sync")
                await ann.emit("add", {"item": "a"})
                await ann.next_event("added")
                store.hold_saves = True
                await server.room("tally").call(lambda a: a.room_state.items.append("b"))
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(server.hibernate, "tally")
                    await store.save_reached.wait()

                    async def bob_joins() -> None:
                        async with connect(server.url, "/ws/tally", user_id="bob") as bob:
                            _, data = await bob.next_event("sync")
                            assert data["items"] == ["a", "b"]

                    nursery.start_soon(bob_joins)
                    await until_queued(server, "tally")
                    assert "connect:bob" not in log
                    store.release_saves()
    assert log.count("connect:bob") == 1
    assert stored_items(store) == ["a", "b"]


async def test_hibernate_during_a_long_async_handler_waits_for_its_turn(tmp_path: Any) -> None:
    log: list[str] = []
    room = tally_room(log)
    store = FileStore(tmp_path, durability="os")
    with trio.fail_after(10):
        async with open_server([room], store=store) as server:
            async with connect(server.url, "/ws/tally") as client:
                await client.next_event("sync")
                await client.emit("slow")
                await room.slow_started.wait()
                async with trio.open_nursery() as nursery:
                    done: list[Any] = []

                    async def hibernate() -> None:
                        done.extend(await server.hibernate("tally"))
                        log.append("hibernated")

                    nursery.start_soon(hibernate)
                    await until_queued(server, "tally")
                    await trio.testing.wait_all_tasks_blocked()
                    assert not done  # it waits behind the running turn
                    room.slow_gate.set()
                assert done == [("tally", "default", None)]
    assert log == ["connect:anonymous", "slow:start", "slow:end", "hibernated"]
    assert stored_items(store) == ["slow"]


async def test_a_revival_that_fails_halfway_loses_nothing(tmp_path: Any) -> None:
    log: list[str] = []
    store = FaultyStore(tmp_path, durability="os")
    with trio.fail_after(10):
        async with open_server([tally_room(log)], store=store) as server:
            async with connect(server.url, "/ws/tally") as client:
                await client.next_event("sync")
                await client.emit("add", {"item": "kept"})
                await client.next_event("added")
            await server.hibernate("tally")
            saved = store.path_for("tally", "default").read_bytes()
            # The next revival cannot read the store.
            store.fail_reads(OSError(errno.EIO, "Input/output error"), times=1)
            async with connect(server.url, "/ws/tally") as client:
                with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                    await client.recv()
                assert closed.value.reason is not None and closed.value.reason.code == 1011
            # The failed revival ran no room code and wrote nothing; the next one works.
            assert log == ["connect:anonymous", "add:kept"]
            assert store.path_for("tally", "default").read_bytes() == saved
            async with connect(server.url, "/ws/tally") as client:
                _, data = await client.next_event("sync")
                assert data["items"] == ["kept"]
    assert stored_items(store) == ["kept"]
