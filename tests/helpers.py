"""Test helpers: a minimal WebSocket client speaking the wire protocol, and raw HTTP requests.

The client is written from the protocol (DESIGN.md §5), not from verani's server code, so the
tests check the server against the protocol rather than against itself.
"""

from __future__ import annotations

import pathlib
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import trio
import trio_websocket
from wsproto.connection import Connection, ConnectionType
from wsproto.events import CloseConnection, Pong, TextMessage
from wsproto.frame_protocol import FrameProtocol

ROOT = pathlib.Path(__file__).resolve().parent.parent
ROOMS = ROOT / "rooms"


class Client:
    """One WebSocket connection to a room."""

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self.ws = ws

    async def send(self, payload: Any) -> None:
        """Send a raw frame (a str as is, anything else JSON-encoded)."""
        await self.ws.send_message(
            payload if isinstance(payload, str | bytes) else orjson.dumps(payload).decode()
        )

    async def emit(self, event: str, data: Any = None) -> None:
        """Send ``{"type": event, "data": data}``."""
        await self.send({"type": event, "data": data})

    async def recv(self) -> dict[str, Any]:
        """The next frame, decoded."""
        frame = orjson.loads(await self.ws.get_message())
        assert isinstance(frame, dict), frame
        return frame

    async def next_event(self, name: str | None = None) -> tuple[str, dict[str, Any]]:
        """The next event frame (of ``name`` if given), as ``(event, data)``; skips others."""
        while True:
            frame = await self.recv()
            if frame.get("type") != "event":
                continue
            data = frame["data"]
            if name is None or data["type"] == name:
                return data["type"], data


@asynccontextmanager
async def connect(
    url: str, path: str = "/ws/counter", user_id: str | None = None
) -> AsyncIterator[Client]:
    """Open a WebSocket to ``url + path`` (``?userId=`` added when given)."""
    query = f"?userId={user_id}" if user_id is not None else ""
    async with trio_websocket.open_websocket_url(
        f"{url}{path}{query}", message_queue_size=64
    ) as ws:
        try:
            yield Client(ws)
        finally:
            # trio-websocket's client never closes its TCP stream when the server closed first
            # (its aclose() returns early once a close reason is set); close it ourselves.
            await trio.aclose_forcefully(ws._stream)


async def http_request(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes to 127.0.0.1:port and parse the HTTP answer (status, headers, body)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(raw)
        data = b""
        while True:
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


def upgrade_request(path: str, **extra: str) -> bytes:
    """A valid WebSocket upgrade request for ``path`` (extra headers by keyword, _ → -)."""
    headers = {
        "Host": "127.0.0.1",
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version": "13",
    }
    headers.update({k.replace("_", "-"): v for k, v in extra.items()})
    lines = [f"GET {path} HTTP/1.1", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def masked_frame(
    payload: bytes,
    *,
    first: int = 0x81,
    length_form: str | None = None,
    mask: bytes = b"\x01\x02\x03\x04",
) -> bytes:
    """A client frame built by hand (``first``: FIN/RSV/opcode byte), so it may break the rules
    on purpose; ``length_form`` forces "short", "medium" (16-bit) or "long" (64-bit)."""
    n = len(payload)
    form = length_form or ("short" if n < 126 else "medium" if n < 65536 else "long")
    if form == "short":
        head = bytes((first, 0x80 | n))
    elif form == "medium":
        head = bytes((first, 0x80 | 126)) + struct.pack("!H", n)
    else:
        head = bytes((first, 0x80 | 127)) + struct.pack("!Q", n)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


class RawClient:
    """A WebSocket client on a bare TCP stream: bytes out as given, wsproto reads the answers."""

    def __init__(self, stream: trio.SocketStream, rest: bytes) -> None:
        self.stream = stream
        self.reader = Connection(ConnectionType.CLIENT, trailing_data=rest)
        self.framer = FrameProtocol(client=True, extensions=[])

    @classmethod
    async def open(cls, port: int, path: str, head: bytes | None = None) -> RawClient:
        """Connect and upgrade (``head``: the request bytes to send instead of a standard one)."""
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(head if head is not None else upgrade_request(path))
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(65536)
            if not chunk:
                raise EOFError(data)
            data += chunk
        status, _, rest = data.partition(b"\r\n\r\n")
        assert status.startswith(b"HTTP/1.1 101"), status
        return cls(stream, rest)

    async def next(self) -> Any:
        """The next text message, ``("close", code, reason)``, ``("pong",)`` or ``("EOF",)``."""
        while True:
            for event in self.reader.events():
                if isinstance(event, TextMessage):
                    return event.data
                if isinstance(event, CloseConnection):
                    return ("close", int(event.code), event.reason)
                if isinstance(event, Pong):
                    return ("pong",)
            try:
                chunk = await self.stream.receive_some(65536)
            except trio.BrokenResourceError:
                chunk = b""
            if not chunk:
                return ("EOF",)
            self.reader.receive_data(chunk)
