"""The Python client: Verani's ``VeraniClient``, Trio-style.

::

    async with open_client("ws://127.0.0.1:8787/ws/counter?userId=alice") as client:
        client.on("counter:update", lambda data: print("count", data["count"]))
        await client.wait_for_connection()
        client.emit("counter:increment", {"amount": 1})
        sync = await client.receive("counter:sync")
        total = await client.call("counter:increment", {"amount": 1})  # the handler's answer

The client owns its tasks in the nursery of ``open_client``. It reconnects with exponential
backoff, keeps the connection alive with ``{"type": "ping"}`` frames, and queues ``emit`` calls
made while it is not connected (bounded: the oldest are dropped first), flushing them in order
once connected; :meth:`VeraniClient.call` sends an event and waits for the room's answer (an
acknowledgement). Defaults are Verani's, and so are its zero values: ``max_attempts=0``
retries forever, ``ping_interval=0`` sends no keepalive.

A ``wss://`` URL is TLS with certificate verification (``ssl_context=`` to choose what to trust);
the client and ``verani emit`` both connect through :func:`open_stream`.
"""

from __future__ import annotations

import logging
import random
import ssl
import urllib.parse
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Literal

import attrs
import trio
import trio_websocket

from .errors import AckError, NotConnectedError, ProtocolError, leaf_exceptions, single_error
from .protocol import (
    PING_MESSAGE,
    AckAnswer,
    ack_answer,
    decode_server_frame,
    encode_client_event,
    is_pong,
    server_event,
)
from .recovery import SESSION_EVENT

__all__ = ["AckError", "NotConnectedError", "ReconnectOptions", "VeraniClient", "open_client"]

log = logging.getLogger("verani.client")

State = Literal["connecting", "connected", "disconnected", "reconnecting", "error"]
Callback = Callable[[Any], object]
#: A frame waiting to be sent: its text, and the id of the call it carries (None: an emit).
Queued = tuple[str, int | None]


@attrs.define(eq=False)
class _PendingCall:
    """A :meth:`VeraniClient.call` awaiting its answer."""

    done: trio.Event = attrs.field(factory=trio.Event)
    #: Written to a connection: from then on, losing that connection loses the answer.
    sent: bool = False
    answer: AckAnswer | None = None
    error: BaseException | None = None

    def finish(self, answer: AckAnswer | None = None, error: BaseException | None = None) -> None:
        if not self.done.is_set():
            self.answer, self.error = answer, error
            self.done.set()


#: What :func:`open_stream` returns: TCP for ``ws://``, TLS over TCP for ``wss://``.
Stream = trio.SocketStream | trio.SSLStream[trio.SocketStream]


@attrs.frozen
class ReconnectOptions:
    """Verani's reconnection defaults, plus jitter.

    The delay before reconnection attempt ``n`` (1-based) is
    ``min(initial_delay * multiplier ** (n - 1), max_delay)``, scaled by a random factor in
    ``[1 - jitter, 1 + jitter]`` so that many clients dropped together do not return together.
    After ``max_attempts`` failed attempts the client's state becomes ``error``;
    ``max_attempts=0`` (as in Verani) means no limit: the client retries forever.
    """

    enabled: bool = True
    max_attempts: int = 10
    initial_delay: float = 1.0
    max_delay: float = 30.0
    multiplier: float = 1.5
    jitter: float = 0.1

    def delay(self, attempt: int) -> float:
        """Seconds to wait before reconnection attempt ``attempt`` (1-based)."""
        base = min(self.initial_delay * self.multiplier ** (attempt - 1), self.max_delay)
        return base * random.uniform(1 - self.jitter, 1 + self.jitter)

    def gives_up_after(self, failures: int) -> bool:
        """Whether ``failures`` failed attempts in a row are enough to stop trying."""
        if not self.enabled:
            return True
        return self.max_attempts > 0 and failures > self.max_attempts


