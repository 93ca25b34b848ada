"""Internal: the exceptions verani raises, as one family under :class:`VeraniError`.

Each error a user can cause has its own type, and its message names the thing at fault and says
what to do. Transport and OS errors are translated into these at the I/O edge, so callers catch
verani's errors, not trio's or the file system's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


class VeraniError(Exception):
    """Base class of every error verani raises on purpose."""


# --- room definitions -------------------------------------------------------------------------


class RoomDefinitionError(VeraniError, ValueError):
    """A room definition is invalid (bad name or path, unknown persisted key, clashing routes)."""


class RoomLoadError(VeraniError):
    """A room file could not be loaded (missing, syntax error, no rooms in it)."""


# --- the wire protocol ------------------------------------------------------------------------


class ProtocolError(VeraniError):
    """A client frame does not follow the wire protocol; it is dropped, never handled."""


class FrameTooLargeError(ProtocolError):
    """A client frame is over the size limit; the socket is closed with 1009."""


class FrameEncodeError(VeraniError, TypeError):
    """A room emitted data that cannot be encoded as a JSON frame."""


class WebSocketClosed(VeraniError):
    """A server-side WebSocket is closed: ``code`` and ``reason`` as the close handshake (or
    its absence, 1006) left them; ``violation`` when the peer broke the protocol and was closed
    for it."""

    def __init__(self, code: int, reason: str = "", *, violation: bool = False) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason
        self.violation = violation


class HandshakeRefused(VeraniError):
    """Raised by ``extract_meta`` to refuse a connection before the WebSocket upgrade.

    The client gets an HTTP answer with ``status`` (401 or 403 are the usual ones) and ``reason``
    as a short plain-text body; no room code runs for it.
    """

    def __init__(self, status: int = 403, reason: str = "forbidden") -> None:
        if not 400 <= status <= 599:
            raise ValueError(f"HandshakeRefused status must be a 4xx or 5xx code, not {status}")
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason


# --- persistence ------------------------------------------------------------------------------


class PersistenceError(VeraniError):
    """A persisted key could not be saved; the previous stored value is kept."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"cannot persist key {key!r}: {message}")
        self.key = key


class NotPersistableError(VeraniError, TypeError):
    """A value (or something inside it) cannot be written to the store.

    ``path`` names where inside the key's value the problem is, e.g. ``items[2].callback``.
    """

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class StoreError(VeraniError):
    """The store could not be read or written."""


@contextlib.contextmanager
def store_errors(what: str) -> Iterator[None]:
    """At the file system's edge: an :class:`OSError` raised inside becomes a
    :class:`StoreError` saying ``what`` could not be done, and why (httpcore's
    ``map_exceptions`` is the model)."""
    try:
        yield
    except OSError as exc:
        raise StoreError(f"{what}: {exc}") from exc


class CorruptDocumentError(StoreError):
    """A stored document cannot be read; it has been moved aside and the room starts afresh."""


class StoreLockedError(StoreError):
    """Another verani server already serves this store directory."""


class StoreUnavailableError(StoreError):
    """The store's server (Redis) cannot be reached or did not answer in time; nothing is
    known to be written, and the room retries its commit with backoff."""


class LeaseLostError(StoreError):
    """This node no longer holds the lease of a room instance (it expired or was never taken),
    so it may not write the instance's document; it stops serving the room."""

    def __init__(self, room: str, instance: str, message: str | None = None) -> None:
        super().__init__(
            message
            or f"this node no longer owns room {room}/{instance}: its lease is gone;"
            " it stops serving the room"
        )
        self.room = room
        self.instance = instance


class FencedError(LeaseLostError):
    """A write carried an epoch older than the instance's newest one: another node took the
    room over, and the write was refused (nothing of it is stored)."""

    def __init__(self, room: str, instance: str, ours: int, theirs: int | None) -> None:
        newer = f"a newer owner holds epoch {theirs}" if theirs is not None else "no epoch"
        super().__init__(
            room,
            instance,
            f"this node no longer owns room {room}/{instance}: {newer} (ours: {ours});"
            " it stops serving the room",
        )
        self.ours = ours
        self.theirs = theirs


