"""Lifecycle hooks over real sockets: ``on_start`` at every creation and revival, before the
first event; ``on_hibernate`` before the final flush of every kind of hibernation.

Tests that wait for idle hibernation run on Trio's MockClock with autojump (see
test_runtime.py): they assert only what must hold however far the clock jumps.
"""

from __future__ import annotations

import contextlib
from typing import Any

import attrs
import orjson
import pytest
import trio
import trio_websocket

from verani import RoomActor, RoomContext, define_room, open_server
from verani.store import FileStore

from helpers import connect


@attrs.define
class LifeState:
    starts: int = 0  # persisted: how many times an instance was started
    sleeps: int = 0  # persisted: how many times on_hibernate ran
    woke: bool = False  # ephemeral: set by on_start, so it is True from the first event on


def life_room(events: list[Any], *, fail: str | None = None, idle_timeout: float = 30.0) -> Any:
    """A room whose hooks record what they saw in ``events``; ``fail`` names a hook that raises
    (after changing state)."""
    room = define_room(
        name="life",
        state=LifeState,
        persisted_keys=["starts", "sleeps"],
        idle_timeout=idle_timeout,
    )

    @room.on_start
    async def started(actor: RoomActor[LifeState]) -> None:
        await trio.lowlevel.checkpoint()  # an async hook, with a checkpoint inside its turn
        state = actor.room_state
        state.starts += 1
        state.woke = True
        events.append(("start", state.starts, actor.get_session_count()))
        actor.emit.emit("life:started", {"starts": state.starts})
        if fail == "on_start":
            raise RuntimeError("on_start exploded")

    @room.on_hibernate
    def hibernating(actor: RoomActor[LifeState]) -> None:
        actor.room_state.sleeps += 1
        events.append(("hibernate", actor.room_state.sleeps))
        actor.emit.emit("life:sleeping", {"sleeps": actor.room_state.sleeps})
        if fail == "on_hibernate":
            raise RuntimeError("on_hibernate exploded")

    @room.on_hibernation_restore
    def restored(actor: RoomActor[LifeState]) -> None:
        events.append(("restore", actor.room_state.woke))

    @room.on_connect
    def joined(ctx: RoomContext[LifeState]) -> None:
        state = ctx.actor.room_state
        events.append(("connect", state.woke))
        ctx.emit.emit("life:sync", {"starts": state.starts, "sleeps": state.sleeps})

    @room.on("life:get")
    def get(ctx: RoomContext[LifeState], data: Any) -> None:
        state = ctx.actor.room_state
        events.append(("get", state.woke))
        ctx.emit.emit("life:state", {"starts": state.starts, "sleeps": state.sleeps})

    @room.on_error
    def on_error(error: BaseException, ctx: RoomContext[LifeState] | None) -> None:
        events.append(("error", str(error), ctx))

    return room


def document(store: FileStore, room: str = "life", instance: str = "default") -> Any:
    """The state in the stored document itself (not the journal)."""
    return orjson.loads(store.path_for(room, instance).read_bytes())["state"]


async def test_on_start_runs_at_creation_and_each_revival_before_the_first_event(
    tmp_path: Any,
) -> None:
    events: list[Any] = []
    room = life_room(events)
    with trio.fail_after(10):
        async with open_server([room], store=FileStore(tmp_path)) as server:
            async with connect(server.url, "/ws/life") as client:
                # Created: on_start ran before on_connect (no socket yet to hear its emit).
                assert await client.next_event() == (
                    "life:sync",
                    {"type": "life:sync", "starts": 1, "sleeps": 0},
                )
                assert events == [("start", 1, 0), ("connect", True)]
                events.clear()

                assert await server.hibernate("life") == [("life", "default", None)]
                await client.next_event("life:sleeping")
                # Revived by a message: on_start first (its frame reaches the socket before
                # the handler's), then on_hibernation_restore, then the message.
                await client.emit("life:get")
                assert await client.next_event() == (
                    "life:started",
                    {"type": "life:started", "starts": 2},
                )
                assert await client.next_event() == (
                    "life:state",
                    {"type": "life:state", "starts": 2, "sleeps": 1},
                )
                assert events == [
                    ("hibernate", 1),
                    ("start", 2, 1),
                    ("restore", True),
                    ("get", True),
                ]
        # on_start's change is persisted like any turn's: a new server starts from it.
        async with open_server([room], store=FileStore(tmp_path)) as server:
            async with connect(server.url, "/ws/life") as client:
                _, synced = await client.next_event("life:sync")
                assert synced["starts"] == 3


async def test_on_hibernate_runs_before_idle_hibernation_and_is_saved(
    tmp_path: Any, autojump_clock: Any
) -> None:
    events: list[Any] = []
    room = life_room(events, idle_timeout=30)
    store = FileStore(tmp_path)
    async with open_server([room], store=store) as server:
        async with connect(server.url, "/ws/life") as client:
            await client.next_event("life:sync")
            # The hook runs before the flush, and its frame reaches the socket.
            _, sleeping = await client.next_event("life:sleeping")
            assert sleeping["sleeps"] == 1
            while server.supervisor.instances[("life", "default")].awake:
                await trio.sleep(1)
            assert trio.current_time() >= 30
            assert document(store) == {"starts": 1, "sleeps": 1}
            assert [e for e in events if e[0] == "hibernate"] == [("hibernate", 1)]


