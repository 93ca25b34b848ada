"""Internal: room instances and the supervisor that wakes, hibernates and isolates their actors.

A :class:`RoomInstance` outlives its actor: it keeps the sessions (sockets stay open while the room
sleeps) and the inbox. When an event arrives for a sleeping instance, the supervisor starts an
actor for it in the supervisor's nursery; the actor ends when it hibernates. If an actor's own
machinery fails, only that instance's sockets are closed (1011); other rooms never notice.
"""

from __future__ import annotations

import collections
import logging
import reprlib
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import attrs
import trio

from .actor import Actor, Call, Connect, Disconnect, Hibernate, InboxEvent
from .codec import Codec, make_codec
from .errors import NotPersistableError, RoomCrashedError, RoomNotFoundError, StoreError
from .room import DEFAULT_IDLE_TIMEOUT, RoomDefinition
from .routing import InstanceRules
from .runtime import Runtime
from .schedules import WallClock
from .sessions import Session, Sessions
from .store import Store

if TYPE_CHECKING:
    from .cluster.node import ClusterNode

log = logging.getLogger("verani.supervisor")

#: Events waiting for one room instance; a reader that finds it full waits (backpressure).
INBOX_SIZE = 1024


class RoomInstance:
    """A room definition + an instance name: its sessions and inbox, awake or asleep."""

    def __init__(self, supervisor: Supervisor, definition: RoomDefinition[Any], name: str) -> None:
        self.definition = definition
        self.name = name
        cluster = supervisor.cluster
        self.sessions: Sessions
        if cluster is None:
            self.sessions = Sessions()
        else:
            from .cluster.node import ClusterSessions  # coredis only for a cluster

            self.sessions = ClusterSessions(cluster, definition.name, name)
        self.actor: Actor | None = None
        self.running = False
        self._supervisor = supervisor
        self._send, self.inbox = trio.open_memory_channel[InboxEvent](INBOX_SIZE)
        #: In a cluster: when the first detached session of the room, as this node let it go,
        #: ends its grace period (Trio's clock; None: none).
        self.grace_deadline: float | None = None
        #: This process's sockets connected to the instance: it is not forgotten while any
        #: holds it (in a cluster they are not among its sessions when another node owns it).
        self.attached = 0
        #: Events taken from the inbox and put back, read before it (a cluster node that found
        #: no owner to forward one to takes the room, and handles it first).
        self.front: collections.deque[InboxEvent] = collections.deque()

    @property
    def key(self) -> tuple[str, str]:
        """``(room name, instance name)``."""
        return (self.definition.name, self.name)

    @property
    def awake(self) -> bool:
        """Whether an actor is running for this instance (possibly finishing its hibernation)."""
        return self.running

    def has_pending(self) -> bool:
        """Whether events wait in the inbox (or senders wait for room in it)."""
        stats = self.inbox.statistics()
        return bool(self.front or stats.current_buffer_used or stats.tasks_waiting_send)

    def receive_nowait(self) -> InboxEvent:
        """The next event (put-back ones first), or :class:`trio.WouldBlock`."""
        if self.front:
            return self.front.popleft()
        return self.inbox.receive_nowait()

    async def receive(self) -> InboxEvent:
        """The next event (put-back ones first), waiting for one."""
        if self.front:
            return self.front.popleft()
        return await self.inbox.receive()

    async def submit(self, event: InboxEvent) -> bool:
        """Queue an event for the room, waking it if it sleeps; waits while the inbox is full.

        Returns False when the event was dropped: the server is shutting down, or a socket that
        never joined (or was already dropped by a crash) left, which needs no turn.
        """
        if self._supervisor.stopping and not isinstance(event, Hibernate):
            return False
        if (
            isinstance(event, Disconnect)
            and not self.running
            and event.session not in self.sessions
            # In a cluster the session may be another node's to end: it goes there.
            and self._supervisor.cluster is None
        ):
            return False
        self._supervisor.ensure_running(self)
        try:
            # No scheduling round per message while the inbox has room; a reader still yields
            # at every socket read and whenever its socket's flow control makes it wait.
            self._send.send_nowait(event)
        except trio.WouldBlock:
            await self._send.send(event)
        return True

    async def hibernate(self) -> str | None:
        """Hibernate now if awake; returns an error message when its state could not be saved."""
        if not self.running:
            return None
        request = Hibernate()
        try:
            # No checkpoint between the ``running`` check and the enqueue: the actor cannot end
            # in between, so the request is never what wakes a sleeping room.
            self._send.send_nowait(request)
        except trio.WouldBlock:
            await self._send.send(request)
        await request.done.wait()
        return request.error


