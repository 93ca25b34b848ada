"""Connection-state recovery (issue 17, item 1): a dropped client gets its session back, with
what it missed, across a hibernation and a restart; presence does not flicker."""

from __future__ import annotations

import contextlib
import pathlib
import signal
import subprocess
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
import trio
import trio_websocket

from verani import Recovery, RoomContext, ServerConfig, define_room, open_server
from verani.store import FileStore, MemoryStore

from helpers import ROOMS, VERANI, free_port

#: No liveness pings: the autojump clock jumps while the store writes in a thread.
NO_PING = ServerConfig(ping_interval=0)


def chat_room(events: list[Any], *, max_disconnect: float = 120.0) -> Any:
    room = define_room(
        name="chat",
        recovery=Recovery(max_disconnect=max_disconnect, max_frames=500),
    )

    @room.on_connect
    def connected(ctx: RoomContext[Any]) -> None:
        events.append(("connect", ctx.meta.user_id, ctx.recovered))
        if not ctx.recovered:
            ctx.emit.emit("welcome", {"you": ctx.meta.user_id})
            ctx.actor.emit.emit("joined", {"user": ctx.meta.user_id})

    @room.on_disconnect
    def disconnected(ctx: RoomContext[Any]) -> None:
        events.append(("disconnect", ctx.meta.user_id, ctx.close_code))
        ctx.actor.emit.emit("left", {"user": ctx.meta.user_id})

    @room.on("say")
    def say(ctx: RoomContext[Any], data: dict[str, Any]) -> None:
        ctx.actor.emit.emit("said", {"text": data["text"]})

    return room


class Raw:
    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self.ws = ws

    async def frame(self) -> dict[str, Any]:
        # No timeout: on the autojump clock it would fire while the store writes in a thread.
        frame: dict[str, Any] = orjson.loads(await self.ws.get_message())
        return frame

    async def say(self, text: str) -> None:
        await self.ws.send_message(orjson.dumps({"type": "say", "data": {"text": text}}).decode())

    async def cut(self) -> None:
        """Drop the TCP connection without a WebSocket close."""
        await trio.aclose_forcefully(self.ws._stream)


@contextlib.asynccontextmanager
async def raw(url: str, query: str) -> AsyncIterator[Raw]:
    # A queue that holds what a test leaves unread: with trio-websocket's default of one
    # message, the reader task blocks on the second and the block never exits.
    async with trio_websocket.open_websocket_url(
        f"{url}/ws/chat/r?{query}", message_queue_size=64
    ) as ws:
        try:
            yield Raw(ws)
        finally:
            await trio.aclose_forcefully(ws._stream)


def name(frame: dict[str, Any]) -> str:
    return str(frame["data"]["type"])


async def test_rooms_without_recovery_send_todays_frames(tmp_path: Any) -> None:
    room = define_room(name="plain")

    @room.on_connect
    def connected(ctx: RoomContext[Any]) -> None:
        ctx.emit.emit("hello", {"a": 1})

    async with open_server([room], store=FileStore(tmp_path), config=NO_PING) as server:
        async with trio_websocket.open_websocket_url(f"{server.url}/ws/plain/x") as ws:
            first = orjson.loads(await ws.get_message())
            assert first == {
                "type": "event",
                "channel": "default",
                "data": {"a": 1, "type": "hello"},
            }
            await trio.aclose_forcefully(ws._stream)


