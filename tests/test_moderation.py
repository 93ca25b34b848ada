"""Moderation over real sockets: ``ctx.close``, ``actor.disconnect``, ``actor.sessions``.

A close is one of a turn's outputs: it reaches its socket after every frame the room sent that
socket before it, including frames the output gate held for the turn's write.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio_websocket

from verani import (
    CloseCodeError,
    ConnectionMeta,
    HandshakeRequest,
    RoomActor,
    RoomContext,
    define_room,
    open_server,
)
from verani.sessions import is_room_close_code
from verani.store import FileStore

from helpers import Client, connect


def mod_room(log: list[Any]) -> Any:
    room = define_room(name="mod", state={"count": 0}, persisted_keys=["count"])

    @room.extract_meta
    def meta(request: HandshakeRequest) -> ConnectionMeta:
        return ConnectionMeta(user_id=request.query["user"], client_id=request.query["cid"])

    @room.on_connect
    def joined(ctx: RoomContext[Any]) -> None:
        ctx.emit.emit("welcome", {"cid": ctx.meta.client_id})
        if ctx.meta.user_id == "banned":
            # Refused after the upgrade, with a code of the room's own and a frame first.
            ctx.emit.emit("banned", {})
            ctx.close(4003, "you are banned")

    @room.on_disconnect
    def left(ctx: RoomContext[Any]) -> None:
        log.append(("disconnect", ctx.meta.client_id, ctx.close_code, ctx.close_reason))

    @room.on("close-me")
    def close_me(ctx: RoomContext[Any], data: Any) -> None:
        if data.get("persist"):
            # The turn changes persisted state: its frames (and the close) wait for the write.
            ctx.actor.room_state.count += 1
        for n in range(data.get("frames", 1)):
            ctx.emit.emit("before", {"n": n})
        ctx.close(data["code"], data.get("reason", ""))
        ctx.emit.emit("after", {})  # after the close: never reaches the socket

    @room.on("kick")
    def kick(ctx: RoomContext[Any], data: Any) -> None:
        n = ctx.actor.disconnect(
            data.get("cid"),
            user_id=data.get("user"),
            code=data.get("code", 4000),
            reason=data.get("reason", ""),
        )
        ctx.emit.emit("kicked", {"n": n})

    @room.on("who")
    def who(ctx: RoomContext[Any], data: Any) -> None:
        metas = ctx.actor.sessions(data.get("channel"))
        ctx.emit.emit("who", {"cids": [m.client_id for m in metas]})

    @room.on("join")
    def join(ctx: RoomContext[Any], data: Any) -> None:
        ctx.join(data["channel"])
        ctx.emit.emit("joined", {})

    @room.on_error
    def on_error(error: BaseException, ctx: RoomContext[Any] | None) -> None:
        log.append(("error", type(error).__name__, str(error)))

    return room


def path(user: str, cid: str) -> str:
    return f"/ws/mod?user={user}&cid={cid}"


async def closed_with(client: Client) -> tuple[int, str, list[str]]:
    """Read ``client`` until the server closes it: the close code, reason and the events that
    came first."""
    events: list[str] = []
    try:
        while True:
            name, _ = await client.next_event()
            events.append(name)
    except trio_websocket.ConnectionClosed as exc:
        assert exc.reason is not None
        return exc.reason.code, exc.reason.reason or "", events


async def until(predicate: Any) -> None:
    while not predicate():
        await trio.sleep(0.01)


@pytest.mark.parametrize("persist", [False, True], ids=["passing", "held-by-the-gate"])
async def test_ctx_close_reaches_the_client_after_the_frames_of_its_turn(
    tmp_path: Any, persist: bool
) -> None:
    log: list[Any] = []
    with trio.fail_after(10):
        async with open_server([mod_room(log)], store=FileStore(tmp_path)) as server:
            async with connect(server.url, path("ann", "a1")) as ann:
                await ann.next_event("welcome")
                await ann.emit(
                    "close-me",
                    {"code": 4321, "reason": "bye now", "persist": persist, "frames": 50},
                )
                code, reason, events = await closed_with(ann)
                assert (code, reason) == (4321, "bye now")
                # Every frame sent before the close, none after it.
                assert events == ["before"] * 50
                await until(lambda: log)
                assert log == [("disconnect", "a1", 4321, "bye now")]


async def test_close_codes_1000_and_the_application_range_are_allowed(tmp_path: Any) -> None:
    with trio.fail_after(10):
        async with open_server([mod_room([])], store=str(tmp_path)) as server:
            for code in (1000, 3000, 4999):
                async with connect(server.url, path("ann", f"a{code}")) as ann:
                    await ann.next_event("welcome")
                    await ann.emit("close-me", {"code": code})
                    assert (await closed_with(ann))[:2] == (code, "")


async def test_on_connect_may_close_a_socket_after_telling_it_why(tmp_path: Any) -> None:
    log: list[Any] = []
    with trio.fail_after(10):
        async with open_server([mod_room(log)], store=str(tmp_path)) as server:
            async with connect(server.url, path("banned", "x1")) as banned:
                code, reason, events = await closed_with(banned)
                assert (code, reason, events) == (4003, "you are banned", ["welcome", "banned"])
            await until(lambda: log)
            assert log == [("disconnect", "x1", 4003, "you are banned")]


async def test_disconnect_by_client_id_and_by_user_id_closes_only_those(tmp_path: Any) -> None:
    log: list[Any] = []
    with trio.fail_after(10):
        async with open_server([mod_room(log)], store=str(tmp_path)) as server:
            async with (
                connect(server.url, path("ann", "a1")) as a1,
                connect(server.url, path("ann", "a2")) as a2,
                connect(server.url, path("bob", "b1")) as b1,
                connect(server.url, path("bob", "b2")) as b2,
                connect(server.url, path("mod", "m1")) as m1,
            ):
                for client in (a1, a2, b1, b2, m1):
                    await client.next_event("welcome")
                await m1.emit("who")
                assert (await m1.next_event("who"))[1]["cids"] == ["a1", "a2", "b1", "b2", "m1"]

                await m1.emit("kick", {"user": "ann", "code": 4001, "reason": "spam"})
                assert (await m1.next_event("kicked"))[1]["n"] == 2
                assert (await closed_with(a1))[:2] == (4001, "spam")
                assert (await closed_with(a2))[:2] == (4001, "spam")

                await m1.emit("kick", {"cid": "b2"})
                assert (await m1.next_event("kicked"))[1]["n"] == 1
                assert (await closed_with(b2))[:2] == (4000, "")
                await m1.emit("kick", {"cid": "nobody"})
                assert (await m1.next_event("kicked"))[1]["n"] == 0
                await m1.emit("kick", {"user": "nobody"})
                assert (await m1.next_event("kicked"))[1]["n"] == 0

                await until(lambda: len(log) == 3)
                assert sorted(log) == [
                    ("disconnect", "a1", 4001, "spam"),
                    ("disconnect", "a2", 4001, "spam"),
                    ("disconnect", "b2", 4000, None),
                ]
                # The others are still there and served.
                await m1.emit("who")
                assert (await m1.next_event("who"))[1]["cids"] == ["b1", "m1"]
                await b1.emit("who")
                assert (await b1.next_event("who"))[1]["cids"] == ["b1", "m1"]


async def test_sessions_lists_the_metas_of_a_channel(tmp_path: Any) -> None:
    with trio.fail_after(10):
        async with open_server([mod_room([])], store=str(tmp_path)) as server:
            async with (
                connect(server.url, path("ann", "a1")) as a1,
                connect(server.url, path("bob", "b1")) as b1,
            ):
                await a1.next_event("welcome")
                await b1.next_event("welcome")
                await b1.emit("join", {"channel": "ops"})
                await b1.next_event("joined")
                await a1.emit("who", {"channel": "ops"})
                assert (await a1.next_event("who"))[1]["cids"] == ["b1"]
                await a1.emit("who", {"channel": "nowhere"})
                assert (await a1.next_event("who"))[1]["cids"] == []

                # From outside the room, as a turn of it: the metas themselves.
                metas = await server.room("mod").call(lambda actor: actor.sessions())
                assert [(m.user_id, m.client_id, m.channels) for m in metas] == [
                    ("ann", "a1", ["default"]),
                    ("bob", "b1", ["default", "ops"]),
                ]

                # And a disconnect from outside.
                def kick_bob(actor: RoomActor[Any]) -> int:
                    return actor.disconnect(user_id="bob", code=4010, reason="later")

                assert await server.room("mod").call(kick_bob) == 1
                assert (await closed_with(b1))[:2] == (4010, "later")


@pytest.mark.parametrize("code", [999, 1001, 1005, 1011, 2999, 5000, -1, True, "4000", None])
async def test_a_bad_close_code_is_refused_at_the_call_and_the_room_goes_on(
    tmp_path: Any, code: Any
) -> None:
    log: list[Any] = []
    with trio.fail_after(10):
        async with open_server([mod_room(log)], store=str(tmp_path)) as server:
            async with (
                connect(server.url, path("ann", "a1")) as ann,
                connect(server.url, path("bob", "b1")) as bob,
            ):
                await ann.next_event("welcome")
                await bob.next_event("welcome")
                await ann.emit("close-me", {"code": code})
                # The handler's error: the sender is told, nothing was sent after the call.
                _, error = await ann.next_event("verani:error")
                assert error["code"] == "handler_error"
                await ann.emit("kick", {"user": "bob", "code": code})
                _, error = await ann.next_event("verani:error")
                assert error["code"] == "handler_error"
                message = (
                    f"close code {code!r} is not allowed: use 1000 (normal closure) or "
                    f"3000-4999 (3000-3999 registered with IANA, 4000-4999 private to the "
                    f"application)"
                )
                assert log == [("error", "CloseCodeError", message)] * 2
                # Nobody was closed; the room goes on.
                await bob.emit("who")
                assert (await bob.next_event("who"))[1]["cids"] == ["a1", "b1"]
                await ann.emit("close-me", {"code": 4000})
                assert (await closed_with(ann))[:2] == (4000, "")


def test_close_code_error_is_a_value_error_naming_code_and_ranges() -> None:
    error = CloseCodeError(1001)
    assert isinstance(error, ValueError)
    assert "1001" in str(error) and "1000" in str(error) and "3000-4999" in str(error)
    allowed = [c for c in range(0, 6000) if is_room_close_code(c)]
    assert allowed == [1000, *range(3000, 5000)]
    assert not is_room_close_code(True) and not is_room_close_code(4000.0)


async def test_disconnect_takes_exactly_one_of_client_id_and_user_id(tmp_path: Any) -> None:
    with trio.fail_after(10):
        async with open_server([mod_room([])], store=str(tmp_path)) as server:
            handle = server.room("mod")
            with pytest.raises(TypeError, match="exactly one"):
                await handle.call(lambda actor: actor.disconnect())
            with pytest.raises(TypeError, match="exactly one"):
                await handle.call(lambda actor: actor.disconnect("a1", user_id="ann"))
            with pytest.raises(TypeError, match="reason must be a str"):
                await handle.call(lambda actor: actor.disconnect("a1", reason=None))
