"""Internal: the WebSocket server: HTTP routing, handshakes, one reader and one writer per socket.

Each connection runs in its own guarded scope: whatever goes wrong with one socket ends that
socket only, never the listener or the other connections. The HTTP request head is read here
first, so a plain HTTP request to a room path gets ``426 Upgrade Required``, an unknown path
``404``, a bad instance name ``400``; only a well-formed upgrade to a room path is answered with
``101`` and handed to the WebSocket transport (:mod:`verani.transport`).
"""

from __future__ import annotations

import base64
import errno
import http
import logging
import math
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Sequence
from contextlib import asynccontextmanager
from typing import Any, Literal

import attrs
import h11
import trio

from .actor import Connect, Disconnect, Message
from .errors import FrameTooLargeError, HandshakeRefused, ProtocolError, VeraniError, single_error
from .protocol import ERROR_EVENT, MAX_FRAME_SIZE, PING, PONG_FRAME, decode_frame, encode_event
from .room import DEFAULT_IDLE_TIMEOUT, RoomDefinition, normalize_origin
from .routing import MAX_INSTANCE_NAME, InstanceRules, Route, Router, split_target
from .runtime import RoomHandle, Runtime
from .sessions import ConnectionMeta, Session
from .store import FileStore, Store
from .supervisor import RoomInstance, Supervisor
from .transport import MAX_BATCH_BYTES, Closed, WebSocket, accept_response

log = logging.getLogger("verani.server")

#: ``accept`` errors that mean "no resources now": wait and retry instead of failing.
_ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
#: Seconds the listener waits after such an error.
ACCEPT_BACKOFF = 0.1
#: Log lines caused by clients: the burst allowed, and the rate past it (see Server.client_log).
CLIENT_LOG_BURST = 100
CLIENT_LOG_RATE = 20


class ServeError(VeraniError):
    """The server could not start (address in use, store locked or unusable)."""


@attrs.frozen
class ServerConfig:
    """Limits and timeouts of a server; every one has a default safe for the internet."""

    #: Largest client frame, in characters; a bigger one closes its socket with 1009. A room's
    #: own ``max_frame_size`` wins for that room.
    max_frame_size: int = MAX_FRAME_SIZE
    #: Open WebSockets on the whole server; past it a new upgrade gets HTTP 503.
    max_connections: int = 10_000
    #: Open WebSockets on one room instance (a room's ``max_connections`` wins); past it, 503.
    max_connections_per_room: int = 1_000
    #: Room instances awake at once; past it the least recently used ones hibernate.
    max_awake_rooms: int = 10_000
    #: Frames queued for one socket before it counts as too slow and is closed (1008).
    outbound_queue: int = 1024
    #: A socket's messages in the room (queued, running, or waiting for the disk) plus its frames
    #: not yet sent; past it the socket's reader waits, so a flood slows its sender down instead
    #: of filling its outbound queue or the room's inbox.
    max_in_flight: int = 64
    #: Seconds one send may take before the socket is dropped.
    send_timeout: float = 30.0
    #: Seconds a client gets to send its whole HTTP request head and finish the upgrade.
    handshake_timeout: float = 10.0
    #: Seconds the closing handshake may take before the TCP connection is dropped.
    close_timeout: float = 5.0
    max_request_head: int = 16 * 1024
    #: Longest instance name, in characters; longer ones get HTTP 400.
    max_instance_name: int = MAX_INSTANCE_NAME
    #: A regular expression every instance name must match in full (a room's own wins); None
    #: allows any name that cannot reach outside the store.
    instance_pattern: re.Pattern[str] | None = None
    #: Seconds a graceful shutdown may spend saving rooms and closing sockets.
    shutdown_timeout: float = 30.0
    #: Bytes pending for one socket — queued, being written, or held by the room's output gate
    #: until a write is durable — before it counts as too slow and is closed (1008).
    max_outbound_bytes: int = 4 * 1024 * 1024
    #: Frames one client message may be cut into; past it the socket is closed (1008).
    max_fragments: int = 1024
    #: Control frames (ping, pong, close) one socket may send per second, and in a burst;
    #: past it the socket is closed (1008).
    max_control_frames: float = 100.0
    #: Seconds a socket may stay quiet (nothing received) before the server sends it a
    #: WebSocket Ping; 0 sends none.
    ping_interval: float = 20.0
    #: Seconds a pinged socket has to send anything back before it is closed (1011).
    ping_timeout: float = 20.0
    #: Sockets accepted and still in their HTTP handshake. They count toward
    #: ``max_connections`` from accept; when either limit is reached, the oldest handshake in
    #: progress is dropped to make room (a silent client yields its place to a new one).
    max_handshakes: int = 256


