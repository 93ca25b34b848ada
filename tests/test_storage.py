"""actor.storage over real sockets and files, and documents that no longer read back."""

from __future__ import annotations

import datetime as dt
from typing import Any

import attrs
import orjson
import pytest
import trio

from verani import NotPersistableError, RoomContext, define_room, open_server
from verani.store import FileStore

from helpers import connect


def ledger_room(errors: list[Any]) -> Any:
    room = define_room(
        name="ledger",
        state={"total": 0},
        persisted_keys=["total"],
        on_error=lambda error, ctx: errors.append(error),
    )

    @room.on("add")
    async def add(ctx: RoomContext[Any], data: Any) -> None:
        storage = ctx.actor.storage
        # State and storage change in one turn: one atomic write.
        ctx.actor.room_state.total += data["amount"]
        await storage.put(
            f"entry:{data['id']}", {"amount": data["amount"], "at": dt.date(2026, 1, 2)}
        )
        ctx.emit.emit("added", {"total": ctx.actor.room_state.total})

    @room.on("read")
    async def read(ctx: RoomContext[Any], data: Any) -> None:
        storage = ctx.actor.storage
        entries = await storage.list(prefix="entry:")
        one = await storage.get("entry:1")
        many = await storage.get(["entry:1", "missing"])
        ctx.emit.emit(
            "entries",
            {
                "keys": list(entries),
                "first_at": one["at"].isoformat() if one else None,  # a date came back as a date
                "many": list(many),
                "last_two": list(await storage.list(prefix="entry:", reverse=True, limit=2)),
            },
        )

    @room.on("forget")
    async def forget(ctx: RoomContext[Any], data: Any) -> None:
        removed = await ctx.actor.storage.delete(data["key"])
        count = await ctx.actor.storage.delete(["entry:2", "entry:3", "nope"])
        ctx.emit.emit("forgot", {"removed": removed, "count": count})

    @room.on("bad")
    async def bad(ctx: RoomContext[Any], data: Any) -> None:
        await ctx.actor.storage.put("fn", {"cb": print})

    return room


async def test_storage_is_saved_with_state_and_survives_hibernation_and_restart(
    tmp_path: Any,
) -> None:
    errors: list[Any] = []
    store = FileStore(tmp_path)
    with trio.fail_after(15):
        async with open_server([ledger_room(errors)], store=store) as server:
            async with connect(server.url, "/ws/ledger") as client:
                for i in (1, 2, 3):
                    await client.emit("add", {"id": i, "amount": 10 * i})
                    await client.next_event("added")
                # What is stored now: the document and the journal's commits after it.
                found = await store.peek("ledger", "default")
                assert found is not None
                doc = {"state": found[0].state, "storage": found[0].storage}
                assert doc["state"] == {"total": 60}
                assert doc["storage"]["entry:2"] == {
                    "amount": 20,
                    "at": {"$t": "date", "v": "2026-01-02"},
                }
                await client.emit("bad")
                await client.emit("read")
                _, data = await client.next_event("entries")
                assert data["keys"] == ["entry:1", "entry:2", "entry:3"]
                assert data["first_at"] == "2026-01-02"
                assert (data["many"], data["last_two"]) == (["entry:1"], ["entry:3", "entry:2"])
            assert len(errors) == 1 and isinstance(errors[0], NotPersistableError)
            assert str(errors[0]) == "storage['fn']['cb']: function is not persistable"
            await server.hibernate("ledger")

        async with open_server([ledger_room(errors)], store=store) as server:
            async with connect(server.url, "/ws/ledger") as client:
                await client.emit("read")
                _, data = await client.next_event("entries")
                assert data["keys"] == ["entry:1", "entry:2", "entry:3"]
                await client.emit("forget", {"key": "entry:1"})
                _, data = await client.next_event("forgot")
                assert (data["removed"], data["count"]) == (True, 2)
        assert orjson.loads(store.path_for("ledger", "default").read_bytes())["storage"] == {}


