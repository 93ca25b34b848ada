"""Internal: one node of a cluster — routing sockets' events to the owner of their room, and the
owner's frames back to the sockets, through Redis.

Every room instance is owned by at most one node at a time (a lease, :mod:`.lease`); only the
owner runs its actor and writes its state, each write fenced by the owner's epoch. A socket
stays on the node that accepted it. When its room is owned elsewhere, the socket's node
forwards its connect, messages and disconnect to the owner's *inbox* (a Redis stream), and the
owner sends the frames for it to the socket node's inbox, in order. Streams, not pub/sub: an
entry waits in the stream while its reader is busy or reconnecting to Redis, where pub/sub
would drop it.

The owner sees every session of its room, on every node: the sessions it accepted are kept in
a Redis hash per instance (:func:`.keys.sessions_key`), so the next owner — after a
hibernation, a hand-over or a failover — takes them over as a room takes over its sockets
after a hibernation (``on_hibernation_restore`` runs).

What a forward to a room carries is checked and enqueued in one script: it goes to the inbox of
whoever holds the lease at that moment, or, when nobody does, the forwarding node takes the
room itself. An event is lost only when the owner dies with it unprocessed in its inbox — it was
never answered, so no client was shown its effect.
"""

from __future__ import annotations

import collections
import functools
import importlib
import itertools
import logging
import os
import secrets
import socket
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final

import attrs
import coredis
import orjson
import trio

from ..actor import Call, Connect, Disconnect, Hibernate, InboxEvent, Message
from ..codec import make_codec
from ..errors import NotPersistableError, RoomNotFoundError, StoreError, VeraniError
from ..flow import Credit
from ..protocol import ClientFrame
from ..recovery import ResumeRequest
from ..sessions import DETACHED, ConnectionMeta, Session, Sessions
from . import keys, lease
from .group import Group, Job, run_scripts, settle
from .lease import UNREACHABLE as _UNREACHABLE

if TYPE_CHECKING:
    from ..supervisor import RoomInstance, Supervisor

log = logging.getLogger("verani.cluster")

#: Seconds a lease lasts without renewal; renewed every third of it.
DEFAULT_LEASE_SECONDS: Final = 5.0
#: Seconds a non-owner keeps forwarding for an instance after its last event.
FORWARD_IDLE: Final = 30.0
#: Entries kept in a node's inbox at most (approximately): a dead node's inbox stops growing.
INBOX_MAXLEN: Final = 100_000
#: Seconds a call across nodes waits for its answer at most.
MAX_REPLY_WAIT: Final = 8.0
#: Events of one room forwarded in one round trip at most.
FORWARD_BATCH: Final = 64
#: Entries read from the inbox at once.
READ_COUNT: Final = 512

# KEYS[1]: the lease. ARGV: the message, the inbox key prefix, the inbox's maximum length.
# The message goes to the inbox of the lease's holder; no holder: false (take the room).
_FORWARD = """
local v = redis.call('GET', KEYS[1])
if not v then return false end
local holder = string.match(v, '^(%S+) ')
local node = string.match(holder, '^(.*)#[^#]*$')
redis.call('XADD', ARGV[2] .. node, 'MAXLEN', '~', ARGV[3], '*', 'p', ARGV[1])
return holder
"""

# KEYS[1]: an instance's sessions. ARGV: a client id, its connection. The entry goes only if it
# is still that connection's (a recovered session may already be another socket's).
_FORGET = """
local v = redis.call('HGET', KEYS[1], ARGV[1])
if v and string.find(v, '"x":"' .. ARGV[2] .. '"', 1, true) then
  return redis.call('HDEL', KEYS[1], ARGV[1])
end
return 0
"""

#: Seconds between retries when Redis does not answer.
_READ_ERRORS: tuple[type[BaseException], ...] = (coredis.exceptions.RedisError, *_UNREACHABLE)
_HEARTBEAT_ERRORS: tuple[type[BaseException], ...] = (*_READ_ERRORS, StoreError)
_RETRY: Final = 0.5


def default_node_id() -> str:
    """``HOST-PID``: unique on one machine, readable in ``verani inspect --cluster``."""
    return f"{socket.gethostname()}-{os.getpid()}"


@attrs.define(eq=False)
class RemoteSink:
    """The sink of a session whose socket is on another node: its frames go there, in order,
    through that node's inbox (the node's own flow control applies when they arrive)."""

    node: ClusterNode
    target: str
    conn: str
    room: str
    instance: str

    def send_frame(self, frame: bytes) -> None:
        self.node.post_frame(self.target, self.conn, self.room, self.instance, frame)

    def close(self, code: int, reason: str) -> None:
        self.node.post(self.target, ["z", self.conn, code, reason])

    def over_budget(self) -> None:
        # Frames held for it are bounded where they are sent: at the socket's own node.
        pass