@attrs.frozen
class WebSocketURL:
    """A ``ws://`` or ``wss://`` URL, split the way connecting to it needs."""

    url: str
    secure: bool
    host: str
    port: int
    resource: str

    @classmethod
    def parse(cls, url: str) -> WebSocketURL:
        """Split ``url``; raises :class:`ValueError` if it is not ``ws://`` or ``wss://`` with a
        host."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise ValueError(f"client URL must be ws://HOST[:PORT]/PATH or wss://..., not {url!r}")
        secure = parts.scheme == "wss"
        resource = parts.path or "/"
        if parts.query:
            resource += "?" + parts.query
        port = parts.port or (443 if secure else 80)
        return cls(url, secure, parts.hostname, port, resource)

    @property
    def host_header(self) -> str:
        """The ``Host`` header: the port is named unless it is the scheme's default."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.port == (443 if self.secure else 80):
            return host
        return f"{host}:{self.port}"


async def open_stream(url: WebSocketURL, ssl_context: ssl.SSLContext | None = None) -> Stream:
    """Open the byte stream a WebSocket to ``url`` runs over: TCP, and for ``wss://`` TLS over
    it with the handshake done, so the certificate is verified (by ``ssl_context``, or the
    system's CAs) before a byte of the request — path, query, token — is sent.

    It sets no deadline of its own: call it under the one that also bounds the WebSocket
    handshake that follows. On failure nothing is left open. A failed TLS handshake raises
    :class:`NotConnectedError` naming the cause (``certificate verify failed: ...``).
    """
    tcp = await trio.open_tcp_stream(url.host, url.port)
    if not url.secure:
        return tcp
    tls = trio.SSLStream(
        tcp,
        ssl_context or ssl.create_default_context(),
        server_hostname=url.host,
        https_compatible=True,
    )
    try:
        await tls.do_handshake()
    except trio.BrokenResourceError as exc:
        await trio.aclose_forcefully(tcp)
        cause = exc.__cause__ or exc
        raise NotConnectedError(
            f"TLS handshake with {url.host}:{url.port} failed: {describe_connect_error(cause)}"
        ) from exc
    except BaseException:
        await trio.aclose_forcefully(tcp)
        raise
    return tls


async def websocket_over(
    nursery: trio.Nursery, stream: Stream, url: WebSocketURL
) -> trio_websocket.WebSocketConnection:
    """The WebSocket handshake for ``url`` over ``stream`` (from :func:`open_stream`).

    trio-websocket raises a refused handshake from its reader task, which runs in ``nursery``:
    it reaches the caller as an exception group out of that nursery. The stream stays the
    caller's to close (trio-websocket leaves it open when the server refuses).
    """
    return await trio_websocket.wrap_client_stream(
        nursery, stream, url.host_header, url.resource, message_queue_size=256
    )


def describe_connect_error(exc: BaseException, timeout: float | None = None) -> str:
    """Why connecting failed, in a few words that are never empty.

    ``timeout`` is the deadline that a :class:`trio.TooSlowError` means was passed. Exception
    groups are described by their leaves; an exception with no message by its cause, else by
    its type name.
    """
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(
            dict.fromkeys(describe_connect_error(e, timeout) for e in leaf_exceptions(exc))
        )
    if isinstance(exc, trio_websocket.ConnectionRejected):
        body = (exc.body or b"").decode(errors="replace").strip()
        return f"HTTP {exc.status_code} {body}".rstrip()
    if isinstance(exc, trio.TooSlowError):
        return "timed out" if timeout is None else f"timed out after {timeout:g}s"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLEOFError):
        return "the peer closed the connection during the TLS handshake"
    if isinstance(exc, OSError) and isinstance(exc.__cause__, BaseExceptionGroup):
        # trio.open_tcp_stream: "all attempts to connect to H:P failed"; the leaves say why.
        return describe_connect_error(exc.__cause__, timeout)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror  # without the "[Errno 111]" prefix
    text = str(exc)
    if text:
        return text
    if exc.__cause__ is not None:
        return f"{type(exc).__name__}: {describe_connect_error(exc.__cause__, timeout)}"
    return type(exc).__name__