async def _drop_and_recover(tmp_path: Any, between: str) -> None:
    events: list[Any] = []
    # The memory store: no worker threads, so the autojump clock never jumps past a grace
    # period while a write is on its way (it did with files, and the session expired).
    store = MemoryStore()
    server_cm = open_server([chat_room(events)], store=store, config=NO_PING)
    server = await server_cm.__aenter__()
    try:
        async with raw(server.url, "userId=bob") as bob:
            async with raw(server.url, "userId=alice") as alice:
                hello = await alice.frame()
                assert name(hello) == "verani:session" and "offset" not in hello
                session = hello["data"]
                assert session["recovered"] is False and session["offset"] == 0
                assert len(session["token"]) >= 22
                welcome = await alice.frame()
                assert name(welcome) == "welcome" and welcome["offset"] == 1
                last = 1
                await alice.cut()
            # Bob: his own hello and welcome, then alice's join.
            for expected in ("verani:session", "welcome", "joined"):
                assert name(await bob.frame()) == expected
            for i in range(3):
                await trio.sleep(3.3)
                await bob.say(f"m{i}")
                said = await bob.frame()
                assert said["data"].get("text") == f"m{i}", (said, events)
            if between == "hibernate":
                assert await server.hibernate("chat", "r") == [("chat", "r", None)]
            elif between == "restart":
                await bob.cut()
        if between == "restart":
            await server_cm.__aexit__(None, None, None)
            server_cm = open_server([chat_room(events)], store=store, config=NO_PING)
            server = await server_cm.__aenter__()
        query = f"userId=alice&recover={session['token']}&offset={last}"
        async with raw(server.url, query) as alice:
            hello = await alice.frame()
            assert name(hello) == "verani:session"
            assert hello["data"]["recovered"] is True
            assert hello["data"]["token"] == session["token"]
            missed = [await alice.frame() for _ in range(3)]
            assert [f["data"]["text"] for f in missed] == ["m0", "m1", "m2"]
            assert [f["offset"] for f in missed] == [2, 3, 4]
            await alice.say("live")
            live = await alice.frame()
            assert live["data"]["text"] == "live" and live["offset"] == 5
        # No leave and no second join for alice.
        assert ("disconnect", "alice", 1006) not in events
        assert events.count(("connect", "alice", False)) == 1
        assert ("connect", "alice", True) in events
    finally:
        await server_cm.__aexit__(None, None, None)


async def test_a_dropped_client_recovers_what_it_missed(tmp_path: Any, autojump_clock: Any) -> None:
    await _drop_and_recover(tmp_path, "none")


async def test_recovery_across_a_hibernation(tmp_path: Any, autojump_clock: Any) -> None:
    await _drop_and_recover(tmp_path, "hibernate")


async def test_recovery_across_a_server_restart(tmp_path: Any, autojump_clock: Any) -> None:
    await _drop_and_recover(tmp_path, "restart")


@pytest.mark.parametrize("query", ["recover=forged&offset=0", "recover={token}&offset=99"])
async def test_a_bad_token_or_offset_gets_a_fresh_session(
    tmp_path: Any, autojump_clock: Any, query: str
) -> None:
    events: list[Any] = []
    async with open_server(
        [chat_room(events)], store=FileStore(tmp_path), config=NO_PING
    ) as server:
        async with raw(server.url, "userId=alice") as alice:
            token = (await alice.frame())["data"]["token"]
            await alice.cut()
        await trio.sleep(1)
        async with raw(server.url, "userId=alice&" + query.format(token=token)) as again:
            hello = (await again.frame())["data"]
            assert hello["recovered"] is False and hello["token"] != token
            assert name(await again.frame()) == "welcome"


async def test_another_users_token_gets_a_fresh_session(tmp_path: Any, autojump_clock: Any) -> None:
    events: list[Any] = []
    async with open_server(
        [chat_room(events)], store=FileStore(tmp_path), config=NO_PING
    ) as server:
        async with raw(server.url, "userId=alice") as alice:
            token = (await alice.frame())["data"]["token"]
            await alice.cut()
        await trio.sleep(1)
        async with raw(server.url, f"userId=mallory&recover={token}&offset=0") as other:
            assert (await other.frame())["data"]["recovered"] is False


async def test_grace_expiry_runs_on_disconnect(tmp_path: Any, autojump_clock: Any) -> None:
    events: list[Any] = []
    async with open_server([chat_room(events, max_disconnect=10.0)], store=MemoryStore()) as server:
        async with raw(server.url, "userId=bob") as bob:
            async with raw(server.url, "userId=alice") as alice:
                token = (await alice.frame())["data"]["token"]
                await alice.cut()
            for expected in ("verani:session", "welcome", "joined"):
                assert name(await bob.frame()) == expected
            await trio.sleep(5)
            assert not any(e[0] == "disconnect" for e in events)
            live = server.supervisor.inspect("chat", "r")
            assert live is not None
            assert {s["user_id"]: s["detached"] for s in live["sessions"]} == {
                "alice": True,
                "bob": False,
            }
            left = await bob.frame()  # the grace period ends: alice leaves
            assert name(left) == "left" and left["data"]["user"] == "alice"
            assert ("disconnect", "alice", 1006) in events
        async with raw(server.url, f"userId=alice&recover={token}&offset=0") as again:
            assert (await again.frame())["data"]["recovered"] is False


