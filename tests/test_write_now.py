"""Frames written at once by the task that sends them (issue 15, item 4).

A frame for a socket with nothing queued is written by the emitting task, without waiting; what
the kernel does not take is queued for the socket's writer. Each test pins one promise that must
hold whatever mix of the two carried a socket's frames: every frame arrives whole, once and in
order; a frame cut short is finished before anything else is written; a reader too slow is
closed with 1008 as before; a peer reset ends its socket only. Real servers on 127.0.0.1, real
sockets; a spy on :meth:`WebSocket.write_now` shows which path the frames took.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest
import trio
import trio.testing
from wsproto.events import CloseConnection, Pong, TextMessage

from verani import RoomContext, ServerConfig, define_room, open_server
from verani.connection import Connection
from verani.errors import WebSocketClosed
from verani.protocol import encode_event
from verani.server import Server
from verani.sessions import coalesced, defer_write, send_to
from verani.store import MemoryStore
from verani.transport import WebSocket

from helpers import PING, Client, RawSocket, connect, frame, logged, wait_logged

Writes = list[tuple[int, bool] | str]


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> Writes:
    """What every write at once did: ``(whole frames, cut)``, or ``"lost"`` (peer gone)."""
    seen: Writes = []
    real = WebSocket.write_now

    def spy(self: WebSocket, payloads: Any) -> tuple[int, bool]:
        try:
            result = real(self, payloads)
        except WebSocketClosed:
            seen.append("lost")
            raise
        seen.append(result)
        return result

    monkeypatch.setattr(WebSocket, "write_now", spy)
    return seen


def relay_room() -> Any:
    """``push`` sends ``n`` numbered items of ``size`` characters to every other socket."""
    room = define_room(name="relay")

    @room.on("push")
    def push(ctx: RoomContext[Any], data: Any) -> None:
        for k in range(data.get("n", 1)):
            ctx.emit.to("default").emit("item", {"i": data["i"] + k, "pad": "x" * data["size"]})

    @room.on("ack")
    def ack(ctx: RoomContext[Any], data: Any) -> None:
        ctx.emit.emit("acked", data)

    return room


def connection_of(server: Server, user_id: str) -> Connection:
    return next(c for c in server._connections if c.session.meta.user_id == user_id)


def shrink_send_buffer(conn: Connection) -> None:
    """The server's send buffer for ``conn`` at its smallest: the kernel takes a few KB at a
    time. (A small receive buffer on the client would do too, but reading through a 4 KiB
    window afterwards takes seconds.)"""
    conn._ws._stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # type: ignore[attr-defined]


async def sessions_in_room(server: Server, count: int) -> None:
    while sum(s.sessions for s in server.supervisor.status()) != count:
        await trio.sleep(0.01)


@asynccontextmanager
async def relay(
    config: ServerConfig | None = None,
) -> AsyncIterator[tuple[Server, RawSocket, Client]]:
    """A relay room with a receiver that reads only when the test does, and a sender."""
    async with open_server([relay_room()], store=MemoryStore(), config=config) as server:
        async with (
            RawSocket.open(server.port, "/ws/relay?userId=receiver") as (receiver, _),
            connect(server.url, "/ws/relay", user_id="sender") as sender,
        ):
            await sessions_in_room(server, 2)
            yield server, receiver, sender


async def next_message(client: RawSocket) -> str | Pong | CloseConnection:
    """The next whole text message (wsproto hands a long one over in parts), Pong or Close."""
    parts = []
    while True:
        event = await client.event()
        if isinstance(event, Pong | CloseConnection):
            assert not parts, "a control frame inside a text frame"
            return event
        assert isinstance(event, TextMessage), event
        parts.append(event.data)
        if event.message_finished:
            return "".join(parts)


def item(message: str | Pong | CloseConnection, size: int) -> int:
    """The number of an ``item`` message, its padding checked whole."""
    assert isinstance(message, str), message
    data = orjson.loads(message)["data"]
    assert data["pad"] == "x" * size
    return int(data["i"])


async def read_items(client: RawSocket, count: int, size: int) -> list[int]:
    """The numbers of the next ``count`` items (pongs skipped)."""
    seen: list[int] = []
    while len(seen) < count:
        message = await next_message(client)
        if not isinstance(message, Pong):
            seen.append(item(message, size))
    return seen


async def test_a_reader_that_stops_then_resumes_gets_every_frame_once_in_order(
    writes: Writes,
) -> None:
    # Written at once while the receiver's buffers take them, then queued (with a frame cut in
    # the middle, most likely) once they are full; the receiver reads again: nothing lost,
    # nothing twice, nothing out of order.
    count, size = 300, 4000
    with trio.fail_after(20):
        async with relay() as (server, receiver, sender):
            shrink_send_buffer(connection_of(server, "receiver"))
            i = 0
            while i < count:
                # One frame per turn, then three: single frames and coalesced ones.
                n = 1 if i % 2 == 0 else 3
                await sender.emit("push", {"i": i, "n": n, "size": size})
                i += n
            await sender.emit("ack")
            await sender.next_event("acked")
            assert connection_of(server, "receiver").credit.frames > 0  # some are queued
            assert any(isinstance(w, tuple) and w[0] for w in writes)  # some went at once
            assert await read_items(receiver, i, size) == list(range(i))


async def test_a_frame_cut_short_is_finished_before_anything_else_is_written(
    writes: Writes,
) -> None:
    # A 1 MB frame to a receiver that does not read: the kernel takes a part of it, the rest
    # waits. A WebSocket Ping answered meanwhile (its Pong is written by the socket's reader),
    # and the frames emitted after it, all come after its last byte.
    size = 1_000_000
    with trio.fail_after(20):
        async with relay() as (server, receiver, sender):
            shrink_send_buffer(connection_of(server, "receiver"))
            await sender.emit("push", {"i": 0, "size": size})
            await sender.emit("ack")
            await sender.next_event("acked")
            assert (0, True) in writes  # cut: nothing of it went out whole
            await receiver.send(frame(PING, b"p"))
            await sender.emit("push", {"i": 1, "n": 2, "size": size})
            messages = [await next_message(receiver) for _ in range(4)]
            pongs = [m for m in messages if isinstance(m, Pong)]
            assert [p.payload for p in pongs] == [b"p"]
            assert [item(m, size) for m in messages if m not in pongs] == [0, 1, 2]


async def test_a_reader_too_slow_for_small_frames_is_closed_with_1008_after_whole_frames(
    writes: Writes, caplog: pytest.LogCaptureFixture
) -> None:
    # Small frames, ten per turn: the kernel takes the first ones at once; the queue behind
    # them fills to its 64 frames, and the next one closes the socket (1008). What it is sent
    # before the Close frame is whole frames, in order.
    caplog.set_level(logging.INFO, logger="verani")
    config = ServerConfig(outbound_queue=64)
    size = 1000
    with trio.fail_after(20):
        async with relay(config) as (_, receiver, sender):
            receiver.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            for i in range(0, 2000, 10):
                await sender.emit("push", {"i": i, "n": 10, "size": size})
                if logged(caplog, "verani", "reads too slowly"):
                    break
            await wait_logged(caplog, "verani", "reads too slowly")
            assert "closing with 1008" in caplog.text
            assert any(isinstance(w, tuple) and w[0] for w in writes)
            seen = []
            while not isinstance(message := await next_message(receiver), CloseConnection):
                seen.append(item(message, size))
            assert message.code == 1008
            assert seen == list(range(len(seen)))
            assert seen  # what the kernel took before the socket was closed
            await sender.emit("ack", "still here")
            assert (await sender.next_event("acked"))[1]["data"] == "still here"


async def test_a_peer_reset_found_by_a_write_at_once_ends_that_socket_only(
    writes: Writes,
) -> None:
    with trio.fail_after(20):
        async with open_server([relay_room()], store=MemoryStore()) as server:
            async with (
                RawSocket.open(server.port, "/ws/relay?userId=victim") as (victim, _),
                RawSocket.open(server.port, "/ws/relay?userId=bystander") as (bystander, _),
            ):
                await sessions_in_room(server, 2)
                sessions = [connection_of(server, u).session for u in ("victim", "bystander")]
                sock = victim.stream.socket
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
                # Blocking on purpose: the kernel takes in the reset while no task runs, so the
                # victim's own reader has not seen it when the room writes to it.
                time.sleep(0.1)  # noqa: ASYNC251
                frame_ = encode_event("default", "item", {"i": 0, "pad": ""})
                # As the room sends: the reset must not reach it as an error.
                assert send_to(sessions, frame_) == 2
                assert "lost" in writes
                assert item(await next_message(bystander), 0) == 0
                await sessions_in_room(server, 1)
                while len(server._connections) != 1:
                    await trio.sleep(0.01)
                send_to(sessions[1:], frame_)
                assert item(await next_message(bystander), 0) == 0


async def test_a_broadcast_to_many_sockets_arrives_at_every_one(writes: Writes) -> None:
    receivers, rounds, size = 200, 10, 100
    with trio.fail_after(60):
        async with open_server([relay_room()], store=MemoryStore()) as server:
            async with (
                connect(server.url, "/ws/relay", user_id="sender") as sender,
                contextlib.AsyncExitStack() as stack,
            ):
                clients = []
                for _ in range(receivers):
                    client, _ = await stack.enter_async_context(
                        RawSocket.open(server.port, "/ws/relay?userId=r")
                    )
                    clients.append(client)
                await sessions_in_room(server, receivers + 1)
                writes.clear()
                i = 0
                for r in range(rounds):
                    n = 1 if r % 2 == 0 else 2
                    await sender.emit("push", {"i": i, "n": n, "size": size})
                    i += n
                got: list[list[int]] = []

                async def read(client: RawSocket) -> None:
                    got.append(await read_items(client, i, size))

                async with trio.open_nursery() as nursery:
                    for client in clients:
                        nursery.start_soon(read, client)
                assert got == [list(range(i))] * receivers
                # Written at once by the room's own task: a write per socket per turn at least
                # for the first turn (later ones may find a socket's write still in progress),
                # and a turn's two frames to a socket in one write.
                assert sum(w[0] for w in writes if isinstance(w, tuple)) >= receivers
                assert (2, False) in writes


async def test_a_stream_that_is_not_a_plain_socket_is_never_written_at_once() -> None:
    # TLS and other wrapped streams keep state of their own: their frames take the writer's
    # path (send_frames), as every frame did before.
    server_side, client_side = trio.testing.memory_stream_pair()
    ws = WebSocket(server_side, trailing=b"", max_message_size=1 << 20)
    assert ws.write_now([b"hello"]) == (0, False)
    await ws.send_frames([b"hello"])
    assert await client_side.receive_some(100) == b"\x81\x05hello"


def test_writes_deferred_in_a_coalesced_block_are_made_at_its_end_even_after_an_error() -> None:
    made: list[str] = []
    assert not defer_write(lambda: made.append("outside"))  # outside a block: write now
    with pytest.raises(RuntimeError), coalesced():
        with coalesced():
            assert defer_write(lambda: made.append("inner"))
        assert made == []  # the outer block writes
        assert defer_write(lambda: made.append("outer"))
        raise RuntimeError
    assert made == ["inner", "outer"]
    assert not defer_write(lambda: made.append("after"))