@attrs.frozen
class HandshakeRequest:
    """The HTTP upgrade request, as ``extract_meta`` sees it."""

    path: str
    query: dict[str, str]
    #: Header names lower-cased; repeated headers joined with ``", "``.
    headers: dict[str, str]
    remote: str
    room: str
    instance: str


def default_meta(request: HandshakeRequest) -> ConnectionMeta:
    """Verani's default: ``userId`` from the query string (else ``anonymous``), a random client id,
    channel ``default``."""
    return ConnectionMeta(
        user_id=request.query.get("userId") or "anonymous",
        client_id=str(uuid.uuid4()),
        channels=["default"],
    )


@attrs.define
class ServerStats:
    """Counters a running server keeps (for logs, ``verani inspect`` and tests)."""

    connections: int = 0
    frames_dropped: int = 0
    http_rejected: int = 0
    #: Handshakes dropped to make room for newer ones (``max_handshakes``, ``max_connections``).
    handshakes_dropped: int = 0
    #: Times ``accept`` failed for lack of file descriptors (or memory) and the listener waited.
    accept_backoffs: int = 0
    #: Sockets closed because they answered no Ping within ``ping_timeout``.
    ping_timeouts: int = 0


class Server:
    """A running server; made by :func:`open_server`."""

    def __init__(self, router: Router, supervisor: Supervisor, config: ServerConfig) -> None:
        self.router = router
        self.supervisor = supervisor
        self.config = config
        self.stats = ServerStats()
        self.host = ""
        self.port = 0
        self._connections: set[_Connection] = set()
        # Sockets accepted and in their handshake, oldest first, each with the cancel scope
        # that drops it and when it was accepted.
        self._handshakes: dict[trio.CancelScope, float] = {}
        self._warned_at = -math.inf
        self._log_tokens = float(CLIENT_LOG_BURST)
        self._log_tokens_at = 0.0
        self._log_suppressed = 0
        self._per_room: dict[tuple[str, str], int] = {}
        self._no_connections = trio.Event()
        self._no_connections.set()
        self._accept_scope = trio.CancelScope()
        #: Room instances whose state could not be saved when the server stopped, with why.
        self.unsaved: list[tuple[str, str, str]] = []

    @property
    def url(self) -> str:
        """``ws://HOST:PORT`` of the listener."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ws://{host}:{self.port}"

    @property
    def runtime(self) -> Runtime:
        """Reaches room instances from other code: ``server.runtime.room("chat", "lobby")``."""
        return self.supervisor.runtime

    def room(self, name: str, instance: str = "default") -> RoomHandle:
        """Shorthand for ``server.runtime.room(name, instance)``."""
        return self.supervisor.runtime.room(name, instance)

    async def hibernate(
        self, room: str | None = None, instance: str | None = None
    ) -> list[tuple[str, str, str | None]]:
        """Hibernate awake rooms now (see :meth:`Supervisor.hibernate`)."""
        return await self.supervisor.hibernate(room, instance)

    async def _accept(
        self,
        listeners: Sequence[trio.SocketListener],
        conn_nursery: trio.Nursery,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        with self._accept_scope:
            async with trio.open_nursery() as nursery:
                for listener in listeners:
                    nursery.start_soon(self._accept_loop, listener, conn_nursery)
                task_status.started()

    async def _accept_loop(self, listener: trio.SocketListener, conn_nursery: trio.Nursery) -> None:
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                        raise
                    # Out of file descriptors (or memory): retrying at once would spin a core
                    # and starve the sockets that are open; they go on while we wait.
                    self.stats.accept_backoffs += 1
                    self._warn(
                        "cannot accept connections: %s; retrying in %ss (raise the file "
                        "descriptor limit, `ulimit -n`, or lower --max-connections)",
                        exc.strerror or exc,
                        ACCEPT_BACKOFF,
                    )
                    await trio.sleep(ACCEPT_BACKOFF)
                    continue
                conn_nursery.start_soon(self._handle_stream, stream, self._admit())

    def _admit(self) -> trio.CancelScope:
        """A slot in the handshake table for a socket just accepted, made by dropping the
        oldest handshakes in progress while a limit is exceeded."""
        cfg, table = self.config, self._handshakes
        scope = trio.CancelScope()
        table[scope] = trio.current_time()
        dropped = 0
        while len(table) > 1 and (
            len(table) > cfg.max_handshakes
            or len(table) + len(self._connections) > cfg.max_connections
        ):
            oldest = next(iter(table))
            del table[oldest]
            oldest.cancel()
            dropped += 1
        if dropped:
            self.stats.handshakes_dropped += dropped
            self._warn(
                "dropped the oldest handshake in progress to make room: %d in progress "
                "(limit %d), %d connections (limit %d); %d dropped so far",
                len(table),
                cfg.max_handshakes,
                len(self._connections),
                cfg.max_connections,
                self.stats.handshakes_dropped,
            )
        return scope

    def client_log(self, level: int, message: str, *args: object) -> None:
        """Log a line caused by one client (a refusal, a violation, a slow reader): at most
        ``CLIENT_LOG_BURST`` at once and ``CLIENT_LOG_RATE`` a second, so a client that
        reconnects and misbehaves in a loop cannot fill the disk; what is left out is counted
        in the next line that goes through."""
        now = trio.current_time()
        self._log_tokens = min(
            CLIENT_LOG_BURST, self._log_tokens + (now - self._log_tokens_at) * CLIENT_LOG_RATE
        )
        self._log_tokens_at = now
        if self._log_tokens < 1:
            self._log_suppressed += 1
            return
        self._log_tokens -= 1
        if self._log_suppressed:
            log.warning(
                "%d log lines about clients left out (over %d a second)",
                self._log_suppressed,
                CLIENT_LOG_RATE,
            )
            self._log_suppressed = 0
        log.log(level, message, *args)

    def _warn(self, message: str, *args: object) -> None:
        # At most one line a second: under attack these would otherwise flood the log.
        now = trio.current_time()
        if now - self._warned_at >= 1.0:
            self._warned_at = now
            log.warning(message, *args)

    async def _liveness(self) -> None:
        """Ping every socket that has been quiet for ``ping_interval``; close (1011) one that
        sends nothing back within ``ping_timeout``. One task for all sockets."""
        cfg = self.config
        if not cfg.ping_interval:
            return
        step = min(cfg.ping_interval, cfg.ping_timeout) / 4
        while True:
            await trio.sleep(step)
            now = trio.current_time()
            for conn in list(self._connections):
                sent, seen = conn.ping_sent, conn.last_received
                if sent is not None and seen >= sent:
                    conn.ping_sent = sent = None  # answered (anything received counts)
                if sent is None:
                    if now - seen >= cfg.ping_interval:
                        conn.ping(now)
                elif now - sent >= cfg.ping_timeout:
                    self.stats.ping_timeouts += 1
                    conn.close_unresponsive(now - seen)

    async def _shutdown(self) -> None:
        self._accept_scope.cancel()
        results = await self.supervisor.shutdown()
        for room, instance, error in results:
            if error:
                log.error("room %s/%s: %s", room, instance, error)
                self.unsaved.append((room, instance, error))
        for conn in list(self._connections):
            conn.close(1001, "server shutting down")
        with trio.move_on_after(self.config.close_timeout + 1):
            await self._no_connections.wait()

    # --- one TCP connection -----------------------------------------------------------------

    async def _handle_stream(self, stream: trio.SocketStream, slot: trio.CancelScope) -> None:
        remote = _peer(stream)
        try:
            await self._serve_stream(stream, remote, slot)
        except Exception as exc:
            # One connection's failure must never reach the listener or other connections.
            log.warning("connection from %s ended with %s: %s", remote, type(exc).__name__, exc)
        finally:
            await trio.aclose_forcefully(stream)

    async def _serve_stream(
        self, stream: trio.SocketStream, remote: str, slot: trio.CancelScope
    ) -> None:
        try:
            with slot:
                accepted = await self._handshake(stream, remote)
        finally:
            self._handshakes.pop(slot, None)
        if slot.cancelled_caught:
            # Counted and logged (once a second) where it was dropped; one line each would flood.
            log.debug("connection from %s: handshake dropped to make room for a newer one", remote)
            return
        if accepted is None:
            return
        # Only what the connection needs lives on: the request head, its headers and the
        # handshake's locals are gone with _handshake's frame (memory per idle socket).
        route, meta, trailing = accepted
        cfg = self.config
        ws = WebSocket(
            stream,
            trailing=trailing,
            max_message_size=route.room.max_frame_size or cfg.max_frame_size,
            max_fragments=cfg.max_fragments,
            max_control_per_second=cfg.max_control_frames,
        )
        if self.supervisor.stopping:
            # The handshake finished after shutdown began: no room will take it.
            with trio.move_on_after(self.config.close_timeout):
                await ws.aclose(1001, "server shutting down")
            return
        inst = self.supervisor.instance(route.room.name, route.instance)
        conn = _Connection(self, ws, inst, meta)
        self._connections.add(conn)
        key = (route.room.name, route.instance)
        self._per_room[key] = self._per_room.get(key, 0) + 1
        if self._no_connections.is_set():
            self._no_connections = trio.Event()
        self.stats.connections += 1
        try:
            await conn.run()
        finally:
            self._connections.discard(conn)
            left = self._per_room[key] - 1
            if left:
                self._per_room[key] = left
            else:
                del self._per_room[key]
            if not self._connections:
                self._no_connections.set()

    async def _handshake(
        self, stream: trio.SocketStream, remote: str
    ) -> tuple[Route, ConnectionMeta, bytes] | None:
        """Read and check the upgrade request, run ``extract_meta``, answer 101; or answer the
        refusal and return None."""
        cfg = self.config
        with trio.move_on_after(cfg.handshake_timeout) as timeout:
            head = await _read_request_head(stream, cfg.max_request_head)
        if timeout.cancelled_caught:
            self.client_log(
                logging.INFO,
                "connection from %s: no complete HTTP request within %ss",
                remote,
                cfg.handshake_timeout,
            )
            return None
        if isinstance(head, _HttpAnswer):
            await self._answer(stream, head, remote, "")
            return None
        request, trailing = head
        target = request.target.decode("ascii", "replace")
        path, query = split_target(target)
        route = self.router.route(path)
        answer = (
            _check_upgrade(request, route, path)
            or _check_origin(request, route)
            or self._check_capacity(route)
        )
        if answer is not None:
            await self._answer(stream, answer, remote, target)
            return None
        assert route is not None
        hreq = HandshakeRequest(
            path=path,
            query=query,
            headers=_headers(request.headers),
            remote=remote,
            room=route.room.name,
            instance=route.instance,
        )
        with trio.move_on_after(cfg.handshake_timeout) as timeout:
            meta = await self._extract_meta(route.room, hreq)
            if isinstance(meta, _HttpAnswer):
                await self._answer(stream, meta, remote, target, logged=True)
                return None
            await stream.send_all(accept_response(hreq.headers["sec-websocket-key"]))
        if timeout.cancelled_caught:
            self.client_log(
                logging.INFO, "connection from %s: WebSocket handshake timed out", remote
            )
            return None
        assert isinstance(meta, ConnectionMeta)
        return route, meta, trailing

    def _check_capacity(self, route: Route | None) -> _HttpAnswer | None:
        # Counted before the upgrade, so a refused client costs no room code and no socket.
        if route is None:
            return None
        cfg = self.config
        # Sockets count from accept: the open WebSockets and the handshakes in progress (this
        # one included; older ones were dropped to make room, so only open ones are left).
        if len(self._connections) + len(self._handshakes) > cfg.max_connections:
            self.client_log(
                logging.WARNING,
                "refusing a connection: %d open, the server's limit",
                cfg.max_connections,
            )
            return _HttpAnswer(
                503, "the server is at its connection limit; retry later", (("Retry-After", "5"),)
            )
        limit = route.room.max_connections or cfg.max_connections_per_room
        if self._per_room.get((route.room.name, route.instance), 0) >= limit:
            self.client_log(
                logging.WARNING,
                "room %s/%s: refusing a connection: %d open, the room's limit",
                route.room.name,
                route.instance,
                limit,
            )
            return _HttpAnswer(
                503,
                f"room {route.room.name}/{route.instance} is full; retry later",
                (("Retry-After", "5"),),
            )
        return None

    async def _extract_meta(
        self, room: RoomDefinition[Any], request: HandshakeRequest
    ) -> ConnectionMeta | _HttpAnswer:
        extract = room.hooks.extract_meta or default_meta
        where = f"room {room.name}/{request.instance}"
        try:
            result = extract(request)
            meta = await result if isinstance(result, Awaitable) else result
        except HandshakeRefused as refusal:
            self.client_log(
                logging.INFO, "%s: refused connection from %s: %s", where, request.remote, refusal
            )
            return _HttpAnswer(refusal.status, refusal.reason, verbatim=True)
        except Exception as exc:
            log.error(
                "%s: extract_meta raised %s: %s", where, type(exc).__name__, exc, exc_info=exc
            )
            return _HttpAnswer(500, "the room could not accept the connection")
        if not isinstance(meta, ConnectionMeta):
            log.error("%s: extract_meta returned %r, not a ConnectionMeta", where, meta)
            return _HttpAnswer(500, "the room could not accept the connection")
        return meta

    async def _answer(
        self,
        stream: trio.SocketStream,
        answer: _HttpAnswer,
        remote: str,
        target: str,
        *,
        logged: bool = False,
    ) -> None:
        self.stats.http_rejected += 1
        if not logged:
            self.client_log(
                logging.INFO,
                "%s %s from %s: %s",
                answer.status,
                target or "(bad request)",
                remote,
                answer.body,
            )
        with trio.move_on_after(self.config.close_timeout):
            await stream.send_all(answer.encode())


@attrs.frozen
class _HttpAnswer:
    status: int
    body: str
    headers: tuple[tuple[str, str], ...] = ()
    #: Send ``body`` byte for byte (a room's own refusal reason), without our trailing newline.
    verbatim: bool = False

    def encode(self) -> bytes:
        body = self.body.encode() if self.verbatim else (self.body + "\n").encode()
        try:
            phrase = http.HTTPStatus(self.status).phrase
        except ValueError:  # a status the standard library does not name (e.g. 499)
            phrase = ""
        lines = [
            f"HTTP/1.1 {self.status} {phrase}",
            "Content-Type: text/plain; charset=utf-8",
            f"Content-Length: {len(body)}",
            "Connection: close",
            *(f"{k}: {v}" for k, v in self.headers),
        ]
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _read_request_head(
    stream: trio.SocketStream, limit: int
) -> tuple[h11.Request, bytes] | _HttpAnswer:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limit)
    raw = bytearray()
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            return _HttpAnswer(exc.error_status_hint, f"bad HTTP request: {exc}")
        if event is h11.NEED_DATA:
            data = await stream.receive_some(4096)
            raw += data
            conn.receive_data(data)
            if not data:
                return _HttpAnswer(400, "the connection closed before a complete request")
            continue
        if isinstance(event, h11.Request):
            # What h11 read past the head (a client may send its first frame at once). h11
            # knows where the head ended, whatever line endings it used.
            trailing = conn.trailing_data[0]
            # h11 bounds only a head still incomplete; a complete one may have come in a read
            # that crossed the limit.
            if len(raw) - len(trailing) > limit:
                return _HttpAnswer(431, f"the request head is over {limit} bytes")
            return event, bytes(trailing)
        return _HttpAnswer(400, "bad HTTP request")


def _check_upgrade(request: h11.Request, route: Route | None, path: str) -> _HttpAnswer | None:
    headers = _headers(request.headers)
    wants_ws = "websocket" in headers.get("upgrade", "").lower()
    if route is None:
        return _HttpAnswer(404, f"no room is served at {path}")
    if not wants_ws:
        return _HttpAnswer(
            426,
            f"{path} is a WebSocket endpoint of room {route.room.name!r}; connect with a "
            f"WebSocket client",
            (("Upgrade", "websocket"), ("Connection", "Upgrade")),
        )
    if route.error is not None:
        return _HttpAnswer(400, f"bad room instance name: {route.error}")
    if request.method != b"GET":
        return _HttpAnswer(405, "a WebSocket upgrade must use GET", (("Allow", "GET"),))
    problem = _upgrade_problem(request, headers)
    if problem is not None:
        return _HttpAnswer(400, problem)
    if headers.get("sec-websocket-version") != "13":
        return _HttpAnswer(
            426, "unsupported WebSocket version; use 13", (("Sec-WebSocket-Version", "13"),)
        )
    return None


def _upgrade_problem(request: h11.Request, headers: dict[str, str]) -> str | None:
    """Why a GET is not a well-formed RFC 6455 upgrade, checked here so that every refusal is
    ours (logged, with a reason) rather than wsproto's bare 400."""
    if request.http_version != b"1.1":
        return "a WebSocket upgrade needs HTTP/1.1"
    if headers.get("upgrade", "").strip().lower() != "websocket":
        return "the Upgrade header must be exactly 'websocket'"
    if "upgrade" not in [t.strip() for t in headers.get("connection", "").lower().split(",")]:
        return "the Connection header must include 'Upgrade'"
    if "content-length" in headers and headers["content-length"].strip() != "0":
        return "a WebSocket upgrade carries no body (Content-Length)"
    if "transfer-encoding" in headers:
        return "a WebSocket upgrade carries no body (Transfer-Encoding)"
    try:
        key = base64.b64decode(headers.get("sec-websocket-key", ""), validate=True)
    except ValueError:
        key = b""
    if len(key) != 16:
        return "Sec-WebSocket-Key must be 16 bytes in base64"
    return None


