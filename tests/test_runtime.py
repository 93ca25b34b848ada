"""Turns, hooks, errors, idle hibernation and revival, over real sockets.

Tests that wait for idle timeouts run on Trio's MockClock with autojump (the ``autojump_clock``
fixture of pytest-trio), so a 30-second idle timeout takes no wall time. The clock may jump to
any deadline while the test waits on a socket or the store's worker thread, so those tests assert
only what must hold however far the clock jumps, and set no deadline of their own (pytest-timeout
is the backstop).
"""

from __future__ import annotations

from typing import Any

import attrs
import trio
import trio.lowlevel

from verani import RoomContext, define_room, open_server

from helpers import connect


@attrs.define
class NotesState:
    notes: list[str] = attrs.Factory(list)
    visits: int = 0  # ephemeral: starts again from 0 after every revival


def notes_room(events: list[Any], *, idle_timeout: float = 30.0) -> Any:
    room = define_room(
        name="notes",
        state=NotesState,
        persisted_keys=["notes"],
        idle_timeout=idle_timeout,
    )

    @room.on_connect
    def joined(ctx: RoomContext[NotesState]) -> None:
        ctx.actor.room_state.visits += 1
        ctx.emit.emit(
            "notes:sync",
            {"notes": ctx.actor.room_state.notes, "visits": ctx.actor.room_state.visits},
        )

    @room.on("notes:add")
    async def add(ctx: RoomContext[NotesState], data: Any) -> None:
        await trio.lowlevel.checkpoint()  # an async handler, with a checkpoint inside the turn
        state = ctx.actor.room_state
        state.notes = [*state.notes, data["text"]]
        state.visits += 1
        ctx.actor.emit.emit("notes:added", {"notes": state.notes, "visits": state.visits})

    @room.on("notes:boom")
    def boom(ctx: RoomContext[NotesState], data: Any) -> None:
        ctx.actor.room_state.visits += 100
        raise RuntimeError("handler exploded")

    @room.on_error
    def on_error(error: BaseException, ctx: RoomContext[NotesState] | None) -> None:
        events.append(
            ("error", type(error).__name__, str(error), ctx.meta.user_id if ctx else None)
        )

    @room.on_hibernation_restore
    def restored(actor: Any) -> None:
        events.append(
            (
                "restore",
                actor.get_session_count(),
                list(actor.room_state.notes),
                actor.room_state.visits,
            )
        )

    return room


async def test_idle_hibernation_with_open_socket_then_revival(
    tmp_path: Any, autojump_clock: Any
) -> None:
    events: list[Any] = []
    room = notes_room(events, idle_timeout=30)
    async with open_server([room], store=str(tmp_path)) as server:
        async with connect(server.url, "/ws/notes", user_id="ann") as ann:
            _, data = await ann.next_event("notes:sync")
            assert data["visits"] == 1
            await ann.emit("notes:add", {"text": "first"})
            _, data = await ann.next_event("notes:added")
            assert (data["notes"], data["visits"]) == (["first"], 2)

            while server.supervisor.instances[("notes", "default")].awake:
                await trio.sleep(1)
            # It slept on Trio's clock (which started at 0), not before the idle timeout, with
            # its socket still open.
            assert trio.current_time() >= 30
            assert server.supervisor.status()[0].sessions == 1

            # A ping is answered without waking the room.
            await ann.send({"type": "ping"})
            assert await ann.recv() == {"type": "pong"}
            assert not server.supervisor.instances[("notes", "default")].awake

            # The next message revives it: persisted key back, ephemeral key reset, hook ran.
            await ann.emit("notes:add", {"text": "second"})
            _, data = await ann.next_event("notes:added")
            assert data["notes"] == ["first", "second"]
            assert data["visits"] == 1
            assert events == [("restore", 1, ["first"], 0)]


