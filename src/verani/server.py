"""Internal: the server's life: its limits, listener, admitted handshakes, liveness, shutdown.

Each socket runs in its own guarded scope: whatever goes wrong with one socket ends that socket
only, never the listener or the other connections. The server decides (limits, capacity, what
to log); :mod:`verani.handshake` speaks HTTP (a plain request to a room path gets ``426``, an
unknown path ``404``, a bad instance name ``400``, a well-formed upgrade ``101``);
:mod:`verani.connection` runs each upgraded socket.
"""

from __future__ import annotations

import errno
import logging
import math
import re
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Literal

import attrs
import h11
import trio

from . import api, live
from .connection import Connection
from .errors import ServeError, VeraniError, single_error
from .handshake import (
    HttpAnswer,
    RequestHead,
    accept_response,
    check_origin,
    check_upgrade,
    check_websocket,
    extract_meta,
    headers_of,
    read_request_head,
)
from .protocol import MAX_FRAME_SIZE
from .recovery import ResumeRequest, resume_request
from .room import DEFAULT_IDLE_TIMEOUT, RoomDefinition
from .routing import MAX_INSTANCE_NAME, InstanceRules, Route, Router, split_target
from .runtime import RoomHandle, Runtime
from .sessions import ConnectionMeta, HandshakeRequest, default_meta
from .store import FileStore, Store
from .supervisor import Supervisor
from .transport import WebSocket

if TYPE_CHECKING:
    from .cluster.node import ClusterNode

__all__ = [
    "HandshakeRequest",
    "ServeError",
    "Server",
    "ServerConfig",
    "ServerStats",
    "default_meta",
    "open_server",
]

log = logging.getLogger("verani.server")

#: ``accept`` errors that mean "no resources now": wait and retry instead of failing.
_ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
#: Seconds the listener waits after such an error.
ACCEPT_BACKOFF = 0.1
#: Log lines caused by clients: the burst allowed, and the rate past it (see Server.client_log).
CLIENT_LOG_BURST = 100
CLIENT_LOG_RATE = 20


# A limit of 0 would refuse everything, a timeout of 0 would expire at once (and a ping check
# every 0 seconds would spin): refused when the config is made, naming the field.
_AT_LEAST_ONE = attrs.validators.ge(1)
_POSITIVE = attrs.validators.gt(0.0)
_NOT_NEGATIVE = attrs.validators.ge(0.0)


