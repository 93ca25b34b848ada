"""Internal: sessions (one per connected socket) and emit targeting: bookkeeping, no I/O of its
own (:func:`coalesced` only decides when the sockets' writes are made).

A session outlives its room's hibernation, as a Durable Object's socket attachment does: the meta
stays with the socket, and the room finds its sessions again when it is revived.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Protocol

import attrs

from .flow import Credit

if TYPE_CHECKING:
    from .recovery import SessionLog


@attrs.define(eq=False)
class ConnectionMeta:
    """Who is on the other end of a socket. ``extract_meta`` may return a subclass with more fields.

    ``channels`` lists the channels the socket receives; a socket-level emit uses its first one.
    """

    user_id: str
    client_id: str
    channels: list[str] = attrs.field(factory=lambda: ["default"])


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


class FrameSink(Protocol):
    """Where a session's outgoing frames go: the socket's bounded outbound queue."""

    def send_frame(self, frame: bytes) -> None:
        """Send an encoded frame without waiting (written at once, or queued); past the socket's
        credit, close it instead. Inside :func:`coalesced`, a write may wait for the block's
        end (:func:`defer_write`)."""

    def close(self, code: int, reason: str) -> None:
        """Ask for the socket to be closed with ``code``; returns at once. With a code a room
        chooses (1000, 3000-4999) or 1001, what is queued is sent first; with an error code,
        what is queued is dropped and the Close frame goes next."""

    def over_budget(self) -> None:
        """The frames held for this socket by the room's output gate took it past its byte
        allowance: close it (1008) as a reader too slow for what it is sent."""


@attrs.define(eq=False)
class Session:
    """One socket's presence in one room instance: who it is, where its frames go, and its
    flow control (owned by the connection; the room's output gate and turns spend and return
    it)."""

    meta: ConnectionMeta
    sink: FrameSink
    credit: Credit
    #: Its recovery log, in a room with connection-state recovery (None: no recovery).
    recovery: SessionLog | None = None

    @property
    def detached(self) -> bool:
        """Whether its socket dropped and it waits for its client to recover it."""
        return self.sink is DETACHED

    @property
    def first_channel(self) -> str:
        """The channel socket-level emits are addressed to (``default`` when it has none)."""
        return self.meta.channels[0] if self.meta.channels else "default"


class _Detached:
    """The sink of a session whose socket dropped: its frames are only kept (its log)."""

    def send_frame(self, frame: bytes) -> None:
        pass

    def close(self, code: int, reason: str) -> None:
        pass

    def over_budget(self) -> None:
        pass


#: The sink of every detached session.
DETACHED: FrameSink = _Detached()


class Sessions:
    """The sessions of one room instance, in connection order."""

    def __init__(self) -> None:
        self._by_client: dict[str, Session] = {}

    def __len__(self) -> int:
        return len(self._by_client)

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._by_client.values()))

    def __contains__(self, session: object) -> bool:
        return (
            isinstance(session, Session) and self._by_client.get(session.meta.client_id) is session
        )

    def has_client(self, client_id: str) -> bool:
        """Whether a socket with ``client_id`` is connected."""
        return client_id in self._by_client

    def add(self, session: Session) -> None:
        """Register a session; a client id can only be connected once per room instance."""
        if session.meta.client_id in self._by_client:
            raise ValueError(f"client id {session.meta.client_id!r} is already connected")
        self._by_client[session.meta.client_id] = session

    def meta_changed(self, meta: ConnectionMeta) -> None:
        """A session's meta changed (its channels): a cluster records it for the next owner.
        Nothing to do in one process."""

    def left(self, session: Session) -> None:
        """The socket of ``session`` is gone (it leaves, or waits detached for its client): a
        cluster stops counting it there. Nothing to do in one process."""

    def get(self, client_id: str) -> Session | None:
        """The session of ``client_id``, if it is connected."""
        return self._by_client.get(client_id)

    def remove(self, session: Session) -> bool:
        """Forget a session; returns whether it was there."""
        if self._by_client.get(session.meta.client_id) is session:
            del self._by_client[session.meta.client_id]
            return True
        return False

    def in_channel(self, channel: str, *, exclude: Session | None = None) -> list[Session]:
        """Sessions subscribed to ``channel``, except ``exclude``."""
        return [
            s for s in self._by_client.values() if channel in s.meta.channels and s is not exclude
        ]

    def of_user(self, user_id: str) -> list[Session]:
        """Every session (device, tab) of one user."""
        return [s for s in self._by_client.values() if s.meta.user_id == user_id]

    def user_ids(self) -> list[str]:
        """Connected user ids, each once, in first-connection order."""
        return list(dict.fromkeys(s.meta.user_id for s in self._by_client.values()))


@attrs.frozen
class Close:
    """A close a room asked for (``ctx.close``, ``actor.disconnect``), as one of a turn's
    outputs: it goes to its sockets in order with their frames, through the output gate like
    them, so it never overtakes a frame the room sent those sockets before it."""

    code: int
    reason: str

    def __len__(self) -> int:
        # What the output gate and flow control count is a frame's size: a close has none.
        return 0

    def __bool__(self) -> bool:
        return True  # a close is something to send, whatever its length says


#: What a turn sends a socket: an encoded frame, or a close.
Output = bytes | Close


def is_room_close_code(code: object) -> bool:
    """Whether a room may close a socket with ``code``: 1000 (normal closure) or 3000-4999
    (registered and private application codes); the others are the protocol's own."""
    return (
        isinstance(code, int)
        and not isinstance(code, bool)
        and (code == 1000 or 3000 <= code <= 4999)
    )


def send_to(sessions: Iterable[Session], frame: Output) -> int:
    """Send one already-encoded frame (or close) to each session; returns how many it was
    sent to."""
    if isinstance(frame, Close):
        return close_all(sessions, frame)
    count = 0
    for session in sessions:
        session.sink.send_frame(frame)
        count += 1
    return count


def close_all(sessions: Iterable[Session], close: Close) -> int:
    """Close each session's socket with ``close``'s code and reason, after the frames already
    queued on it; returns how many."""
    count = 0
    for session in sessions:
        session.sink.close(close.code, close.reason)
        count += 1
    return count


class _Deferred(threading.local):
    # The writes waiting for the end of the coalesced() block running in this thread (None:
    # none runs). Per thread, not per Trio task: a task started inside the block must not see
    # it (a context variable would be copied into it, and outlive the block there).
    writes: list[Callable[[], None]] | None = None


_deferred = _Deferred()


@contextmanager
def coalesced() -> Iterator[None]:
    """Frames sent inside the block go out at its end, one write per socket: a release of many
    turns' frames costs a socket one write, not one per frame.

    For synchronous code only (no ``await`` inside). The writes are made when the block exits,
    with an error or not: no socket may be left with frames that nothing will write.
    """
    if _deferred.writes is not None:
        yield  # the outer block writes
        return
    writes: list[Callable[[], None]] = []
    _deferred.writes = writes
    try:
        yield
    finally:
        _deferred.writes = None
        for write in writes:
            write()


def defer_write(write: Callable[[], None]) -> bool:
    """Inside :func:`coalesced`, call ``write`` at the block's end and return True; outside,
    return False (the caller writes now)."""
    writes = _deferred.writes
    if writes is None:
        return False
    writes.append(write)
    return True
