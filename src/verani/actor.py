"""Internal: one awake room instance — its turns, dispatch and change detection.

An :class:`Actor` lives from revival to hibernation. It takes events from the instance's inbox one
at a time (a *turn*), so a handler never sees another handler's half-done change. After each turn
the persisted keys that changed are encoded and handed to group commit, which writes them to the
store, coalescing the changes of consecutive turns into one write; the turn's frames go through
the output gate, held until that write is on disk (both in :mod:`verani.gate`).
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import inspect
import logging
import math
import reprlib
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import attrs
import orjson
import trio

from .codec import Codec, JSONValue
from .context import RoomActor, RoomContext, ScheduleContext, SocketEmitter
from .errors import (
    ClientError,
    CorruptDocumentError,
    FrameEncodeError,
    NotPersistableError,
    PersistenceError,
    RoomCrashedError,
    StoreError,
)
from .flow import Credit
from .gate import GroupCommit, OutputGate, Outputs
from .protocol import ERROR_EVENT, AckId, ClientFrame, encode_ack, encode_ack_error, encode_event
from .recovery import (
    SESSION_EVENT,
    LogMark,
    ResumeRequest,
    SessionLog,
    decode_log,
    new_token,
    stored_mark,
)
from .room import RoomDefinition
from .schedules import RoomSchedules, Schedule, WallClock
from .sessions import DETACHED, Close, Output, Session, Sessions, send_to
from .state import set_untracked, take_changes, track
from .storage import RoomStorage
from .store import Store
from .store.base import Changes, StoredDocument

if TYPE_CHECKING:
    from .runtime import Runtime

log = logging.getLogger("verani.actor")

#: The name ``on_persist_error`` gets for ``actor.storage`` when a write with its changes fails.
STORAGE_KEY = "<storage>"
#: The same for the instance's schedules.
SCHEDULES_KEY = "<schedules>"
#: The same for its recoverable sessions.
RECOVERY_KEY = "<recovery>"

#: First and longest wait between retries of a failed store write, in seconds.
#: Turns an actor runs back to back from a non-empty inbox before letting other tasks run.
YIELD_EVERY = 16


@attrs.define(eq=False)
class Connect:
    """A socket joined the room instance (asking for a dropped session back: ``resume``)."""

    session: Session
    resume: ResumeRequest | None = None


@attrs.define(eq=False)
class Message:
    """A socket sent a (valid) frame."""

    session: Session
    frame: ClientFrame


@attrs.define(eq=False)
class Disconnect:
    """A socket left; ``code`` is its close code (1006 when it just dropped)."""

    session: Session
    code: int
    reason: str | None = None
    #: The peer closed cleanly, or the room closed it: a session with recovery ends now
    #: rather than waiting for its client to come back.
    final: bool = False


@attrs.define(eq=False)
class Hibernate:
    """Hibernate now (``verani hibernate``, shutdown); ``done`` is set once state is durable."""

    done: trio.Event = attrs.field(factory=trio.Event)
    error: str | None = None

    def finish(self, error: str | None) -> None:
        """Report the outcome to whoever asked."""
        self.error = error
        self.done.set()


@attrs.define(eq=False)
class Call:
    """Run ``fn(actor)`` as a turn of the room, for code outside it (the runtime handle).

    ``done`` is set once the result may be shown: after the turn, and after the write of what
    the turn changed is durable (the output gate applies to results as to frames).
    """

    fn: Callable[[RoomActor[Any]], Any]
    done: trio.Event = attrs.field(factory=trio.Event)
    result: Any = None
    error: BaseException | None = None
    #: The same call as data — a method of :class:`~verani.runtime.RoomHandle` and its
    #: arguments — so that it can run on another node of a cluster (None: only here).
    op: tuple[Any, ...] | None = None

    def fail(self, error: BaseException) -> None:
        """Give the caller ``error`` instead of a result."""
        self.error = error
        self.done.set()


InboxEvent = Connect | Message | Disconnect | Hibernate | Call


class Inbox(Protocol):
    """Where an actor takes its events from (its room instance's inbox)."""

    def receive_nowait(self) -> InboxEvent:
        """The next event, or :class:`trio.WouldBlock`."""
        ...

    async def receive(self) -> InboxEvent:
        """The next event, waiting for one."""
        ...


@attrs.define(eq=False)
class PendingAck:
    """The answer being made, during a turn, to a client frame that carried an ``id``.

    With several handlers for one event, the first error any of them raises is the answer;
    without one, the first result that is not None (the event's own handlers run before the
    wildcard ones, so a ``"*"`` handler that logs every event does not answer for them).
    """

    session: Session
    id: AckId
    result: Any = None
    error: tuple[str, str] | None = None  # (code, message)

    def answer(self, result: Any) -> None:
        """A handler returned ``result``."""
        if self.result is None:
            self.result = result

    def fail(self, code: str, message: str) -> None:
        """Something in the turn failed: the answer is this error, unless an earlier one is."""
        if self.error is None:
            self.error = (code, message)


#: The room instance whose turn (or turn-like hook) runs in this task, with that task: tasks
#: started from a turn inherit context variables, but are not the turn (see ``current_room``).
_TURN_OF: contextvars.ContextVar[tuple[trio.lowlevel.Task, tuple[str, str]] | None] = (
    contextvars.ContextVar("verani_turn_of", default=None)
)


def current_room() -> tuple[str, str] | None:
    """``(room, instance)`` whose turn the calling task is running, if any."""
    turn = _TURN_OF.get()
    if turn is None or turn[0] is not trio.lowlevel.current_task():
        return None
    return turn[1]


@contextlib.contextmanager
def _as_turn_of(key: tuple[str, str]) -> Iterator[None]:
    token = _TURN_OF.set((trio.lowlevel.current_task(), key))
    try:
        yield
    finally:
        _TURN_OF.reset(token)


class Actor:
    """An awake room instance (see the module docstring)."""

    def __init__(
        self,
        *,
        definition: RoomDefinition[Any],
        instance: str,
        sessions: Sessions,
        inbox: Inbox,
        store: Store,
        codec: Codec,
        idle_timeout: float,
        runtime: Runtime | None = None,
        clock: WallClock | None = None,
    ) -> None:
        self.definition = definition
        self._runtime = runtime
        self._clock = clock or WallClock()
        self.schedules: RoomSchedules | None = None
        self._schedules_dirty = False  # changed since the last persist_changes
        self._schedules_uncommitted = False  # changed since the last commit
        #: Trio's time of the next due schedule (inf: none).
        self._next_due = math.inf
        self.instance = instance
        self.sessions = sessions
        self._inbox = inbox
        self._store = store
        self._codec = codec
        self.idle_timeout = idle_timeout
        self._where = f"room {definition.name}/{instance}"
        self._key = (definition.name, instance)
        self._persisted = frozenset(definition.persisted_keys)
        self.state: Any = None
        self.room_actor: RoomActor[Any] | None = None
        self._unyielded = 0
        #: Set by the load: whether a stored document was found, and how long reviving took.
        self.restored = False
        self.load_ms = 0.0
        self.last_turn = trio.current_time()
        # Persistence: the encoded value of every persisted key as last handed to the store.
        self._encoded: dict[str, JSONValue] = {}
        self._storage_dirty = False
        self.storage: RoomStorage | None = None
        self._unsaved: set[str] = set()  # persisted keys changed since the last durable write
        self._uncommitted: set[str] = set()  # persisted keys changed since the last commit
        # The background checkpoint under way, if any (one at a time).
        self._checkpointing: trio.Event | None = None
        self._nursery: trio.Nursery | None = None
        # Output gate: turns' frames wait for their writes to be durable; the session whose
        # message caused a turn is told when its outputs leave (per-socket flow control).
        self._gate = OutputGate(released=_released)
        # Group commit: changed state is written in the background, many turns per write.
        self._commit = GroupCommit(
            where=self._where, save=self._save, durable=self._durable, failed=self._save_failed
        )
        self._turn_outputs: Outputs | None = None
        #: The answer the current turn owes a client frame's ``id``, if it carried one.
        self._ack: PendingAck | None = None
        # Turns and the user hooks that report failed writes exclude each other: user code
        # always runs one piece at a time, as in a turn.
        self._turn_lock = trio.Lock()
        # Connection-state recovery: every recoverable session by token (live or detached),
        # the tokens changed since the last persist_changes and since the last commit, and
        # Trio's time when the next detached session ends (inf: none).
        self._recovery = definition.recovery
        self._recoverable: dict[str, Session] = {}
        self._recovery_dirty: set[str] = set()
        self._recovery_uncommitted: set[str] = set()
        self._next_expiry = math.inf
        #: The hibernation request being carried out, for the supervisor if the actor crashes.
        self.hibernating: Hibernate | None = None

    # --- lifetime ---------------------------------------------------------------------------

    async def run(self) -> Hibernate | None:
        """Revive from the store, take turns until idle or told to hibernate, flush, and end.

        Returns the hibernation request that ended it, if one did; the caller finishes it once
        the actor is gone.
        """
        await self._load()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._commit.run)
            start = self.definition.hooks.on_start
            if start is not None:
                # A turn of its own, before any event: its changes and frames are a turn's.
                async with self._turn_lock:
                    await self._turn(self._lifecycle_hook, ("on_start", start))
            restore = self.definition.hooks.on_hibernation_restore
            if len(self.sessions) and restore is not None:
                async with self._turn_lock:
                    await self._turn(self._restore, restore)
            request = await self._turn_loop()
            nursery.cancel_scope.cancel()
        return request

    async def _turn_loop(self) -> Hibernate | None:
        while True:
            while self._gate.full:
                await self._commit.wait_progress()
            event: InboxEvent | None = None
            # Queued events run back to back, with a scheduling point every few turns so a
            # busy room never starves the sockets and other rooms. The checkpoint comes before
            # an event is taken: a cancellation there leaves it in the inbox for the drain.
            self._unyielded += 1
            if self._unyielded >= YIELD_EVERY:
                self._unyielded = 0
                await trio.lowlevel.checkpoint()
            if trio.current_time() >= self._next_expiry:
                await self._end_expired_sessions()
                continue
            if trio.current_time() >= self._next_due:
                await self._run_due_schedules()
                continue
            try:
                event = self._inbox.receive_nowait()
            except trio.WouldBlock:
                wake = min(self._next_due, self._next_expiry)
                with trio.move_on_at(min(self.last_turn + self.idle_timeout, wake)):
                    event = await self._inbox.receive()
                if event is None and trio.current_time() >= wake:
                    continue  # a schedule or a session's grace period came due, not idling
            if event is None:
                if await self._final_flush() is None:
                    log.info("%s: hibernated after %.1fs idle", self._where, self.idle_timeout)
                    return None
                self.last_turn = trio.current_time()
            elif isinstance(event, Hibernate):
                self.hibernating = event
                failure = await self._final_flush()
                if failure is None:
                    log.info("%s: hibernated on request", self._where)
                    return event
                self.hibernating = None
                event.finish(f"{self._where}: {failure}; it stays awake")
            else:
                # The lock is free unless a failed write is being reported: take it without a
                # scheduling point (one per event otherwise).
                try:
                    self._turn_lock.acquire_nowait()
                except trio.WouldBlock:
                    await self._turn_lock.acquire()
                try:
                    await self._turn(self._dispatch, event)
                finally:
                    self._turn_lock.release()

    async def _load(self) -> None:
        name, spec = self.definition.name, self.definition.state_spec
        started = time.perf_counter()
        unreadable: list[tuple[str, Exception]] = []
        try:
            doc = await self._store.load(name, self.instance)
        except CorruptDocumentError as exc:
            # The store has moved the document aside; every key starts from its initial value.
            log.error(
                "%s: stored state unreadable, starting from initial values: %s", self._where, exc
            )
            unreadable = [(key, exc) for key in self.definition.persisted_keys]
            doc = None
        state = spec.new_untracked()
        stored = doc.state if doc is not None else {}
        for key in self.definition.persisted_keys:
            declared = spec.key_types[key]
            if key in stored:
                try:
                    value = self._codec.decode(stored[key], declared, path=key)
                except CorruptDocumentError as exc:
                    unreadable.append((key, exc))
                else:
                    set_untracked(state, key, value)
                    self._encoded[key] = stored[key]
                    continue
            self._encoded[key] = self._codec.encode(getattr(state, key), declared, path=key)
        dropped = sorted(set(stored) - self._persisted)
        if dropped:
            log.warning("%s: ignoring stored keys no longer persisted: %s", self._where, dropped)
        track(state, () if self.definition.persist_options.shallow else self._persisted)
        self.state = state
        self.storage = RoomStorage(
            self._codec, doc.storage if doc is not None else {}, self._storage_changed
        )
        self.room_actor = RoomActor(
            name, self.instance, state, self.sessions, self._deliver, self.storage, self._runtime
        )
        self.schedules = self.room_actor.schedules = self._load_schedules(doc)
        if self._recovery is not None:
            self._load_recovery(doc)
        if doc is not None and any(key in stored for key, _ in unreadable):
            # Values that no longer read as their declared type: keep a copy of the document,
            # then write the repaired one (those keys at their initial values).
            await self._store.set_aside(
                name, self.instance, f"keys {[k for k, _ in unreadable]} no longer read back"
            )
            self._commit.changed()
        with _as_turn_of(self._key):
            for key, error in unreadable:
                log.error(
                    "%s: stored key %r unreadable, using its initial value: %s",
                    self._where,
                    key,
                    error,
                )
                await self._persist_failed(key, error, None)
        self.load_ms = (time.perf_counter() - started) * 1000
        self.restored = doc is not None
        log.debug(
            "%s: awake (%s, %d sessions) in %.2f ms",
            self._where,
            "state restored" if doc is not None else "initial state",
            len(self.sessions),
            self.load_ms,
        )

    def _load_schedules(self, doc: StoredDocument | None) -> RoomSchedules:
        stored = doc.schedules if doc is not None else {}
        definition = self.definition

        def make(entries: dict[str, JSONValue]) -> RoomSchedules:
            return RoomSchedules(
                where=self._where,
                codec=self._codec,
                stored=entries,
                has_handler=lambda event: definition.schedule_handler(event) is not None,
                clock=self._clock.now,
                on_change=self._schedules_changed,
            )

        try:
            schedules = make(stored)
        except (CorruptDocumentError, ValueError, TypeError, KeyError) as exc:
            log.error("%s: stored schedules unreadable, dropped: %s", self._where, exc)
            schedules = make({})
            self._schedules_dirty = True
        self._next_due = self._due_deadline(schedules)
        return schedules

    # --- connection-state recovery ----------------------------------------------------------

    def _load_recovery(self, doc: StoredDocument | None) -> None:
        """Find the recoverable sessions again: the live ones (a hibernation keeps them), then
        the stored ones no socket holds (from before a restart), detached."""
        assert self._recovery is not None
        stored = doc.recovery if doc is not None else {}
        for session in self.sessions:
            log = session.recovery
            if log is not None:
                self._recoverable[log.token] = session
                # Commits carry what changed since what the store has: the document says.
                log.stored = stored_mark(stored.get(log.token))
                put, delta, _ = log.changes(session.meta)
                if put is not None or delta is not None:
                    self._recovery_dirty.add(log.token)
        for token, raw in stored.items():
            if token in self._recoverable:
                continue
            try:
                log, meta = decode_log(self._recovery, token, raw)
            except (KeyError, TypeError, ValueError) as exc:
                log_ = logging.getLogger("verani.actor")
                log_.error("%s: stored session unreadable, dropped: %s", self._where, exc)
                self._recovery_dirty.add(token)
                continue
            if self.sessions.has_client(meta.client_id):
                self._recovery_dirty.add(token)
                continue
            log.restored = True
            if log.expires is None:
                # Connected when the server stopped: its grace period starts now.
                log.expires = self._clock.now().timestamp() + self._recovery.max_disconnect
                self._recovery_dirty.add(token)
            log.deadline = self._clock.deadline(dt.datetime.fromtimestamp(log.expires, dt.UTC))
            credit = Credit(max_frames=1 << 30, max_bytes=1 << 62, max_in_flight=1 << 30)
            placeholder = Session(meta, DETACHED, credit, log)
            self.sessions.add(placeholder)
            self._recoverable[token] = placeholder
        self._update_expiry()
        if self._recovery_dirty:
            self._persist_changes()

    def _update_expiry(self) -> None:
        deadlines = [
            s.recovery.deadline
            for s in self._recoverable.values()
            if s.recovery is not None and s.recovery.deadline is not None
        ]
        self._next_expiry = min(deadlines, default=math.inf)

    def _resumable(self, event: Connect) -> tuple[Session, list[bytes]] | None:
        """The detached (or still live) session a reconnect asks for, with the frames it
        missed; None when it cannot have it back (a new session then)."""
        request = event.resume
        if request is None:
            return None
        old = self._recoverable.get(request.token)
        if old is None or old.recovery is None or old not in self.sessions:
            return None
        if old.meta.user_id != event.session.meta.user_id:
            return None
        deadline = old.recovery.deadline
        if deadline is not None and trio.current_time() >= deadline:
            return None
        replay = old.recovery.after(request.offset)
        if replay is None:
            return None
        return old, replay

    async def _connect_recoverable(self, event: Connect) -> RoomContext[Any] | None:
        assert self._recovery is not None
        hooks = self.definition.hooks
        session = event.session
        resumed = self._resumable(event)
        if resumed is not None:
            old = resumed[0]
            log = old.recovery
            assert log is not None
            self.sessions.remove(old)
            if not old.detached:
                # The old socket is still open (its drop not noticed yet): it is replaced.
                old.sink.close(1000, "the session was recovered by a new connection")
            if log.restored:
                # From the store: the meta is the new handshake's, with the session's identity.
                session.meta.client_id = old.meta.client_id
                session.meta.channels = list(old.meta.channels)
                log.restored = False
            else:
                session.meta = old.meta
            old.recovery = None
            log.deadline = log.expires = None
            self._update_expiry()
        else:
            existing = self.sessions.get(session.meta.client_id)
            if existing is not None and existing.detached:
                # The same client id connects anew: the session it dropped is over.
                await self._end_session(existing)
            stale = self._recoverable.get(event.resume.token) if event.resume else None
            if (
                stale is not None
                and stale.detached
                and stale.meta.user_id == session.meta.user_id
                and stale in self.sessions
            ):
                # Its client is back (it has the token) but cannot have it back (what it
                # missed is no longer kept): that session is over now, not at its deadline.
                await self._end_session(stale)
            log = SessionLog(self._recovery, new_token())
        if self.sessions.has_client(session.meta.client_id):
            log_msg = "%s: refused a connection: client id %r is already connected"
            log.frames.clear()
            logging.getLogger("verani.actor").error(log_msg, self._where, session.meta.client_id)
            session.sink.close(1008, "client id already connected to this room")
            return None
        session.recovery = log
        self._recoverable[log.token] = session
        self._recovery_dirty.add(log.token)
        hello = {"token": log.token, "offset": log.offset, "recovered": resumed is not None}
        self._deliver_raw([session], encode_event(session.first_channel, SESSION_EVENT, hello))
        for frame in resumed[1] if resumed is not None else ():
            self._deliver_raw([session], frame)
        ctx = self._context(session)
        ctx.recovered = resumed is not None
        if hooks.on_connect is not None and not await self._call(
            "on_connect", ctx, hooks.on_connect, ctx
        ):
            del self._recoverable[log.token]
            session.sink.close(1011, "the room failed to accept the connection")
        else:
            self.sessions.add(session)
            log_ = logging.getLogger("verani.actor")
            log_.debug(
                "%s: client %s (user %s) %s; %d connected",
                self._where,
                session.meta.client_id,
                session.meta.user_id,
                "recovered its session" if resumed is not None else "connected",
                len(self.sessions),
            )
        return ctx

    def _detach(self, event: Disconnect) -> None:
        """A recoverable socket dropped: its session waits for its client (see recovery)."""
        assert self._recovery is not None
        session = event.session
        log = session.recovery
        assert log is not None
        session.sink = DETACHED
        log.deadline = trio.current_time() + self._recovery.max_disconnect
        log.expires = self._clock.now().timestamp() + self._recovery.max_disconnect
        log.close_code, log.close_reason = event.code, event.reason
        self._recovery_dirty.add(log.token)
        self._update_expiry()

    async def _end_expired_sessions(self) -> None:
        now = trio.current_time()
        for session in list(self._recoverable.values()):
            log = session.recovery
            if log is not None and log.deadline is not None and log.deadline <= now:
                async with self._turn_lock:
                    await self._turn(self._end_session, session)
        self._update_expiry()

    async def _end_session(self, session: Session) -> RoomContext[Any] | None:
        """A detached session's grace period is over: it leaves (``on_disconnect``)."""
        log = session.recovery
        assert log is not None
        self._recoverable.pop(log.token, None)
        self._recovery_dirty.add(log.token)
        session.recovery = None
        self._update_expiry()
        if not self.sessions.remove(session):
            return None
        ctx = self._context(session, close_code=log.close_code, close_reason=log.close_reason)
        hook = self.definition.hooks.on_disconnect
        if hook is not None:
            await self._call("on_disconnect", ctx, hook, ctx)
        return ctx

    def _recovery_changes(self, tokens: set[str]) -> _RecoveryChanges:
        """What a commit writes of the sessions ``tokens``: the non-frame parts that changed,
        the frames appended and dropped since the last commit that carried each log, the
        sessions that ended; and each log's :attr:`~SessionLog.stored` once it is stored."""
        changes = _RecoveryChanges()
        for token in sorted(tokens):
            session = self._recoverable.get(token)
            log = session.recovery if session is not None else None
            if session is None or log is None:
                changes.deleted.append(token)
                continue
            put, delta, mark = log.changes(session.meta)
            if put is not None:
                changes.put[token] = put
            if delta is not None:
                changes.frames[token] = delta
            changes.marks.append((log, mark))
        return changes

    def _whole_recovery(self) -> dict[str, JSONValue]:
        """Every recoverable session's log, whole (a checkpoint's)."""
        return {
            token: session.recovery.encode(session.meta)
            for token, session in sorted(self._recoverable.items())
            if session.recovery is not None
        }

    def _due_deadline(self, schedules: RoomSchedules) -> float:
        due = schedules.next_due()
        return math.inf if due is None else self._clock.deadline(due)

    def _schedules_changed(self) -> None:
        self._schedules_dirty = True
        if self.schedules is not None:
            self._next_due = self._due_deadline(self.schedules)
        if self._turn_outputs is None:  # a change outside any turn is committed on its own
            self._persist_changes()

    async def _run_due_schedules(self) -> None:
        """Run every schedule due now, each as a turn, earliest first."""
        assert self.schedules is not None
        now = self._clock.now()
        earliest = self.schedules.next_due()
        if earliest is not None and earliest > now:
            # Trio's clock says it is due (the deadline passed) while the wall clock, cut to
            # microseconds, is a hair short: without this the loop would spin on the same
            # deadline, and under a virtual clock time would never move on.
            now = earliest
        for entry in self.schedules.due(now):
            async with self._turn_lock:
                await self._turn(self._run_schedule, entry)
        self._next_due = self._due_deadline(self.schedules)

    async def _run_schedule(self, entry: Schedule) -> None:
        assert self.schedules is not None and self.room_actor is not None
        now = self._clock.now()
        handler = self.definition.schedule_handler(entry.event)
        if handler is None:
            log.error(
                "%s: schedule %r is due but the room has no on_schedule handler for %r any "
                "more; dropped",
                self._where,
                entry.id,
                entry.event,
            )
        else:
            late = attrs.evolve(entry, late_by=max(0.0, (now - entry.due).total_seconds()))
            ctx = ScheduleContext(self.room_actor, late)
            error = await self._run_user_code(
                f"on_schedule({entry.event!r})", handler, ctx, entry.data
            )
            if error is not None:
                await self._on_error(error, None)
        # Removed (or moved on) in this turn's write: a crash before it runs it again.
        self.schedules.ran(entry, now)

    def _storage_changed(self) -> None:
        self._storage_dirty = True
        if self._turn_outputs is None:  # a change outside any turn is committed on its own
            self._persist_changes()

    def abandon(self, reason: str) -> None:
        """The actor is gone before its held outputs were durable: their frames are dropped
        (their sockets are being closed), and every call waiting on them gets an error."""
        for event in self._gate.abandon():
            if isinstance(event, Call):
                event.fail(
                    RoomCrashedError(
                        f"{self._where}: {reason} before the call's changes were saved"
                    )
                )
        if self.hibernating is not None:
            self.hibernating.finish(f"{self._where}: {reason} while saving its state")

    @property
    def hibernates_in(self) -> float:
        """Seconds left before the room hibernates if no turn comes."""
        return max(0.0, self.last_turn + self.idle_timeout - trio.current_time())

    @property
    def write_pending(self) -> bool:
        """Whether a write of newer persisted values is in progress."""
        return bool(self._commit.pending)

    def snapshot(self) -> dict[str, Any]:
        """The live state for ``verani inspect``: persisted and ephemeral keys encoded as the
        store would hold them (keys whose value cannot be encoded are listed under
        ``unencodable`` as a short ``repr``), and the seconds left before idle hibernation.
        Read between turns' checkpoints, so it never shows a half-done turn's await point
        differently than the turn's own code would see it."""
        spec = self.definition.state_spec
        persisted: dict[str, JSONValue] = {}
        ephemeral: dict[str, JSONValue] = {}
        unencodable: dict[str, str] = {}
        for key, declared in spec.key_types.items():
            value = getattr(self.state, key)
            target = persisted if key in self._persisted else ephemeral
            try:
                target[key] = self._codec.encode(value, declared, path=key)
            except NotPersistableError:
                unencodable[key] = reprlib.repr(value)
        return {
            "state": persisted,
            "ephemeral": ephemeral,
            "unencodable": unencodable,
            "hibernates_in": self.hibernates_in,
            "write_pending": self.write_pending,
            "schedules": self.schedules.encoded() if self.schedules is not None else {},
        }

    # --- turns ------------------------------------------------------------------------------

    async def _turn(
        self, body: Callable[[Any], Awaitable[RoomContext[Any] | None]], arg: Any
    ) -> None:
        self._turn_outputs = []
        finished = False
        # _as_turn_of without a generator context manager: this runs once per event.
        token = _TURN_OF.set((trio.lowlevel.current_task(), self._key))
        try:
            ctx = await body(arg)
            for key, error in self._persist_changes():
                await self._persist_failed(key, error, ctx)
            if self._ack is not None:
                # The last frame of the turn, after what the handlers emitted and after any
                # persist failure that changes the answer; held by the gate like the others.
                await self._send_ack(self._ack, ctx)
            finished = True
        finally:
            self._ack = None
            _TURN_OF.reset(token)
            outputs, self._turn_outputs = self._turn_outputs, None
            if not finished:
                # Cancelled, or the machinery failed mid-turn: whoever waits is told now.
                if isinstance(arg, Call):
                    arg.fail(RoomCrashedError(f"{self._where} stopped during the call"))
                elif isinstance(arg, Connect):
                    arg.session.sink.close(1011, "the room failed; reconnect to revive it")
                arg = None
            commit = self._commit
            self._gate.settle(outputs, arg, seq=commit.seq, durable=commit.durable_seq)
            self.last_turn = trio.current_time()

    async def _restore(self, hook: Callable[..., Any]) -> None:
        await self._call("on_hibernation_restore", None, hook, self.room_actor)

    async def _lifecycle_hook(self, named: tuple[str, Callable[..., Any]]) -> None:
        what, hook = named
        await self._call(what, None, hook, self.room_actor)

    async def _dispatch(self, event: InboxEvent) -> RoomContext[Any] | None:
        hooks = self.definition.hooks
        if isinstance(event, Connect) and self._recovery is not None:
            return await self._connect_recoverable(event)
        if isinstance(event, Connect):
            session = event.session
            if self.sessions.has_client(session.meta.client_id):
                # extract_meta gave two live sockets one client id; refuse the newcomer only.
                log.error(
                    "%s: refused a connection: client id %r is already connected",
                    self._where,
                    session.meta.client_id,
                )
                session.sink.close(1008, "client id already connected to this room")
                return None
            ctx = self._context(session)
            # As in Verani, the socket joins the room's sessions once on_connect has succeeded:
            # room-wide emits from on_connect reach the others, ctx.emit reaches the newcomer.
            if hooks.on_connect is not None and not await self._call(
                "on_connect", ctx, hooks.on_connect, ctx
            ):
                session.sink.close(1011, "the room failed to accept the connection")
            else:
                self.sessions.add(session)
                log.debug(
                    "%s: client %s (user %s) connected; %d connected",
                    self._where,
                    session.meta.client_id,
                    session.meta.user_id,
                    len(self.sessions),
                )
            return ctx
        if isinstance(event, Disconnect):
            session = event.session
            if session in self.sessions:
                self.sessions.left(session)
            if session.recovery is not None and session in self.sessions:
                if not event.final:
                    self._detach(event)
                    return None
                self._recoverable.pop(session.recovery.token, None)
                self._recovery_dirty.add(session.recovery.token)
                self._update_expiry()
            if not self.sessions.remove(session):
                return None
            log.debug(
                "%s: client %s (user %s) disconnected (%s%s); %d connected",
                self._where,
                session.meta.client_id,
                session.meta.user_id,
                event.code,
                f" {event.reason}" if event.reason else "",
                len(self.sessions),
            )
            ctx = self._context(session, close_code=event.code, close_reason=event.reason)
            if hooks.on_disconnect is not None:
                await self._call("on_disconnect", ctx, hooks.on_disconnect, ctx)
            return ctx
        if isinstance(event, Message):
            session, frame = event.session, event.frame
            if session not in self.sessions:
                return None
            ctx = self._context(session, frame=frame)
            started = time.perf_counter() if log.isEnabledFor(logging.DEBUG) else None
            handlers = self.definition.handlers_for(frame.type)
            if frame.id is not None:
                self._ack = PendingAck(session, frame.id)
            # Verani hands handlers `frame.data || {}`: a frame without data gives an empty dict.
            data = {} if frame.data is None else frame.data
            for handler in handlers:
                await self._handle(f"handler for {frame.type!r}", ctx, handler, ctx, data)
            if not handlers:
                if hooks.on_message is not None:
                    await self._handle("on_message", ctx, hooks.on_message, ctx, frame)
                elif self._ack is not None:
                    log.warning(
                        "%s: no handler for event %r from client %s (user %s); answered",
                        self._where,
                        frame.type,
                        session.meta.client_id,
                        session.meta.user_id,
                    )
                    self._ack.fail("unknown_event", f"this room has no handler for {frame.type!r}")
                else:
                    log.warning(
                        "%s: no handler for event %r from client %s (user %s); dropped",
                        self._where,
                        frame.type,
                        session.meta.client_id,
                        session.meta.user_id,
                    )
                    ctx.emit.emit(
                        ERROR_EVENT,
                        {
                            "code": "unknown_event",
                            "event": frame.type,
                            "message": f"this room has no handler for {frame.type!r}",
                        },
                    )
            if started is not None:
                log.debug(
                    "%s: handled %r from client %s (user %s) in %.2f ms",
                    self._where,
                    frame.type,
                    session.meta.client_id,
                    session.meta.user_id,
                    (time.perf_counter() - started) * 1000,
                )
            return ctx
        if isinstance(event, Call):
            try:
                result = event.fn(self.room_actor)  # type: ignore[arg-type]
                if inspect.isawaitable(result):
                    result = await result
            except Exception as exc:
                event.error = exc  # the caller's error: raised to the caller, not on_error
            else:
                event.result = result
            return None
        raise AssertionError(f"unexpected inbox event {event!r}")

    def _context(
        self,
        session: Session,
        *,
        frame: ClientFrame | None = None,
        close_code: int | None = None,
        close_reason: str | None = None,
    ) -> RoomContext[Any]:
        assert self.room_actor is not None
        emit = SocketEmitter(session, self.sessions, self._deliver)
        return RoomContext(self.room_actor, session.meta, emit, frame, close_code, close_reason)

    async def _call(
        self, what: str, ctx: RoomContext[Any] | None, fn: Callable[..., Any], *args: Any
    ) -> bool:
        """Run a user handler or hook; an error is logged and goes to ``on_error``, never up."""
        error = await self._run_user_code(what, fn, *args)
        if error is not None:
            await self._on_error(error, ctx)
        return error is None

    async def _handle(
        self, what: str, ctx: RoomContext[Any], fn: Callable[..., Any], *args: Any
    ) -> None:
        """Run a handler of a client's event; what it raises is answered to that client: a
        :class:`ClientError` with its own code and message, anything else as ``handler_error``
        (and ``on_error``), so a sender never meets silence. The answer is the ack when the
        frame carried an ``id`` (which also gets what the handler returns), else a
        ``verani:error`` event."""
        ack = self._ack
        result, error = await self._user_code(what, fn, *args)
        if error is None:
            if ack is not None:
                ack.answer(result)
            return
        event = ctx.frame.type if ctx.frame is not None else None
        if isinstance(error, ClientError):
            code, message = error.code, str(error)
        else:
            await self._on_error(error, ctx)
            code = "handler_error"
            message = f"the room could not handle {event!r}; the error is in the server's log"
        if ack is not None:
            ack.fail(code, message)
        else:
            ctx.emit.emit(ERROR_EVENT, {"code": code, "event": event, "message": message})

    async def _send_ack(self, ack: PendingAck, ctx: RoomContext[Any] | None) -> None:
        """Queue the turn's answer to the frame's ``id`` (see :class:`PendingAck`)."""
        if ack.error is not None:
            frame = encode_ack_error(ack.id, *ack.error)
        else:
            try:
                frame = encode_ack(ack.id, ack.result)
            except FrameEncodeError as exc:
                log.error("%s: cannot answer %r: %s", self._where, ack.id, exc)
                await self._on_error(exc, ctx)
                frame = encode_ack_error(
                    ack.id,
                    "handler_error",
                    "the handler's answer cannot be sent as JSON; the error is in the server's log",
                )
        self._deliver([ack.session], frame)

    async def _on_error(self, error: BaseException, ctx: RoomContext[Any] | None) -> None:
        hook = self.definition.hooks.on_error
        if hook is not None:
            await self._run_user_code("on_error", hook, error, ctx)

    async def _run_user_code(
        self, what: str, fn: Callable[..., Any], *args: Any
    ) -> Exception | None:
        """Call the room author's ``fn`` (sync or async); what it raises is logged with the room
        and ``what`` it was, and returned, never raised."""
        return (await self._user_code(what, fn, *args))[1]

    async def _user_code(
        self, what: str, fn: Callable[..., Any], *args: Any
    ) -> tuple[Any, Exception | None]:
        """As :meth:`_run_user_code`, with what ``fn`` returned (None when it raised)."""
        try:
            result = fn(*args)
            if inspect.isawaitable(result):
                result = await result
        except ClientError as exc:
            # The room's answer to bad input, not a fault: one line, no traceback.
            log.info("%s: %s refused the event: %s", self._where, what, exc)
            return None, exc
        except Exception as exc:
            log.error(
                "%s: %s raised %s: %s", self._where, what, type(exc).__name__, exc, exc_info=exc
            )
            return None, exc
        return result, None

    # --- persistence ------------------------------------------------------------------------

    def _persist_changes(self, *, full: bool = False) -> list[tuple[str, NotPersistableError]]:
        """Encode the persisted keys this turn changed (``full``: every persisted key, written
        if its encoding differs from the last one); schedule a write if any changed."""
        assigned = take_changes(self.state) & self._persisted
        failures: list[tuple[str, NotPersistableError]] = []
        dirty = False
        for key in self.definition.persisted_keys:
            if key not in assigned and not full:
                continue
            declared = self.definition.state_spec.key_types[key]
            try:
                encoded = self._codec.encode(getattr(self.state, key), declared, path=key)
            except NotPersistableError as exc:
                failures.append((key, exc))
                continue
            if key not in assigned and _same(encoded, self._encoded.get(key)):
                continue
            self._encoded[key] = encoded
            self._unsaved.add(key)
            self._uncommitted.add(key)
            dirty = True
        if self._storage_dirty:
            self._storage_dirty = False
            self._unsaved.add(STORAGE_KEY)
            dirty = True
        if self._schedules_dirty:
            self._schedules_dirty = False
            self._schedules_uncommitted = True
            self._unsaved.add(SCHEDULES_KEY)
            dirty = True
        if self._recovery_dirty:
            self._recovery_uncommitted |= self._recovery_dirty
            self._recovery_dirty = set()
            self._unsaved.add(RECOVERY_KEY)
            dirty = True
        if dirty:
            self._commit.changed()
        return failures

    async def _persist_failed(
        self, key: str, error: Exception, ctx: RoomContext[Any] | None
    ) -> None:
        """Report a key that could not be saved: the log, ``on_persist_error``, and (with
        ``throw_on_error``) ``on_error`` — with the turn's context, or None for a failed write or
        a hibernation flush, which happen outside any turn."""
        failure = PersistenceError(key, f"{error}; the previous stored value is kept")
        failure.__cause__ = error
        log.error("%s: %s", self._where, failure)
        message = f"the room could not save {key!r}; its previous value is kept"
        if self._ack is not None and ctx is not None:
            # The caller hears it in the answer it waits for, not in a separate event.
            self._ack.fail("persist_error", message)
        elif ctx is not None:
            # The socket whose event made the value hears that it was refused.
            ctx.emit.emit(
                ERROR_EVENT,
                {
                    "code": "persist_error",
                    "event": ctx.frame.type if ctx.frame is not None else None,
                    "message": message,
                },
            )
        hook = self.definition.hooks.on_persist_error
        if hook is not None:
            await self._run_user_code("on_persist_error", hook, key, failure)
        if self.definition.persist_options.throw_on_error:
            await self._on_error(failure, ctx)

    async def _save(self) -> None:
        """Commit what changed since the last commit: the store writes only that."""
        assert self.storage is not None
        keys, self._uncommitted = self._uncommitted, set()
        put, deleted, storage_keys = self.storage.take_changes()
        schedules_changed, self._schedules_uncommitted = self._schedules_uncommitted, False
        schedules = (
            self.schedules.encoded() if schedules_changed and self.schedules is not None else None
        )
        tokens, self._recovery_uncommitted = self._recovery_uncommitted, set()
        recovery = self._recovery_changes(tokens)
        # In declaration order (a set's is arbitrary): documents list keys as the room does.
        changes = Changes(
            {k: v for k, v in self._encoded.items() if k in keys},
            put,
            deleted,
            schedules,
            recovery.put,
            recovery.deleted,
            recovery.frames,
        )
        try:
            await self._store.commit(self.definition.name, self.instance, changes)
        except BaseException:
            # Not stored: the next commit carries these again (with their latest values; a
            # log's frames since what the store had, which is still its ``stored``).
            self._uncommitted |= keys
            self.storage.restore_changes(storage_keys)
            self._schedules_uncommitted |= schedules_changed
            self._recovery_uncommitted |= tokens
            raise
        for log, mark in recovery.marks:
            log.stored = mark

    def _durable(self, seq: int) -> None:
        if seq == self._commit.seq:
            self._unsaved.clear()
        self._gate.release(seq)
        if (
            self._checkpointing is None
            and self._nursery is not None
            and self._store.checkpoint_due(self.definition.name, self.instance)
        ):
            # In the background: checkpoint I/O never holds a turn or a reply.
            self._checkpointing = trio.Event()
            self._nursery.start_soon(self._checkpoint)

    async def _checkpoint(self) -> None:
        """Rewrite the stored document from the room's state, so the store can let go of the
        commits it includes. A failure loses nothing (the commits stay in the store's journal)."""
        assert self.storage is not None
        try:
            await self._store.checkpoint(
                self.definition.name,
                self.instance,
                dict(self._encoded),
                self.storage.snapshot(),
                schedules=self.schedules.encoded() if self.schedules is not None else None,
                recovery=self._whole_recovery(),
            )
        except StoreError as exc:
            log.warning(
                "%s: checkpoint failed (its commits stay in the journal): %s", self._where, exc
            )
        finally:
            if self._checkpointing is not None:
                self._checkpointing.set()
                self._checkpointing = None

    async def _save_failed(self, error: StoreError, first: bool) -> None:
        if first:  # reported once per run of failures, not on every retry
            async with self._turn_lock:
                with _as_turn_of(self._key):
                    for key in sorted(self._unsaved):
                        await self._persist_failed(key, error, None)

    async def _final_flush(self) -> str | None:
        """Write every persisted key in full and wait until it is durable, then fold it into the
        stored document (a checkpoint); what failed, if anything did."""
        hibernate = self.definition.hooks.on_hibernate
        if hibernate is not None:
            # A turn before the flush, so what it changes is in the flush; if it raises, the
            # room still goes to sleep (its error is logged and goes to on_error).
            async with self._turn_lock:
                await self._turn(self._lifecycle_hook, ("on_hibernate", hibernate))
        async with self._turn_lock:
            with _as_turn_of(self._key):
                for key, error in self._persist_changes(full=True):
                    await self._persist_failed(key, error, None)
        if not await self._commit.wait_durable():
            return "its state could not be saved"
        if self._checkpointing is not None:
            await self._checkpointing.wait()
        if self._store.checkpoint_due(self.definition.name, self.instance, at_rest=True):
            # A room only goes to sleep with everything in its document: a sleeping room's
            # commits would otherwise wait in the journal until the next start.
            self._checkpointing = trio.Event()
            await self._checkpoint()
            if self._store.checkpoint_due(self.definition.name, self.instance, at_rest=True):
                return (
                    "its changes are saved in the store's journal, but its document could not "
                    "be written (they are applied at the next start)"
                )
        self._store.forget(self.definition.name, self.instance)
        return None

    # --- output gate ------------------------------------------------------------------------

    def _deliver(self, targets: Sequence[Session], frame: Output) -> int:
        if self._recovery is None or isinstance(frame, Close):
            return self._deliver_raw(targets, frame)
        # Recoverable sessions get the frame numbered, each its own copy, kept in its log.
        plain = [s for s in targets if s.recovery is None]
        if plain:
            self._deliver_raw(plain, frame)
        for session in targets:
            log = session.recovery
            if log is not None:
                self._recovery_dirty.add(log.token)
                self._deliver_raw([session], log.number(frame))
        if self._turn_outputs is None:  # outside any turn: committed on its own
            self._persist_changes()
        return len(targets)

    def _deliver_raw(self, targets: Sequence[Session], frame: Output) -> int:
        outputs = self._turn_outputs
        if outputs is None:
            return send_to(targets, frame)
        # Every frame of a turn waits for the turn's end: only then is it known whether the turn
        # changed persisted state (an early frame may precede the change within the same turn).
        outputs.append((targets, frame))
        return len(targets)


@attrs.define
class _RecoveryChanges:
    """The recovery part of one commit (see :meth:`Actor._recovery_changes`)."""

    put: dict[str, JSONValue] = attrs.field(factory=dict)
    frames: dict[str, JSONValue] = attrs.field(factory=dict)
    deleted: list[str] = attrs.field(factory=list)
    marks: list[tuple[SessionLog, LogMark]] = attrs.field(factory=list)


def _released(event: Any) -> None:
    """A turn's outputs left the gate: give the socket's message slot back, or hand a call's
    result to its caller."""
    if isinstance(event, Message):
        event.session.credit.message_done()
    elif isinstance(event, Call):
        event.done.set()


def _same(a: JSONValue, b: JSONValue | None) -> bool:
    # ``==`` alone treats 0.0 and -0.0 (and 1 and 1.0) as equal; the encoded bytes do not.
    return a == b and orjson.dumps(a) == orjson.dumps(b)
