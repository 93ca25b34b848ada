"""Internal: one WebSocket's server side, on a Trio stream: frames parsed by :mod:`verani.frames`,
writes batched.

trio-websocket (our client, and the reference the server was first built on) sends one write per
message and, on a protocol violation from the peer, drops the TCP connection without the Close
frame RFC 6455 asks for. This transport reads with a sans-IO :class:`~verani.frames.FrameReader`
(every RFC 6455 check, plus per-peer caps) and adds what a server of many sockets needs:

- any number of text frames go out in one ``send_all`` (one syscall for a burst of events);
- on a plain TCP socket, :meth:`WebSocket.write_now` writes frames at once from the task that
  emits them, without waiting (a broadcast need not wake one writer task per socket); the tail
  of a frame the kernel took only in part goes out first in the next write, so frames are never
  interleaved on the wire;
- a protocol violation is answered with a Close frame carrying its code (1002, 1007, 1008, 1009);
- a message is limited in size while it is still arriving, not after it is buffered whole;
- the reader yields to the scheduler every few hundred frames, so one peer's flood of tiny
  frames cannot hold the event loop.

The opening handshake was answered before (:mod:`verani.handshake`); this module starts with the
bytes that follow it.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterable, Sequence

import trio

from .errors import WebSocketClosed
from .frames import (
    NEED_DATA,
    PAUSE,
    PING,
    PONG,
    CloseReceived,
    FrameReader,
    Ping,
    Violation,
    close_frame,
    control_frame,
    encode_text_frame,
    text_frame_header,
)

__all__ = ["WebSocket", "encode_text_frame", "text_frame_header"]

#: Bytes asked of the socket per read; big enough that a pipelining client's burst is one read.
RECEIVE_SIZE = 64 * 1024

#: A batch of frames stops growing past this many bytes, so one slow socket never makes the
#: writer build a huge buffer.
MAX_BATCH_BYTES = 256 * 1024

#: At most this many frames per :meth:`WebSocket.write_now`: two buffers each, and ``writev``
#: takes no more than IOV_MAX (1,024 on Linux) at once.
MAX_WRITE_NOW_FRAMES = 256

_PING_FRAME = control_frame(PING, b"verani")

# Writes at once go straight to the socket's file descriptor (Trio's socket has no synchronous
# send), which only POSIX allows.
_CAN_WRITE_NOW = sys.platform != "win32"


class WebSocket:
    """An accepted WebSocket: one reader may call :meth:`receive` while one writer calls
    :meth:`send_frames`; control frames the reader must answer share the writer's lock.

    ``max_fragments`` and ``max_control_per_second`` are the reader's caps (see
    :class:`~verani.frames.FrameReader`).
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        trailing: bytes,
        max_message_size: int,
        max_fragments: int = 1024,
        max_control_per_second: float = 100.0,
    ) -> None:
        self._stream = stream
        # What write_now() may write to: a plain TCP socket. A TLS stream (or any other) has
        # state of its own that only its send_all may advance.
        self._socket = (
            stream.socket if _CAN_WRITE_NOW and isinstance(stream, trio.SocketStream) else None
        )
        #: What write_now() left unsent of a frame the kernel took only in part: the next
        #: write sends it first, before any other frame may start.
        self._tail = b""
        self._reader = FrameReader(
            max_message_size=max_message_size,
            max_fragments=max_fragments,
            max_control_per_second=max_control_per_second,
            clock=trio.current_time,
            data=trailing,
        )
        self._send_lock = trio.Lock()
        #: Set once the connection is closed: what the close handshake (or its absence) said.
        self.closed: WebSocketClosed | None = None
        #: When bytes last arrived from the peer (Trio's clock): liveness.
        self.last_received = trio.current_time()
        self._close_sent = False
        self._close_received = False
        # A send cut short by cancellation left a partial frame on the wire; after it nothing
        # more can be framed, so closing only drops the TCP connection.
        self._broken = False

    async def receive(self) -> str | bytes:
        """The next whole message; raises :class:`WebSocketClosed` once the connection is closed."""
        reader = self._reader
        while True:
            if self.closed is not None:
                raise self.closed
            event = reader.next_event()
            if isinstance(event, str | bytes):
                return event
            if event is NEED_DATA:
                await self._feed()
            elif event is PAUSE:
                # This peer has had its share of the event loop; the others go first.
                await trio.lowlevel.checkpoint()
            elif isinstance(event, Ping):
                await self._send_control(control_frame(PONG, event.payload))
            elif isinstance(event, CloseReceived):
                await self._on_close(event)
            elif isinstance(event, Violation):
                await self._refuse(event.code, event.reason)

    async def send_frames(self, payloads: Iterable[bytes]) -> None:
        """Send text messages (UTF-8 ``payloads``) in one write; raises
        :class:`~verani.errors.WebSocketClosed` if the socket is closed."""
        parts: list[bytes] = []
        for payload in payloads:
            # Header and payload side by side: the payload, shared by every socket of a
            # broadcast, is copied once, into this socket's write.
            parts.append(text_frame_header(len(payload)))
            parts.append(payload)
        await self._send_data(b"".join(parts))

    def write_now(self, payloads: Sequence[bytes]) -> tuple[int, bool]:
        """Write text messages (UTF-8 ``payloads``, up to MAX_WRITE_NOW_FRAMES of them) without
        waiting, as far as the kernel takes them at once.

        Returns how many went out whole, and whether the one after them went out in part: its
        tail is kept, and the next write (:meth:`send_frames`, a ping, a Close) sends it first.
        ``(0, False)`` when nothing could be written now: a write is in progress or a tail waits,
        the connection is closing, the stream is not a plain TCP socket, or the kernel's buffer
        is full. Raises :class:`~verani.errors.WebSocketClosed` if the connection is lost.
        """
        sock = self._socket
        if (
            sock is None
            or self._tail
            or self._send_lock.locked()
            or self._broken
            or self._close_sent
            or self.closed is not None
        ):
            return 0, False
        fd = sock.fileno()
        if fd < 0:
            return 0, False
        parts: list[bytes] = []
        for payload in payloads[:MAX_WRITE_NOW_FRAMES]:
            parts.append(text_frame_header(len(payload)))
            parts.append(payload)
        try:
            # Python ignores SIGPIPE, so a peer gone is an EPIPE here, as in trio's own send.
            written = os.writev(fd, parts)
        except BlockingIOError:
            return 0, False
        except OSError:
            self._broken = True
            self.closed = self.closed or WebSocketClosed(1006, "connection lost")
            raise self.closed from None
        whole = 0
        for i in range(0, len(parts), 2):
            size = len(parts[i]) + len(parts[i + 1])
            if written < size:
                if written:
                    self._tail = (parts[i] + parts[i + 1])[written:]
                    return whole, True
                break
            written -= size
            whole += 1
        return whole, False

    async def send_ping(self) -> None:
        """Send a WebSocket Ping (a live peer answers with a Pong, which counts as traffic)."""
        await self._send_data(_PING_FRAME)

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        """Close: send a Close frame, wait for the peer's (bounded by the caller's deadline),
        then close the TCP connection. Safe to call more than once and after the peer closed."""
        try:
            if not self._broken and not self._close_sent and not self._close_received:
                await self._send_close(code, reason)
                if self.closed is None:
                    self.closed = WebSocketClosed(code, reason)
                await self._await_peer_close()
        except (WebSocketClosed, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            if self.closed is None:
                self.closed = WebSocketClosed(code, reason)
            await trio.aclose_forcefully(self._stream)

    # --- internals ---------------------------------------------------------------------------

    async def _await_peer_close(self) -> None:
        # Messages still arriving are dropped: the application has said goodbye.
        while True:
            event = self._reader.next_event()
            if event is NEED_DATA:
                await self._feed()
            elif event is PAUSE:
                await trio.lowlevel.checkpoint()
            elif isinstance(event, CloseReceived | Violation):
                return

    async def _feed(self) -> None:
        try:
            data = await self._stream.receive_some(RECEIVE_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if data:
            self.last_received = trio.current_time()
            self._reader.receive_data(data)
            return
        # The peer went away without a close handshake.
        self._broken = True
        self.closed = self.closed or WebSocketClosed(1006, "connection lost")
        raise self.closed

    async def _on_close(self, event: CloseReceived) -> None:
        self._close_received = True
        self.closed = self.closed or WebSocketClosed(event.code, event.reason)
        if not self._close_sent:
            # The peer's closing handshake: answer with its code and let it go.
            with contextlib.suppress(WebSocketClosed):
                await self._send_close(event.code if event.code != 1005 else None, "")

    async def _refuse(self, code: int, reason: str) -> None:
        # Close for the peer's fault: say why in a Close frame, then drop the connection
        # without waiting for an answer from a peer that does not follow the protocol.
        self.closed = WebSocketClosed(code, reason, violation=True)
        if not self._close_sent:
            with contextlib.suppress(WebSocketClosed):
                await self._send_close(code, reason)

    async def _send_close(self, code: int | None, reason: str) -> None:
        self._close_sent = True
        await self._send_data(close_frame(code, reason), closing=True)

    async def _send_control(self, data: bytes) -> None:
        if self._close_sent:
            return  # nothing but the Close frame may follow it
        with contextlib.suppress(WebSocketClosed):
            await self._send_data(data)

    async def _send_data(self, data: bytes, *, closing: bool = False) -> None:
        if self._broken or (self._close_sent and not closing):
            raise self.closed or WebSocketClosed(1006, "connection lost")
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
        if self._close_sent and not closing:
            # A Close frame went out while this send waited for the lock: nothing may follow.
            self._send_lock.release()
            raise self.closed or WebSocketClosed(1006, "connection closed")
        if self._tail:
            data, self._tail = self._tail + data, b""
        done = False
        try:
            await self._stream.send_all(data)
            done = True
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.closed = self.closed or WebSocketClosed(1006, "connection lost")
            raise self.closed from None
        finally:
            self._send_lock.release()
            if not done:
                self._broken = True
