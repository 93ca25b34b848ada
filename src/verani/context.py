"""What handlers see: ``ctx.actor``, ``ctx.meta``, ``ctx.emit``, ``ctx.frame``. Pure.

Every emit is synchronous: it encodes the frame once and hands it, with its targets, to the
actor's ``deliver`` function, which queues it on each socket (or holds it until the turn's state
changes are durable). Nothing here awaits, so a handler cannot interleave with another turn by
emitting.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import attrs

from .protocol import ClientFrame, encode_event
from .sessions import ConnectionMeta, Session, Sessions
from .storage import RoomStorage

S = TypeVar("S")

#: Queue ``frame`` on each of the sessions (after the output gate); returns how many.
Deliver = Callable[[Sequence[Session], str], int]


@attrs.define
class ChannelEmitter:
    """``emit`` to a fixed set of sessions, all given the same frame channel."""

    _targets: Callable[[], Sequence[Session]]
    _channel: str
    _deliver: Deliver

    def emit(self, event: str, data: Any = None) -> int:
        """Send ``event`` with ``data``; returns how many sockets it was sent to."""
        targets = self._targets()
        if not targets:
            return 0
        return self._deliver(targets, encode_event(self._channel, event, data))


@attrs.define
class ActorEmitter:
    """``ctx.actor.emit``: room-wide emits."""

    _sessions: Sessions
    _deliver: Deliver

    def emit(self, event: str, data: Any = None) -> int:
        """Send ``event`` to every socket on channel ``default``; returns the count."""
        return self.to("default").emit(event, data)

    def to(self, channel: str) -> ChannelEmitter:
        """Address every socket subscribed to ``channel`` (the sender included)."""
        return ChannelEmitter(lambda: self._sessions.in_channel(channel), channel, self._deliver)


@attrs.define
class SocketEmitter:
    """``ctx.emit``: emits from the point of view of one socket."""

    _session: Session
    _sessions: Sessions
    _deliver: Deliver

    def emit(self, event: str, data: Any = None) -> int:
        """Send ``event`` to this socket only, on its first channel."""
        session = self._session
        if session not in self._sessions:
            return 0
        return self._deliver([session], encode_event(session.first_channel, event, data))

    def to(self, target: str) -> ChannelEmitter:
        """Address a channel of this socket's (everyone on it but this socket), else a user id.

        This is Verani's rule: ``ctx.emit.to("room-1")`` reaches the other members of a channel
        the socket is on; ``ctx.emit.to("alice")`` reaches every socket of user ``alice``.
        """
        session = self._session
        if target in session.meta.channels:
            return ChannelEmitter(
                lambda: self._sessions.in_channel(target, exclude=session), target, self._deliver
            )
        return ChannelEmitter(lambda: self._sessions.of_user(target), "default", self._deliver)


class RoomActor(Generic[S]):
    """One room instance as handlers see it (``ctx.actor``).

    ``room_state`` is typed by the room's state class, so a type checker flags unknown keys.
    """

    def __init__(
        self,
        room: str,
        instance: str,
        room_state: S,
        sessions: Sessions,
        deliver: Deliver,
        storage: RoomStorage,
    ) -> None:
        self.room_name = room
        self.instance_name = instance
        self.room_state: S = room_state
        self._sessions = sessions
        self._deliver = deliver
        self.emit = ActorEmitter(sessions, deliver)
        #: The instance's own key-value storage (Verani's ``getStorage()``), saved atomically
        #: with the state changes of the same turn.
        self.storage = storage

    def get_session_count(self) -> int:
        """How many sockets are connected to this room instance."""
        return len(self._sessions)

    def get_connected_user_ids(self) -> list[str]:
        """The ids of connected users, each once."""
        return self._sessions.user_ids()

    def get_user_sessions(self, user_id: str) -> list[ConnectionMeta]:
        """The meta of every socket of ``user_id``."""
        return [s.meta for s in self._sessions.of_user(user_id)]

    def send_to_user(self, user_id: str, event: str, data: Any = None) -> int:
        """Send ``event`` to every socket of ``user_id``; returns the count."""
        targets = self._sessions.of_user(user_id)
        if not targets:
            return 0
        return self._deliver(targets, encode_event("default", event, data))

    def __repr__(self) -> str:
        return f"<RoomActor {self.room_name}/{self.instance_name} sessions={len(self._sessions)}>"


@attrs.define
class RoomContext(Generic[S]):
    """The argument every handler and hook gets: the room, the socket's meta, emit, the frame."""

    actor: RoomActor[S]
    meta: ConnectionMeta
    emit: SocketEmitter
    frame: ClientFrame | None = None
    #: For ``on_disconnect``: the WebSocket close code (1006 when the connection just dropped).
    close_code: int | None = None