def _check_origin(request: h11.Request, route: Route | None) -> _HttpAnswer | None:
    allowed = route.room.allowed_origins if route is not None else None
    if route is None or allowed is None:
        return None
    origin = _headers(request.headers).get("origin")
    # Browsers always send Origin on a WebSocket upgrade; a request without one is not a
    # browser's, so it cannot be a cross-site attempt riding on a user's cookies.
    if origin is None or normalize_origin(origin) in allowed:
        return None
    return _HttpAnswer(403, f"origin {origin} is not allowed for room {route.room.name!r}")


def _headers(raw: Sequence[tuple[bytes, bytes]]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name, value in raw:
        key, text = name.decode("latin-1").lower(), value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return headers


def _peer(stream: trio.SocketStream) -> str:
    try:
        host, port, *_ = stream.socket.getpeername()
    except (OSError, ValueError):
        return "unknown"
    return f"{host}:{port}"


#: Close codes after which queued frames are still sent before the close frame.
_DRAINING_CODES = frozenset({1000, 1001})


class _Connection:
    """One accepted socket: its session, bounded outbound queue, reader and writer.

    The outbound budget counts frames and bytes: frames queued, the batch being written, and
    frames the room's output gate holds for this socket (``session.held_bytes``). Past either
    limit the socket is closed with 1008: what is queued is dropped and the Close frame goes
    next.
    """

    def __init__(
        self, server: Server, ws: WebSocket, instance: RoomInstance, meta: ConnectionMeta
    ) -> None:
        self._server = server
        self._ws = ws
        self._instance = instance
        self.session = Session(meta, self)
        # A list, not a deque: the writer takes it whole, and an empty list is 56 bytes where
        # a deque is over 600 (memory per idle socket).
        self._out: list[bytes] = []
        self._out_limit = server.config.outbound_queue
        #: Bytes queued or being written (the output gate's are on the session: held_bytes).
        self.pending_bytes = 0
        self.max_pending_bytes = server.config.max_outbound_bytes
        self._out_ready = trio.Event()
        self._draining = False
        self._read_scope = trio.CancelScope()
        self._send_scope: trio.CancelScope | None = None
        self._ping_due = False
        #: When the last liveness Ping was sent (None: no answer awaited).
        self.ping_sent: float | None = None
        self._in_flight = 0
        self._may_read = trio.Event()
        self._close_code: int | None = None
        self._close_reason = ""
        self._where = f"room {instance.definition.name}/{instance.name}"
        self._max_frame_size = instance.definition.max_frame_size or server.config.max_frame_size

    # FrameSink
    def send_frame(self, frame: bytes) -> None:
        if self._close_code is not None:
            return
        pending = self.pending_bytes + len(frame)
        if (
            len(self._out) >= self._out_limit
            or pending + self.session.held_bytes > self.max_pending_bytes
        ):
            self._too_slow(pending + self.session.held_bytes)
            return
        self.pending_bytes = pending
        self._out.append(frame)
        self._out_ready.set()

    def over_budget(self) -> None:
        self._too_slow(self.pending_bytes + self.session.held_bytes)

    def _too_slow(self, pending: int) -> None:
        self._server.client_log(
            logging.WARNING,
            "%s: client %s (user %s) reads too slowly (%d frames queued, %d bytes pending; "
            "limits: %d frames, %d bytes); closing with 1008",
            self._where,
            self.session.meta.client_id,
            self.session.meta.user_id,
            len(self._out),
            pending,
            self._out_limit,
            self.max_pending_bytes,
        )
        self.close(1008, "outbound budget exceeded: the client reads too slowly")

    def message_done(self) -> None:
        self._in_flight -= 1
        self._may_read.set()

    def _backlog(self) -> int:
        # This socket's messages still in the room plus its frames not yet sent: a client that
        # floods faster than it reads its replies is slowed here, at its own socket.
        return self._in_flight + len(self._out)

    def close(self, code: int, reason: str) -> None:
        if self._close_code is not None:
            return
        self._close_code, self._close_reason = code, reason
        if code in _DRAINING_CODES:
            # The writer sends what is queued, then ends the socket.
            self._draining = True
        else:
            # Nothing queued goes out: the Close frame is next. A write in progress may finish
            # (a frame cut in half would leave no way to send the Close), but not for long.
            self._out = []
            self.pending_bytes = 0
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
        await inst.submit(Connect(session))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._writer)
            with self._read_scope:
                await self._reader()
            # The session leaves its room now, while a write in progress may still finish
            # (bounded by close_timeout): the room must not count a socket it has closed.
            closed = self._ws.closed
            code = self._close_code or (closed.code if closed else 1006)
            reason = self._close_reason if self._close_code else (closed.reason if closed else "")
            await inst.submit(Disconnect(session, code, reason or None))
            if self._close_code is None:
                # The peer closed, broke the protocol or went away: nothing more to send.
                nursery.cancel_scope.cancel()
        with trio.move_on_after(self._server.config.close_timeout):
            await self._ws.aclose(self._close_code or 1000, self._close_reason)

    async def _reader(self) -> None:
        ws, session, server = self._ws, self.session, self._server
        while True:
            # Flow control before any frame is handled: pongs and error answers fill the
            # outbound queue too, and a burst of them must wait for the writer, not overflow it.
            while self._backlog() >= server.config.max_in_flight:
                self._may_read = trio.Event()
                await self._may_read.wait()
            try:
                message = await ws.receive()
            except Closed as closed:
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
            self._in_flight += 1
            if not await self._instance.submit(Message(session, frame)):
                self._in_flight -= 1

    def _log_violation(self, closed: Closed) -> None:
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
                    if self._ping_due:
                        self._ping_due = False
                        send_scope.deadline = trio.current_time() + timeout
                        await ws.send_ping()
                        send_scope.deadline = math.inf
                        continue
                    if not self._out:
                        if self._draining:
                            break
                        self._out_ready = trio.Event()
                        await self._out_ready.wait()
                        continue
                    # Everything queued goes out in one write (bounded), so a burst of events
                    # costs one syscall, not one per frame.
                    batch = _take_batch(self._out)
                    if batch is self._out:
                        self._out = []
                    send_scope.deadline = trio.current_time() + timeout
                    await ws.send_frames(batch)
                    send_scope.deadline = math.inf
                    if self._close_code is None or self._draining:
                        self.pending_bytes -= sum(map(len, batch))
                    # An idle socket keeps no reference to what it last sent.
                    del batch
                    self._may_read.set()
            except Closed:
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


