"""Test helpers: the ``verani`` command in subprocesses, a minimal WebSocket client speaking the
wire protocol, and raw HTTP requests.

The client writes and reads frames with the client's half of :mod:`verani.protocol`, never with
the server's code: the server decodes with ``decode_frame`` and encodes with ``encode_event``,
while this client encodes with ``encode_client_event`` and decodes with ``server_event``, and
test_protocol.py pins those byte for byte to the protocol (DESIGN.md §5). So the tests still check
the server against the protocol rather than against itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import re
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import orjson
import pytest
import trio
import trio_websocket
from wsproto import ConnectionType, WSConnection
from wsproto.events import CloseConnection, Event, Pong, Request, TextMessage

from verani.protocol import decode_server_frame, encode_client_event, server_event

ROOT = pathlib.Path(__file__).resolve().parent.parent
ROOMS = ROOT / "rooms"


#: The ``verani`` command, run as its entry point does.
VERANI = [sys.executable, "-m", "verani"]


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``verani ARGS...`` to its end."""
    return subprocess.run([*VERANI, *args], capture_output=True, text=True, timeout=timeout)


@contextmanager
def running(*args: str) -> Iterator[subprocess.Popen[str]]:
    """``verani ARGS...`` in the background, its output in pipes; killed if still running."""
    proc = subprocess.Popen(
        [*VERANI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)  # also closes the pipes


@contextmanager
def serving(
    store: pathlib.Path, *extra: str, rooms: pathlib.Path = ROOMS / "counter.py"
) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """``verani serve`` of ``rooms`` (the counter room by default) on a free port; yields it
    and its ``ws://`` URL."""
    with running("serve", str(rooms), "--port", "0", "--store", str(store), *extra) as proc:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.search(r"serving on (ws://\S+)", line)
        assert match, (line, proc.stderr.read() if proc.stderr else "")
        yield proc, match.group(1)


#: A client's close frame, code 1000, masked with a zero key (RFC 6455 §5.5.1).
CLOSE_1000 = b"\x88\x82\x00\x00\x00\x00\x03\xe8"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a server that must come back on the same one)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


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
        await self.send(encode_client_event(event, data))

    async def recv(self) -> dict[str, Any]:
        """The next frame, decoded."""
        return decode_server_frame(await self.ws.get_message())

    async def next_event(self, name: str | None = None) -> tuple[str, dict[str, Any]]:
        """The next event frame (of ``name`` if given), as ``(event, data)``; skips others."""
        while True:
            event = server_event(await self.recv())
            if event is not None and (name is None or event[0] == name):
                return event


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
            # The client leaves: a close frame with 1000 (a bare cut would be a dropped network,
            # which a room with recovery keeps for a while), then the TCP stream goes. Written
            # by hand, behind wsproto's back: after ws.aclose() trio-websocket answers a ping
            # that crosses the close with a pong wsproto refuses (LocalProtocolError), and its
            # client never closes the stream when the server closed first.
            with trio.move_on_after(5):
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await ws._stream.send_all(CLOSE_1000)
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


def frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    masked: bool = True,
    long_length: bool = False,
) -> bytes:
    """One client frame built by hand (RFC 6455 §5.2), free to break the protocol
    (``long_length``: a 16-bit length even for a payload under 126 bytes)."""
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    size, mask_bit = len(payload), 0x80 if masked else 0
    if size < 126 and not long_length:
        head = bytes([first, mask_bit | size])
    elif size < 1 << 16:
        head = bytes([first, mask_bit | 126]) + size.to_bytes(2, "big")
    else:
        head = bytes([first, mask_bit | 127]) + size.to_bytes(8, "big")
    if not masked:
        return head + payload
    key = os.urandom(4)
    stream = (key * (size // 4 + 1))[:size]
    body = (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(size, "big")
    return head + key + body


TEXT, CONTINUATION, CLOSE, PING = 0x1, 0x0, 0x8, 0x9


class RawSocket:
    """A WebSocket client on a bare TCP stream: wsproto reads what the server sends, frames go
    out as bytes built by :func:`frame`, so they may break RFC 6455 on purpose."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self._events: list[Event] = []

    @classmethod
    @asynccontextmanager
    async def open(cls, port: int, target: str) -> AsyncIterator[tuple[RawSocket, Event]]:
        """Connect and send the upgrade; yields the socket and the handshake's answer
        (AcceptConnection, or RejectConnection with the status)."""
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            sock = cls(stream)
            await stream.send_all(sock.ws.send(Request(host="127.0.0.1", target=target)))
            yield sock, await sock.event()

    async def event(self) -> Event:
        """The next event; a close without a Close frame reads as CloseConnection(1006)."""
        while not self._events:
            try:
                data = await self.stream.receive_some(65536)
            except trio.BrokenResourceError:
                data = b""
            self.ws.receive_data(data or None)
            self._events.extend(self.ws.events())
        return self._events.pop(0)

    async def send(self, *frames: bytes) -> None:
        await self.stream.send_all(b"".join(frames))

    async def send_json(self, obj: Any) -> None:
        await self.send(frame(TEXT, orjson.dumps(obj)))

    async def next_json(self) -> dict[str, Any]:
        """The next text message, decoded (pongs are skipped)."""
        while True:
            event = await self.event()
            if isinstance(event, TextMessage):
                return decode_server_frame(event.data)
            assert isinstance(event, Pong), event

    async def close_code(self) -> int:
        """Read until the server ends the connection; its close code (1006: no Close frame)."""
        while True:
            event = await self.event()
            if isinstance(event, CloseConnection):
                return int(event.code)


def logged(
    caplog: pytest.LogCaptureFixture, logger: str, pattern: str, level: int = logging.INFO
) -> list[str]:
    """Messages of ``logger`` (or its children) at ``level`` or above matching ``pattern``."""
    return [
        r.getMessage()
        for r in caplog.records
        if (r.name == logger or r.name.startswith(logger + "."))
        and r.levelno >= level
        and re.search(pattern, r.getMessage())
    ]


async def wait_logged(caplog: pytest.LogCaptureFixture, logger: str, pattern: str) -> None:
    """Wait for a log line another task writes after the client saw the outcome."""
    while not logged(caplog, logger, pattern):
        await trio.sleep(0.01)
