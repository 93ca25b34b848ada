"""The server's WebSocket transport: frame encoding, batched writes, the handshake's edge cases.

Frames written by the server are read back with wsproto's client (an independent parser), and
the socket tests drive a real server over loopback.
"""

from __future__ import annotations

import pathlib
import socket
from typing import Any

import h11
import orjson
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto.connection import Connection, ConnectionType
from wsproto.events import CloseConnection, TextMessage
from wsproto.frame_protocol import FrameProtocol

from verani import RoomDefinition, define_room, open_server
from verani.handshake import accept_response
from verani.store import MemoryStore
from verani.transport import WebSocket, encode_text_frame

from helpers import connect, upgrade_request

# Payload sizes around each of the three length encodings of RFC 6455 §5.2.
_BOUNDARIES = [0, 1, 125, 126, 127, 65535, 65536, 65537]


def _read_back(data: bytes, chunk: int) -> list[str]:
    client = Connection(ConnectionType.CLIENT)
    messages: list[str] = []
    parts: list[str] = []
    for start in range(0, len(data), chunk):
        client.receive_data(data[start : start + chunk])
        for event in client.events():
            assert isinstance(event, TextMessage), event
            parts.append(event.data)
            if event.message_finished:
                messages.append("".join(parts))
                parts = []
    return messages


