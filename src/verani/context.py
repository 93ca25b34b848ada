"""Internal: what handlers see: ``ctx.actor``, ``ctx.meta``, ``ctx.emit``, ``ctx.frame``. Pure.

Every emit is synchronous: it encodes the frame once and hands it, with its targets, to the
actor's ``deliver`` function, which queues it on each socket (or holds it until the turn's state
changes are durable). Nothing here awaits, so a handler cannot interleave with another turn by
emitting.

Targeting follows Verani: ``ctx.emit.to(x)`` is a channel of this socket's (everyone on it but
this socket) or else a user id (that user's sockets on this socket's first channel);
``actor.emit.to(channel)`` is everyone on the channel; ``emit_to_user`` is every socket of a user.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import attrs

from .errors import CloseCodeError
from .protocol import ClientFrame, encode_event, encode_frame
from .schedules import RoomSchedules, Schedule
from .sessions import Close, ConnectionMeta, Output, Session, Sessions, is_room_close_code
from .storage import RoomStorage

if TYPE_CHECKING:
    from .runtime import Runtime

S = TypeVar("S")

#: Queue ``frame`` (or a close) on each of the sessions (after the output gate); returns how
#: many.
Deliver = Callable[[Sequence[Session], Output], int]


def _close(code: int, reason: str) -> Close:
    """A close with ``code`` and ``reason``, checked now: the error belongs to the caller."""
    if not is_room_close_code(code):
        raise CloseCodeError(code)
    if not isinstance(reason, str):
        raise TypeError(f"a close reason must be a str, not {type(reason).__name__}")
    return Close(code, reason)


@attrs.define
class ChannelEmitter:
    """``emit`` to a set of sessions chosen when it is called, all given one frame channel."""

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
        """Send ``event`` to this socket only, on its first channel (also from ``on_connect``)."""
        session = self._session
        return self._deliver([session], encode_event(session.first_channel, event, data))

    def _close(self, close: Close) -> None:
        # For ctx.close: the socket itself, not its client id, so it also works in on_connect
        # (before the socket is one of the room's sessions).
        self._deliver([self._session], close)

    def to(self, target: str) -> ChannelEmitter:
        """Address a channel of this socket's (everyone on it but this socket), else a user id
        (that user's sockets subscribed to this socket's first channel), as Verani does."""
        session = self._session
        if target in session.meta.channels:
            return ChannelEmitter(
                lambda: self._sessions.in_channel(target, exclude=session), target, self._deliver
            )
        channel = session.first_channel
        return ChannelEmitter(
            lambda: [s for s in self._sessions.of_user(target) if channel in s.meta.channels],
            channel,
            self._deliver,
        )


class RoomActor(Generic[S]):
    """One room instance as handlers see it (``ctx.actor``): Verani's actor API in snake_case.

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
        runtime: Runtime | None = None,
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
        #: Other rooms of this server (``runtime.room("chat", "lobby")``); None outside a server.
        self.runtime = runtime
        #: The instance's schedules (set by its actor).
        self.schedules: RoomSchedules | None = None

    def broadcast(
        self,
        channel: str,
        data: Any,
        *,
        user_ids: Collection[str] | None = None,
        client_ids: Collection[str] | None = None,
        except_: ConnectionMeta | str | None = None,
    ) -> int:
        """Send ``{"type": "event", "channel": channel, "data": data}`` to the sockets on
        ``channel``, only those of ``user_ids`` / ``client_ids`` when given, never ``except_``
        (a socket's meta or client id). ``data`` is sent as is: give it a ``type`` for clients
        that dispatch on it. Returns the count."""
        skip = except_.client_id if isinstance(except_, ConnectionMeta) else except_
        targets = [
            s
            for s in self._sessions.in_channel(channel)
            if s.meta.client_id != skip
            and (user_ids is None or s.meta.user_id in user_ids)
            and (client_ids is None or s.meta.client_id in client_ids)
        ]
        if not targets:
            return 0
        return self._deliver(targets, encode_frame(channel, data))

    def emit_to_channel(self, channel: str, event: str, data: Any = None) -> int:
        """Send ``event`` to every socket on ``channel``; returns the count."""
        return self.emit.to(channel).emit(event, data)

    def emit_to_user(self, user_id: str, event: str, data: Any = None) -> int:
        """Send ``event`` to every socket of ``user_id``, whatever its channels."""
        return ChannelEmitter(
            lambda: self._sessions.of_user(user_id), "default", self._deliver
        ).emit(event, data)

    def send_to_user(self, user_id: str, channel: str, data: Any = None) -> int:
        """Send ``data`` as is on ``channel`` to the sockets of ``user_id`` subscribed to it."""
        targets = [s for s in self._sessions.of_user(user_id) if channel in s.meta.channels]
        if not targets:
            return 0
        return self._deliver(targets, encode_frame(channel, data))

    def get_session_count(self) -> int:
        """How many sockets are connected to this room instance."""
        return len(self._sessions)

    def get_connected_user_ids(self) -> list[str]:
        """The ids of connected users, each once, in first-connection order."""
        return self._sessions.user_ids()

    def get_user_sessions(self, user_id: str) -> list[ConnectionMeta]:
        """The meta of every socket of ``user_id``."""
        return [s.meta for s in self._sessions.of_user(user_id)]

    # --- schedules --------------------------------------------------------------------------

    def schedule(self, when: Any, event: str, data: Any = None, *, id: str | None = None) -> str:
        """Run the room's ``on_schedule(event)`` handler with ``data`` at ``when``: seconds from
        now, a ``timedelta`` or an aware ``datetime``. Saved with the room (the same write as
        this turn), it wakes the room if it sleeps and survives restarts; a schedule due while
        the server was down runs at start, late. Returns its id (``id`` if given: scheduling an
        existing id replaces it). ``data`` is stored as persisted state is; what cannot be is
        refused here. Runs at least once: a crash during its handler runs it again."""
        return self._schedules().add(when, event, data, id=id)

    def schedule_every(
        self, interval: Any, event: str, data: Any = None, *, id: str | None = None
    ) -> str:
        """Like :meth:`schedule`, every ``interval`` (seconds or a ``timedelta``), first in one
        interval; each run is counted from the previous due time (no drift), and runs missed
        while the room could not run are run once, not once each."""
        return self._schedules().add(interval, event, data, id=id, every=interval)

    def cancel_schedule(self, id: str) -> bool:
        """Remove a schedule; returns whether there was one with that id."""
        return self._schedules().cancel(id)

    def list_schedules(self) -> list[Schedule]:
        """The room instance's schedules, the next due first."""
        return self._schedules().list()

    def _schedules(self) -> RoomSchedules:
        if self.schedules is None:
            raise RuntimeError(f"room {self.room_name}/{self.instance_name} has no schedules")
        return self.schedules

    def sessions(self, channel: str | None = None) -> list[ConnectionMeta]:
        """The meta of every connected socket (those subscribed to ``channel`` when given), in
        connection order."""
        found = self._sessions if channel is None else self._sessions.in_channel(channel)
        return [s.meta for s in found]

    def disconnect(
        self,
        client_id: str | None = None,
        *,
        user_id: str | None = None,
        code: int = 4000,
        reason: str = "",
    ) -> int:
        """Close the socket of ``client_id``, or every socket of ``user_id`` (give one of the
        two); returns how many sockets are being closed (0 if none is connected).

        The close is one of the turn's outputs: it reaches each socket after the frames the
        room sent it before (held, like them, until the turn's changes are durable). The
        client sees ``code`` and ``reason`` (cut to 123 bytes); the room's ``on_disconnect``
        then runs for each socket with ``ctx.close_code == code``. ``code`` must be 1000 or
        3000-4999, else :class:`~verani.CloseCodeError` is raised and nothing is closed.
        """
        close = _close(code, reason)
        if (client_id is None) == (user_id is None):
            raise TypeError("disconnect() takes a client_id or a user_id= (exactly one)")
        if client_id is not None:
            session = self._sessions.get(client_id)
            targets = [] if session is None else [session]
        else:
            assert user_id is not None
            targets = self._sessions.of_user(user_id)
        if not targets:
            return 0
        return self._deliver(targets, close)

    def __repr__(self) -> str:
        return f"<RoomActor {self.room_name}/{self.instance_name} sessions={len(self._sessions)}>"


