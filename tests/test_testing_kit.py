"""verani.testing, used the way a room author would: the seed's counter room under test."""

from __future__ import annotations

import pathlib
from typing import Any

import pytest
import trio

from verani import RoomContext, RoomLoadError, define_room
from verani.store import FileStore, MemoryStore
from verani.testing import ClientClosed, open_test_server

from helpers import ROOMS

COUNTER = ROOMS / "counter.py"


async def test_the_counter_room_hibernates_and_restarts_without_wall_clock_time(
    autojump_clock: Any,
) -> None:
    async with open_test_server(COUNTER, idle_timeout=30) as server:
        ann = await server.connect("/ws/counter", user_id="ann")
        bob = await server.connect("/ws/counter", user_id="bob")
        assert (await ann.receive("counter:sync"))["count"] == 0
        await ann.emit("counter:increment", {"amount": 2})
        assert await bob.receive("counter:update") == {
            "type": "counter:update",
            "count": 2,
            "updatedBy": "ann",
        }
        assert (await ann.receive("counter:update"))["count"] == 2
        # Idle hibernation: 30 virtual seconds, no wall-clock time.
        await trio.sleep(31)
        assert not server.server.supervisor.instances[("counter", "default")].awake
        assert await server.state("counter") == {"count": 2, "last_updated_by": "ann"}
        await bob.emit("counter:decrement")
        assert (await ann.receive("counter:update"))["count"] == 1

        await server.restart()  # same store, new runtime: the old sockets were closed
        with pytest.raises(ClientClosed) as closed:
            await ann.receive()
        assert closed.value.code == 1001
        carol = await server.connect("/ws/counter", user_id="carol")
        assert await carol.receive("counter:sync") == {
            "type": "counter:sync",
            "count": 1,
            "lastUpdatedBy": "bob",
        }
    assert trio.current_time() >= 30


async def test_receive_keeps_other_events_for_later(autojump_clock: Any) -> None:
    room = define_room(name="two")

    @room.on("go")
    def go(ctx: RoomContext[Any], data: Any) -> None:
        ctx.emit.emit("first", {"n": 1})
        ctx.emit.emit("second", {"n": 2})

    async with open_test_server(room) as server:
        client = await server.connect("/ws/two")
        await client.emit("go")
        assert (await client.receive("second"))["n"] == 2
        assert (await client.receive("first"))["n"] == 1
        await client.send({"type": "ping"})
        assert await client.recv() == {"type": "pong"}


async def test_state_handles_and_a_file_store(tmp_path: Any) -> None:
    store = FileStore(tmp_path, durability="os")
    with trio.fail_after(10):
        async with open_test_server(COUNTER, store=store) as server:
            ann = await server.connect("/ws/counter/room-7", user_id="ann")
            await ann.receive("counter:sync")
            await ann.emit("counter:increment", {"amount": 5})
            await ann.receive("counter:update")
            assert await server.room("counter", "room-7").get_connected_user_ids() == ["ann"]
            assert (await server.state("counter", "room-7"))["count"] == 5
            assert await server.state("counter", "never-used") == {}
            await ann.close(4001, "bye")
            with pytest.raises(Exception, match="no room named 'nope'"):
                await server.state("nope")
    assert store.path_for("counter", "room-7").exists()


async def test_memory_store_counts_coalesced_saves(autojump_clock: Any) -> None:
    store = MemoryStore()
    async with open_test_server(COUNTER, store=store) as server:
        client = await server.connect("/ws/counter")
        await client.receive("counter:sync")
        for _ in range(20):
            await client.emit("counter:increment")
        for _ in range(20):
            await client.receive("counter:update")
        assert (await server.state("counter"))["count"] == 20
        assert 1 <= store.saves <= 20


async def test_relative_room_paths_are_found_from_the_test_file_up(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # as if pytest ran somewhere with no rooms/ in it
    # Not in tmp_path, not in tests/: found in the directory above this file.
    async with open_test_server("rooms/counter.py") as server:
        assert [room.name for room in server.rooms] == ["counter"]
    (tmp_path / "here").mkdir()
    (tmp_path / "here" / "mine.py").write_text(
        "from verani import define_room\nmine = define_room(name='mine')\n"
    )
    async with open_test_server("mine.py", relative_to=tmp_path / "here") as server:
        assert [room.name for room in server.rooms] == ["mine"]
    with pytest.raises(RoomLoadError) as missing:
        async with open_test_server("rooms/nope.py"):
            pass  # pragma: no cover - never entered
    here = pathlib.Path(__file__).parent
    assert str(missing.value) == (
        f"room file rooms/nope.py does not exist: looked in the working directory ({tmp_path}), "
        f"then in {here} and every directory above it"
    )