def _take_batch(out: list[bytes]) -> list[bytes]:
    """The frames of ``out`` for one write: all of them (``out`` itself) when they fit in
    MAX_BATCH_BYTES, else as many as fit (at least one), removed from ``out``."""
    size = 0
    for i, frame in enumerate(out):
        size += len(frame)
        if size > MAX_BATCH_BYTES and i:
            batch = out[:i]
            del out[:i]
            return batch
    return out


@asynccontextmanager
async def open_server(
    rooms: Sequence[RoomDefinition[Any]],
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    store: Store | str | None = None,
    durability: Literal["fsync", "os"] = "fsync",
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    config: ServerConfig | None = None,
    control: bool = True,
) -> AsyncIterator[Server]:
    """Serve ``rooms`` on ``host:port`` until the ``async with`` block ends.

    ``store`` is a :class:`Store` or a directory for a :class:`FileStore` (default ``.verani``)
    with the given ``durability`` (``"fsync"``: a saved change survives a power loss; ``"os"``:
    no fsync, it survives a crash of the process but not of the machine — for tests and dev).
    With a file store the server takes the store's lock (one server per store) and, when
    ``control`` is true, opens the local control endpoint ``verani hibernate`` talks to. Leaving
    the block shuts down gracefully: stop accepting, hibernate every room (a durable flush),
    close the sockets with 1001.
    """
    from .control import StoreLock, serve_control

    config = config or ServerConfig()
    rules = InstanceRules(config.max_instance_name, config.instance_pattern)
    router = Router(rooms, rules)
    store_obj: Store = (
        store if isinstance(store, Store) else FileStore(store or ".verani", durability=durability)
    )
    lock = (
        await trio.to_thread.run_sync(StoreLock.acquire, store_obj.directory)
        if isinstance(store_obj, FileStore)
        else None
    )
    try:
        # Held frames are released in bursts; half the outbound queue leaves room for them.
        supervisor = Supervisor(
            router.rooms,
            store_obj,
            idle_timeout=idle_timeout,
            max_held_per_socket=max(1, config.outbound_queue // 2),
            max_awake=config.max_awake_rooms,
            instance_rules=rules,
        )
        server = Server(router, supervisor, config)
        try:
            listeners = await trio.open_tcp_listeners(port, host=host)
        except OSError as exc:
            raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        sockname = listeners[0].socket.getsockname()
        server.host, server.port = sockname[0], sockname[1]
        with single_error():
            async with trio.open_nursery() as nursery:
                await nursery.start(supervisor.run)
                conn_nursery: trio.Nursery = await nursery.start(_nursery_task)
                await nursery.start(server._accept, listeners, conn_nursery)
                nursery.start_soon(server._liveness)
                if control and isinstance(store_obj, FileStore):
                    await nursery.start(serve_control, server, store_obj.directory)
                try:
                    yield server
                finally:
                    with trio.CancelScope(shield=True):
                        with trio.move_on_after(server.config.shutdown_timeout) as timeout:
                            await server._shutdown()
                        if timeout.cancelled_caught:
                            log.error(
                                "shutdown took over %ss; stopping without waiting further",
                                server.config.shutdown_timeout,
                            )
                            why = f"still saving after {server.config.shutdown_timeout}s"
                            server.unsaved.extend(
                                (st.room, st.instance, why)
                                for st in supervisor.status()
                                if st.awake
                            )
                    nursery.cancel_scope.cancel()
    finally:
        await store_obj.aclose()
        if lock is not None:
            lock.release()


async def _nursery_task(*, task_status: trio.TaskStatus[trio.Nursery]) -> None:
    # A nursery of its own for connections, so they can outlive (and be closed after) the rooms.
    async with trio.open_nursery() as nursery:
        task_status.started(nursery)
        await trio.sleep_forever()