@attrs.frozen
class ServerConfig:
    """Limits and timeouts of a server; every one has a default safe for the internet.

    Limits are at least 1 and timeouts positive (``ping_interval`` may be 0: no pings); any
    other value raises :class:`ValueError` naming the field.
    """

    #: Largest client frame, in characters; a bigger one closes its socket with 1009. A room's
    #: own ``max_frame_size`` wins for that room.
    max_frame_size: int = attrs.field(default=MAX_FRAME_SIZE, validator=_AT_LEAST_ONE)
    #: Open WebSockets on the whole server; past it a new upgrade gets HTTP 503.
    max_connections: int = attrs.field(default=10_000, validator=_AT_LEAST_ONE)
    #: Open WebSockets on one room instance (a room's ``max_connections`` wins); past it, 503.
    max_connections_per_room: int = attrs.field(default=1_000, validator=_AT_LEAST_ONE)
    #: Room instances awake at once; past it the least recently used ones hibernate.
    max_awake_rooms: int = attrs.field(default=10_000, validator=_AT_LEAST_ONE)
    #: Frames queued for one socket before it counts as too slow and is closed (1008).
    outbound_queue: int = attrs.field(default=1024, validator=_AT_LEAST_ONE)
    #: A socket's messages in the room (queued, running, or waiting for the disk) plus its frames
    #: not yet sent; past it the socket's reader waits, so a flood slows its sender down instead
    #: of filling its outbound queue or the room's inbox.
    max_in_flight: int = attrs.field(default=64, validator=_AT_LEAST_ONE)
    #: Seconds one send may take before the socket is dropped.
    send_timeout: float = attrs.field(default=30.0, validator=_POSITIVE)
    #: Seconds a client gets to send its whole HTTP request head and finish the upgrade.
    handshake_timeout: float = attrs.field(default=10.0, validator=_POSITIVE)
    #: Seconds the closing handshake may take before the TCP connection is dropped.
    close_timeout: float = attrs.field(default=5.0, validator=_POSITIVE)
    max_request_head: int = attrs.field(default=16 * 1024, validator=_AT_LEAST_ONE)
    #: Longest instance name, in characters; longer ones get HTTP 400.
    max_instance_name: int = attrs.field(default=MAX_INSTANCE_NAME, validator=_AT_LEAST_ONE)
    #: A regular expression every instance name must match in full (a room's own wins); None
    #: allows any name that cannot reach outside the store.
    instance_pattern: re.Pattern[str] | None = None
    #: Seconds a graceful shutdown may spend saving rooms and closing sockets.
    shutdown_timeout: float = attrs.field(default=30.0, validator=_POSITIVE)
    #: Bytes pending for one socket — queued, being written, or held by the room's output gate
    #: until a write is durable — before it counts as too slow and is closed (1008).
    max_outbound_bytes: int = attrs.field(default=4 * 1024 * 1024, validator=_AT_LEAST_ONE)
    #: Frames one client message may be cut into; past it the socket is closed (1008).
    max_fragments: int = attrs.field(default=1024, validator=_AT_LEAST_ONE)
    #: Control frames (ping, pong, close) one socket may send per second, and in a burst;
    #: past it the socket is closed (1008).
    max_control_frames: float = attrs.field(default=100.0, validator=_POSITIVE)
    #: Seconds a socket may stay quiet (nothing received) before the server sends it a
    #: WebSocket Ping; 0 sends none.
    ping_interval: float = attrs.field(default=20.0, validator=_NOT_NEGATIVE)
    #: Seconds a pinged socket has to send anything back before it is closed (1011).
    ping_timeout: float = attrs.field(default=20.0, validator=_POSITIVE)
    #: Sockets accepted and still in their HTTP handshake. They count toward
    #: ``max_connections`` from accept; when either limit is reached, the oldest handshake in
    #: progress is dropped to make room (a silent client yields its place to a new one).
    max_handshakes: int = attrs.field(default=256, validator=_AT_LEAST_ONE)
    #: The bearer token of the HTTP API under ``/_verani/api`` (see :mod:`verani.api`); None
    #: (the default) turns the API off, and its paths answer 404 like any unknown path. Kept out
    #: of the repr, so that a logged config does not leak it.
    api_token: str | None = attrs.field(
        default=None,
        repr=False,
        validator=attrs.validators.optional(attrs.validators.min_len(1)),
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
    #: Client messages handed to rooms (the live inspector shows them per second).
    events_received: int = 0
    #: Frames queued for sockets (events, replies, pongs).
    frames_sent: int = 0


class Server:
    """A running server; made by :func:`open_server`."""

    def __init__(self, router: Router, supervisor: Supervisor, config: ServerConfig) -> None:
        self.router = router
        self.supervisor = supervisor
        self.config = config
        self.stats = ServerStats()
        self.host = ""
        self.port = 0
        self._connections: set[Connection] = set()
        # Sockets accepted and in their handshake, oldest first, each with the cancel scope
        # that drops it and when it was accepted.
        self._handshakes: dict[trio.CancelScope, float] = {}
        self._warned_at = -math.inf
        self._log_tokens = float(CLIENT_LOG_BURST)
        self._log_tokens_at = 0.0
        self._log_suppressed = 0
        self._per_room: dict[tuple[str, str], int] = {}
        self._live_sockets = 0
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
    def open_connections(self) -> int:
        """WebSockets open to rooms now."""
        return len(self._connections)

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
        """Hibernate awake rooms now (see :meth:`Supervisor.hibernate`). In a cluster, one
        instance (``room`` and ``instance`` given) is hibernated by whichever node owns it."""
        cluster = self.supervisor.cluster
        if cluster is not None and room is not None and instance is not None:
            inst = self.supervisor.instances.get((room, instance))
            if inst is None or cluster.epoch_of(room, instance) is None:
                try:
                    error = await cluster.remote_op(room, instance, ("hibernate",))
                except VeraniError as exc:
                    error = str(exc)
                return [(room, instance, error if isinstance(error, str) else None)]
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
        if isinstance(accepted, ApiCall):
            await self._serve_api(stream, accepted, remote)
            return
        if isinstance(accepted, LiveCall):
            ws = WebSocket(stream, trailing=accepted.trailing, max_message_size=live.MAX_MESSAGE)
            self._live_sockets += 1
            try:
                await live.serve_live(self, ws)
            finally:
                self._live_sockets -= 1
            return
        # Only what the connection needs lives on: the request head, its headers and the
        # handshake's locals are gone with _handshake's frame (memory per idle socket).
        route, meta, trailing, resume = accepted
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
        conn = Connection(self, ws, inst, meta, resume)
        inst.attached += 1
        cluster = self.supervisor.cluster
        if cluster is not None:
            conn.cluster_id = cluster.attach(conn)
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
            inst.attached -= 1
            self.supervisor.forget_if_idle(inst)
            if cluster is not None and conn.cluster_id is not None:
                cluster.detach(conn.cluster_id)
            left = self._per_room[key] - 1
            if left:
                self._per_room[key] = left
            else:
                del self._per_room[key]
            if not self._connections:
                self._no_connections.set()

    async def _handshake(
        self, stream: trio.SocketStream, remote: str
    ) -> tuple[Route, ConnectionMeta, bytes, ResumeRequest | None] | ApiCall | LiveCall | None:
        """Read and check the upgrade request, run ``extract_meta``, answer 101; or read an
        authorized request of the HTTP API, or upgrade the admin page's live socket, or answer
        a file of the admin page; or answer the refusal and return None."""
        cfg = self.config
        with trio.move_on_after(cfg.handshake_timeout) as timeout:
            head = await read_request_head(stream, cfg.max_request_head)
        if timeout.cancelled_caught:
            self.client_log(
                logging.INFO,
                "connection from %s: no complete HTTP request within %ss",
                remote,
                cfg.handshake_timeout,
            )
            return None
        if not isinstance(head, RequestHead):
            await self._answer(stream, *head, remote, "")
            return None
        conn, request = head.connection, head.request
        target = request.target.decode("ascii", "replace")
        path, query = split_target(target)
        if cfg.api_token is not None:
            if path == live.LIVE_PATH:
                return await self._live_upgrade(stream, head, remote, target)
            if live.is_admin_path(path):
                method = request.method.decode("ascii", "replace")
                await self._send_file(
                    stream, conn, live.static_answer(method, path), remote, target
                )
                return None
            if api.is_api_path(path):
                return await self._api_request(stream, head, path, remote, target)
        route = self.router.route(path)
        answer = (
            check_upgrade(request, route, path)
            or check_origin(request, route)
            or self._check_capacity(route)
        )
        if answer is not None:
            await self._answer(stream, conn, answer, remote, target)
            return None
        assert route is not None
        hreq = HandshakeRequest(
            path=path,
            query=query,
            headers=headers_of(request.headers),
            remote=remote,
            room=route.room.name,
            instance=route.instance,
        )
        with trio.move_on_after(cfg.handshake_timeout) as timeout:
            meta = await extract_meta(route.room, hreq, self._log_refusal, _log_room_error)
            if isinstance(meta, HttpAnswer):
                await self._answer(stream, conn, meta, remote, target, logged=True)
                return None
            await stream.send_all(accept_response(conn, hreq.headers["sec-websocket-key"]))
        if timeout.cancelled_caught:
            self.client_log(
                logging.INFO, "connection from %s: WebSocket handshake timed out", remote
            )
            return None
        assert isinstance(meta, ConnectionMeta)
        resume = resume_request(query) if route.room.recovery is not None else None
        return route, meta, head.trailing, resume

    async def _live_upgrade(
        self, stream: trio.SocketStream, head: RequestHead, remote: str, target: str
    ) -> LiveCall | None:
        """Upgrade the admin page's live socket (the token comes in its first message), or
        answer the refusal and return None."""
        conn, request = head.connection, head.request
        headers = headers_of(request.headers)
        answer = check_websocket(request, headers) or live.check_origin(headers)
        if answer is None and self._live_sockets >= live.MAX_LIVE:
            answer = HttpAnswer(503, "too many live inspector sockets are open; retry later")
        if answer is not None:
            await self._answer(stream, conn, answer, remote, target)
            return None
        with trio.move_on_after(self.config.handshake_timeout) as timeout:
            await stream.send_all(accept_response(conn, headers["sec-websocket-key"]))
        if timeout.cancelled_caught:
            return None
        return LiveCall(head.trailing)

    async def _send_file(
        self,
        stream: trio.SocketStream,
        conn: h11.Connection,
        answer: HttpAnswer,
        remote: str,
        target: str,
    ) -> None:
        if answer.status >= 400:
            await self._answer(stream, conn, answer, remote, target, linger=True)
            return
        with trio.move_on_after(self.config.close_timeout):
            await stream.send_all(answer.encode(conn))
            await _linger(stream)

    async def _api_request(
        self, stream: trio.SocketStream, head: RequestHead, path: str, remote: str, target: str
    ) -> ApiCall | None:
        """Check an HTTP API request (token, endpoint, body size) and read its body; or answer
        the refusal and return None. Runs in the handshake's slot and time limit, so that an
        API request that never completes is dropped like any slow handshake."""
        cfg, conn, request = self.config, head.connection, head.request
        assert cfg.api_token is not None
        headers = headers_of(request.headers)
        method = request.method.decode("ascii", "replace")
        resolved = api.authorize(headers, cfg.api_token) or api.resolve(
            method, path, self.supervisor.rooms, self.router.rules
        )
        if isinstance(resolved, HttpAnswer):
            await self._answer(stream, conn, resolved, remote, target, linger=True)
            return None
        definition = self.supervisor.rooms.get(resolved.room)
        limit = (definition.max_frame_size if definition else None) or cfg.max_frame_size
        length = api.declared_length(headers)
        body: bytes | HttpAnswer = api.too_large(limit)
        if length is None or length <= limit:
            with trio.move_on_after(cfg.handshake_timeout):
                # The answer if the time runs out before the body is read whole.
                body = api.error(408, "the request body did not come in time")
                body = await api.read_body(conn, stream, limit)
        if isinstance(body, HttpAnswer):
            await self._answer(stream, conn, body, remote, target, linger=True)
            return None
        return ApiCall(conn, resolved, body, target)

    async def _serve_api(self, stream: trio.SocketStream, call: ApiCall, remote: str) -> None:
        # Outside the handshake's slot: an emit waits for the room to wake and for the disk,
        # which may take longer than a handshake may.
        answer = await api.perform(self, call.endpoint, call.body)
        if answer.status >= 400:
            await self._answer(stream, call.connection, answer, remote, call.target, linger=True)
            return
        log.debug("%s %s from %s: %s", answer.status, call.target, remote, call.endpoint.action)
        with trio.move_on_after(self.config.close_timeout):
            await stream.send_all(answer.encode(call.connection))
            await _linger(stream)

    def _log_refusal(self, line: str) -> None:
        self.client_log(logging.INFO, "%s", line)

    def _check_capacity(self, route: Route | None) -> HttpAnswer | None:
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
            return HttpAnswer(
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
            return HttpAnswer(
                503,
                f"room {route.room.name}/{route.instance} is full; retry later",
                (("Retry-After", "5"),),
            )
        return None

    async def _answer(
        self,
        stream: trio.SocketStream,
        conn: h11.Connection,
        answer: HttpAnswer,
        remote: str,
        target: str,
        *,
        logged: bool = False,
        linger: bool = False,
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
            await stream.send_all(answer.encode(conn))
            if linger:
                await _linger(stream)


@attrs.frozen
class ApiCall:
    """An authorized request of the HTTP API, read whole: what :func:`api.perform` runs."""

    connection: h11.Connection
    endpoint: api.Endpoint
    body: bytes
    target: str


@attrs.frozen
class LiveCall:
    """An upgraded live socket of the admin page, with the bytes read past its request head."""

    trailing: bytes


#: Bytes of a request left unread that are read and dropped before the socket closes.
_LINGER_BYTES = 1024 * 1024


async def _linger(stream: trio.SocketStream) -> None:
    """Close our side, then read what the client still sends (a body we refused unread) until
    it closes: closing a socket with unread bytes sends a reset, which can destroy the answer
    before the client reads it. Bounded in bytes here, in time by the caller."""
    try:
        await stream.send_eof()
        dropped = 0
        while dropped < _LINGER_BYTES:
            data = await stream.receive_some(65536)
            if not data:
                return
            dropped += len(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return


def _log_room_error(line: str, exc: BaseException | None) -> None:
    # A room's extract_meta failing is the room's bug, not the client's: always logged.
    log.error("%s", line, exc_info=exc)


def _peer(stream: trio.SocketStream) -> str:
    try:
        host, port, *_ = stream.socket.getpeername()
    except (OSError, ValueError):
        return "unknown"
    return f"{host}:{port}"


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
    cluster: str | None = None,
    node_id: str | None = None,
    lease_seconds: float | None = None,
) -> AsyncIterator[Server]:
    """Serve ``rooms`` on ``host:port`` until the ``async with`` block ends.

    ``store`` is a :class:`Store` or a directory for a :class:`FileStore` (default ``.verani``)
    with the given ``durability`` (``"fsync"``: a saved change survives a power loss; ``"os"``:
    no fsync, it survives a crash of the process but not of the machine — for tests and dev).
    With a file store the server takes the store's lock (one server per store) and, when
    ``control`` is true, opens the local control endpoint ``verani hibernate`` talks to. Leaving
    the block shuts down gracefully: stop accepting, hibernate every room (a durable flush),
    close the sockets with 1001.

    ``cluster``, a ``redis://`` URL, makes this server one node of a cluster on that Redis
    (``node_id`` names it; see README, "Running more than one process"): room state lives in
    Redis (``store`` must then be None), and each room instance is owned by one node at a time.
    Leaving the block then also hands every room this node owns over (flush, lease released).
    """
    from .control import StoreLock, serve_control

    config = config or ServerConfig()
    rules = InstanceRules(config.max_instance_name, config.instance_pattern)
    router = Router(rooms, rules)
    node: ClusterNode | None = None
    store_obj: Store
    if cluster is not None:
        from .cluster.node import DEFAULT_LEASE_SECONDS, ClusterNode
        from .cluster.redis_store import RedisStore

        if store is not None:
            raise ServeError("a cluster keeps room state in Redis: give --cluster or --store")

        def fence(room: str, instance: str) -> int | None:
            return node.epoch_of(room, instance) if node is not None else None

        redis_store = RedisStore.from_url(cluster, fence=fence)
        node = ClusterNode(
            cluster,
            node_id,
            client=redis_store.client,
            lease_seconds=lease_seconds or DEFAULT_LEASE_SECONDS,
        )
        store_obj = redis_store
    else:
        store_obj = (
            store
            if isinstance(store, Store)
            else FileStore(store or ".verani", durability=durability)
        )
    lock = (
        await trio.to_thread.run_sync(StoreLock.acquire, store_obj.directory)
        if isinstance(store_obj, FileStore)
        else None
    )
    started = False
    try:
        # Before anything is served: what a crash left in the store's journal goes into the
        # documents, so every room wakes with every change it ever committed.
        await store_obj.recover()
        supervisor = Supervisor(
            router.rooms,
            store_obj,
            idle_timeout=idle_timeout,
            max_awake=config.max_awake_rooms,
            instance_rules=rules,
            cluster=node,
        )
        server = Server(router, supervisor, config)
        try:
            listeners = await trio.open_tcp_listeners(port, host=host)
        except OSError as exc:
            hint = (
                " (another program listens there, perhaps another verani server: stop it, or "
                "choose another port; port 0 picks a free one)"
                if exc.errno == errno.EADDRINUSE
                else ""
            )
            raise ServeError(
                f"cannot listen on {host}:{port}: {exc.strerror or exc}{hint}"
            ) from None
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
                started = True
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
            # A start that failed (the port in use, say) leaves no store behind it.
            lock.release(undo=not started)


async def _nursery_task(*, task_status: trio.TaskStatus[trio.Nursery]) -> None:
    # A nursery of its own for connections, so they can outlive (and be closed after) the rooms.
    async with trio.open_nursery() as nursery:
        task_status.started(nursery)
        await trio.sleep_forever()