@attrs.define
class ScheduleContext(Generic[S]):
    """What an ``on_schedule`` handler gets: the room (``ctx.actor``, its storage and runtime)
    and the schedule that came due (``ctx.schedule``, with ``late_by`` in seconds). There is no
    socket: emit through ``ctx.actor.emit``."""

    actor: RoomActor[S]
    schedule: Schedule

    @property
    def runtime(self) -> Runtime | None:
        """Other rooms of this server."""
        return self.actor.runtime


@attrs.define
class RoomContext(Generic[S]):
    """The argument every handler and hook gets: the room, the socket's meta, emit, the frame."""

    actor: RoomActor[S]
    meta: ConnectionMeta
    emit: SocketEmitter
    frame: ClientFrame | None = None
    #: For ``on_disconnect``: the WebSocket close code (1006 when the connection just dropped).
    close_code: int | None = None
    #: For ``on_disconnect``: the close reason the client or the server gave, if any.
    close_reason: str | None = None
    #: For ``on_connect``, in a room with recovery: the client got its dropped session back
    #: (its missed frames were sent; rooms skip their welcome sync).
    recovered: bool = False

    def join(self, channel: str) -> None:
        """Subscribe this socket to ``channel`` (kept while the room sleeps, like Verani's
        socket attachment)."""
        if channel not in self.meta.channels:
            self.meta.channels.append(channel)
            self.actor._sessions.meta_changed(self.meta)

    def leave(self, channel: str) -> None:
        """Unsubscribe this socket from ``channel``."""
        if channel in self.meta.channels:
            self.meta.channels.remove(channel)
            self.actor._sessions.meta_changed(self.meta)

    def close(self, code: int = 4000, reason: str = "") -> None:
        """Close this socket with ``code`` and ``reason`` (cut to 123 bytes), e.g. to kick a
        client: after the frames this turn and earlier ones sent it, which go out first (the
        close waits for the output gate like them). Nothing it sends afterwards is handled; the
        room's ``on_disconnect`` runs with ``ctx.close_code == code``. In ``on_disconnect`` the
        socket is already closed and this does nothing.

        ``code`` must be 1000 or 3000-4999 (4000-4999 are the application's own); any other
        raises :class:`~verani.CloseCodeError` and the socket stays open.
        """
        close = _close(code, reason)
        if self.close_code is None:
            self.emit._close(close)

    @property
    def runtime(self) -> Runtime | None:
        """Other rooms of this server: ``await ctx.runtime.room("chat").emit_to_channel(...)``."""
        return self.actor.runtime