@attrs.frozen
class InstanceStatus:
    """A snapshot of one room instance, for ``verani inspect`` and tests."""

    room: str
    instance: str
    awake: bool
    sessions: int


class Supervisor:
    """Owns the nursery every awake room instance's actor runs in."""

    def __init__(
        self,
        rooms: Sequence[RoomDefinition[Any]],
        store: Store,
        *,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        codec: Codec | None = None,
        max_awake: int = 10_000,
        instance_rules: InstanceRules | None = None,
        cluster: ClusterNode | None = None,
    ) -> None:
        #: This node of a cluster (None: a server of its own).
        self.cluster = cluster
        self.rooms = {room.name: room for room in rooms}
        self.instance_rules = instance_rules or InstanceRules()
        self.store = store
        self.idle_timeout = idle_timeout
        self.codec = codec or make_codec()
        self.instances: dict[tuple[str, str], RoomInstance] = {}
        self.stopping = False
        self.max_awake = max_awake
        self._running = 0  # instances with an actor task, awake or finishing hibernation
        self._evicting: set[tuple[str, str]] = set()
        #: Reaches room instances from outside their turns (timers, other rooms' handlers).
        self.runtime = Runtime(self)
        #: How long recent revivals from a stored document took (store read, decoding, state
        #: rebuilt), in ms; recorded when the revived actor ends.
        self.revive_ms: collections.deque[float] = collections.deque(maxlen=1000)
        #: Room instance whose turn waits on a call -> the instance it called (cycle checks).
        self.waiting: dict[tuple[str, str], tuple[str, str]] = {}
        self._nursery: trio.Nursery | None = None
        #: The wall clock rooms schedule by (set when the supervisor runs).
        self.clock: WallClock | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled; room actors live in this task's nursery, with the task that
        wakes sleeping rooms whose schedules come due."""
        self.clock = WallClock()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.cluster is not None:
                await nursery.start(self.cluster.run, self)
            nursery.start_soon(self._wake_due, self.clock)
            task_status.started()
            await trio.sleep_forever()

    async def _wake_due(self, clock: WallClock) -> None:
        """Wake every sleeping room instance whose next schedule is due, earliest first.

        The store's index says when each is due without reading any document; an awake room
        runs its own schedules. The index is looked at again at least once a second (a room
        that goes to sleep adds to it without telling this task).
        """
        stale = False
        while True:
            # Due or not by Trio's clock, the one the sleep below uses: judged by the wall clock
            # (cut to microseconds), a deadline just passed can look a hair early, and the loop
            # would spin on it without time moving on (for good, on a virtual clock). Seen with
            # due times stored from float timestamps.
            try:
                await self.store.refresh_due_times()
                stale = False
            except StoreError as exc:
                # The index as last read stays in use; rooms that come due meanwhile wake a
                # little late, once the store answers again. Said once per outage.
                if not stale:
                    log.warning("the index of due schedules could not be refreshed: %s", exc)
                stale = True
            now = trio.current_time()
            due: list[tuple[float, tuple[str, str]]] = []
            upcoming = now + 1.0
            for key, when in self.store.due_times().items():
                if key[0] not in self.rooms:
                    continue  # a room this server does not serve: its schedules wait for one
                deadline = clock.deadline(when)
                if deadline <= now:
                    due.append((deadline, key))
                else:
                    upcoming = min(upcoming, deadline)
            for _, (room, name) in sorted(due):
                if self.stopping:
                    return
                inst = self.instance(room, name)
                if not inst.running:
                    log.debug("room %s/%s: woken for a schedule that is due", room, name)
                    self.ensure_running(inst)
            await trio.sleep_until(upcoming)

    def instance(self, room: str, name: str) -> RoomInstance:
        """The instance ``name`` of ``room``, created (asleep) if it is not known yet."""
        key = (room, name)
        inst = self.instances.get(key)
        if inst is None:
            inst = self.instances[key] = RoomInstance(self, self.rooms[room], name)
        return inst

    def ensure_running(self, inst: RoomInstance) -> None:
        """Start an actor for ``inst`` unless one runs."""
        if inst.running:
            return
        if self._nursery is None:
            raise RuntimeError("the supervisor is not running; start Supervisor.run first")
        current = self.instances.get(inst.key)
        if current is not None and current is not inst:
            # Never two instances (and actors) of one room: this one was let go of while idle.
            raise RuntimeError(f"room {inst.key[0]}/{inst.key[1]}: a second instance")
        inst.running = True
        self._running += 1
        self.instances[inst.key] = inst
        self._nursery.start_soon(self._run_instance, inst, name=f"room {inst.key[0]}/{inst.key[1]}")
        if self._running > self.max_awake:  # the scan below runs only when over the limit
            self._evict_if_over(inst)

    def _evict_if_over(self, newcomer: RoomInstance) -> None:
        """Past ``max_awake`` awake instances, hibernate the least recently used ones."""
        awake = [
            i
            for i in self.instances.values()
            if i.running
            and i is not newcomer
            and i.actor is not None
            and i.key not in self._evicting
        ]
        excess = len(awake) + 1 + len(self._evicting) - self.max_awake
        if excess <= 0 or self._nursery is None:
            return
        awake.sort(key=lambda i: i.actor.last_turn if i.actor is not None else 0.0)
        for victim in awake[:excess]:
            self._evicting.add(victim.key)
            self._nursery.start_soon(self._evict, victim)

    async def _evict(self, inst: RoomInstance) -> None:
        try:
            log.info(
                "room %s/%s: hibernating, the least recently used of %d awake rooms",
                *inst.key,
                self.max_awake,
            )
            error = await inst.hibernate()
            if error:
                log.error("room %s/%s: %s", *inst.key, error)
        finally:
            self._evicting.discard(inst.key)

    async def _run_instance(self, inst: RoomInstance) -> None:
        try:
            while True:
                cluster = self.cluster
                if cluster is not None:
                    if self.stopping:
                        # Draining: the room is not taken again here; its next owner will.
                        self._drain(inst, "the node is shutting down", close_code=1012)
                        return
                    try:
                        owned = await cluster.take(inst)
                    except Exception as exc:
                        log.error(
                            "room %s/%s: cannot reach its owner or take it over (%s: %s); "
                            "closing its sockets here with 1011",
                            *inst.key,
                            type(exc).__name__,
                            exc,
                            exc_info=exc,
                        )
                        self._fail_instance(inst)
                        return
                    if not owned:
                        # Another node owns it: its events went there until none came for a
                        # while.
                        if inst.has_pending():
                            continue
                        return
                definition = inst.definition
                actor = Actor(
                    definition=definition,
                    instance=inst.name,
                    sessions=inst.sessions,
                    inbox=inst,
                    store=self.store,
                    codec=self.codec,
                    idle_timeout=definition.idle_timeout or self.idle_timeout,
                    clock=self.clock,
                    runtime=self.runtime,
                )
                inst.actor = actor
                request = None
                try:
                    if cluster is None:
                        request = await actor.run()
                    else:
                        with cluster.scope(inst):
                            request = await actor.run()
                        if inst.key in cluster.lost:
                            # Its lease went to another node: stop at once, write nothing.
                            actor.abandon("the room moved to another node")
                            cluster.abandon(inst)
                            self._drain(inst, "the room moved to another node", close_code=1012)
                            return
                    if actor.restored:
                        self.revive_ms.append(actor.load_ms)
                except Exception as exc:
                    log.error(
                        "room %s/%s crashed (%s: %s); closing its sockets with 1011",
                        *inst.key,
                        type(exc).__name__,
                        exc,
                        exc_info=exc,
                    )
                    actor.abandon("the room failed")
                    self._fail_instance(inst)
                    return
                except BaseException:
                    # Cancelled (a shutdown that ran out of time): answer everyone who waits.
                    actor.abandon("the server stopped")
                    self._drain(inst, "the server stopped", close_code=None)
                    raise
                finally:
                    inst.actor = None
                    if cluster is not None:
                        with trio.CancelScope(shield=True):
                            await cluster.release(inst)
                # Events that arrived during the final flush wake the room again at once.
                pending = inst.has_pending()
                if not pending:
                    self._retire(inst)
                if request is not None:
                    # Only now: whoever asked sees the instance asleep (or awake again for the
                    # events that came meanwhile), never still finishing its hibernation.
                    request.finish(None)
                if not pending:
                    return
        finally:
            self._retire(inst)

    def _retire(self, inst: RoomInstance) -> None:
        if inst.running:
            self._running -= 1
        inst.running = False
        deadlines = [
            s.recovery.deadline
            for s in inst.sessions
            if s.detached and s.recovery is not None and s.recovery.deadline is not None
        ]
        if inst.grace_deadline is not None:
            # A cluster node let the room go with dropped sessions waiting (they are in its
            # document now): it wakes the room once, when the first one's grace period ends.
            deadlines.append(inst.grace_deadline)
            inst.grace_deadline = None
        if deadlines and self._nursery is not None and not self.stopping:
            # Asleep with dropped sessions waiting: wake when the first one's grace period ends.
            self._nursery.start_soon(self._wake_at, inst, min(deadlines))
        self.forget_if_idle(inst)

    def forget_if_idle(self, inst: RoomInstance) -> None:
        """Let go of an instance that sleeps with no session and no socket of this process."""
        if (
            not inst.running
            and not len(inst.sessions)
            and not inst.attached
            and self.instances.get(inst.key) is inst
        ):
            del self.instances[inst.key]

    async def _wake_at(self, inst: RoomInstance, deadline: float) -> None:
        await trio.sleep_until(deadline)
        waiting = self.cluster is not None or any(s.detached for s in inst.sessions)
        if not inst.running and not self.stopping and waiting:
            if self.instances.get(inst.key) is not inst:
                inst = self.instance(*inst.key)  # let go of meanwhile: the current one
            self.ensure_running(inst)

    def _fail_instance(self, inst: RoomInstance) -> None:
        for session in inst.sessions:
            inst.sessions.remove(session)
            session.sink.close(1011, "the room failed; reconnect to revive it")
        self._drain(inst, "the room failed", close_code=1011)

    def _drain(self, inst: RoomInstance, reason: str, *, close_code: int | None) -> None:
        """Answer every event still queued for an instance whose actor is gone."""
        while True:
            try:
                event = inst.receive_nowait()
            except trio.WouldBlock:
                break
            if isinstance(event, Connect) and close_code is not None:
                event.session.sink.close(close_code, f"{reason}; reconnect to revive it")
            elif isinstance(event, Hibernate):
                event.finish(f"{reason} before the room could hibernate")
            elif isinstance(event, Call):
                event.fail(RoomCrashedError(f"room {inst.key[0]}/{inst.key[1]}: {reason}"))

    def status(self) -> list[InstanceStatus]:
        """Every known instance, sorted by room and name."""
        return [
            InstanceStatus(room, name, inst.awake, len(inst.sessions))
            for (room, name), inst in sorted(self.instances.items())
        ]

    def inspect(self, room: str, instance: str) -> dict[str, Any] | None:
        """What this server knows of ``room``/``instance`` beyond the store (sessions, awake
        state, ephemeral keys), or None when it knows nothing of it."""
        inst = self.instances.get((room, instance))
        if inst is None:
            return None
        live: dict[str, Any] = {
            "awake": inst.awake,
            "sessions": [_session_info(s, self.codec) for s in inst.sessions],
        }
        if inst.actor is not None and inst.actor.state is not None:
            live.update(inst.actor.snapshot())
        return live

    async def hibernate(
        self, room: str | None = None, instance: str | None = None
    ) -> list[tuple[str, str, str | None]]:
        """Hibernate the awake instances of ``room`` (all rooms when None), or one instance.

        Returns ``(room, instance, error)`` for each instance that was awake; ``error`` is None
        when its state is durable and it sleeps. Raises :class:`RoomNotFoundError` for an unknown
        room, or an instance that is neither known here nor in the store.
        """
        if room is not None and room not in self.rooms:
            known = ", ".join(sorted(self.rooms)) or "(none)"
            raise RoomNotFoundError(f"no room named {room!r} is served (rooms: {known})")
        if instance is not None:
            if room is None:
                raise ValueError("an instance name needs its room name")
            if (room, instance) not in self.instances:
                stored = await self.store.list_instances(room)
                if (room, instance) not in stored:
                    raise RoomNotFoundError(f"room {room!r} has no instance named {instance!r}")
        targets = [
            inst
            for (r, name), inst in list(self.instances.items())
            if inst.running
            and (room is None or r == room)
            and (instance is None or name == instance)
        ]
        return await self._hibernate_all(targets)

    async def _hibernate_all(
        self, targets: Iterable[RoomInstance]
    ) -> list[tuple[str, str, str | None]]:
        results: list[tuple[str, str, str | None]] = []

        async def one(inst: RoomInstance) -> None:
            results.append((*inst.key, await inst.hibernate()))

        async with trio.open_nursery() as nursery:
            for inst in targets:
                nursery.start_soon(one, inst)
        return sorted(results, key=lambda r: (r[0], r[1]))

    async def shutdown(self) -> list[tuple[str, str, str | None]]:
        """Stop taking events and hibernate every awake instance (a full, durable flush)."""
        self.stopping = True
        return await self._hibernate_all([i for i in list(self.instances.values()) if i.running])


def _session_info(session: Session, codec: Codec) -> dict[str, Any]:
    meta = session.meta
    extra: dict[str, Any] = {}
    for field in attrs.fields(type(meta)):
        if field.name in ("user_id", "client_id", "channels"):
            continue
        value = getattr(meta, field.name)
        try:
            extra[field.name] = codec.encode(value, path=field.name)
        except NotPersistableError:
            extra[field.name] = reprlib.repr(value)
    return {
        "user_id": meta.user_id,
        "client_id": meta.client_id,
        "channels": list(meta.channels),
        "extra": extra,
        # Its socket dropped; the session waits for its client to recover it (recovery).
        "detached": session.detached,
    }