# --- the running server and its control endpoint ----------------------------------------------


class ControlError(VeraniError):
    """A request to a running server (from the CLI) failed."""


class NoServerError(ControlError):
    """No running server serves the given store."""


class RoomNotFoundError(ControlError, LookupError):
    """No room (or room instance) has the given name."""


class RemoteError(VeraniError):
    """A request to a server's HTTP API (:mod:`verani.remote`) failed.

    ``status`` is the HTTP status the server answered (None when no answer came: the server
    could not be reached or did not answer in time), ``message`` the server's ``error`` text
    (or why no answer came), ``body`` the whole JSON answer when there was one.
    """

    def __init__(
        self, status: int | None, message: str, body: dict[str, Any] | None = None
    ) -> None:
        super().__init__(f"HTTP {status}: {message}" if status is not None else message)
        self.status = status
        self.message = message
        self.body = body or {}


class ServeError(VeraniError):
    """The server could not start (address in use, store locked or unusable)."""


class CallCycleError(VeraniError, RuntimeError):
    """A room called (directly or through other rooms) itself from inside its own turn.

    The call would wait for the turn that is waiting for it; use ``ctx.actor`` for the room
    you are in.
    """


# --- clients ---------------------------------------------------------------------------------


class ClientError(VeraniError):
    """Raised by a room's handler to refuse a client's event with a message that client reads.

    The sender gets ``verani:error`` with ``code`` (``"bad_request"`` unless given), ``event`` and
    ``message`` (``str(error)``). It is the room's answer, not a fault: logged in one line, never
    passed to ``on_error``. Anything else a handler raises reaches the sender as code
    ``handler_error`` with a generic message (the details stay in the server log) and goes to
    ``on_error``.
    """

    def __init__(self, message: str, *, code: str = "bad_request") -> None:
        super().__init__(message)
        self.code = code


class CloseCodeError(VeraniError, ValueError):
    """A room asked to close a socket (``ctx.close``, ``actor.disconnect``) with a close code
    WebSocket does not let an application send. Raised at the call, which closes nothing."""

    def __init__(self, code: object) -> None:
        super().__init__(
            f"close code {code!r} is not allowed: use 1000 (normal closure) or 3000-4999 "
            f"(3000-3999 registered with IANA, 4000-4999 private to the application)"
        )
        self.code = code


class NotConnectedError(VeraniError):
    """The client could not do what was asked (not connected in time, gave up, closed)."""


class AckError(VeraniError):
    """The answer to a client's ``call`` is an error: ``code`` says which, ``str(error)`` is its
    message.

    Codes the server sends: ``handler_error`` (the handler failed; the details are in the
    server's log), ``unknown_event`` (the room has no handler for the event), ``persist_error``
    (the handler ran but its changes could not be saved), or the code of a
    :class:`ClientError` the handler raised. Codes the client makes itself:
    ``connection_lost`` (the connection dropped after the call was sent and before its answer
    came: the room may or may not have handled it) and ``queue_full`` (the call was dropped
    from the send queue while offline, unsent).
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class ClientClosed(VeraniError):
    """The server closed a test client's socket; ``code`` and ``reason`` say how."""

    def __init__(self, code: int | None, reason: str | None) -> None:
        super().__init__(f"the server closed the socket: {code} {reason or ''}".rstrip())
        self.code = code
        self.reason = reason


class RoomCrashedError(VeraniError):
    """The room's machinery failed while a call to it was pending; its sockets got 1011."""


@contextlib.contextmanager
def single_error() -> Iterator[None]:
    """Re-raise a lone exception out of a nursery's exception group as itself.

    The context managers verani offers (``open_server``, ``open_client``,
    ``open_test_server``) run the caller's block inside a nursery; without this, an error raised
    in the block would reach the caller wrapped in an ``ExceptionGroup``.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        leaves = list(leaf_exceptions(group))
        if len(leaves) == 1:
            raise leaves[0] from None
        raise


def leaf_exceptions(group: BaseExceptionGroup[BaseException]) -> Iterator[BaseException]:
    """The exceptions inside ``group`` and its nested groups, in order."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from leaf_exceptions(exc)
        else:
            yield exc
