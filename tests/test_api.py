"""The Verani server API over real sockets: targeting, channels, meta, hooks, runtime handles."""

from __future__ import annotations

from typing import Any

import attrs
import pytest
import trio

from faults import FaultyStore, settle
from verani import (
    ConnectionMeta,
    HandshakeRequest,
    RoomContext,
    RoomNotFoundError,
    define_room,
    open_server,
)
from verani.runtime import CallCycleError

from helpers import connect, http_request, upgrade_request


async def drain(client: Any) -> None:
    """Skip what was sent to ``client`` so far (join notices of other sockets)."""
    while not await quiet(client, 0.1):
        pass


async def upgrade_status(port: int, raw: bytes) -> int:
    """The HTTP status of an upgrade request, read from the response head alone."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(raw)
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = await stream.receive_some(4096)
            if not chunk:
                break
            head += chunk
    return int(head.split()[1])


async def quiet(client: Any, seconds: float = 0.2) -> bool:
    """True when nothing arrives on ``client`` for ``seconds``."""
    with trio.move_on_after(seconds):
        await client.recv()
        return False
    return True


@attrs.define(eq=False)
class TeamMeta(ConnectionMeta):
    team: str = "none"


def api_room(log: list[Any]) -> Any:
    room = define_room(name="api", state={"seen": 0})

    @room.extract_meta
    def meta(request: HandshakeRequest) -> TeamMeta:
        q = request.query
        return TeamMeta(user_id=q["user"], client_id=q["cid"], team=q.get("team", "none"))

    @room.on_connect
    def joined(ctx: RoomContext[Any]) -> None:
        # The newcomer is not a session yet: the count and room-wide emits exclude it.
        log.append(("connect", ctx.meta.client_id, ctx.actor.get_session_count()))
        ctx.actor.emit.emit("someone-joined", {"cid": ctx.meta.client_id})
        ctx.emit.emit("welcome", {"cid": ctx.meta.client_id})

    @room.on_disconnect
    def left(ctx: RoomContext[Any]) -> None:
        log.append(("disconnect", ctx.meta.client_id, ctx.close_code, ctx.close_reason))

    @room.on("broadcast")
    def broadcast(ctx: RoomContext[Any], data: Any) -> None:
        sent = ctx.actor.broadcast(
            data["channel"],
            {"type": "raw", "n": data["n"]},
            user_ids=data.get("users"),
            client_ids=data.get("cids"),
            except_=ctx.meta if data.get("skip_me") else None,
        )
        ctx.emit.emit("sent", {"count": sent})

    @room.on("to-user")
    def to_user(ctx: RoomContext[Any], data: Any) -> None:
        a = ctx.actor.send_to_user(data["user"], data["channel"], {"type": "direct"})
        b = ctx.actor.emit_to_user(data["user"], "any-channel", {})
        ctx.emit.emit("sent", {"count": [a, b]})

    @room.on("join")
    def join(ctx: RoomContext[Any], data: Any) -> None:
        ctx.join(data["channel"])
        ctx.emit.emit("channels", {"channels": ctx.meta.channels})

    @room.on("leave")
    def leave(ctx: RoomContext[Any], data: Any) -> None:
        ctx.leave(data["channel"])
        ctx.emit.emit("channels", {"channels": ctx.meta.channels})

    @room.on("whoami")
    def whoami(ctx: RoomContext[Any], data: Any) -> None:
        assert isinstance(ctx.meta, TeamMeta)
        ctx.emit.emit("me", {"team": ctx.meta.team, "data": data})

    return room


def url_path(user: str, cid: str, team: str = "none") -> str:
    return f"/ws/api?user={user}&cid={cid}&team={team}"


async def test_broadcast_and_user_targeting(tmp_path: Any) -> None:
    with trio.fail_after(10):
        async with open_server([api_room([])], store=str(tmp_path)) as server:
            async with (
                connect(server.url, url_path("ann", "a1")) as a1,
                connect(server.url, url_path("bob", "b1")) as b1,
                connect(server.url, url_path("bob", "b2")) as b2,
            ):
                for c in (a1, b1, b2):
                    await c.next_event("welcome")
                await b2.emit("join", {"channel": "ops"})
                await b2.next_event("channels")
                for c in (a1, b1, b2):
                    await drain(c)

                await a1.emit("broadcast", {"channel": "default", "n": 1, "users": ["bob"]})
                assert (await a1.next_event("sent"))[1]["count"] == 2
                for c in (b1, b2):
                    assert await c.recv() == {
                        "type": "event",
                        "channel": "default",
                        "data": {"type": "raw", "n": 1},
                    }
                await a1.emit(
                    "broadcast",
                    {"channel": "default", "n": 2, "skip_me": True, "cids": ["a1", "b2"]},
                )
                assert (await a1.next_event("sent"))[1]["count"] == 1
                assert (await b2.recv())["data"]["n"] == 2
                assert await quiet(b1)

                # send_to_user: bob's sockets on channel "ops" only; emit_to_user: all of them.
                await a1.emit("to-user", {"user": "bob", "channel": "ops"})
                assert (await a1.next_event("sent"))[1]["count"] == [1, 2]
                assert await b2.recv() == {
                    "type": "event",
                    "channel": "ops",
                    "data": {"type": "direct"},
                }
                assert (await b2.next_event())[0] == "any-channel"
                assert (await b1.next_event())[0] == "any-channel"


async def test_channels_and_meta_subclass_survive_hibernation(tmp_path: Any) -> None:
    with trio.fail_after(10):
        async with open_server([api_room([])], store=str(tmp_path)) as server:
            async with (
                connect(server.url, url_path("ann", "a1", "red")) as a1,
                connect(server.url, url_path("bob", "b1")) as b1,
            ):
                await a1.next_event("welcome")
                await b1.next_event("welcome")
                await drain(a1)
                await a1.emit("join", {"channel": "ops"})
                assert (await a1.next_event("channels"))[1]["channels"] == ["default", "ops"]
                assert await server.hibernate("api") == [("api", "default", None)]

                await b1.emit("broadcast", {"channel": "ops", "n": 7})
                assert (await b1.next_event("sent"))[1]["count"] == 1
                assert (await a1.recv())["channel"] == "ops"
                await a1.emit("whoami")
                assert (await a1.next_event("me"))[1] == {"type": "me", "team": "red", "data": {}}
                await a1.emit("leave", {"channel": "ops"})
                assert (await a1.next_event("channels"))[1]["channels"] == ["default"]
                await b1.emit("broadcast", {"channel": "ops", "n": 8})
                assert (await b1.next_event("sent"))[1]["count"] == 0


async def test_connect_and_disconnect_hooks(tmp_path: Any) -> None:
    log: list[Any] = []
    with trio.fail_after(10):
        async with open_server([api_room(log)], store=str(tmp_path)) as server:
            async with connect(server.url, url_path("ann", "a1")) as a1:
                await a1.next_event("welcome")
                async with connect(server.url, url_path("bob", "b1")) as b1:
                    # The joiner's own welcome, but not its own "someone-joined".
                    assert (await b1.next_event())[0] == "welcome"
                    assert (await a1.next_event("someone-joined"))[1]["cid"] == "b1"
                    await b1.ws.aclose(4000, "going home")
                while len(log) < 3:
                    await trio.sleep(0.01)
                # Read while a1 is still connected: its own disconnect comes when it leaves.
                seen = list(log)
            assert seen == [
                ("connect", "a1", 0),
                ("connect", "b1", 1),
                ("disconnect", "b1", 4000, "going home"),
            ]


async def test_handler_order_wildcard_fallback_and_off(tmp_path: Any) -> None:
    calls: list[str] = []
    room = define_room(name="order")
    room.on("e", lambda ctx, data: calls.append("first"))
    room.on("e", lambda ctx, data: calls.append("second"))

    @room.on("*")
    def every(ctx: RoomContext[Any], data: Any) -> None:
        calls.append(f"*{ctx.frame.type if ctx.frame else ''}")
        if ctx.frame and ctx.frame.type == "remove":
            room.off("*")

    @room.on_message
    def fallback(ctx: RoomContext[Any], frame: Any) -> None:
        calls.append(f"on_message:{frame.type}")
        ctx.emit.emit("done")

    @room.on("done?")
    def done(ctx: RoomContext[Any], data: Any) -> None:
        ctx.emit.emit("done")

    with trio.fail_after(10):
        async with open_server([room], store=str(tmp_path)) as server:
            async with connect(server.url, "/ws/order") as client:
                for event in ("e", "other", "remove", "other", "done?"):
                    await client.emit(event)
                await client.next_event("done")
                await client.next_event("done")
    assert calls == ["first", "second", "*e", "*other", "*remove", "on_message:other"]


async def test_origin_allow_list(tmp_path: Any) -> None:
    room = define_room(name="origin", allowed_origins=["https://app.example"])
    with trio.fail_after(10):
        async with open_server([room], store=str(tmp_path)) as server:
            req = upgrade_request("/ws/origin", Origin="https://evil.example")
            status, _, body = await http_request(server.port, req)
            assert status == 403 and b"origin https://evil.example is not allowed" in body
            good = upgrade_request("/ws/origin", Origin="https://app.example")
            assert await upgrade_status(server.port, good) == 101
            # Not a browser (no Origin header): nothing to protect against.
            assert await upgrade_status(server.port, upgrade_request("/ws/origin")) == 101


async def test_runtime_handle_reaches_rooms_as_turns_and_wakes_them(tmp_path: Any) -> None:
    order: list[str] = []
    room = define_room(name="hub", state={"n": 0}, persisted_keys=["n"])
    slow_started, slow_gate = trio.Event(), trio.Event()

    @room.on("slow")
    async def slow(ctx: RoomContext[Any], data: Any) -> None:
        order.append("slow:start")
        slow_started.set()
        await slow_gate.wait()
        order.append("slow:end")

    @room.on("call-self")
    async def call_self(ctx: RoomContext[Any], data: Any) -> None:
        assert ctx.runtime is not None
        try:
            await ctx.runtime.room("hub").get_session_count()
        except CallCycleError as exc:
            ctx.emit.emit("refused", {"why": str(exc)})

    with trio.fail_after(10):
        async with open_server([room], store=str(tmp_path)) as server:
            with pytest.raises(RoomNotFoundError):
                server.room("nope")
            with pytest.raises(ValueError, match="bad instance name"):
                server.room("hub", "..")
            hub = server.room("hub")
            async with connect(server.url, "/ws/hub", user_id="ann") as ann:
                await ann.emit("slow")
                await slow_started.wait()

                async def call() -> None:
                    assert await hub.emit_to_channel("default", "news", {"x": 1}) == 1
                    order.append("call")

                # The call waits for the running turn: handlers never interleave.
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(call)
                    await settle(server.supervisor.instances[("hub", "default")].has_pending)
                    slow_gate.set()
                assert order == ["slow:start", "slow:end", "call"]
                assert (await ann.next_event("news"))[1]["x"] == 1
                await ann.emit("call-self")
                assert (
                    "cannot be called from inside room hub/default's turn"
                    in (await ann.next_event("refused"))[1]["why"]
                )

                await server.hibernate("hub")
                assert not server.supervisor.instances[("hub", "default")].awake
                # A call wakes a hibernated room; its state comes back first.
                assert await hub.call(lambda actor: actor.room_state.n) == 0
                assert await hub.get_connected_user_ids() == ["ann"]
                assert await hub.emit_to_user("ann", "ping-user") == 1
                assert (await ann.next_event("ping-user"))[0] == "ping-user"

                def bump(actor: Any) -> int:
                    actor.room_state.n += 5
                    return int(actor.room_state.n)

                assert await hub.call(bump) == 5
                with pytest.raises(ZeroDivisionError):
                    await hub.call(lambda actor: 1 / 0)
            # A handle on an instance nobody connected to creates it.
            assert await server.room("hub", "fresh").get_session_count() == 0


def calling_room(name: str, other: str, inside: list[str], both_inside: trio.Event) -> Any:
    room = define_room(name=name)

    @room.on("go")
    async def go(ctx: RoomContext[Any], data: Any) -> None:
        # Both rooms are inside their turns before either calls.
        inside.append(name)
        if len(inside) == 2:
            both_inside.set()
        await both_inside.wait()
        assert ctx.runtime is not None
        try:
            count = await ctx.runtime.room(other).get_session_count()
        except CallCycleError as exc:
            ctx.emit.emit("refused", {"why": str(exc)})
        else:
            ctx.emit.emit("done", {"count": count})

    return room


async def test_rooms_calling_each_other_get_a_cycle_error_not_a_deadlock(tmp_path: Any) -> None:
    inside: list[str] = []
    both_inside = trio.Event()
    rooms = [
        calling_room("a", "b", inside, both_inside),
        calling_room("b", "a", inside, both_inside),
    ]
    with trio.fail_after(10):
        async with open_server(rooms, store=str(tmp_path)) as server:
            async with connect(server.url, "/ws/a") as a, connect(server.url, "/ws/b") as b:
                await a.emit("go")
                await b.emit("go")
                answers = {(await a.next_event())[0], (await b.next_event())[0]}
                # One of the two calls waits on the other's turn: it is refused, the other
                # completes once the refused turn has ended.
                assert answers == {"done", "refused"}


async def test_a_task_started_from_a_turn_may_call_its_room(tmp_path: Any) -> None:
    results: list[int] = []
    room = define_room(name="ticker")

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:

            @room.on("start")
            def start(ctx: RoomContext[Any], data: Any) -> None:
                async def tick() -> None:  # runs after the turn, in the test's nursery
                    assert ctx.runtime is not None
                    results.append(await ctx.runtime.room("ticker").get_session_count())

                nursery.start_soon(tick)

            async with open_server([room], store=str(tmp_path)) as server:
                async with connect(server.url, "/ws/ticker") as client:
                    await client.emit("start")
                    while not results:
                        await trio.sleep(0.01)
    assert results == [1]


async def test_a_call_result_waits_for_durability_like_frames(tmp_path: Any) -> None:
    store = FaultyStore(tmp_path, hold_saves=True)
    room = define_room(name="gated", state={"n": 0}, persisted_keys=["n"])

    def bump(actor: Any) -> int:
        actor.room_state.n += 1
        return int(actor.room_state.n)

    with trio.fail_after(10):
        async with open_server([room], store=store) as server:
            handle = server.room("gated")
            with trio.move_on_after(0.3):
                await handle.call(bump)
                pytest.fail("the call returned before its change was durable")
            assert store.save_reached.is_set()  # the call's turn ran; its write was held
            store.release_saves()
            assert await handle.call(bump) == 2


async def test_allowed_origins_are_compared_as_browsers_send_them(tmp_path: Any) -> None:
    room = define_room(
        name="norm", allowed_origins=["https://App.Example.com", "https://x.example:443"]
    )
    with trio.fail_after(10):
        async with open_server([room], store=str(tmp_path)) as server:
            for origin in ("https://app.example.com", "https://x.example", "HTTPS://X.EXAMPLE"):
                req = upgrade_request("/ws/norm", Origin=origin)
                assert await upgrade_status(server.port, req) == 101, origin
            for origin in ("https://x.example:8443", "null", "http://x.example"):
                req = upgrade_request("/ws/norm", Origin=origin)
                assert await upgrade_status(server.port, req) == 403, origin