async def test_on_hibernate_runs_on_forced_hibernation_and_shutdown_and_is_saved(
    tmp_path: Any,
) -> None:
    events: list[Any] = []
    heard: list[tuple[str, dict[str, Any]]] = []
    room = life_room(events)
    store = FileStore(tmp_path)

    async def listen(url: str, *, task_status: trio.TaskStatus[Any]) -> None:
        # Outlives the server's block, to hear what the room sends while it shuts down.
        async with connect(url, "/ws/life") as client:
            task_status.started(client)
            with contextlib.suppress(trio_websocket.ConnectionClosed):
                while True:
                    heard.append(await client.next_event())

    async def until_heard(event: str, count: int = 1) -> dict[str, Any]:
        while len(found := [data for name, data in heard if name == event]) < count:
            await trio.sleep(0.01)
        return found[-1]

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            async with open_server([room], store=store) as server:
                client = await nursery.start(listen, server.url)
                await until_heard("life:sync")
                # Forced (verani hibernate): its change is in the flush, its frame delivered.
                assert await server.hibernate("life") == [("life", "default", None)]
                assert document(store)["sleeps"] == 1
                assert (await until_heard("life:sleeping"))["sleeps"] == 1
                # Awake again for the shutdown.
                await client.emit("life:get")
                await until_heard("life:state")
            # The frame the hook emitted at shutdown went out before the sockets were closed.
            assert (await until_heard("life:sleeping", 2))["sleeps"] == 2
        assert [e for e in events if e[0] == "hibernate"] == [("hibernate", 1), ("hibernate", 2)]
        # What the hook changed at shutdown is in the stored document, and a new server reads it.
        assert document(store) == {"starts": 2, "sleeps": 2}
        async with open_server([room], store=FileStore(tmp_path)) as server:
            async with connect(server.url, "/ws/life") as client:
                _, synced = await client.next_event("life:sync")
                assert synced == {"type": "life:sync", "starts": 3, "sleeps": 2}


async def test_an_error_in_on_start_is_logged_and_the_room_serves(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    events: list[Any] = []
    with trio.fail_after(10):
        async with open_server([life_room(events, fail="on_start")], store=str(tmp_path)) as server:
            async with connect(server.url, "/ws/life") as client:
                # What the hook changed before raising stays, as for any turn.
                _, synced = await client.next_event("life:sync")
                assert synced["starts"] == 1
                await client.emit("life:get")
                assert (await client.next_event("life:state"))[1]["starts"] == 1
    assert ("error", "on_start exploded", None) in events
    assert "room life/default: on_start raised RuntimeError: on_start exploded" in caplog.text


async def test_an_error_in_on_hibernate_is_logged_and_the_room_still_hibernates(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    events: list[Any] = []
    store = FileStore(tmp_path)
    room = life_room(events, fail="on_hibernate")
    with trio.fail_after(10):
        async with open_server([room], store=store) as server:
            async with connect(server.url, "/ws/life") as client:
                await client.next_event("life:sync")
                assert await server.hibernate("life") == [("life", "default", None)]
                assert not server.supervisor.instances[("life", "default")].awake
                # The change made before the error is in the flush.
                assert document(store)["sleeps"] == 1
                await client.emit("life:get")
                _, state = await client.next_event("life:state")
                assert state == {"type": "life:state", "starts": 2, "sleeps": 1}
    assert ("error", "on_hibernate exploded", None) in events
    assert "room life/default: on_hibernate raised RuntimeError: on_hibernate exploded" in (
        caplog.text
    )


async def test_lifecycle_hooks_as_define_room_options(tmp_path: Any) -> None:
    seen: list[str] = []
    room = define_room(
        name="opts",
        state={"n": 0},
        persisted_keys=["n"],
        on_start=lambda actor: seen.append("start"),
        on_hibernate=lambda actor: seen.append("hibernate"),
    )
    assert room.hooks.on_start is not None and room.hooks.on_hibernate is not None
    with trio.fail_after(10):
        async with open_server([room], store=str(tmp_path)) as server:
            async with connect(server.url, "/ws/opts"):
                while not seen:
                    await trio.sleep(0.01)
                assert await server.hibernate("opts") == [("opts", "default", None)]
                assert seen == ["start", "hibernate"]
            # The socket's leaving wakes the room (a turn for on_disconnect); shutdown puts it
            # to sleep again.
    assert seen == ["start", "hibernate", "start", "hibernate"]


def test_hook_decorators_return_the_function() -> None:
    room = define_room(name="deco")

    def hook(actor: Any) -> None:
        pass

    assert room.on_start(hook) is hook
    assert room.on_hibernate(hook) is hook
    assert room.hooks.on_start is hook and room.hooks.on_hibernate is hook