class ClusterSessions(Sessions):
    """An instance's sessions on its owner: each one the room accepts is recorded in Redis, so
    that the next owner takes it over."""

    def __init__(self, node: ClusterNode, room: str, instance: str) -> None:
        super().__init__()
        self._node, self._room, self._instance = node, room, instance

    def add(self, session: Session) -> None:
        super().add(session)
        if session.sink is not DETACHED:
            self._node.record_session(self._room, self._instance, session)

    def left(self, session: Session) -> None:
        self._node.forget_session(self._room, self._instance, session)

    def meta_changed(self, meta: ConnectionMeta) -> None:
        session = self.get(meta.client_id)
        if session is not None and session.sink is not DETACHED:
            self._node.record_session(self._room, self._instance, session)


def _big_credit() -> Credit:
    # A remote socket's credit is kept by its own node; here only the turn's bookkeeping runs.
    return Credit(max_frames=1 << 30, max_bytes=1 << 62, max_in_flight=1 << 30)


class ClusterNode:
    """This process as one node of a cluster on the Redis at ``url``."""

    def __init__(
        self,
        url: str,
        node_id: str | None = None,
        *,
        client: coredis.Redis[Any],
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
    ) -> None:
        self.url = url
        self.node_id = node_id or default_node_id()
        if "#" in self.node_id or not self.node_id.strip():
            raise ValueError(f"node id {self.node_id!r}: must be non-empty and without '#'")
        #: Random per process: a node restarted with the same id is another incarnation, whose
        #: sockets and leases are not the old one's.
        self.incarnation = secrets.token_hex(6)
        self.holder = f"{self.node_id}#{self.incarnation}"
        self.lease_ms = int(lease_seconds * 1000)
        #: Seconds a non-owner keeps forwarding for an instance after its last event.
        self.forward_idle = FORWARD_IDLE
        #: Opened and closed by the store that shares it (``RedisStore.from_url``).
        self.client = client
        self._forward_script = self.client.register_script(_FORWARD)
        self._forget_script = self.client.register_script(_FORGET)
        self.codec = make_codec()
        #: The epoch of every room instance this node owns.
        self.owned: dict[tuple[str, str], int] = {}
        #: This node's sockets, by connection id; and the latest ones that closed.
        self.conns: dict[str, Any] = {}
        self._closed: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._conn_seq = itertools.count(1)
        #: Sessions of rooms this node owns whose sockets are elsewhere, by (node, conn).
        self.remote: dict[tuple[str, str], Session] = {}
        #: Per instance owned: the scope its actor runs in (cancelled when the lease is lost).
        self._scopes: dict[tuple[str, str], trio.CancelScope] = {}
        self.lost: set[tuple[str, str]] = set()
        # What goes to other nodes' inboxes and to Redis, flushed in order by one task.
        self._out: dict[str, list[list[Any]]] = {}
        # Per target: the last frame queued and the message carrying it (see post_frame).
        self._last_frame: dict[str, tuple[bytes, list[Any]]] = {}
        self._writes: list[tuple[Any, ...]] = []
        # Group forwarding (see _forward).
        self._forwards = Group(self._forward_batch)
        # Sessions of this node's sockets that ended: (hash, client id, connection).
        self._forget: list[tuple[str, str, str]] = []
        # Disconnects of sockets found gone, for their rooms' owners (see _deliver).
        self._gone: list[tuple[str, str, list[Any]]] = []
        self._out_ready = trio.Event()
        self._flush_lock = trio.Lock()
        self._gone_reported: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.supervisor: Supervisor | None = None
        self._nursery: trio.Nursery | None = None
        #: Counters for benchmarks and inspect: forwards, entries read, batches flushed.
        self.stats: collections.Counter[str] = collections.Counter()

    # --- life -------------------------------------------------------------------------------

    async def run(
        self,
        supervisor: Supervisor,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Announce the node, then keep it alive, read its inbox and flush what it sends."""
        self.supervisor = supervisor
        await self._announce()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._heartbeat)
                nursery.start_soon(self._read_inbox)
                nursery.start_soon(self._flush_loop)
                task_status.started()
                await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await self._flush()
                await self._retire()

    async def _announce(self) -> None:
        try:
            await self.client.set(keys.node_key(self.node_id), self.incarnation, px=self.lease_ms)
            info = {
                "incarnation": self.incarnation,
                "pid": os.getpid(),
                "host": socket.gethostname(),
            }
            await self.client.hset(keys.NODES, {self.node_id: orjson.dumps(info)})
        except (coredis.exceptions.RedisError, OSError) as exc:
            raise StoreError(f"cannot reach Redis at {self.url}: {exc}") from exc

    async def _retire(self) -> None:
        try:
            await self.client.delete([keys.node_key(self.node_id)])
            await self.client.hdel(keys.NODES, [self.node_id])
        except (coredis.exceptions.RedisError, OSError):
            pass  # the key expires by itself

    # --- this node's sockets ----------------------------------------------------------------

    def attach(self, conn: Any) -> str:
        """Give a socket of this node its cluster-wide connection id."""
        conn_id = f"{self.incarnation}.{next(self._conn_seq)}"
        self.conns[conn_id] = conn
        return conn_id

    def detach(self, conn_id: str) -> None:
        """A socket of this node is gone. Its room's owner ends its session when its
        Disconnect arrives (``ClusterSessions.left``); until then a new owner may still take
        it over, so it is kept a while among the closed ones."""
        conn = self.conns.pop(conn_id, None)
        if conn is not None:
            self._closed[conn_id] = conn
            if len(self._closed) > 10_000:
                self._closed.popitem(last=False)

    def forget_session(self, room: str, instance: str, session: Session) -> None:
        """The owner saw ``session``'s socket go: the next owner must not take it over."""
        where = self._address(session)
        if where is not None:
            hkey = keys.sessions_key(room, instance)
            self._forget.append((hkey, session.meta.client_id, where[1]))
            self._out_ready.set()

    def record_session(self, room: str, instance: str, session: Session) -> None:
        """The owner accepted ``session``: keep it where the next owner will find it."""
        where = self._address(session)
        if where is None:
            return
        meta = session.meta
        try:
            encoded = self.codec.encode(meta, type(meta), path="meta")
        except NotPersistableError as exc:
            log.warning("room %s/%s: session meta not kept for a failover: %s", room, instance, exc)
            return
        value = orjson.dumps(
            {"n": where[0], "x": where[1], "m": encoded, "c": _class_path(type(meta))}
        )
        self._writes.append(("HSET", keys.sessions_key(room, instance), meta.client_id, value))
        self._out_ready.set()

    def _address(self, session: Session) -> tuple[str, str] | None:
        sink = session.sink
        if isinstance(sink, RemoteSink):
            return sink.target, sink.conn
        conn_id = getattr(sink, "cluster_id", None)
        return (self.node_id, conn_id) if isinstance(conn_id, str) else None

    # --- ownership --------------------------------------------------------------------------

    def epoch_of(self, room: str, instance: str) -> int | None:
        """The epoch this node owns ``room``/``instance`` with (None: not owned)."""
        return self.owned.get((room, instance))

    async def take(self, inst: RoomInstance) -> bool:
        """Own ``inst`` (True, its sessions on every node loaded) or forward its events to
        whoever owns it until it is idle (False)."""
        key = inst.key
        while True:
            got = await self._retrying(
                lambda: lease.acquire(self.client, key[0], key[1], self.holder, self.lease_ms),
                f"room {key[0]}/{key[1]}: taking its lease",
            )
            if got.ok:
                self.owned[key] = got.epoch
                self.lost.discard(key)
                await self._load_sessions(inst)
                log.debug("room %s/%s: owned by this node (epoch %d)", *key, got.epoch)
                return True
            if await self._forward_until_idle(inst):
                return False

    def scope(self, inst: RoomInstance) -> trio.CancelScope:
        """The scope the owner's actor runs in: cancelled when the lease is lost (at once if
        it was lost while the sessions were being read)."""
        scope = self._scopes[inst.key] = trio.CancelScope()
        if inst.key not in self.owned:
            self.lost.add(inst.key)
            scope.cancel()
        return scope

    async def release(self, inst: RoomInstance) -> None:
        """The actor of ``inst`` ended (hibernated, or lost the room): let the room go, and
        forget the sessions of other nodes (the next owner reads them again)."""
        key = inst.key
        self._scopes.pop(key, None)
        epoch = self.owned.pop(key, None)
        # Every session is read again by whichever node owns the room next: live ones from
        # the sessions hash, detached ones from the document's recovery section (this node
        # wakes the room when the first of those ends its grace period).
        deadlines = [
            s.recovery.deadline
            for s in inst.sessions
            if s.detached and s.recovery is not None and s.recovery.deadline is not None
        ]
        inst.grace_deadline = min(deadlines, default=None)
        for session in list(inst.sessions):
            inst.sessions.remove(session)
            if isinstance(session.sink, RemoteSink):
                self.remote.pop((session.sink.target, session.sink.conn), None)
        if epoch is not None and key not in self.lost:
            await self._flush()  # frames for other nodes go before the room can move
            try:
                await lease.release(self.client, key[0], key[1], self.holder, epoch)
            except (coredis.exceptions.RedisError, OSError, StoreError) as exc:
                log.warning("room %s/%s: lease not released (%s); it expires", *key, exc)

    def _lose(self, key: tuple[str, str]) -> None:
        if key not in self.owned:
            return
        log.error(
            "room %s/%s: this node no longer holds its lease; it stops serving the room "
            "(its sockets here are closed with 1012 and reconnect to the new owner)",
            *key,
        )
        self.lost.add(key)
        self.owned.pop(key, None)
        scope = self._scopes.get(key)
        if scope is not None:
            scope.cancel()

    def abandon(self, inst: RoomInstance) -> None:
        """After a lost lease: this node's sockets of ``inst`` reconnect (to the new owner)."""
        for session in list(inst.sessions):
            inst.sessions.remove(session)
            if isinstance(session.sink, RemoteSink):
                self.remote.pop((session.sink.target, session.sink.conn), None)
            else:
                session.sink.close(1012, "the room moved to another node; reconnect")

    async def _load_sessions(self, inst: RoomInstance) -> None:
        """Take over the sessions the room's previous owners accepted, on live nodes."""
        room, instance = inst.key
        hkey = keys.sessions_key(room, instance)
        entries: dict[bytes, bytes] = await self._retrying(
            lambda: self.client.hgetall(hkey), f"room {room}/{instance}: reading its sessions"
        )
        incarnations: dict[str, str | None] = {}
        dead: list[bytes] = []
        for client_id, raw in entries.items():
            try:
                entry = orjson.loads(raw)
                node, conn = str(entry["n"]), str(entry["x"])
            except (orjson.JSONDecodeError, KeyError, TypeError):
                dead.append(client_id)
                continue
            if node not in incarnations:
                alive = await self._retrying(
                    functools.partial(self.client.get, keys.node_key(node)),
                    f"room {room}/{instance}: reading which nodes are alive",
                )
                incarnations[node] = alive.decode() if alive is not None else None
            if incarnations[node] != conn.split(".")[0]:
                dead.append(client_id)  # that socket went with its node
                continue
            if inst.sessions.has_client(client_id.decode()):
                continue
            if node == self.node_id:
                local = self.conns.get(conn) or self._closed.get(conn)
                if local is None:
                    dead.append(client_id)
                    continue
                session = local.session
                recorded = self._decode_meta(entry)
                if recorded is not None:
                    # Channels it joined or left under another owner.
                    session.meta.channels = list(recorded.channels)
            else:
                existing = self.remote.get((node, conn))
                if existing is not None:
                    session = existing
                else:
                    meta = self._decode_meta(entry)
                    if meta is None:
                        dead.append(client_id)
                        continue
                    sink = RemoteSink(self, node, conn, room, instance)
                    session = Session(meta, sink, _big_credit())
                    self.remote[(node, conn)] = session
            Sessions.add(inst.sessions, session)
        if dead:
            self._writes.append(("HDEL", hkey, *(c.decode() for c in dead)))
            self._out_ready.set()

    def _decode_meta(self, entry: dict[str, Any]) -> ConnectionMeta | None:
        cls = _class_at(str(entry.get("c", ""))) or ConnectionMeta
        try:
            meta = self.codec.decode(entry["m"], cls, path="meta")
        except Exception as exc:  # a meta class changed between deployments
            log.warning("a session's meta could not be read (%s); using its identity only", exc)
            raw = entry.get("m") or {}
            try:
                return ConnectionMeta(
                    str(raw["user_id"]), str(raw["client_id"]), list(raw.get("channels", []))
                )
            except (KeyError, TypeError):
                return None
        return meta if isinstance(meta, ConnectionMeta) else None

    # --- forwarding -------------------------------------------------------------------------

    async def _forward_until_idle(self, inst: RoomInstance) -> bool:
        """Send ``inst``'s events to its owner until none came for :data:`FORWARD_IDLE`
        seconds (True), or until it has no owner (False: the events in hand are put back).

        Every event waiting goes in one forward (one round trip, one inbox entry), in order.
        """
        room, instance = inst.key
        while True:
            event: InboxEvent | None = inst.front.popleft() if inst.front else None
            if event is None:
                with trio.move_on_after(self.forward_idle):
                    event = await inst.inbox.receive()
                if event is None:
                    return True
            events = [event]
            while len(events) < FORWARD_BATCH:
                try:
                    events.append(inst.receive_nowait())
                except trio.WouldBlock:
                    break
            sent: list[InboxEvent] = []
            messages: list[list[Any]] = []
            for one in events:
                message = self._message_for(inst, one)
                if message is not None:
                    sent.append(one)
                    messages.append(message)
            if not messages:
                continue
            holder = await self._retrying(
                functools.partial(self._forward, room, instance, *messages),
                f"room {room}/{instance}: forwarding to its owner",
            )
            if holder is None:
                inst.front.extendleft(reversed(sent))
                return False
            self.stats["forwards"] += 1
            for one in sent:
                if isinstance(one, Message):
                    one.session.credit.message_done()
                elif isinstance(one, Disconnect) and isinstance(one.session.sink, RemoteSink):
                    self.remote.pop((one.session.sink.target, one.session.sink.conn), None)

    def _message_for(self, inst: RoomInstance, event: InboxEvent) -> list[Any] | None:
        """The inbox message that carries ``event`` to another node (None: none to send)."""
        room, instance = inst.key
        if isinstance(event, Hibernate):
            # Nothing of the room is awake here (a shutdown, or `verani hibernate` on this
            # node); the owner's own hibernation is asked for through remote_op.
            event.finish(None)
            return None
        if isinstance(event, Call):
            if event.op is None:
                event.fail(
                    RoomNotFoundError(
                        f"room {room}/{instance} is owned by another node: call(fn) runs only "
                        f"there; use the room handle's methods (emit_to_channel, ...), which "
                        f"reach it"
                    )
                )
            else:
                self._start(self._call_remote, inst, event)
            return None
        where = self._address(event.session)
        if where is None:
            return None
        node, conn = where
        if isinstance(event, Connect):
            meta = event.session.meta
            try:
                encoded = self.codec.encode(meta, type(meta), path="meta")
            except NotPersistableError as exc:
                log.error("room %s/%s: a socket's meta cannot cross nodes: %s", room, instance, exc)
                event.session.sink.close(1011, "the room's meta cannot cross nodes")
                return None
            resume = event.resume
            return [
                "c",
                room,
                instance,
                node,
                conn,
                encoded,
                _class_path(type(meta)),
                resume.token if resume else None,
                resume.offset if resume else 0,
            ]
        if isinstance(event, Message):
            f = event.frame
            return ["m", room, instance, node, conn, [f.type, f.data, f.channel, f.id]]
        return ["d", room, instance, node, conn, event.code, event.reason, event.final]

    # --- calls across nodes -----------------------------------------------------------------

    def _start(self, fn: Callable[..., Any], *args: Any) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(fn, *args)

    async def _call_remote(self, inst: RoomInstance, event: Call) -> None:
        assert event.op is not None
        try:
            event.result = await self.remote_op(inst.key[0], inst.key[1], event.op)
        except VeraniError as exc:
            event.fail(exc)
        except Exception as exc:  # Redis failed under the call: the caller hears it
            event.fail(VeraniError(f"room {inst.key[0]}/{inst.key[1]}: the call failed: {exc}"))
        else:
            event.done.set()

    async def remote_op(
        self, room: str, instance: str, op: Sequence[Any], *, timeout: float = MAX_REPLY_WAIT
    ) -> Any:
        """Run ``op`` (see :meth:`run_op`) on the owner of ``room``/``instance`` and return its
        result; with no owner, here (which takes the room)."""
        reply = keys.reply_key(secrets.token_hex(12))
        message = ["o", room, instance, reply, list(op)]
        holder = await self._retrying(
            functools.partial(self._forward, room, instance, message),
            f"room {room}/{instance}: a call to its owner",
        )
        if holder is None:
            if op[0] in ("hibernate", "inspect"):
                return None  # not awake anywhere
            return await self.run_op(room, instance, op)
        return await wait_reply(self.client, reply, f"room {room}/{instance}", timeout)

    async def run_op(self, room: str, instance: str, op: Sequence[Any]) -> Any:
        """Run a call that came as data: a :class:`~verani.runtime.RoomHandle` method, or
        ``hibernate`` / ``inspect``."""
        supervisor = self.supervisor
        assert supervisor is not None
        name, *args = op
        if name == "hibernate":
            results = await supervisor.hibernate(room, instance)
            return next((e for _, _, e in results if e), None)
        if name == "inspect":
            return supervisor.inspect(room, instance)
        handle = supervisor.runtime.room(room, instance)
        if name == "disconnect":
            client_id, user_id, code, reason = args
            return await handle.disconnect(client_id, user_id=user_id, code=code, reason=reason)
        if name == "broadcast":
            channel, data, users, clients = args
            return await handle.broadcast(channel, data, user_ids=users, client_ids=clients)
        if name in _HANDLE_OPS:
            return await getattr(handle, name)(*args)
        raise VeraniError(f"room {room}/{instance}: unknown call {name!r} from another node")

    async def _answer_op(self, room: str, instance: str, reply: str, op: list[Any]) -> None:
        try:
            answer: dict[str, Any] = {"ok": await self.run_op(room, instance, op)}
        except Exception as exc:  # the caller's error, on the caller's node
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        payload = orjson.dumps(answer, default=repr)
        try:
            await self._retrying(
                functools.partial(self._push_reply, reply, payload), "answering a call"
            )
        except Exception as exc:  # the caller times out; this node goes on
            log.error("room %s/%s: a call's answer was not sent: %s", room, instance, exc)

    async def _push_reply(self, reply: str, payload: bytes) -> None:
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.rpush(reply, [payload])
            pipe.expire(reply, 60)

    # --- what this node sends ---------------------------------------------------------------

    def post(self, target: str, message: list[Any]) -> None:
        """Queue ``message`` for the inbox of node ``target`` (sent in order, in batches)."""
        self._out.setdefault(target, []).append(message)
        self._out_ready.set()

    def post_frame(self, target: str, conn: str, room: str, instance: str, frame: bytes) -> None:
        """Queue a frame for socket ``conn`` of node ``target``: one message per run of frames
        for one socket (``f``), or per frame sent to a run of sockets (``b``: a broadcast
        reaches another node as one copy, decoded and encoded once)."""
        queue = self._out.setdefault(target, [])
        last = queue[-1] if queue else None
        shared = self._last_frame.get(target)
        self._out_ready.set()
        if last is not None and shared is not None and shared[0] is frame and shared[1] is last:
            if last[0] == "b":
                last.append(conn)
                return
            if len(last) == 5 and last[1] != conn:
                last[:] = ["b", room, instance, last[4], last[1], conn]
                return
        if last is not None and last[0] == "f" and last[1] == conn:
            last.append(frame.decode())
        else:
            queue.append(["f", conn, room, instance, frame.decode()])
        self._last_frame[target] = (frame, queue[-1])

    async def _flush_loop(self) -> None:
        while True:
            await self._out_ready.wait()
            self._out_ready = trio.Event()
            try:
                await self._flush()
            except Exception as exc:  # Redis refused (OOM, read-only): said, and go on
                log.error("node %s: sending to other nodes failed: %s", self.node_id, exc)

    async def _flush(self) -> None:
        # One flush at a time, in order: a release waits for the one in flight, so no frame
        # of a room it hands over arrives after the new owner's.
        async with self._flush_lock:
            await self._flush_all()

    async def _flush_all(self) -> None:
        while self._out or self._writes or self._gone or self._forget:
            out, self._out = self._out, {}
            self._last_frame.clear()
            writes, self._writes = self._writes, []
            gone, self._gone = self._gone, []
            await self._retrying(
                functools.partial(self._send, out, writes), "sending to other nodes"
            )
            for room, instance, message in gone:
                await self._retrying(
                    functools.partial(self._forward, room, instance, message),
                    "reporting a gone socket",
                )
            forget, self._forget = self._forget, []
            for hkey, client_id, conn_id in forget:
                await self._retrying(
                    functools.partial(self._forget_script, keys=[hkey], args=[client_id, conn_id]),
                    "forgetting a session",
                )

    async def _forward(self, room: str, instance: str, *messages: list[Any]) -> str | None:
        """Put ``messages`` in the inbox of the owner of ``room``/``instance`` (one entry);
        returns the owner (None: nobody owns it, nothing was sent). Grouped with every other
        room's forward waiting (see :mod:`.group`)."""
        holder = await self._forwards.run((keys.lease_key(room, instance), orjson.dumps(messages)))
        return holder.decode() if isinstance(holder, bytes) else None

    async def _forward_batch(self, jobs: list[Job]) -> None:
        prefix = keys.inbox_key("")
        calls = [([job.payload[0]], [job.payload[1], prefix, INBOX_MAXLEN]) for job in jobs]
        try:
            settle(jobs, await run_scripts(self.client, _FORWARD, self._forward_script.sha, calls))
        except Exception as exc:  # never raise out of a group write: its waiters are told
            for job in jobs:
                job.error = exc

    async def _send(self, out: dict[str, list[list[Any]]], writes: list[tuple[Any, ...]]) -> None:
        async with self.client.pipeline(transaction=False) as pipe:
            for target, messages in out.items():
                pipe.xadd(
                    keys.inbox_key(target),
                    {"p": orjson.dumps(messages)},
                    trim_strategy=coredis.PureToken.MAXLEN,
                    threshold=INBOX_MAXLEN,
                    trim_operator=coredis.PureToken.APPROXIMATELY,
                )
            for command in writes:
                if command[0] == "HSET":
                    pipe.hset(command[1], {command[2]: command[3]})
                else:
                    pipe.hdel(command[1], list(command[2:]))
        self.stats["batches"] += 1

    # --- what this node receives ------------------------------------------------------------

    async def _read_inbox(self) -> None:
        inbox = keys.inbox_key(self.node_id)
        # Where to read from: an explicit id, never "$" (which means "what comes after this
        # call starts": an entry added while no XREAD is waiting would be skipped). What a
        # previous incarnation of this node left unread is not for this one.
        last: str | bytes = await self._retrying(
            functools.partial(self._stream_end, inbox), "reading its inbox"
        )
        read = 0
        failing = False
        while True:
            try:
                got = await self.client.xread({inbox: last}, count=READ_COUNT, block=1000)
            except _READ_ERRORS as exc:
                if not failing:  # once per outage
                    log.warning("node %s: cannot read its inbox (%s); retrying", self.node_id, exc)
                failing = True
                await trio.sleep(_RETRY)
                continue
            failing = False
            if not got:
                continue
            for entry in got.get(inbox.encode(), ()):
                last = entry.identifier
                try:
                    messages = orjson.loads(entry.field_values[b"p"])
                except (KeyError, orjson.JSONDecodeError) as exc:
                    log.error("node %s: unreadable inbox entry %s: %s", self.node_id, last, exc)
                    continue
                for message in messages:
                    await self._handle(message)
                read += 1
            self.stats["read"] = read
            # Nothing to trim: every XADD keeps the stream to about INBOX_MAXLEN entries.

    async def _stream_end(self, inbox: str) -> str | bytes:
        newest = await self.client.xrevrange(inbox, count=1)
        return newest[0].identifier if newest else b"0-0"

    async def _handle(self, message: list[Any]) -> None:
        kind = message[0]
        try:
            if kind in ("f", "b"):
                self._deliver(message)
            elif kind == "z":
                conn = self.conns.get(message[1])
                if conn is not None:
                    conn.close(int(message[2]), str(message[3]))
            elif kind in ("c", "m", "d"):
                await self._to_room(message)
            elif kind == "o":
                _, room, instance, reply, op = message
                supervisor = self.supervisor
                if supervisor is None or room not in supervisor.rooms:
                    await self._push_reply(reply, orjson.dumps({"error": f"no room {room!r}"}))
                else:
                    self._start(self._answer_op, room, instance, reply, op)
            else:
                log.error("node %s: unknown inbox message %r", self.node_id, kind)
        except (IndexError, KeyError, TypeError, ValueError) as exc:
            log.error("node %s: malformed inbox message %r: %s", self.node_id, message[:5], exc)
        except Exception as exc:  # one message never stops the reader (and the node)
            log.error(
                "node %s: inbox message %r failed: %s", self.node_id, message[:5], exc, exc_info=exc
            )

    def _deliver(self, message: list[Any]) -> None:
        if message[0] == "b":
            # One frame for many sockets (a broadcast): encoded once.
            room, instance, text = message[1], message[2], message[3]
            frames = [text.encode()]
            self.stats["shared_frames"] += 1
            for conn_id in message[4:]:
                self._deliver_to(conn_id, room, instance, frames)
        else:
            frames = [text.encode() for text in message[4:]]
            self._deliver_to(message[1], message[2], message[3], frames)

    def _deliver_to(self, conn_id: str, room: str, instance: str, frames: list[bytes]) -> None:
        conn = self.conns.get(conn_id)
        if conn is not None:
            for frame in frames:
                conn.send_frame(frame)
            return
        if conn_id in self._gone_reported:
            return
        # The owner sends to a socket that is gone (its disconnect was lost with an owner that
        # died): tell the current owner, once.
        self._gone_reported[conn_id] = None
        if len(self._gone_reported) > 10_000:
            self._gone_reported.popitem(last=False)
        self._gone.append(
            (room, instance, ["d", room, instance, self.node_id, conn_id, 1006, None, True])
        )
        self._out_ready.set()

    async def _to_room(self, message: list[Any]) -> None:
        supervisor = self.supervisor
        assert supervisor is not None
        kind, room, instance, node, conn = message[:5]
        if room not in supervisor.rooms:
            log.error(
                "node %s: an event for room %r, which this node does not serve", self.node_id, room
            )
            return
        inst = supervisor.instance(room, instance)
        key = (node, conn)
        local = self.conns.get(conn) if node == self.node_id else None
        if kind == "c":
            if node == self.node_id:
                # This node's own socket, sent back here (the room moved to this node while
                # its Connect was on its way): its local session, not a remote one.
                if local is not None:
                    await inst.submit(Connect(local.session, _resume(message)))
                return
            meta = self._decode_meta({"m": message[5], "c": message[6]})
            if meta is None:
                self.post(node, ["z", conn, 1011, "the session could not be read"])
                return
            joining = Session(meta, RemoteSink(self, node, conn, room, instance), _big_credit())
            self.remote[key] = joining
            if not await inst.submit(Connect(joining, _resume(message))):
                self.remote.pop(key, None)
                self.post(node, ["z", conn, 1001, "server shutting down"])
            return
        found = local.session if local is not None else self.remote.get(key)
        if kind == "m":
            if found is None:
                if inst.key not in self.owned and await self._forward(room, instance, message):
                    return  # this node let the room go meanwhile: on to its owner
                # Not a session of this room here (the socket joined a previous owner that
                # died before recording it): the client reconnects.
                self.post(node, ["z", conn, 1012, "the room moved to another node; reconnect"])
                return
            t, data, channel, ack_id = message[5]
            found.credit.take_message()
            frame = ClientFrame(str(t), data, channel, ack_id)
            if not await inst.submit(Message(found, frame)):
                found.credit.message_done()
                # Draining (SIGTERM): the client reconnects rather than wait for an answer.
                if local is None:
                    self.post(node, ["z", conn, 1012, "the node is shutting down; reconnect"])
            return
        if found is None:
            found = self._session_by_conn(inst, node, conn)
            if found is None:
                if inst.key not in self.owned:
                    await self._forward(room, instance, message)
                return
        self.remote.pop(key, None)
        code, reason, final = int(message[5]), message[6], bool(message[7])
        await inst.submit(Disconnect(found, code, reason, final=final))

    def _session_by_conn(self, inst: RoomInstance, node: str, conn: str) -> Session | None:
        for session in inst.sessions:
            sink = session.sink
            if isinstance(sink, RemoteSink) and sink.target == node and sink.conn == conn:
                return session
        return None

    # --- liveness ---------------------------------------------------------------------------

    async def _heartbeat(self) -> None:
        """Every third of a lease: say this node is alive, renew its leases, and let go of
        sessions on dead nodes.

        A lease found lost (another node took the room, or it expired while this node was
        paused or cut off from Redis) is taken again only if nobody owned the room meanwhile —
        the epoch is then exactly one more, so this node's state is still the latest; otherwise
        the room stops here at once, writing nothing (its next event revives it from Redis,
        here or elsewhere). While Redis cannot be reached, the rooms cannot commit: their
        replies wait, never shown, until it is back.
        """
        step = self.lease_ms / 3000
        unreachable = False
        while True:
            await trio.sleep(step)
            try:
                await self.client.set(
                    keys.node_key(self.node_id), self.incarnation, px=self.lease_ms
                )
                owned = list(self.owned.items())
                if owned:
                    kept = await lease.renew(
                        self.client,
                        [(room, inst, epoch) for (room, inst), epoch in owned],
                        self.holder,
                        self.lease_ms,
                    )
                    for (key, epoch), ok in zip(owned, kept, strict=True):
                        if not ok:
                            await self._take_again(key, epoch)
                await self._drop_dead_nodes()
            except _HEARTBEAT_ERRORS as exc:
                if not unreachable:
                    log.warning("node %s: cannot reach Redis (%s); retrying", self.node_id, exc)
                unreachable = True
                continue
            if unreachable:
                log.warning("node %s: Redis is reachable again", self.node_id)
                unreachable = False

    async def _take_again(self, key: tuple[str, str], epoch: int) -> None:
        if self.owned.get(key) != epoch:
            return  # released or lost meanwhile
        got = await lease.acquire(self.client, key[0], key[1], self.holder, self.lease_ms)
        if got.ok and got.epoch == epoch + 1:
            self.owned[key] = got.epoch
            log.warning(
                "room %s/%s: its lease had expired (this node was paused or cut off); taken "
                "again (epoch %d), nobody owned it meanwhile",
                *key,
                got.epoch,
            )
            return
        if got.ok:
            # Another node owned it meanwhile: this node's state is not the latest.
            await lease.release(self.client, key[0], key[1], self.holder, got.epoch)
        self._lose(key)

    async def _drop_dead_nodes(self) -> None:
        nodes = {node for node, _ in self.remote}
        if not nodes:
            return
        supervisor = self.supervisor
        assert supervisor is not None
        for node in nodes:
            alive = await self.client.get(keys.node_key(node))
            incarnation = alive.decode() if alive is not None else None
            for (n, conn), session in list(self.remote.items()):
                if n != node or conn.split(".")[0] == incarnation:
                    continue
                self.remote.pop((n, conn), None)
                sink = session.sink
                assert isinstance(sink, RemoteSink)
                log.info(
                    "room %s/%s: node %s is gone; its client %s left",
                    sink.room,
                    sink.instance,
                    node,
                    session.meta.client_id,
                )
                inst = supervisor.instance(sink.room, sink.instance)
                # Not awaited here: a full inbox must not hold up the leases' renewal.
                self._start(inst.submit, Disconnect(session, 1006, f"node {node} is gone"))

    # --- helpers ----------------------------------------------------------------------------

    async def _retrying(self, call: Callable[[], Any], what: str) -> Any:
        """``await call()``, retried while Redis cannot be reached (the caller's event waits,
        never lost); every other error propagates."""
        delay = _RETRY
        while True:
            try:
                return await call()
            except _UNREACHABLE as exc:
                log.warning(
                    "node %s: %s failed (%s); retrying in %.1fs", self.node_id, what, exc, delay
                )
                await trio.sleep(delay)
                delay = min(delay * 2, 5.0)


#: RoomHandle methods a call from another node may name, with their arguments in order.
_HANDLE_OPS: Final = frozenset(
    {
        "emit_to_channel",
        "emit_to_user",
        "send_to_user",
        "get_session_count",
        "get_connected_user_ids",
    }
)


async def wait_reply(client: coredis.Redis[Any], reply: str, where: str, timeout: float) -> Any:
    """The answer pushed to ``reply`` by the node that ran a call (see ``run_op``)."""
    # Below the client's stream timeout (10 s): a blocking pop longer than it is cut short as
    # a failed read.
    timeout = min(timeout, MAX_REPLY_WAIT)
    try:
        got = await client.blpop([reply], timeout=timeout)
    except _READ_ERRORS as exc:
        raise VeraniError(f"{where}: waiting for its owner's answer failed: {exc}") from exc
    if got is None:
        raise VeraniError(f"{where}: its owner did not answer within {timeout:g}s")
    answer = orjson.loads(got[1])
    if "error" in answer:
        raise VeraniError(f"{where}: {answer['error']}")
    return answer["ok"]


def _resume(message: list[Any]) -> ResumeRequest | None:
    """The resume a forwarded Connect asks for, if any."""
    return ResumeRequest(str(message[7]), int(message[8])) if message[7] else None


def _class_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _class_at(path: str) -> type | None:
    module_name, _, qualname = path.partition(":")
    module = sys.modules.get(module_name)
    if module is None:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            return None
    found: Any = module
    for part in qualname.split("."):
        found = getattr(found, part, None)
        if found is None:
            return None
    return found if isinstance(found, type) else None
