"""Persisted keys over real sockets and real files: failures, the output gate, group commit.

``FaultyStore`` (tests/faults.py) is the real FileStore with a gate, a delay or a failure
switched on: the latency and faults of a slow or full disk.
"""

from __future__ import annotations

import errno
import logging
from typing import Any

import attrs
import pytest
import trio
import trio_websocket

from faults import FaultyStore
from verani import RoomContext, define_room, open_server
from verani.store import FileStore

from helpers import connect


async def stored(store: FileStore, room: str, instance: str = "default") -> Any:
    """What the store holds durably: the document with the journal's later commits applied."""
    found = await store.peek(room, instance)
    assert found is not None, f"nothing stored for {room}/{instance}"
    return found[0].state


def bag_room(events: list[Any], **options: Any) -> Any:
    """The bag room; ``room.persist_failed`` is set once it is told a key could not be saved."""
    persist_failed = trio.Event()

    def report(key: str, error: BaseException) -> None:
        events.append(("persist_error", key, str(error)))
        persist_failed.set()

    room = define_room(
        name="bag",
        state={"items": [], "label": "none"},
        persisted_keys=["items", "label"],
        on_persist_error=report,
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

    room.persist_failed = persist_failed  # type: ignore[attr-defined]
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
                # The sender hears that the value was refused (the details stay in the log).
                _, refused = await client.next_event("verani:error")
                assert refused == {
                    "type": "verani:error",
                    "code": "persist_error",
                    "event": "put_fn",
                    "message": "the room could not save 'items'; its previous value is kept",
                }
                await client.emit("put", "b")  # still holds the function: fails again
                await client.next_event("put:ok")
            assert (await stored(store, "bag"))["items"] == ["a"]
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
    # The opt-out keeps assignment-only tracking: an in-place change waits for the next write.
    store = FileStore(tmp_path)
    room = bag_room([], persist_options={"shallow": True})
    with trio.fail_after(10):
        async with open_server([room], store=store) as server:
            async with connect(server.url, "/ws/bag") as client:
                await client.emit("put", "a")
                await client.next_event("put:ok")
                await client.emit("append", "in-place")
                await client.next_event("put:ok")
                await client.emit("put", "b")  # assignment: saves the in-place change too
                await client.next_event("put:ok")
                await client.emit("append", "late")
                await client.next_event("put:ok")
                assert (await stored(store, "bag"))["items"] == ["a", "in-place", "b"]
                await server.hibernate("bag")
                assert (await stored(store, "bag"))["items"] == ["a", "in-place", "b", "late"]


async def test_in_place_changes_are_saved_each_turn_by_default(tmp_path: Any) -> None:
    store = FileStore(tmp_path)
    with trio.fail_after(10):
        async with open_server([bag_room([])], store=store) as server:
            async with connect(server.url, "/ws/bag") as client:
                await client.emit("append", "in-place")
                await client.next_event("put:ok")  # out only once the change is durable
                assert (await stored(store, "bag"))["items"] == ["in-place"]


async def test_a_read_only_connection_after_a_restart_does_not_rewrite_the_document(
    tmp_path: Any,
) -> None:
    # A set that grew and shrank iterates in another order than the same set read back fresh
    # (in another process its str hashes differ too); deep tracking compares what it would
    # write now with what is stored, so that order must not show in the document.
    room = define_room(
        name="online",
        state={"users": set()},
        persisted_keys=["users"],
        persist_options={"shallow": False},
    )

    @room.on_connect
    def on_connect(ctx: RoomContext[Any]) -> None:
        ctx.emit.emit("online:sync", {"count": len(ctx.actor.room_state.users)})

    @room.on("come_and_go")
    def come_and_go(ctx: RoomContext[Any], data: Any) -> None:
        users = ctx.actor.room_state.users
        users.update(range(100))
        for user in range(100):
            if user not in (1, 8):
                users.discard(user)
        ctx.emit.emit("online:ok", {})

    store = FileStore(tmp_path)
    path = store.path_for("online", "default")
    with trio.fail_after(10):
        async with open_server([room], store=store) as server:
            async with connect(server.url, "/ws/online") as client:
                await client.next_event("online:sync")
                await client.emit("come_and_go")
                await client.next_event("online:ok")
        written = path.read_bytes()
        async with open_server([room], store=FileStore(tmp_path)) as server:
            async with connect(server.url, "/ws/online") as client:
                _, synced = await client.next_event("online:sync")
                assert synced["count"] == 2
            # The sync frame waited for any write its turn caused.
            assert path.read_bytes() == written
    assert path.read_bytes() == written


@attrs.define
class Task:
    title: str = ""
    done: bool = False


@attrs.define
class BoardState:
    tasks: list[Task] = attrs.Factory(list)
    cards: list[dict[str, Any]] = attrs.Factory(list)
    tags: set[str] = attrs.Factory(set)


def board_room(**options: Any) -> Any:
    """Every handler changes a persisted value in place; none assigns a state key."""
    room = define_room(
        name="board", state=BoardState, persisted_keys=["tasks", "cards", "tags"], **options
    )
    Ctx = RoomContext[BoardState]

    @room.on("task")
    def task(ctx: Ctx, data: Any) -> None:
        ctx.actor.room_state.tasks.append(Task(data))
        ctx.emit.emit("ok")

    @room.on("done")
    def done(ctx: Ctx, data: Any) -> None:
        ctx.actor.room_state.tasks[data].done = True  # an attrs value inside a list
        ctx.emit.emit("ok")

    @room.on("card")
    def card(ctx: Ctx, data: Any) -> None:
        ctx.actor.room_state.cards.append({"text": data})
        ctx.emit.emit("ok")

    @room.on("vote")
    def vote(ctx: Ctx, data: Any) -> None:
        card = ctx.actor.room_state.cards[data]  # a dict inside a list
        card["text"] = card["text"].upper()
        card.setdefault("votes", []).append(ctx.meta.user_id)
        ctx.emit.emit("ok")

    @room.on("tag")
    def tag(ctx: Ctx, data: Any) -> None:
        ctx.actor.room_state.tags.add(data)
        ctx.emit.emit("ok")

    @room.on("untag")
    def untag(ctx: Ctx, data: Any) -> None:
        ctx.actor.room_state.tags.discard(data)
        ctx.emit.emit("ok")

    @room.on("look")
    def look(ctx: Ctx, data: Any) -> None:
        state = ctx.actor.room_state
        ctx.emit.emit(
            "seen",
            {
                "types": [
                    isinstance(state.tasks, list),
                    isinstance(state.tasks[0], Task),
                    isinstance(state.cards[0], dict),
                    isinstance(state.tags, set),
                ],
                "equal": [
                    state.tasks == [Task("write", done=True)],
                    state.cards == [{"text": "HI", "votes": ["ann"]}],
                    state.tags == {"urgent"},
                ],
                "cards": state.cards,  # the wire encoder takes the tracking dicts as dicts
            },
        )

    return room


async def test_in_place_changes_nested_in_persisted_values_are_saved_each_turn(
    tmp_path: Any,
) -> None:
    store = FileStore(tmp_path)
    steps = [
        ("task", "write", {"tasks": [{"title": "write", "done": False}]}),
        ("done", 0, {"tasks": [{"title": "write", "done": True}]}),
        ("card", "hi", {"cards": [{"text": "hi"}]}),
        ("vote", 0, {"cards": [{"text": "HI", "votes": ["ann"]}]}),
        ("tag", "urgent", {"tags": {"$t": "set", "v": ["urgent"]}}),
        ("tag", "later", {"tags": {"$t": "set", "v": ["urgent", "later"]}}),
        ("untag", "later", {"tags": {"$t": "set", "v": ["urgent"]}}),
    ]
    with trio.fail_after(10):
        async with open_server([board_room()], store=store) as server:
            async with connect(server.url, "/ws/board", user_id="ann") as client:
                for event, data, expected in steps:
                    await client.emit(event, data)
                    await client.next_event("ok")
                    for key, value in expected.items():
                        saved = (await stored(store, "board"))[key]
                        if key == "tags":
                            saved["v"].sort(reverse=True)
                        assert saved == value, (event, key)
                await client.emit("look")
                _, seen = await client.next_event("seen")
                assert seen["types"] == [True] * 4 and seen["equal"] == [True] * 3
                assert seen["cards"] == [{"text": "HI", "votes": ["ann"]}]
        # After a restart the values read back from the store are tracked as well.
        async with open_server([board_room()], store=store) as server:
            async with connect(server.url, "/ws/board", user_id="bob") as client:
                await client.emit("vote", 0)
                await client.next_event("ok")
                cards = (await stored(store, "board"))["cards"]
                assert cards == [{"text": "HI", "votes": ["ann", "bob"]}]


async def test_shallow_true_leaves_nested_in_place_changes_unsaved_until_hibernation(
    tmp_path: Any,
) -> None:
    store = FileStore(tmp_path)
    with trio.fail_after(10):
        async with open_server([board_room(persist_options={"shallow": True})], store=store) as s:
            async with connect(s.url, "/ws/board", user_id="ann") as client:
                await client.emit("card", "hi")
                await client.next_event("ok")
                await client.emit("vote", 0)
                await client.next_event("ok")
                assert not store.path_for("board", "default").exists()  # nothing assigned
                await s.hibernate("board")
                assert (await stored(store, "board"))["cards"] == [{"text": "HI", "votes": ["ann"]}]


async def test_output_waits_for_durability_and_writes_coalesce(tmp_path: Any) -> None:
    store = FaultyStore(tmp_path, hold_saves=True)
    with trio.fail_after(10):
        async with open_server([bag_room([])], store=store) as server:
            async with connect(server.url, "/ws/bag") as client:
                for i in range(10):
                    await client.emit("put", i)
                await store.save_reached.wait()  # the first put's write is held
                # Nothing the puts emitted may leave before their change is on disk.
                with trio.move_on_after(0.3):
                    await client.next_event("put:ok")
                    pytest.fail("a frame left before its state change was durable")
                assert not store.path_for("bag", "default").exists()
                store.release_saves()
                seen = [(await client.next_event("put:ok"))[1]["items"] for _ in range(10)]
                assert seen == list(range(1, 11))
                assert (await stored(store, "bag"))["items"] == list(range(10))
                # Ten turns, far fewer writes: the first, then the rest coalesced.
                assert store.saves <= 3


async def test_failed_writes_hold_outputs_until_the_store_recovers(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    events: list[Any] = []
    store = FaultyStore(tmp_path)
    room = bag_room(events)
    with trio.fail_after(10):
        async with open_server([room], store=store) as server:
            async with connect(server.url, "/ws/bag") as client:
                await client.emit("put", "a")
                await client.next_event("put:ok")
                store.fail_writes(OSError(errno.ENOSPC, "No space left on device"))
                await client.emit("put", "b")
                await room.persist_failed.wait()
                with trio.move_on_after(0.5):
                    await client.next_event("put:ok")
                    pytest.fail("a frame was released although its write failed")
                assert events[0][:2] == ("persist_error", "items")
                assert "No space left on device" in events[0][2]
                assert "room bag/default: saving state failed" in caplog.text
                store.heal()
                _, data = await client.next_event("put:ok")
                assert data["items"] == 2
                assert (await stored(store, "bag"))["items"] == ["a", "b"]


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
    assert (await stored(store, "counter"))["count"] == 1
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


async def test_a_burst_against_a_slow_store_never_drops_a_prompt_reader(tmp_path: Any) -> None:
    # Thousands of turns coalesce into few writes; releasing their frames must respect the
    # socket's outbound queue (1024) instead of closing a client that reads everything at once.
    store = FaultyStore(tmp_path, save_delay=0.05)
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
                assert len((await stored(store, "bag"))["items"]) == n
                # Far fewer writes than turns (about one per 30 here): the turns that run while
                # a write is under way share the next one. A quarter leaves slow machines room.
                assert store.saves < n // 4


async def test_frames_emitted_before_the_change_in_a_turn_wait_too(tmp_path: Any) -> None:
    store = FaultyStore(tmp_path, hold_saves=True)
    room = define_room(name="ack", state={"count": 0}, persisted_keys=["count"])

    @room.on("inc")
    def inc(ctx: RoomContext[Any], data: Any) -> None:
        ctx.emit.emit("ack")  # emitted first, but the turn then changes persisted state
        ctx.actor.room_state.count += 1

    with trio.fail_after(10):
        async with open_server([room], store=store) as server:
            async with connect(server.url, "/ws/ack") as client:
                await client.emit("inc")
                await store.save_reached.wait()  # the turn ran; its write is held
                with trio.move_on_after(0.3):
                    await client.next_event("ack")
                    pytest.fail("the ack left before the turn's change was durable")
                store.release_saves()
                assert (await client.next_event("ack"))[0] == "ack"


async def test_a_crash_while_hibernating_answers_the_request(tmp_path: Any) -> None:
    store = FaultyStore(tmp_path)
    room = bag_room([], persist_options={"shallow": True})
    with trio.fail_after(10):
        async with open_server([room], store=store) as server:
            async with connect(server.url, "/ws/bag") as client:
                await client.emit("append", "in place")  # unsaved until a full flush
                await client.next_event("put:ok")
                store.fail_saves(RuntimeError("store driver bug"))  # a bug in a store
                results = await server.hibernate("bag")
                assert results == [
                    ("bag", "default", "room bag/default: the room failed while saving its state")
                ]
                with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                    await client.recv()
                assert closed.value.reason is not None and closed.value.reason.code == 1011