async def test_room_with_no_sockets_hibernates_and_frees_its_instance(
    tmp_path: Any, autojump_clock: Any
) -> None:
    room = notes_room([], idle_timeout=5)
    async with open_server([room], store=str(tmp_path)) as server:
        async with connect(server.url, "/ws/notes") as client:
            await client.next_event("notes:sync")
            await client.emit("notes:add", {"text": "kept"})
            await client.next_event("notes:added")
        while server.supervisor.instances:
            await trio.sleep(1)
        async with connect(server.url, "/ws/notes") as client:
            _, data = await client.next_event("notes:sync")
            assert (data["notes"], data["visits"]) == (["kept"], 1)


async def test_handler_error_reaches_on_error_and_the_room_goes_on(tmp_path: Any) -> None:
    events: list[Any] = []
    room = notes_room(events)
    with trio.fail_after(10):
        async with open_server([room], store=str(tmp_path)) as server:
            async with (
                connect(server.url, "/ws/notes", user_id="ann") as ann,
                connect(server.url, "/ws/notes", user_id="bob") as bob,
            ):
                await ann.next_event("notes:sync")
                await bob.next_event("notes:sync")
                await ann.emit("notes:boom", {})
                # The sender is told, without the details (they are in the server log).
                assert (await ann.next_event()) == (
                    "verani:error",
                    {
                        "type": "verani:error",
                        "code": "handler_error",
                        "event": "notes:boom",
                        "message": "the room could not handle 'notes:boom'; the error is in the "
                        "server's log",
                    },
                )
                await ann.emit("notes:add", {"text": "after"})
                # Both sockets still work, and the room was neither reset nor stopped; the other
                # socket heard nothing of the error.
                for client in (ann, bob):
                    event, data = await client.next_event()
                    assert (event, data["notes"]) == ("notes:added", ["after"])
                assert events == [("error", "RuntimeError", "handler exploded", "ann")]


async def test_turns_run_one_at_a_time_in_arrival_order(tmp_path: Any) -> None:
    room = notes_room([])
    with trio.fail_after(10):
        async with open_server([room], store=str(tmp_path)) as server:
            async with connect(server.url, "/ws/notes") as client:
                await client.next_event("notes:sync")
                for i in range(20):
                    await client.emit("notes:add", {"text": str(i)})
                seen = [(await client.next_event("notes:added"))[1]["notes"] for _ in range(20)]
                assert seen[-1] == [str(i) for i in range(20)]
                assert all(len(notes) == i + 1 for i, notes in enumerate(seen))


async def test_emit_targets_socket_channel_user_and_counts(tmp_path: Any) -> None:
    counts: list[int] = []
    room = define_room(name="targets")

    @room.on("to")
    def to(ctx: RoomContext[Any], data: Any) -> None:
        counts.append(ctx.emit.to(data["target"]).emit("hello", {"from": ctx.meta.user_id}))

    @room.on("all")
    def everyone(ctx: RoomContext[Any], data: Any) -> None:
        counts.append(ctx.actor.emit.to("default").emit("hello", {"from": "room"}))
        counts.append(ctx.actor.emit.to("nobody-here").emit("hello", {}))
        counts.append(ctx.actor.get_session_count())

    async def quiet(client: Any) -> bool:
        with trio.move_on_after(0.2):
            await client.next_event("hello")
            return False
        return True

    with trio.fail_after(10):
        async with open_server([room], store=str(tmp_path)) as server:
            async with (
                connect(server.url, "/ws/targets", user_id="ann") as ann,
                connect(server.url, "/ws/targets", user_id="bob") as bob1,
                connect(server.url, "/ws/targets", user_id="bob") as bob2,
            ):
                # A channel of mine: everyone on it but me.
                await ann.emit("to", {"target": "default"})
                for client in (bob1, bob2):
                    assert (await client.next_event("hello"))[1]["from"] == "ann"
                assert await quiet(ann)
                # Not one of my channels: a user id, on all of that user's sockets.
                await ann.emit("to", {"target": "bob"})
                for client in (bob1, bob2):
                    assert (await client.next_event("hello"))[1]["from"] == "ann"
                # Room-wide: the sender included, with the channel in the frame.
                await ann.emit("all")
                for client in (ann, bob1, bob2):
                    frame = await client.recv()
                    assert frame["channel"] == "default" and frame["data"]["from"] == "room"
                assert counts == [2, 2, 3, 0, 3]