@attrs.define
class Item:
    name: str
    qty: int


@attrs.define
class ShopState:
    item: Item = attrs.Factory(lambda: Item("nothing", 0))
    visits: int = 0


async def test_a_value_that_no_longer_reads_back_is_set_aside_reported_and_repaired(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    reported: list[tuple[str, str]] = []
    room = define_room(
        name="shop",
        state=ShopState,
        persisted_keys=["item", "visits"],
        on_persist_error=lambda key, error: reported.append((key, type(error).__name__)),
    )

    @room.on_connect
    def hello(ctx: RoomContext[ShopState]) -> None:
        state = ctx.actor.room_state
        ctx.emit.emit("state", {"item": state.item.name, "visits": state.visits})

    store = FileStore(tmp_path)
    path = store.path_for("shop", "default")
    path.parent.mkdir(parents=True)
    # Written by an older version of the room, whose Item had a "title" instead of a "name".
    old = {
        "format": "verani.room",
        "version": 2,
        "room": "shop",
        "instance": "default",
        "saved_at": "2026-01-01T00:00:00Z",
        "storage": {},
        "state": {"item": {"title": "hat", "qty": 2}, "visits": 7, "retired_key": 1},
    }
    path.write_bytes(orjson.dumps(old))
    with trio.fail_after(10):
        async with open_server([room], store=store) as server:
            async with connect(server.url, "/ws/shop") as client:
                _, data = await client.next_event("state")
                # The unreadable key starts from its initial value; the readable one is kept.
                assert (data["item"], data["visits"]) == ("nothing", 7)
    assert reported == [("item", "PersistenceError")]
    copies = [p for p in path.parent.iterdir() if ".corrupt-" in p.name]
    assert len(copies) == 1 and orjson.loads(copies[0].read_bytes()) == old
    repaired = orjson.loads(path.read_bytes())["state"]
    assert repaired == {"item": {"name": "nothing", "qty": 0}, "visits": 7}
    assert "room shop/default: stored key 'item' unreadable" in caplog.text
    assert "ignoring stored keys no longer persisted: ['retired_key']" in caplog.text


async def test_old_format_and_corrupt_documents_leave_the_room_usable(
    tmp_path: Any, counter_rooms: Any, caplog: pytest.LogCaptureFixture
) -> None:
    store = FileStore(tmp_path)
    v1 = {
        "format": "verani.room",
        "version": 1,
        "room": "counter",
        "instance": "old",
        "saved_at": "2025-06-01T00:00:00Z",
        "state": {"count": 41, "last_updated_by": "amy"},
    }
    store.path_for("counter", "old").parent.mkdir(parents=True)
    store.path_for("counter", "old").write_bytes(orjson.dumps(v1))
    store.path_for("counter", "bad").write_bytes(b"\x00\x01 not a document")
    with trio.fail_after(10):
        async with open_server(counter_rooms, store=store) as server:
            async with connect(server.url, "/ws/counter/old") as client:
                assert (await client.next_event("counter:sync"))[1]["count"] == 41
                await client.emit("counter:increment")
                assert (await client.next_event("counter:update"))[1]["count"] == 42
            async with connect(server.url, "/ws/counter/bad") as client:
                assert (await client.next_event("counter:sync"))[1]["count"] == 0
    upgraded = orjson.loads(store.path_for("counter", "old").read_bytes())
    assert (upgraded["version"], upgraded["storage"]) == (5, {})
    aside = [
        p.name for p in store.path_for("counter", "bad").parent.iterdir() if ".corrupt-" in p.name
    ]
    assert len(aside) == 1 and aside[0].startswith("bad.json.corrupt-")
    # Reported through the room's on_persist_error (rooms/counter.py logs it), once per key.
    assert caplog.text.count("Failed to persist 'count'") == 1
    assert caplog.text.count("Failed to persist 'last_updated_by'") == 1
