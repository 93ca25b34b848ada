"""The server side of one WebSocket, on a Trio stream: wsproto parses, our writes are batched.

trio-websocket (our client, and the reference the server was first built on) sends one write per
message and, on a protocol violation from the peer, drops the TCP connection without the Close
frame RFC 6455 asks for. This transport keeps wsproto — trio-websocket's own engine — for
everything a peer can get wrong (framing, masking, fragmentation, UTF-8, control frames, the
closing handshake) and adds what a server of many sockets needs:

- any number of text frames go out in one ``send_all`` (one syscall for a burst of events);
- a protocol violation is answered with a Close frame carrying its code (1002, 1007, 1009);
- a message is limited in size while it is still arriving, not after it is buffered whole.

The opening handshake is answered here too (:func:`accept_response`): the request head was already
parsed and checked by the server with h11.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Iterable

import attrs
import trio
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage
from wsproto.utilities import generate_accept_token

#: Bytes asked of the socket per read; big enough that a pipelining client's burst is one read.
RECEIVE_SIZE = 64 * 1024

#: A batch of frames stops growing past this many bytes, so one slow socket never makes the
#: writer build a huge buffer.
MAX_BATCH_BYTES = 256 * 1024

# The header of an unmasked, final text frame, for every payload length under 126.
_SHORT_HEADERS = [bytes((0x81, n)) for n in range(126)]
_MEDIUM_HEADER = struct.Struct("!BBH")
_LONG_HEADER = struct.Struct("!BBQ")


def accept_response(key: str) -> bytes:
    """The ``101 Switching Protocols`` answer to an upgrade request with ``Sec-WebSocket-Key``."""
    token = generate_accept_token(key.encode("ascii")).decode("ascii")
    return (
        "HTTP/1.1 101 Switching Protocols\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        f"Sec-WebSocket-Accept: {token}\r\n\r\n"
    ).encode("ascii")


def text_frame_header(size: int) -> bytes:
    """The header of an unmasked (servers never mask), unfragmented text frame of ``size``
    payload bytes."""
    if size < 126:
        return _SHORT_HEADERS[size]
    if size < 65536:
        return _MEDIUM_HEADER.pack(0x81, 126, size)
    return _LONG_HEADER.pack(0x81, 127, size)


def encode_text_frame(payload: bytes) -> bytes:
    """One unmasked, unfragmented text frame carrying UTF-8 ``payload``."""
    return text_frame_header(len(payload)) + payload


class Closed(Exception):
    """The WebSocket is closed: ``code`` and ``reason`` as the close handshake (or its absence,
    1006) left them; ``violation`` when the peer broke the protocol and we closed it."""

    def __init__(self, code: int, reason: str = "", *, violation: bool = False) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason
        self.violation = violation


class WebSocket:
    """An accepted WebSocket: one reader may call :meth:`receive` while one writer calls
    :meth:`send_frames`; control frames the reader must answer share the writer's lock."""

    def __init__(self, stream: trio.abc.Stream, *, trailing: bytes, max_message_size: int) -> None:
        self._stream = stream
        self._wsproto: Connection | None = None
        self._max = max_message_size
        self._send_lock = trio.Lock()
        self._parts: list[str | bytes | bytearray] = []
        self._size = 0
        #: Set once the connection is closed: what the close handshake (or its absence) said.
        self.closed: Closed | None = None
        # A send cut short by cancellation left a partial frame on the wire; after it nothing
        # more can be framed, so closing only drops the TCP connection.
        self._broken = False
        # Bytes not yet parsed. Frames a conforming client sends for this protocol (final,
        # masked text frames under 64 KiB) are parsed here directly, at a fraction of wsproto's
        # cost per frame; at the first other frame (a control frame, a fragment, anything
        # wrong) every byte from there on goes to wsproto, which handles the rest of the
        # connection with all of RFC 6455's checks.
        self._raw = bytearray(trailing)
        self._fast = True

    async def receive(self) -> str | bytes:
        """The next whole message; raises :class:`Closed` once the connection is closed."""
        while True:
            if self.closed is not None:
                raise self.closed
            if self._fast:
                simple = self._next_simple_frame()
                if isinstance(simple, _Refusal):
                    await self._refuse(simple.code, simple.reason)
                    raise self.closed  # type: ignore[misc]
                if simple is not None:
                    return simple
                if self._fast:
                    await self._feed()
                    continue
            for event in self._proto.events():
                if isinstance(event, TextMessage | BytesMessage):
                    self._size += len(event.data)
                    if self._size > self._max:
                        self._parts.clear()
                        await self._refuse(1009, f"message over {self._max} characters")
                        raise self.closed  # type: ignore[misc]
                    message = self._take(event)
                    if message is not None:
                        return message
                elif isinstance(event, Ping):
                    await self._send_control(self._proto.send(event.response()))
                elif isinstance(event, CloseConnection):
                    await self._on_close(event)
                # Pongs need no answer: we send no pings, clients' keepalive is a JSON frame.
                if self.closed is not None:
                    raise self.closed
            await self._feed()

    async def send_frames(self, payloads: Iterable[bytes]) -> None:
        """Send text messages (UTF-8 ``payloads``) in one write; raises :class:`Closed` if the
        socket is closed."""
        parts: list[bytes] = []
        for payload in payloads:
            # Header and payload side by side: the payload, shared by every socket of a
            # broadcast, is copied once, into this socket's write.
            parts.append(text_frame_header(len(payload)))
            parts.append(payload)
        await self._send_data(b"".join(parts))

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        """Close: send a Close frame, wait for the peer's (bounded by the caller's deadline),
        then close the TCP connection. Safe to call more than once and after the peer closed."""
        try:
            if not self._broken and self._proto.state is ConnectionState.OPEN:
                await self._send_control(self._proto.send(CloseConnection(code, reason or None)))
                if self.closed is None:
                    self.closed = Closed(code, reason)
                await self._await_peer_close()
        except (Closed, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            if self.closed is None:
                self.closed = Closed(code, reason)
            await trio.aclose_forcefully(self._stream)

    # --- internals ---------------------------------------------------------------------------

    @property
    def _proto(self) -> Connection:
        # Made on first need (a control frame, a close, anything but simple frames): most
        # sockets never need one, and an idle socket is the cheaper without it.
        if self._wsproto is None:
            self._wsproto = Connection(ConnectionType.SERVER)
        return self._wsproto

    def _next_simple_frame(self) -> str | _Refusal | None:
        """The text of the next frame if it is a simple one and complete; None when more bytes
        are needed or (having left fast parsing) wsproto takes over."""
        raw = self._raw
        if len(raw) < 2:
            return None
        first, second = raw[0], raw[1]
        size = second & 0x7F
        # 0x81: FIN, no RSV bit, text; 0x80: masked (a client must mask).
        if first != 0x81 or not second & 0x80 or size == 127:
            self._leave_fast()
            return None
        if size == 126:
            if len(raw) < 4:
                return None
            size = (raw[2] << 8) | raw[3]
            if size < 126:
                # RFC 6455 §5.2: the minimal length encoding MUST be used; wsproto says so.
                self._leave_fast()
                return None
            start = 8
        else:
            start = 6
        # The limit counts characters (as the wsproto path and decode_frame do); a character
        # takes at most 4 bytes, so a frame over 4x the limit needs no decoding to refuse.
        if size > 4 * self._max:
            return _Refusal(1009, f"message over {self._max} characters")
        end = start + size
        if len(raw) < end:
            return None
        mask = bytes(raw[start - 4 : start])
        masked = int.from_bytes(raw[start:end], "little")
        del raw[:end]
        # Unmasking as one big-integer XOR runs in C; a byte loop would cost more than parsing.
        key = int.from_bytes((mask * (size // 4 + 1))[:size], "little")
        payload = (masked ^ key).to_bytes(size, "little")
        try:
            text = payload.decode()
        except UnicodeDecodeError as exc:
            return _Refusal(1007, f"invalid UTF-8 in a text message: {exc}")
        if len(text) > self._max:
            return _Refusal(1009, f"message over {self._max} characters")
        return text

    def _leave_fast(self) -> None:
        if self._fast:
            self._fast = False
            self._proto.receive_data(bytes(self._raw))
            self._raw.clear()

    async def _await_peer_close(self) -> None:
        # Messages still arriving are dropped: the application has said goodbye.
        self._leave_fast()
        while True:
            for event in self._proto.events():
                if isinstance(event, CloseConnection):
                    return
            await self._feed()

    def _take(self, event: TextMessage | BytesMessage) -> str | bytes | None:
        self._parts.append(event.data)
        if not event.message_finished:
            return None
        parts, self._parts, self._size = self._parts, [], 0
        if isinstance(event, TextMessage):
            return parts[0] if len(parts) == 1 else "".join(parts)  # type: ignore[return-value,arg-type]
        return b"".join(parts)  # type: ignore[arg-type]

    async def _feed(self) -> None:
        try:
            data = await self._stream.receive_some(RECEIVE_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if data:
            if self._fast:
                self._raw += data
            else:
                self._proto.receive_data(bytes(data) if isinstance(data, bytearray) else data)
            return
        # The peer went away without a close handshake.
        self._broken = True
        self.closed = self.closed or Closed(1006, "connection lost")
        raise self.closed

    async def _on_close(self, event: CloseConnection) -> None:
        if self._proto.state is ConnectionState.REMOTE_CLOSING:
            # The peer's closing handshake: answer with its code and let it go.
            self.closed = Closed(event.code, event.reason or "")
            await self._send_control(self._proto.send(event.response()))
        elif self._proto.state is ConnectionState.OPEN:
            # wsproto reports a violation (bad opcode, bad UTF-8, unmasked frame) as a close
            # event without changing state; the Close frame with its code is ours to send.
            await self._refuse(event.code, event.reason or "protocol error")
        else:
            self.closed = Closed(event.code, event.reason or "")

    async def _refuse(self, code: int, reason: str) -> None:
        # Close for the peer's fault: say why in a Close frame, then drop the connection
        # without waiting for an answer from a peer that does not follow the protocol.
        self.closed = Closed(code, reason, violation=True)
        await self._send_control(self._proto.send(CloseConnection(code, reason)))

    async def _send_control(self, data: bytes) -> None:
        with contextlib.suppress(Closed):
            await self._send_data(data)

    async def _send_data(self, data: bytes) -> None:
        if self._broken:
            raise self.closed or Closed(1006, "connection lost")
        # The lock is almost never contended (only a pong or a close frame races the writer);
        # taking it without a scheduling point saves one per write.
        try:
            self._send_lock.acquire_nowait()
        except trio.WouldBlock:
            await self._send_lock.acquire()
        try:
            # A cancellation seen here comes before any byte is written: the connection is
            # still intact, so it must not be marked broken (its Close frame can still go).
            await trio.lowlevel.checkpoint_if_cancelled()
        except BaseException:
            self._send_lock.release()
            raise
        done = False
        try:
            await self._stream.send_all(data)
            done = True
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.closed = self.closed or Closed(1006, "connection lost")
            raise self.closed from None
        finally:
            self._send_lock.release()
            if not done:
                self._broken = True


@attrs.frozen
class _Refusal:
    # The fast parser found a frame to refuse: close with this code.
    code: int
    reason: str
