"""Internal: one accepted WebSocket — its session, reader, writer, flow control and close.

A connection outlives its room's hibernation. Its reader hands client frames to the room (or
answers keepalive itself, so a ping never wakes a hibernated room). A frame for a socket with
nothing queued and no write in progress is written at once by the task that sends it, without
waiting (a broadcast to 500 sockets does not wake 500 tasks); what the kernel does not take at
once is queued, and the connection's writer sends the queue, in as few writes as it can, within
the send deadline. Its :class:`~verani.flow.Credit` bounds what waits for a slow reader, in
frames and in bytes. Whatever goes wrong ends this socket only.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import trio

from .actor import Connect, Disconnect, Message
from .errors import FrameTooLargeError, ProtocolError, WebSocketClosed
from .flow import Credit
from .protocol import ERROR_EVENT, PING, PONG_FRAME, decode_frame, encode_event
from .recovery import ResumeRequest
from .sessions import ConnectionMeta, Session, defer_write, is_room_close_code
from .supervisor import RoomInstance
from .transport import MAX_BATCH_BYTES, WebSocket

if TYPE_CHECKING:
    from .server import Server

log = logging.getLogger("verani.server")


class Connection:
    """One accepted socket: its session, outbound queue, reader and writer.

    Past the socket's credit (see :mod:`verani.flow`) it is closed with 1008: what is queued is
    dropped and the Close frame goes next.
    """

    def __init__(
        self,
        server: Server,
        ws: WebSocket,
        instance: RoomInstance,
        meta: ConnectionMeta,
        resume: ResumeRequest | None = None,
    ) -> None:
        self._server = server
        self._resume = resume
        self._ws = ws
        self._instance = instance
        config = server.config
        self.credit = Credit(
            max_frames=config.outbound_queue,
            max_bytes=config.max_outbound_bytes,
            max_in_flight=config.max_in_flight,
        )
        self.session = Session(meta, self, self.credit)
        # A list, not a deque: the writer takes it whole, and an empty list is 56 bytes where
        # a deque is over 600 (memory per idle socket).
        self._out: list[bytes] = []
        self._out_ready = trio.Event()
        #: The size of the frame a write at once cut short (0: none): the transport holds its
        #: tail, which the writer sends before anything else; until then it counts as queued.
        self._tail_size = 0
        #: A write at once waits for the end of the coalesced() block this socket's queue
        #: was started in; the frames sent meanwhile join it.
        self._deferred = False
        self._draining = False
        self._read_scope = trio.CancelScope()
        self._send_scope: trio.CancelScope | None = None
        self._ping_due = False
        #: When the last liveness Ping was sent (None: no answer awaited).
        self.ping_sent: float | None = None
        self._close_code: int | None = None
        self._close_reason = ""
        self._where = f"room {instance.definition.name}/{instance.name}"
        #: This socket's id across a cluster (None: no cluster).
        self.cluster_id: str | None = None
        self._max_frame_size = instance.definition.max_frame_size or server.config.max_frame_size

    # FrameSink
    def send_frame(self, frame: bytes) -> None:
        if self._close_code is not None:
            return
        if not self.credit.queue(len(frame)):
            self._too_slow(len(frame))
            return
        self._server.stats.frames_sent += 1
        out = self._out
        out.append(frame)
        if self._deferred:
            return
        if len(out) > 1 or self._tail_size:
            # Behind frames already queued: the writer's.
            self._out_ready.set()
        elif defer_write(self._write_now):
            self._deferred = True
        else:
            self._write_now()

    def _write_now(self) -> None:
        """Write what is queued without waiting, as far as the kernel takes it; the writer
        sends the rest (and anything this cannot write: a write in progress, a TLS stream)."""
        self._deferred = False
        out = self._out
        if self._close_code is not None or not out:
            return  # closing: the writer drains the queue, or it was dropped
        try:
            whole, cut = self._ws.write_now(out)
        except WebSocketClosed:
            # The peer is gone (reset): as when the writer finds it so, the connection ends;
            # the room learns it from the Disconnect, never from an error in its own turn.
            self._read_scope.cancel()
            return
        if whole:
            self.credit.sent(whole, sum(map(len, out if whole == len(out) else out[:whole])))
        if cut:
            self._tail_size = len(out[whole])
        if whole + cut == len(out):
            self._out = []
        else:
            del out[: whole + cut]
        if self._out or cut:
            self._out_ready.set()

    def over_budget(self) -> None:
        self._too_slow(0)

    def _too_slow(self, refused: int) -> None:
        credit = self.credit
        self._server.client_log(
            logging.WARNING,
            "%s: client %s (user %s) reads too slowly (%d frames queued, %d bytes pending; "
            "limits: %d frames, %d bytes); closing with 1008",
            self._where,
            self.session.meta.client_id,
            self.session.meta.user_id,
            credit.frames,
            credit.bytes + credit.held_bytes + refused,
            credit.max_frames,
            credit.max_bytes,
        )
        self.close(1008, "outbound budget exceeded: the client reads too slowly")

    def close(self, code: int, reason: str) -> None:
        if self._close_code is not None:
            return
        self._close_code, self._close_reason = code, reason
        if code == 1001 or is_room_close_code(code):
            # Going away (shutdown) or the room's own close: the writer sends what is queued,
            # then ends the socket.
            self._draining = True
            if is_room_close_code(code):
                # The room is done with this client (a kick): what it sends from now on is
                # not handled, and the room hears of the close at once (on_disconnect).
                self._read_scope.cancel()
        else:
            # Nothing queued goes out: the Close frame is next. A write in progress may finish
            # (a frame cut in half would leave no way to send the Close), but not for long.
            self._out = []
            self.credit.drop_queued()
            self._read_scope.cancel()
            if self._send_scope is not None:
                deadline = trio.current_time() + self._server.config.close_timeout
                self._send_scope.deadline = min(self._send_scope.deadline, deadline)
        self._out_ready.set()

    def close_unresponsive(self, quiet: float) -> None:
        """The peer answered no Ping in time: a dead peer (or network) leaves its room."""
        self._server.client_log(
            logging.WARNING,
            "%s: client %s (user %s) sent nothing for %.1fs and answered no ping; closing "
            "with 1011",
            self._where,
            self.session.meta.client_id,
            self.session.meta.user_id,
            quiet,
        )
        self.close(1011, "no answer to ping")

    def ping(self, now: float) -> None:
        """Have the writer send a liveness Ping; the answer is awaited from ``now``."""
        self.ping_sent = now
        self._ping_due = True
        self._out_ready.set()

    @property
    def last_received(self) -> float:
        """When bytes last came from the peer (Trio's clock)."""
        return self._ws.last_received

    async def run(self) -> None:
        inst, session = self._instance, self.session
        await inst.submit(Connect(session, self._resume))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._writer)
            with self._read_scope:
                await self._reader()
            # The session leaves its room now, while a write in progress may still finish
            # (bounded by close_timeout): the room must not count a socket it has closed.
            closed = self._ws.closed
            code = self._close_code or (closed.code if closed else 1006)
            reason = self._close_reason if self._close_code else (closed.reason if closed else "")
            # A drop (not a clean close by the peer, nor the room's own close) leaves a session
            # with recovery waiting for its client.
            final = (self._close_code is None and code == 1000) or is_room_close_code(
                self._close_code
            )
            await inst.submit(Disconnect(session, code, reason or None, final=final))
            if self._close_code is None:
                # The peer closed, broke the protocol or went away: nothing more to send.
                nursery.cancel_scope.cancel()
        with trio.move_on_after(self._server.config.close_timeout):
            await self._ws.aclose(self._close_code or 1000, self._close_reason)

    async def _reader(self) -> None:
        ws, session, server = self._ws, self.session, self._server
        while True:
            await self.credit.wait_to_read()
            try:
                message = await ws.receive()
            except WebSocketClosed as closed:
                if closed.violation:
                    self._log_violation(closed)
                return
            try:
                frame = decode_frame(message, max_size=self._max_frame_size)
            except ProtocolError as exc:
                server.stats.frames_dropped += 1
                self._server.client_log(
                    logging.WARNING,
                    "%s: dropped a frame from client %s (user %s): %s",
                    self._where,
                    session.meta.client_id,
                    session.meta.user_id,
                    exc,
                )
                if isinstance(exc, FrameTooLargeError):
                    self.close(1009, "frame too large")
                    return
                self.send_frame(
                    encode_event(
                        session.first_channel,
                        ERROR_EVENT,
                        {"code": "bad_frame", "message": str(exc)},
                    )
                )
                continue
            if frame.type == PING:
                # Answered here, so keepalive never wakes a hibernated room.
                self.send_frame(PONG_FRAME)
                continue
            self.credit.take_message()
            server.stats.events_received += 1
            if not await self._instance.submit(Message(session, frame)):
                self.credit.message_done()

    def _log_violation(self, closed: WebSocketClosed) -> None:
        self._server.stats.frames_dropped += 1
        client = self.session.meta.client_id
        if closed.code == 1009:
            self._server.client_log(
                logging.WARNING,
                "%s: client %s sent a frame over %d bytes; closed with 1009",
                self._where,
                client,
                self._max_frame_size,
            )
        else:
            self._server.client_log(
                logging.WARNING,
                "%s: client %s broke the WebSocket protocol (%s); closed with %d",
                self._where,
                client,
                closed.reason,
                closed.code,
            )

    async def _writer(self) -> None:
        timeout = self._server.config.send_timeout
        ws = self._ws
        # One scope for every send: its deadline is set around each write (cheaper than a
        # new cancel scope per write); only a write that overruns it is cancelled.
        with trio.CancelScope() as send_scope:
            self._send_scope = send_scope
            try:
                while True:
                    if self._close_code is not None and not self._draining:
                        break
                    # A frame cut short is finished first (the Ping would follow its tail on the
                    # wire anyway): the next write sends it, and it is counted as sent there.
                    if self._ping_due and not self._tail_size:
                        self._ping_due = False
                        send_scope.deadline = trio.current_time() + timeout
                        await ws.send_ping()
                        send_scope.deadline = math.inf
                        continue
                    if not self._out and not self._tail_size:
                        if self._draining:
                            break
                        self._out_ready = trio.Event()
                        await self._out_ready.wait()
                        continue
                    # Everything queued goes out in one write (bounded), so a burst of events
                    # costs one syscall, not one per frame.
                    batch, size = _take_batch(self._out)
                    if batch is self._out:
                        self._out = []
                    # The transport sends the tail of a frame a write at once cut short first.
                    frames = len(batch) + (1 if self._tail_size else 0)
                    size += self._tail_size
                    self._tail_size = 0
                    send_scope.deadline = trio.current_time() + timeout
                    await ws.send_frames(batch)
                    send_scope.deadline = math.inf
                    if self._close_code is None or self._draining:
                        self.credit.sent(frames, size)
                    # An idle socket keeps no reference to what it last sent.
                    del batch
            except WebSocketClosed:
                # The peer is gone: end the connection now, or a reader parked on flow
                # control would wait forever for a writer that will never drain its queue.
                pass
            finally:
                self._send_scope = None
        if send_scope.cancelled_caught and self._close_code is None:
            self._server.client_log(
                logging.WARNING,
                "%s: a send to client %s took over %ss; dropping it",
                self._where,
                self.session.meta.client_id,
                timeout,
            )
            self._close_code, self._close_reason = 1008, "a send took too long"
        # The reader ends too: the room lets go of the session, whatever the reader awaited.
        self._read_scope.cancel()


def _take_batch(out: list[bytes]) -> tuple[list[bytes], int]:
    """The frames of ``out`` for one write, and their bytes: all of them (``out`` itself) when
    they fit in MAX_BATCH_BYTES, else as many as fit (at least one), removed from ``out``."""
    size = 0
    for i, frame in enumerate(out):
        if size + len(frame) > MAX_BATCH_BYTES and i:
            batch = out[:i]
            del out[:i]
            return batch, size
        size += len(frame)
    return out, size
