"""Limits: connections per server and per room (503 before the upgrade), frame size per room,
rooms awake at once (least recently used hibernate first), and their CLI options."""

from __future__ import annotations

import contextlib
from typing import Any

import trio
import trio_websocket

from faults import settle
from verani import RoomContext, ServerConfig, define_room, open_server

from helpers import connect, http_request, upgrade_request


def echo_room(name: str, **options: Any) -> Any:
    room = define_room(name=name, **options)

    @room.on("echo")
    def echo(ctx: RoomContext[Any], data: Any) -> None:
        ctx.emit.emit("echo", {"n": len(str(data))})

    return room


async def test_connection_limits_answer_503_before_the_upgrade(tmp_path: Any) -> None:
    rooms = [echo_room("small", max_connections=1), echo_room("big")]
    config = ServerConfig(max_connections=3, max_connections_per_room=2)
    with trio.fail_after(10):
        async with open_server(rooms, store=str(tmp_path), config=config) as server:
            async with connect(server.url, "/ws/small") as first:
                status, headers, body = await http_request(
                    server.port, upgrade_request("/ws/small")
                )
                assert (status, headers["retry-after"]) == (503, "5")
                assert b"room small/default is full" in body
                # Another instance of the same room has room for one.
                async with connect(server.url, "/ws/small/other"):
                    async with connect(server.url, "/ws/big") as big:
                        # Three open: the server's limit, whatever the room.
                        status, _, body = await http_request(
                            server.port, upgrade_request("/ws/big")
                        )
                        assert status == 503 and b"server is at its connection limit" in body
                        await big.emit("echo", "still served")
                        assert (await big.next_event("echo"))[1]["n"] == 12
                await first.emit("echo", "x")
                await first.next_event("echo")
            # Closed sockets free their places.
            async with connect(server.url, "/ws/small") as again:
                await again.emit("echo", "y")
                await again.next_event("echo")


async def test_a_room_may_lower_the_frame_size(tmp_path: Any) -> None:
    rooms = [echo_room("tight", max_frame_size=100), echo_room("roomy")]
    with trio.fail_after(10):
        async with open_server(rooms, store=str(tmp_path)) as server:
            async with connect(server.url, "/ws/roomy") as roomy:
                await roomy.emit("echo", "x" * 500)
                assert (await roomy.next_event("echo"))[1]["n"] == 500
            async with connect(server.url, "/ws/tight") as tight:
                await tight.emit("echo", "x" * 500)
                try:
                    await tight.recv()
                    raise AssertionError("the oversized frame was accepted")
                except trio_websocket.ConnectionClosed as closed:
                    assert closed.reason is not None and closed.reason.code == 1009


async def test_least_recently_used_rooms_hibernate_past_max_awake(tmp_path: Any) -> None:
    room = define_room(name="lru", state={"n": 0}, persisted_keys=["n"])

    @room.on("bump")
    def bump(ctx: RoomContext[Any], data: Any) -> None:
        ctx.actor.room_state.n += 1
        ctx.emit.emit("bumped", {"n": ctx.actor.room_state.n})

    config = ServerConfig(max_awake_rooms=2)
    with trio.fail_after(10):
        async with open_server([room], store=str(tmp_path), config=config) as server:
            sup = server.supervisor
            for name in ("a", "b"):
                assert await server.room("lru", name).call(lambda actor: actor.room_state.n) == 0
            # A state of its own for "b" to come back from (a call returns once it is durable).
            await server.room("lru", "b").call(lambda actor: setattr(actor.room_state, "n", 41))
            assert await server.room("lru", "a").get_session_count() == 0  # "a" is now the newer
            actors = [sup.instances[("lru", name)].actor for name in ("a", "b")]
            assert actors[0] is not None and actors[1] is not None
            assert actors[0].last_turn > actors[1].last_turn
            await server.room("lru", "c").get_session_count()  # a third room wakes

            def awake() -> list[str]:
                return sorted(k[1] for k, i in sup.instances.items() if i.awake)

            await settle(lambda: "b" not in awake())
            assert awake() == ["a", "c"]
            # The evicted room comes back from its saved state when used again.
            async with connect(server.url, "/ws/lru/b") as client:
                await client.emit("bump")
                assert (await client.next_event("bumped"))[1]["n"] == 42


async def test_a_send_that_overruns_its_deadline_drops_only_that_socket(
    tmp_path: Any, caplog: Any
) -> None:
    # A client that stops reading while the room sends it megabytes: once the kernel's buffers
    # are full, the write waits; past send_timeout the socket is dropped, the room goes on.
    room = define_room(name="flood")

    @room.on("flood")
    def flood(ctx: RoomContext[Any], data: Any) -> None:
        for _ in range(int(data)):
            ctx.emit.emit("chunk", "z" * 65536)

    @room.on("echo")
    def echo(ctx: RoomContext[Any], data: Any) -> None:
        ctx.emit.emit("echo", data)

    # The outbound budgets are lifted: this test is about the send deadline alone.
    config = ServerConfig(
        send_timeout=0.5,
        outbound_queue=100_000,
        max_in_flight=100_000,
        max_outbound_bytes=1 << 40,
    )
    with trio.fail_after(30):
        async with open_server([room], store=str(tmp_path), config=config) as server:
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            async with stream:
                await stream.send_all(upgrade_request("/ws/flood"))
                head = await stream.receive_some(4096)
                assert head.startswith(b"HTTP/1.1 101 ")
                # {"type":"flood","data":600}, masked with a zero key; then never read again.
                payload = b'{"type":"flood","data":600}'
                await stream.send_all(bytes([0x81, 0x80 | len(payload), 0, 0, 0, 0]) + payload)
                while "took over 0.5s" not in caplog.text:
                    await trio.sleep(0.05)
                async with connect(server.url, "/ws/flood") as other:
                    await other.emit("echo", "still here")
                    assert (await other.next_event("echo"))[1]["data"] == "still here"
                # The slow socket was dropped: past what was already sent, it ends.
                with contextlib.suppress(trio.BrokenResourceError):
                    while await stream.receive_some(1 << 20):
                        pass