@given(
    pieces=st.lists(
        st.tuples(st.sampled_from(_BOUNDARIES), st.characters(codec="utf-8"))
        | st.text(st.characters(codec="utf-8"), max_size=300),
        min_size=1,
        max_size=8,
    ),
    chunk=st.integers(1, 70000),
)
def test_encoded_frames_read_back_as_the_same_messages(
    pieces: list[tuple[int, str] | str], chunk: int
) -> None:
    # (size, character) stands for a long text, so hypothesis reports stay short.
    texts = [p if isinstance(p, str) else p[1] * p[0] for p in pieces]
    data = b"".join(encode_text_frame(text.encode()) for text in texts)
    # Split into at most ~60 reads, small ones included, so long payloads stay quick.
    assert _read_back(data, max(chunk, len(data) // 60)) == texts


def test_accept_response_carries_the_rfc_example_token() -> None:
    # RFC 6455 §1.3: key "dGhlIHNhbXBsZSBub25jZQ==" → accept "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=".
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(upgrade_request("/ws/counter"))
    assert isinstance(conn.next_event(), h11.Request)
    response = accept_response(conn, "dGhlIHNhbXBsZSBub25jZQ==")
    assert response.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert b"\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in response
    assert response.endswith(b"\r\n\r\n")


async def test_a_frame_sent_with_the_upgrade_request_is_not_lost(
    counter_rooms: list[RoomDefinition[Any]], tmp_path: pathlib.Path
) -> None:
    # A client may write its first frame in the same packet as the request head; those bytes
    # were read with the head and must reach the WebSocket parser.
    masked = FrameProtocol(client=True, extensions=[])
    first = masked.send_data(
        orjson.dumps({"type": "counter:increment", "data": {"amount": 5}}).decode()
    )
    async with open_server(counter_rooms, store=MemoryStore()) as server:
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with stream:
            await stream.send_all(upgrade_request("/ws/counter") + bytes(first))
            data = b""
            while b"\r\n\r\n" not in data:
                data += await stream.receive_some(65536)
            head, _, rest = data.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 101 ")
            client = Connection(ConnectionType.CLIENT, trailing_data=rest)
            seen: list[dict[str, Any]] = []
            with trio.fail_after(5):
                while not any(f["data"]["type"] == "counter:update" for f in seen):
                    events = list(client.events())
                    assert all(isinstance(e, TextMessage) for e in events), events
                    seen += [orjson.loads(e.data) for e in events]  # type: ignore[union-attr]
                    if not events:
                        client.receive_data(await stream.receive_some(65536))
            update = next(f for f in seen if f["data"]["type"] == "counter:update")
            assert update["data"]["count"] == 5


def _burst_room() -> RoomDefinition[Any]:
    room = define_room(name="burst", websocket_path="/ws/burst", state={"n": 0})

    @room.on("burst")
    def burst(ctx: Any, data: Any) -> None:
        # All emitted in one turn: they reach the socket's queue together and leave in batches.
        for i in range(int(data["count"])):
            ctx.emit.emit("item", {"i": i, "pad": "y" * int(data["pad"])})

    return room


async def test_a_burst_of_frames_arrives_whole_and_in_order() -> None:
    async with (
        open_server([_burst_room()], store=MemoryStore()) as server,
        connect(server.url, "/ws/burst") as client,
    ):
        # 600 frames of ~1 KB: more than one write batch, fewer than the outbound queue.
        await client.emit("burst", {"count": 600, "pad": 1000})
        got = [(await client.next_event("item"))[1]["i"] for _ in range(600)]
        assert got == list(range(600))
        # The socket is still in step afterwards.
        await client.emit("burst", {"count": 1, "pad": 0})
        assert (await client.next_event("item"))[1] == {"type": "item", "i": 0, "pad": ""}


async def test_websocket_pings_are_answered_and_a_clean_close_is_echoed() -> None:
    room = define_room(name="bye", websocket_path="/ws/bye")
    seen: list[tuple[int | None, str | None]] = []
    left = trio.Event()

    @room.on_connect
    def hello(ctx: Any) -> None:
        ctx.emit.emit("hello")

    @room.on_disconnect
    def bye(ctx: Any) -> None:
        seen.append((ctx.close_code, ctx.close_reason))
        left.set()

    async with open_server([room], store=MemoryStore()) as server:
        async with connect(server.url, "/ws/bye") as client:
            await client.next_event("hello")
            with trio.fail_after(5):
                # trio-websocket's ping returns only once the Pong with this payload is back.
                await client.ws.ping(b"are you there")
            await client.ws.aclose(4000, "bye")
            # aclose() waits for the server's Close; `closed` holds the code that frame carried.
            assert client.ws.closed is not None
            assert client.ws.closed.code == 4000
        # The room saw the close with the client's code.
        with trio.fail_after(5):
            await left.wait()
        assert seen == [(4000, "bye")]
        assert server.supervisor.status()[0].sessions == 0


async def test_a_server_close_is_a_close_handshake(
    counter_rooms: list[RoomDefinition[Any]],
) -> None:
    stop = trio.Event()

    async def serve(*, task_status: trio.TaskStatus[int]) -> None:
        async with open_server(counter_rooms, store=MemoryStore()) as server:
            task_status.started(server.port)
            await stop.wait()

    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(upgrade_request("/ws/counter"))
            data = b""
            while b"\r\n\r\n" not in data:
                data += await stream.receive_some(65536)
            client = Connection(ConnectionType.CLIENT, trailing_data=data.partition(b"\r\n\r\n")[2])
            stop.set()  # the server shuts down: every socket gets a Close frame with 1001
            close: CloseConnection | None = None
            while close is None:
                client.receive_data(await stream.receive_some(65536))
                close = next((e for e in client.events() if isinstance(e, CloseConnection)), None)
            assert (close.code, close.reason) == (1001, "server shutting down")
            # Our answer completes the handshake, and only then does the server drop TCP.
            await trio.testing.wait_all_tasks_blocked()
            assert _still_open(stream)
            await stream.send_all(client.send(close.response()))
            with trio.fail_after(5):
                while await stream.receive_some(65536):
                    pass


def _still_open(stream: trio.SocketStream) -> bool:
    """Whether the peer has not closed the connection (nothing read, nothing waiting)."""
    with socket.fromfd(stream.socket.fileno(), socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
        except BlockingIOError:
            return True


# One client message, as the test sends it: ("text", str, fragments) or ("ping", bytes).
_client_messages = st.lists(
    st.tuples(st.just("text"), st.text(max_size=300), st.integers(1, 3))
    | st.tuples(st.just("ping"), st.binary(max_size=20), st.just(1))
    | st.tuples(st.just("big"), st.integers(126, 70_000), st.just(1)),
    min_size=1,
    max_size=12,
)


@settings(deadline=None)
@given(messages=_client_messages, chunk=st.integers(1, 5000))
def test_the_reader_returns_every_message_whatever_the_mix_and_split(
    messages: list[tuple[str, Any, int]], chunk: int
) -> None:
    # Simple frames take the fast parser, pings and fragments hand the rest to wsproto: the
    # reader must return the same texts in the same order either way, however reads split them.
    client = FrameProtocol(client=True, extensions=[])
    wire = bytearray()
    expected: list[str] = []
    for kind, value, fragments in messages:
        if kind == "ping":
            wire += client.ping(value)
            continue
        text = value if kind == "text" else "é" * (value // 2)
        expected.append(text)
        step = max(1, len(text) // fragments)
        pieces = [text[i : i + step] for i in range(0, len(text), step)] or [""]
        for i, piece in enumerate(pieces):
            wire += client.send_data(piece, fin=i == len(pieces) - 1)
    chunk = max(chunk, len(wire) // 200)  # small reads included, but no more than ~200 of them

    async def main() -> None:
        server_side, client_side = trio.testing.memory_stream_pair()
        ws = WebSocket(server_side, trailing=bytes(wire[:chunk]), max_message_size=1 << 20)
        got: list[str | bytes] = []
        async with trio.open_nursery() as nursery:

            async def feed() -> None:
                for start in range(chunk, len(wire), chunk):
                    await client_side.send_all(bytes(wire[start : start + chunk]))

            async def drain_pongs() -> None:
                while await client_side.receive_some():
                    pass

            nursery.start_soon(feed)
            nursery.start_soon(drain_pongs)
            for _ in expected:
                got.append(await ws.receive())
            nursery.cancel_scope.cancel()
        assert got == expected

    trio.run(main)
