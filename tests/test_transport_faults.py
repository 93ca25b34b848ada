"""Regressions found by review of the WebSocket transport: each test pins one fault that a real
client could cause, against a real server over loopback."""

from __future__ import annotations

import socket
import struct
from typing import Any

import pytest
import trio
from wsproto.events import AcceptConnection, Pong, TextMessage

from verani import HandshakeRefused, RoomContext, ServerConfig, define_room, open_server
from verani.codec import make_codec
from verani.store import MemoryStore

from helpers import PING, TEXT, RawSocket, frame, http_request, upgrade_request

PING_FRAME = b'{"type":"ping"}'


def _echo_room(**options: Any) -> Any:
    room = define_room(name="echo", **options)

    @room.on("echo")
    def echo(ctx: RoomContext[Any], data: Any) -> None:
        ctx.emit.emit("echoed", {"len": len(data)})

    return room


async def test_a_peer_that_resets_while_its_reader_waits_on_flow_control_is_let_go() -> None:
    room = define_room(name="big")

    @room.on("big")
    def big(ctx: RoomContext[Any], data: Any) -> None:
        ctx.emit.emit("blob", "x" * 100_000)

    # The byte budget is lifted (300 x 100 KB): this test is about flow control alone.
    config = ServerConfig(max_outbound_bytes=1 << 40)
    with trio.fail_after(20):
        async with open_server([room], store=MemoryStore(), config=config) as server:
            async with RawSocket.open(server.port, "/ws/big") as (client, answer):
                assert isinstance(answer, AcceptConnection)
                sock = client.stream.socket
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                # Never read: the writer blocks, the queue fills, the reader parks on flow
                # control.
                await client.send(*[frame(TEXT, b'{"type":"big","data":null}')] * 300)
                while (
                    not server._connections or next(iter(server._connections)).credit.backlog < 64
                ):
                    await trio.sleep(0.05)
                # A reset: the pending send fails in the writer, which must end the connection.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
                while server._connections or server.supervisor.status()[0].sessions:
                    await trio.sleep(0.05)


async def test_the_frame_size_limit_counts_characters_on_every_path() -> None:
    # 625 characters, 1,225 bytes of UTF-8, under a 1,000-character limit: accepted whole or
    # fragmented; 1,001 characters refused either way.
    small = '{"type":"echo","data":"' + "é" * 600 + '"}'
    big = '{"type":"echo","data":"' + "é" * 976 + '"}'
    assert len(small) < 1000 < len(small.encode()) and len(big) == 1001
    with trio.fail_after(10):
        async with open_server([_echo_room(max_frame_size=1000)], store=MemoryStore()) as server:
            for text, fragmented in [(small, False), (small, True), (big, False), (big, True)]:
                async with RawSocket.open(server.port, "/ws/echo") as (client, _):
                    data = text.encode()
                    if fragmented:
                        half = len(data) // 2
                        await client.send(
                            frame(TEXT, data[:half], fin=False), frame(0x0, data[half:])
                        )
                    else:
                        await client.send(frame(TEXT, data))
                    if text is small:
                        assert (await client.next_json())["data"] == {"type": "echoed", "len": 600}
                    else:
                        assert await client.close_code() == 1009, fragmented


@pytest.mark.parametrize("payload", [PING_FRAME, b"not json"])
async def test_a_burst_of_frames_answered_by_the_connection_waits_for_the_writer(
    payload: bytes,
) -> None:
    # Pings and bad frames are answered by the connection itself; 1,100 of them in one write
    # (more than the outbound queue) must be paced by flow control, not close a client that
    # reads every answer.
    with trio.fail_after(20):
        async with open_server([_echo_room()], store=MemoryStore()) as server:
            async with RawSocket.open(server.port, "/ws/echo") as (client, _):
                await client.send(*[frame(TEXT, payload)] * 1100)
                answers = [await client.event() for _ in range(1100)]
                assert all(isinstance(a, TextMessage) for a in answers), answers[-1]


async def test_a_non_minimal_length_is_a_protocol_error_whatever_came_before() -> None:
    # RFC 6455 §5.2: a 16-bit length for a payload under 126 bytes is an error; the verdict must
    # not depend on whether the connection still uses the fast parser.
    with trio.fail_after(10):
        async with open_server([_echo_room()], store=MemoryStore()) as server:
            for ping_first in (False, True):
                async with RawSocket.open(server.port, "/ws/echo") as (client, _):
                    if ping_first:
                        await client.send(frame(PING, b"x"))
                        assert isinstance(await client.event(), Pong)
                    await client.send(frame(TEXT, PING_FRAME, long_length=True))
                    assert await client.close_code() == 1002


async def test_a_request_head_ending_in_a_bare_lf_keeps_the_frame_after_it() -> None:
    head = upgrade_request("/ws/echo")
    assert head.endswith(b"\r\n\r\n")
    head = head[:-2] + b"\n"  # h11 accepts "\r\n\n" as the end of the head
    with trio.fail_after(10):
        async with open_server([_echo_room()], store=MemoryStore()) as server:
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            async with stream:
                await stream.send_all(head + frame(TEXT, PING_FRAME))
                data = b""
                while b'{"type":"pong"}' not in data:
                    chunk = await stream.receive_some(65536)
                    assert chunk, data
                    data += chunk
                assert data.startswith(b"HTTP/1.1 101 ")


async def test_a_refusal_with_a_status_python_does_not_name_is_still_answered() -> None:
    room = define_room(name="picky")

    @room.extract_meta
    def refuse(request: Any) -> Any:
        raise HandshakeRefused(499, "go away")

    with trio.fail_after(10):
        async with open_server([room], store=MemoryStore()) as server:
            status, _, body = await http_request(server.port, upgrade_request("/ws/picky"))
            assert (status, body) == (499, b"go away")


def test_an_unhashable_declaration_still_encodes_scalars() -> None:
    declared: Any = __import__("typing").Annotated[int, ["unhashable"]]
    codec = make_codec()
    assert codec.encode(5, declared) == 5
    assert codec.decode(codec.encode(5, declared), declared) == 5