class VeraniClient:
    """A connection to one room instance that survives drops. Made by :func:`open_client`."""

    def __init__(
        self,
        url: str,
        *,
        reconnection: ReconnectOptions,
        max_queue_size: int,
        connection_timeout: float,
        ping_interval: float,
        pong_timeout: float,
        ssl_context: ssl.SSLContext | None = None,
        recover: bool = False,
    ) -> None:
        self._address = WebSocketURL.parse(url)
        #: Whether to ask for the session back on every reconnect (rooms with ``recovery``).
        self.recover = recover
        #: Whether the current connection got its session back, with what it had missed: set
        #: when the room's ``verani:session`` arrives, first on every connection.
        self.recovered = False
        # The session's token and the offset of the last event frame handled.
        self._token: str | None = None
        self._offset = 0
        if ssl_context is not None and not self._address.secure:
            raise ValueError(f"ssl_context is for wss:// URLs; {url!r} is not TLS")
        self.url = url
        #: What a ``wss://`` connection trusts; made once, not per connection attempt.
        self.ssl_context = ssl_context
        if self._address.secure and ssl_context is None:
            self.ssl_context = ssl.create_default_context()
        self.reconnection = reconnection
        self.connection_timeout = connection_timeout
        self.ping_interval = ping_interval
        self.pong_timeout = pong_timeout
        self.state: State = "connecting"
        self.reconnect_attempts = 0
        self._queue: deque[Queued] = deque(maxlen=max_queue_size)
        self._calls: dict[int, _PendingCall] = {}
        self._next_call_id = 0
        self._queue_changed = trio.Event()
        self._state_changed = trio.Event()
        self._listeners: dict[str, list[tuple[Callback, bool]]] = {}
        # receive() and events() waiting for events: (event or None, channel, just one?)
        self._waiters: list[tuple[str | None, trio.MemorySendChannel[tuple[str, Any]], bool]] = []
        self._last_pong = 0.0
        #: Why the latest attempt to connect failed; None once one succeeds.
        self._last_failure: str | None = None
        # Events no receive() has taken yet (bounded), so an event that arrives just before
        # receive() is called — the sync sent on connecting, say — is not missed.
        self._backlog: deque[tuple[str, dict[str, Any]]] = deque(maxlen=256)
        self._now = False  # reconnect(): skip the backoff wait once
        self._ws: trio_websocket.WebSocketConnection | None = None
        self._session_scope: trio.CancelScope | None = None
        self._wanted = True  # False after disconnect(): stay down until reconnect()
        self._wake = trio.Event()
        self._closed = False
        self.on_open: Callable[[], object] | None = None
        self.on_close: Callable[[int | None, str | None], object] | None = None
        self.on_error: Callable[[BaseException], object] | None = None
        self.on_state_change: Callable[[State], object] | None = None

    # --- listeners --------------------------------------------------------------------------

    def on(self, event: str, callback: Callback) -> None:
        """Call ``callback(data)`` for every ``event`` from the server."""
        self._listeners.setdefault(event, []).append((callback, False))

    def once(self, event: str, callback: Callback) -> None:
        """Call ``callback(data)`` for the next ``event`` only."""
        self._listeners.setdefault(event, []).append((callback, True))

    def off(self, event: str, callback: Callback | None = None) -> None:
        """Remove ``callback`` (or every callback) of ``event``."""
        if callback is None:
            self._listeners.pop(event, None)
            return
        kept = [(cb, once) for cb, once in self._listeners.get(event, []) if cb is not callback]
        self._listeners[event] = kept

    async def receive(self, event: str | None = None) -> dict[str, Any]:
        """The oldest event not taken by an earlier ``receive`` (of that name, when given),
        waiting for one if there is none; returns its data.

        Events are kept from the start (the last 256), so nothing that arrived between
        ``wait_for_connection()`` and this call is missed. Raises :class:`NotConnectedError` if the
        client is closed first.
        """
        for i, (name, data) in enumerate(self._backlog):
            if event is None or name == event:
                del self._backlog[i]
                return data
        send, recv = trio.open_memory_channel[tuple[str, Any]](1)
        entry = (event, send, True)
        self._waiters.append(entry)
        try:
            with recv:
                _, data = await recv.receive()
        except trio.EndOfChannel:
            raise NotConnectedError("the client was closed") from None
        finally:
            if entry in self._waiters:
                self._waiters.remove(entry)
        result: dict[str, Any] = data
        return result

    async def events(self) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """Every event from now on, as ``(name, data)``, until the client is closed.

        Events beyond 256 not yet consumed are dropped with a warning.
        """
        send, recv = trio.open_memory_channel[tuple[str, Any]](256)
        entry = (None, send, False)
        self._waiters.append(entry)
        try:
            with recv:
                async for item in recv:
                    yield item
        finally:
            if entry in self._waiters:
                self._waiters.remove(entry)

    # --- sending ----------------------------------------------------------------------------

    def emit(self, event: str, data: Any = None) -> None:
        """Send ``{"type": event, "data": data}`` now, or as soon as the client is connected.

        Never waits. While not connected at most ``max_queue_size`` frames wait; past that the
        oldest is dropped (as Verani's client does), with a warning.
        """
        if self._closed:
            raise NotConnectedError("the client is closed")
        self._enqueue((encode_client_event(event, data), None))

    async def call(self, event: str, data: Any = None, *, timeout: float = 10.0) -> Any:
        """Send ``event`` as :meth:`emit` does, with an ``"id"``, and return the room's answer:
        what its handler returned, once the room's changes are saved.

        A call made while not connected waits in the send queue like an emit, and is sent once
        connected; ``timeout`` (seconds) counts from the call, offline time included. Raises
        :class:`AckError` (its ``code`` says why) when the answer is an error, when the
        connection drops after the call was sent and before its answer came
        (``connection_lost``: the room may or may not have handled it; it is not sent again),
        or when the call is pushed out of a full send queue (``queue_full``);
        :class:`trio.TooSlowError` after ``timeout`` (a call not yet sent by then never is);
        :class:`NotConnectedError` when the client is closed.
        """
        if self._closed:
            raise NotConnectedError("the client is closed")
        self._next_call_id += 1
        call_id = self._next_call_id
        entry: Queued = (encode_client_event(event, data, ack_id=call_id), call_id)
        pending = self._calls[call_id] = _PendingCall()
        try:
            self._enqueue(entry)
            with trio.fail_after(timeout):
                await pending.done.wait()
        finally:
            del self._calls[call_id]
            if entry in self._queue:
                # Timed out or cancelled before it was sent: no one would read its answer.
                self._queue.remove(entry)
        if pending.error is not None:
            raise pending.error
        answer = pending.answer
        assert answer is not None
        if answer.error is not None:
            raise AckError(str(answer.error.get("code")), str(answer.error.get("message")))
        return answer.data

    def _enqueue(self, entry: Queued) -> None:
        queue = self._queue
        if len(queue) == queue.maxlen:
            log.warning("%s: send queue full (%d); dropping the oldest frame", self.url, len(queue))
            _, dropped = queue[0]
            if dropped is not None and dropped in self._calls:
                self._calls[dropped].finish(
                    error=AckError("queue_full", "the call was dropped from a full send queue")
                )
        queue.append(entry)
        self._queue_changed.set()

    @property
    def queued(self) -> int:
        """Frames waiting to be sent."""
        return len(self._queue)

    # --- connection state -------------------------------------------------------------------

    def is_connected(self) -> bool:
        """Whether the client is connected now."""
        return self.state == "connected"

    async def wait_for_connection(self, timeout: float | None = None) -> None:
        """Return once connected; raise :class:`NotConnectedError` after ``timeout`` seconds
        (default ``2 * connection_timeout``), or when the client gives up (state ``error``), is
        disconnected or closed. The error says why the latest attempt to connect failed."""
        limit = 2 * self.connection_timeout if timeout is None else timeout
        with trio.move_on_after(limit) as scope:
            while self.state != "connected":
                if self.state == "error":
                    raise NotConnectedError(
                        f"{self.url}: gave up after {self.reconnect_attempts} reconnection "
                        f"attempts{self._why_not_connected()}"
                    )
                if self._closed or not self._wanted:
                    raise NotConnectedError(f"{self.url}: the client was disconnected")
                await self._state_changed.wait()
        if scope.cancelled_caught:
            raise NotConnectedError(
                f"{self.url}: not connected within {limit:g}s (state {self.state})"
                f"{self._why_not_connected()}"
            )

    def _why_not_connected(self) -> str:
        # Without it, a client that retried for 20 s against a stopped server says only that
        # it is not connected, not that every attempt was refused.
        if self._last_failure is None:
            return ""
        return f"; the last attempt failed: {self._last_failure}"

    def reconnect(self) -> None:
        """Drop the current connection (if any) and connect again at once, with fresh attempts."""
        self._wanted = True
        self._now = True
        self.reconnect_attempts = 0
        if self._session_scope is not None:
            self._session_scope.cancel()
        self._wake.set()

    def disconnect(self) -> None:
        """Close the connection and stay disconnected (queued frames are kept) until
        :meth:`reconnect`."""
        self._wanted = False
        if self._session_scope is not None:
            self._session_scope.cancel()
        self._wake.set()
        self._set_state("disconnected")

    def _set_state(self, state: State) -> None:
        if state == self.state:
            return
        self.state = state
        self._state_changed.set()
        self._state_changed = trio.Event()
        self._callback("on_state_change", self.on_state_change, state)

    def _callback(self, what: str, fn: Callable[..., object] | None, *args: Any) -> None:
        if fn is None:
            return
        try:
            fn(*args)
        except Exception as exc:
            # A listener's bug must not take the connection down with it.
            log.error(
                "%s: %s callback raised %s: %s",
                self.url,
                what,
                type(exc).__name__,
                exc,
                exc_info=exc,
            )

    # --- the connection loop ----------------------------------------------------------------

    async def _run(self) -> None:
        failures = 0
        while not self._closed:
            if not self._wanted:
                self._wake = trio.Event()
                await self._wake.wait()
                self._now, failures = False, 0
                continue
            self._set_state("connecting" if failures == 0 else "reconnecting")
            error = await self._session()
            if error is not None:
                self._callback("on_error", self.on_error, error)
                failures += 1
            else:
                failures = 1 if self._wanted else 0  # a dropped connection: reconnect with backoff
            if not self._wanted or self._closed:
                continue
            if self._now:  # reconnect() asked for a new connection now
                self._now, failures = False, 0
                continue
            if self.reconnection.gives_up_after(failures):
                self._set_state("error")
                self._wanted = False
                continue
            self.reconnect_attempts = failures
            self._set_state("reconnecting")
            self._wake = trio.Event()
            with trio.move_on_after(self.reconnection.delay(failures)):
                await self._wake.wait()  # reconnect() cuts the wait short

    async def _session(self) -> NotConnectedError | None:
        """One connection, from connecting to its end; returns why connecting failed, if it did."""
        address = self._address
        self.recovered = False  # until this connection's verani:session says otherwise
        if self.recover and self._token is not None:
            ask = urllib.parse.urlencode({"recover": self._token, "offset": self._offset})
            join = "&" if "?" in address.resource else "?"
            address = attrs.evolve(address, resource=f"{address.resource}{join}{ask}")
        stream: Stream | None = None
        failure: BaseException | None = None
        with trio.CancelScope() as scope:
            self._session_scope = scope
            try:
                async with trio.open_nursery() as nursery:
                    with trio.fail_after(self.connection_timeout):
                        stream = await open_stream(address, self.ssl_context)
                        ws = await websocket_over(nursery, stream, address)
                    self._ws = ws
                    self.reconnect_attempts = 0
                    self._last_failure = None
                    self._set_state("connected")
                    self._callback("on_open", self.on_open)
                    nursery.start_soon(self._writer, ws)
                    if self.ping_interval > 0:  # 0: no keepalive, as in Verani
                        nursery.start_soon(self._keepalive, ws)
                    try:
                        await self._reader(ws)
                    finally:
                        self._lose_sent_calls()
                        if ws.closed is None:
                            # Our side ends it (disconnect, reconnect, close): say so with 1000.
                            # The close frame goes out at once; the reply is not awaited long.
                            with trio.CancelScope(shield=True), trio.move_on_after(0.2):
                                await ws.aclose(1000)
                        nursery.cancel_scope.cancel()
            except* (
                OSError,
                trio.TooSlowError,
                trio_websocket.HandshakeError,
                NotConnectedError,
            ) as group:
                failure = group.exceptions[0]
            finally:
                self._session_scope = None
                if stream is not None:
                    # trio-websocket leaves the socket open when the server refuses the
                    # handshake or goes away; the socket is ours, so close it. Shielded: after
                    # reconnect() or disconnect() this scope is cancelled, and the Cancelled
                    # of the close would skip the rest of this block (on_close, the state).
                    with trio.CancelScope(shield=True):
                        await trio.aclose_forcefully(stream)
                ws_now, self._ws = self._ws, None
                if ws_now is not None:
                    closed = ws_now.closed
                    if self.state == "connected":
                        self._set_state("disconnected")
                    self._callback(
                        "on_close",
                        self.on_close,
                        closed.code if closed else 1006,
                        closed.reason if closed else None,
                    )
        del scope
        if failure is None or ws_now is not None:
            return None  # connected, then dropped: not a failed attempt
        cause = self._last_failure = describe_connect_error(failure, self.connection_timeout)
        error = NotConnectedError(f"cannot connect to {self.url}: {cause}")
        error.__cause__ = failure
        return error

    def _lose_sent_calls(self) -> None:
        """The connection is gone: the calls written to it will get no answer on the next one
        (the room answers the socket that asked), so they fail now rather than at their
        timeout. Calls still queued are sent on the next connection."""
        for pending in self._calls.values():
            if pending.sent:
                pending.finish(
                    error=AckError(
                        "connection_lost",
                        "the connection dropped before the answer came; the room may or may "
                        "not have handled the call",
                    )
                )

    async def _reader(self, ws: trio_websocket.WebSocketConnection) -> None:
        while True:
            try:
                message = await ws.get_message()
            except trio_websocket.ConnectionClosed:
                return
            try:
                frame = decode_server_frame(message)
            except ProtocolError as exc:
                log.warning("%s: %s; ignored", self.url, exc)
                continue
            if is_pong(frame):
                self._last_pong = trio.current_time()
                continue
            answer = ack_answer(frame)
            if answer is not None:
                # An answer to a call that timed out (or to another client's id) has no taker.
                pending = self._calls.get(answer.id) if isinstance(answer.id, int) else None
                if pending is not None:
                    pending.finish(answer)
                continue
            event = server_event(frame)
            if event is not None:
                if event[0] == SESSION_EVENT:
                    self._new_session(event[1])
                self._dispatch(*event)
                offset = frame.get("offset")
                if isinstance(offset, int) and not isinstance(offset, bool):
                    self._offset = offset  # handled: a recovery resumes after it

    def _new_session(self, data: dict[str, Any]) -> None:
        token, offset = data.get("token"), data.get("offset")
        if isinstance(token, str) and isinstance(offset, int):
            self._token, self._offset = token, offset
            self.recovered = data.get("recovered") is True

    def _dispatch(self, name: str, data: dict[str, Any]) -> None:
        listeners = self._listeners.get(name, [])
        if any(once for _, once in listeners):
            self._listeners[name] = [(cb, once) for cb, once in listeners if not once]
        for callback, _ in listeners:
            self._callback(f"listener of {name!r}", callback, data)
        taken = False
        for entry in list(self._waiters):
            event, send, just_one = entry
            if event is not None and event != name:
                continue
            if just_one:
                if taken:
                    continue  # one event satisfies one receive(); later ones wait for more
                taken = True
                self._waiters.remove(entry)
            try:
                send.send_nowait((name, data))
            except trio.WouldBlock:
                log.warning("%s: a slow events() reader missed event %r", self.url, name)
            except trio.ClosedResourceError:
                pass
        if not taken:
            self._backlog.append((name, data))

    async def _writer(self, ws: trio_websocket.WebSocketConnection) -> None:
        while True:
            while self._queue:
                entry = self._queue[0]
                frame, call_id = entry
                if call_id is not None and call_id in self._calls:
                    # Before the write: a write cancelled part-way may still have reached the
                    # server, so from here losing the connection may lose the answer.
                    self._calls[call_id].sent = True
                try:
                    await ws.send_message(frame)
                except trio_websocket.ConnectionClosed:
                    return  # keep the frame: it is sent after reconnecting (emits only)
                if self._queue and self._queue[0] is entry:
                    self._queue.popleft()
            self._queue_changed = trio.Event()
            await self._queue_changed.wait()

    async def _keepalive(self, ws: trio_websocket.WebSocketConnection) -> None:
        self._last_pong = trio.current_time()
        next_ping = self._last_pong + self.ping_interval
        while True:
            # Wake for the next ping, or exactly when the silence becomes too long.
            silent_limit = self._last_pong + self.ping_interval + self.pong_timeout
            await trio.sleep_until(min(next_ping, silent_limit))
            now = trio.current_time()
            if now >= self._last_pong + self.ping_interval + self.pong_timeout:
                log.warning("%s: no pong for %.1fs; reconnecting", self.url, now - self._last_pong)
                await trio.aclose_forcefully(ws._stream)
                return
            if now >= next_ping:
                next_ping = now + self.ping_interval
                try:
                    await ws.send_message(PING_MESSAGE)
                except trio_websocket.ConnectionClosed:
                    return

    async def _aclose(self) -> None:
        self._closed = True
        self._wanted = False
        for _, send, _ in self._waiters:
            send.close()
        for pending in self._calls.values():
            pending.finish(error=NotConnectedError("the client was closed"))
        if self._session_scope is not None:
            self._session_scope.cancel()
        self._wake.set()
        self._set_state("disconnected")