async def test_the_python_client_recovers_by_itself(autojump_clock: Any) -> None:
    from verani.client import open_client

    events: list[Any] = []
    async with open_server([chat_room(events)], store=MemoryStore(), config=NO_PING) as server:
        url = f"{server.url}/ws/chat/r?userId=alice"
        async with open_client(url, recover=True, ping_interval=0) as client:
            await client.wait_for_connection()
            await client.receive("welcome")
            assert client.recovered is False
            async with raw(server.url, "userId=bob") as bob:
                await bob.frame()  # bob's session
                assert client._ws is not None
                await trio.aclose_forcefully(client._ws._stream)  # alice's network drops
                await trio.sleep(0.5)
                await bob.say("while you were away")
                await trio.sleep(5)  # the client reconnects (backoff) and recovers
                await client.wait_for_connection()
                with trio.fail_after(30):
                    said = await client.receive("said")
                assert said["text"] == "while you were away"
                assert client.recovered is True
                await bob.say("live")
                assert (await client.receive("said"))["text"] == "live"  # nothing twice
            # No leave and join for alice: her on_disconnect never ran.
            assert [e for e in events if e[1] == "alice"] == [
                ("connect", "alice", False),
                ("connect", "alice", True),
            ]


async def test_an_offset_older_than_what_is_kept_gets_a_fresh_session(
    autojump_clock: Any,
) -> None:
    events: list[Any] = []
    room = chat_room(events)
    room.recovery = Recovery(max_disconnect=60.0, max_frames=2)
    async with open_server([room], store=MemoryStore(), config=NO_PING) as server:
        async with raw(server.url, "userId=bob") as bob:
            async with raw(server.url, "userId=alice") as alice:
                token = (await alice.frame())["data"]["token"]
                assert (await alice.frame())["offset"] == 1  # welcome
                await alice.cut()
            for _ in range(3):  # verani:session, welcome, joined
                await bob.frame()
            for i in range(3):  # three frames for alice; two are kept
                await bob.say(f"m{i}")
                await bob.frame()
            # Offsets 2..4 were sent; 3 and 4 are kept: after 2 it can be recovered, after 1 not.
            async with raw(server.url, f"userId=alice&recover={token}&offset=1") as again:
                hello = (await again.frame())["data"]
                assert hello["recovered"] is False and hello["token"] != token
                assert name(await again.frame()) == "welcome"
            assert ("disconnect", "alice", 1006) in events  # the old session ended for good


def _serve_presence(store: pathlib.Path, port: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [*VERANI, "serve", str(ROOMS / "presence.py"), "--port", str(port), "--store", str(store)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert "serving on" in proc.stdout.readline()
    return proc


def test_sessions_survive_kill_9_of_the_server(tmp_path: pathlib.Path) -> None:
    """The real CLI and the real presence room: the server is killed while alice and bob are
    connected; restarted on the same port, their clients recover by themselves. Nobody is seen
    to leave, and what happened while alice was away reaches her once, in order."""
    from verani.client import open_client

    store, port = tmp_path / "store", free_port()
    url = f"ws://127.0.0.1:{port}/ws/presence"
    procs = [_serve_presence(store, port)]

    async def scenario() -> None:
        async with open_client(f"{url}?userId=alice", recover=True) as alice:
            with trio.fail_after(20):
                await alice.wait_for_connection()
                assert (await alice.receive("presence:update"))["online"] == ["alice"]
            async with open_client(f"{url}?userId=bob", recover=True) as bob:
                with trio.fail_after(30):
                    await bob.wait_for_connection()
                    assert (await alice.receive("presence:update"))["online"] == ["alice", "bob"]
                    assert (await bob.receive("presence:update"))["online"] == ["alice", "bob"]
                    procs[0].send_signal(signal.SIGKILL)
                    assert await trio.to_thread.run_sync(procs[0].wait) == -signal.SIGKILL
                    while alice.state == "connected" or bob.state == "connected":
                        await trio.sleep(0.05)
                    procs.append(_serve_presence(store, port))
                    # carol comes before or after them: either way alice sees her join once.
                    async with open_client(f"{url}?userId=carol") as carol:
                        await carol.wait_for_connection()
                        online = (await carol.receive("presence:update"))["online"]
                        assert online == ["alice", "bob", "carol"]
                        assert (await alice.receive("presence:update"))["online"] == online
                        assert (await bob.receive("presence:update"))["online"] == online
                        # Those came after the server's verani:session: it said "recovered".
                        assert alice.recovered and bob.recovered
                    # carol left (a clean close): the others are told; nobody else left.
                    update = await alice.receive("presence:update")
                    assert update["online"] == ["alice", "bob"]
                with trio.move_on_after(0.5):
                    extra = await alice.receive("presence:update")
                    raise AssertionError(f"alice got an update too many: {extra}")

    try:
        trio.run(scenario)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=10)
