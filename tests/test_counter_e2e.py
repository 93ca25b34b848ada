"""The seed's scenario end to end: real server on port 0, real sockets, real files."""

from __future__ import annotations

from typing import Any

import orjson
import trio

from verani import RoomDefinition, open_server
from verani.store import FileStore

from helpers import connect


async def test_seed_scenario_survives_hibernation_and_restart(
    tmp_path: Any, counter_rooms: list[RoomDefinition[Any]]
) -> None:
    store = tmp_path / "store"
    with trio.fail_after(20):
        async with open_server(counter_rooms, store=str(store)) as server:
            async with (
                connect(server.url, user_id="alice") as alice,
                connect(server.url, user_id="bob") as bob,
            ):
                assert await alice.next_event() == (
                    "counter:sync",
                    {"type": "counter:sync", "count": 0, "lastUpdatedBy": None},
                )
                assert (await bob.next_event("counter:sync"))[1]["count"] == 0

                await alice.emit("counter:increment", {"amount": 1})
                for client in (alice, bob):
                    _, data = await client.next_event("counter:update")
                    assert data == {"type": "counter:update", "count": 1, "updatedBy": "alice"}

                await bob.emit("counter:decrement", {"amount": 2})
                for client in (alice, bob):
                    _, data = await client.next_event("counter:update")
                    assert (data["count"], data["updatedBy"]) == (-1, "bob")

                await alice.emit("counter:increment", {"amount": 5})
                for client in (alice, bob):
                    assert (await client.next_event("counter:update"))[1]["count"] == 4

            # Both left (once their disconnect turns ran); force hibernation as `verani
            # hibernate` does.
            while server.supervisor.status()[0].sessions:
                await trio.sleep(0.01)
            assert await server.hibernate("counter", "default") == [("counter", "default", None)]
            assert all(not s.awake for s in server.supervisor.status())
            doc = orjson.loads(FileStore(store).path_for("counter", "default").read_bytes())
            assert doc["state"] == {"count": 4, "last_updated_by": "alice"}

            async with connect(server.url, user_id="carol") as carol:
                _, data = await carol.next_event("counter:sync")
                assert (data["count"], data["lastUpdatedBy"]) == (4, "alice")

        # A new server on the same store: the count is still there.
        async with open_server(counter_rooms, store=str(store)) as server:
            async with connect(server.url, user_id="dave") as dave:
                _, data = await dave.next_event("counter:sync")
                assert (data["count"], data["lastUpdatedBy"]) == (4, "alice")
                await dave.emit("counter:reset", {})
                assert await dave.next_event("counter:reset") == (
                    "counter:reset",
                    {"type": "counter:reset", "resetBy": "dave"},
                )
                await dave.emit("counter:get", {})
                _, data = await dave.next_event("counter:sync")
                assert (data["count"], data["lastUpdatedBy"]) == (0, "dave")


async def test_default_amount_and_anonymous_user(
    tmp_path: Any, counter_rooms: list[RoomDefinition[Any]]
) -> None:
    with trio.fail_after(10):
        async with open_server(counter_rooms, store=str(tmp_path)) as server:
            async with connect(server.url) as client:
                await client.next_event("counter:sync")
                await client.emit("counter:increment")
                _, data = await client.next_event("counter:update")
                assert (data["count"], data["updatedBy"]) == (1, "anonymous")


async def test_instances_are_separate_rooms(
    tmp_path: Any, counter_rooms: list[RoomDefinition[Any]]
) -> None:
    with trio.fail_after(10):
        async with open_server(counter_rooms, store=str(tmp_path)) as server:
            async with (
                connect(server.url, "/ws/counter/room-a") as a,
                connect(server.url, "/ws/counter") as default,
            ):
                await a.next_event("counter:sync")
                await default.next_event("counter:sync")
                await a.emit("counter:increment", {"amount": 3})
                assert (await a.next_event("counter:update"))[1]["count"] == 3
                await default.emit("counter:get")
                # The default instance never saw room-a's update.
                assert await default.next_event() == (
                    "counter:sync",
                    {"type": "counter:sync", "count": 0, "lastUpdatedBy": None},
                )
            names = {(s.room, s.instance) for s in server.supervisor.status()}
            assert ("counter", "room-a") in names
        assert FileStore(tmp_path).path_for("counter", "room-a").exists()
        assert not FileStore(tmp_path).path_for("counter", "default").exists()