@asynccontextmanager
async def open_client(
    url: str,
    *,
    reconnection: ReconnectOptions | None = None,
    max_queue_size: int = 100,
    connection_timeout: float = 10.0,
    ping_interval: float = 5.0,
    pong_timeout: float = 5.0,
    ssl_context: ssl.SSLContext | None = None,
    recover: bool = False,
) -> AsyncIterator[VeraniClient]:
    """Connect to ``url`` (and keep reconnecting) for the duration of the ``async with`` block.

    Returns at once; ``await client.wait_for_connection()`` to wait for the first connection.
    Leaving the block closes the connection and ends the client's tasks.

    ``connection_timeout`` bounds each attempt: TCP connect, TLS handshake and WebSocket
    handshake together. Every ``ping_interval`` seconds a ``{"type": "ping"}`` frame is sent,
    and a server silent for ``ping_interval + pong_timeout`` is dropped (and reconnected);
    ``ping_interval=0`` turns the keepalive off. ``wss://`` URLs are TLS with certificate
    verification: ``ssl_context`` says what to trust (default: ``ssl.create_default_context()``,
    the system's CAs); passing one with a ``ws://`` URL is a :class:`ValueError`.

    ``recover=True``, for rooms with ``recovery``: the client keeps its session's token and the
    offset of the last event it handled, and asks for the session back on every reconnect, so
    it gets the events it missed, in order, before new ones; ``client.recovered`` says whether
    the current connection got it back.
    """
    client = VeraniClient(
        url,
        reconnection=reconnection or ReconnectOptions(),
        max_queue_size=max_queue_size,
        connection_timeout=connection_timeout,
        ping_interval=ping_interval,
        pong_timeout=pong_timeout,
        ssl_context=ssl_context,
        recover=recover,
    )
    with single_error():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client._run)
            try:
                yield client
            finally:
                await client._aclose()
                nursery.cancel_scope.cancel()
