"""Internal: the store of a cluster: one Redis holds every room instance's document, written as
changes by Lua scripts that also check the writer still owns the instance (fencing).

Layout (see :mod:`.keys`): the document of an instance is one hash, :func:`.keys.doc_key`, with
the fields

- ``meta``: ``{"format", "version", "room", "instance", "saved_at", "seq"}`` as JSON;
- ``s:KEY``: each persisted key's encoded value; ``t:KEY``: each ``actor.storage`` key's;
- ``schedules``: all the instance's schedules, one JSON object (a commit carries them whole);
- ``r:TOKEN``: each recoverable session, but its log's frames: each kept frame is a field of
  its own, ``rf:TOKEN:OFFSET`` (the frame's text), and ``rr:TOKEN`` is the offset of the first
  kept one; so a commit writes a session's new frames and deletes the ones it no longer keeps,
  never its whole log. The frames are ``rr:TOKEN``'s and the ones after it, in order, up to the
  first offset missing. (A document written before held each log whole in ``r:TOKEN``: it still
  reads, and :meth:`RedisStore.load` rewrites it in this layout.)

Every value is JSON made by orjson here (a frame is its text, itself JSON); the scripts only HSET
and HDEL them as opaque strings, never parse them (Redis' cjson would round big integers and
floats). :data:`.keys.INSTANCES`
lists every instance with a document, :data:`.keys.DUE` holds each one's earliest due schedule.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Self

import attrs
import coredis
import coredis.exceptions
import orjson
from coredis.commands import Script

from ..errors import (
    CorruptDocumentError,
    FencedError,
    LeaseLostError,
    StoreError,
)
from ..store.base import (
    DOCUMENT_FORMAT,
    FORMAT_VERSION,
    Changes,
    JSONValue,
    Store,
    StoredDocument,
    UnreadableDocument,
    apply_frames,
    earliest_due,
    encode_instance_name,
    read_document,
    validate_room_name,
)
from . import keys
from .group import Group, Job, run_scripts, settle
from .lease import redis_errors, where

__all__ = ["Fence", "RedisStore"]

_log = logging.getLogger("verani.store")

#: ``fence(room, instance)``: this node's epoch for the instance (None: it does not own it).
Fence = Callable[[str, str], int | None]

# Every writing script starts with this: KEYS[2] is the instance's epoch key, ARGV[1] the epoch
# the writer owns the instance at ('' for an unfenced writer: tools, tests). A newer owner has
# taken a newer epoch, so an older owner's write is refused before anything is changed.
_FENCE = """
if ARGV[1] ~= '' then
    local current = redis.call('GET', KEYS[2])
    if current ~= ARGV[1] then
        return {'fenced', current or ''}
    end
end
"""

#: KEYS: doc, epoch, instances, due. ARGV: [1] epoch, [2] '1' to replace the document whole,
#: [3] member, [4] '' / 'add' / 'rem' for the due index, [5] due score, [6] number of fields to
#: set, [7] number of session logs to trim, [8] number of session logs to drop; then field,
#: value pairs to set; token, first kept offset pairs (each log's frames before it are deleted);
#: tokens (each log's frames and ``rr:`` field are deleted); then the fields to delete. Trims
#: and drops read the ``rr:`` field they change, so they come before the fields are set.
_WRITE = (
    _FENCE
    + """
if ARGV[2] == '1' then
    redis.call('DEL', KEYS[1])
end
local n, m, k = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local trims, drops = 9 + 2 * n, 9 + 2 * n + 2 * m
for j = drops, drops + k - 1 do
    local token = ARGV[j]
    local o = tonumber(redis.call('HGET', KEYS[1], 'rr:' .. token))
    if o then
        while redis.call('HDEL', KEYS[1], 'rf:' .. token .. ':' .. o) == 1 do
            o = o + 1
        end
        redis.call('HDEL', KEYS[1], 'rr:' .. token)
    end
end
for j = 0, m - 1 do
    local token, first = ARGV[trims + 2 * j], tonumber(ARGV[trims + 2 * j + 1])
    local o = tonumber(redis.call('HGET', KEYS[1], 'rr:' .. token))
    -- The kept frames run on from rr: without a gap: stop at the first one missing.
    while o and o < first and redis.call('HDEL', KEYS[1], 'rf:' .. token .. ':' .. o) == 1 do
        o = o + 1
    end
end
local chunk = {}
for j = 0, n - 1 do
    chunk[#chunk + 1] = ARGV[9 + 2 * j]
    chunk[#chunk + 1] = ARGV[10 + 2 * j]
    -- unpack() has a limit on how many values it spreads: HSET a big document in chunks
    if #chunk >= 1000 then
        redis.call('HSET', KEYS[1], unpack(chunk))
        chunk = {}
    end
end
if #chunk > 0 then
    redis.call('HSET', KEYS[1], unpack(chunk))
end
for j = drops + k, #ARGV do
    redis.call('HDEL', KEYS[1], ARGV[j])
end
redis.call('SADD', KEYS[3], ARGV[3])
if ARGV[4] == 'add' then
    redis.call('ZADD', KEYS[4], ARGV[5], ARGV[3])
elseif ARGV[4] == 'rem' then
    redis.call('ZREM', KEYS[4], ARGV[3])
end
return {'ok', 1}
"""
)

#: KEYS: doc, epoch, instances, due. ARGV: [1] epoch, [2] member. Returns {'ok', existed}.
_DELETE = (
    _FENCE
    + """
local existed = redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[3], ARGV[2])
redis.call('ZREM', KEYS[4], ARGV[2])
return {'ok', existed}
"""
)

#: KEYS: doc, epoch, instances, due, the copy. ARGV: [1] epoch, [2] member, [3] '1' to move
#: the document (it is unreadable), '0' to copy it (it stays in place).
_ASIDE = (
    _FENCE
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then
    return {'gone', 0}
end
if redis.call('EXISTS', KEYS[5]) == 1 then
    return {'taken', 0}
end
if ARGV[3] == '1' then
    redis.call('RENAME', KEYS[1], KEYS[5])
    redis.call('SREM', KEYS[3], ARGV[2])
    redis.call('ZREM', KEYS[4], ARGV[2])
else
    redis.call('COPY', KEYS[1], KEYS[5])
end
return {'ok', 1}
"""
)

_WRITE_SCRIPT: Script[Any] = Script(script=_WRITE)
_DELETE_SCRIPT: Script[Any] = Script(script=_DELETE)
_ASIDE_SCRIPT: Script[Any] = Script(script=_ASIDE)


class RedisStore(Store):
    """Documents in Redis, shared by the nodes of a cluster; each commit is one script call.

    ``client`` is a :class:`coredis.Redis` (bytes replies) the caller has opened
    (``async with client``), or let :meth:`from_url` make one the store opens itself
    (:meth:`open`, :meth:`recover` or ``async with store``) and closes in :meth:`aclose`.

    ``fence(room, instance)`` gives this node's epoch for an instance (see
    :mod:`verani.cluster.lease`): every write then carries it, and Redis refuses it when a newer
    owner has taken the instance (:class:`~verani.errors.FencedError`); None means this node
    does not own it (:class:`~verani.errors.LeaseLostError`, Redis is not asked). Without a
    fence (tools, tests) writes are unfenced.

    Durability: a write returns once Redis acknowledged the script, so what that means is the
    operator's ``appendfsync``: ``always``, on Redis' disk before the reply; ``everysec`` (Redis'
    default with AOF), up to about a second of acknowledged writes is lost if Redis crashes; no
    persistence at all, everything is lost when Redis restarts. With ``wait_replicas`` > 0 each
    write is followed by ``WAIT wait_replicas wait_timeout_ms`` and fails with
    :class:`~verani.errors.StoreError` when fewer replicas acknowledged it (it is on the
    primary, and may or may not survive a failover).

    Redis unreachable (refused, reset, timed out) raises
    :class:`~verani.errors.StoreUnavailableError` naming the instance and the server; a room
    retries its commit with backoff. A write whose reply never came may have been applied.

    A document that cannot be read is renamed to ``verani:{ROOM/INSTANCE}:corrupt:<UTC time>``
    (same hash slot) and :meth:`set_aside` copies one there; such copies never expire.

    On a Redis Cluster the instance's keys share a slot, but :data:`.keys.INSTANCES` and
    :data:`.keys.DUE` are single keys elsewhere: the scripts that update them with a document
    need a single Redis (or a cluster where those indices are split per slot: not done yet).
    """

    def __init__(
        self,
        client: coredis.Redis[Any],
        *,
        fence: Fence | None = None,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 1000,
    ) -> None:
        if wait_replicas < 0 or wait_timeout_ms < 0:
            raise ValueError("wait_replicas and wait_timeout_ms must be >= 0")
        self._client = client
        self._fence = fence
        self._wait_replicas = wait_replicas
        self._wait_timeout_ms = wait_timeout_ms
        self._where = where(client)
        # Set by from_url: the store opens and closes the client it made.
        self._owned = False
        self._stack: contextlib.AsyncExitStack | None = None
        # Group commit: commits that arrive while a write is in flight go out together next,
        # one pipeline for every room committing at the time (a script call costs ~200 µs of
        # client CPU alone, ~25 µs in a pipeline of 50).
        self._group = Group(self._write_batch)
        #: Round trips made for the commits counted in ``saves``.
        self.round_trips = 0

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        fence: Fence | None = None,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 1000,
        **client_options: Any,
    ) -> RedisStore:
        """A store with its own client for ``url`` (``redis://HOST:PORT/DB``); open it with
        :meth:`open` (or ``async with``) and close it with :meth:`aclose`. ``client_options``
        go to :meth:`coredis.Redis.from_url` (``connect_timeout`` and ``stream_timeout``
        default to 2 and 10 s: a Redis that stops answering fails commits rather than hanging
        them)."""
        client_options.setdefault("connect_timeout", 2.0)
        client_options.setdefault("stream_timeout", 10.0)
        client: coredis.Redis[Any] = coredis.Redis.from_url(
            url, decode_responses=False, **client_options
        )
        store = cls(
            client, fence=fence, wait_replicas=wait_replicas, wait_timeout_ms=wait_timeout_ms
        )
        store._owned = True
        store._where = url
        return store

    @property
    def client(self) -> coredis.Redis[Any]:
        """The Redis client the store writes with (leases use the same one)."""
        return self._client

    # --- life cycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        """Open the client the store made (:meth:`from_url`); nothing for a caller's client.

        coredis runs its connections in a task group the client's context opens, so this must
        be called from the task that later calls :meth:`aclose` (``open_server`` does both).
        """
        if not self._owned or self._stack is not None:
            return
        stack = contextlib.AsyncExitStack()
        await stack.enter_async_context(self._client)  # connects lazily: nothing to fail here
        self._stack = stack

    async def recover(self) -> None:
        """Open the store and read the index of due times (run once before serving)."""
        await self.open()
        await self.refresh_due_times()

    async def aclose(self) -> None:
        """Close the client if the store made it."""
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.aclose()

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # --- reading ------------------------------------------------------------------------------

    async def load(self, room: str, instance: str) -> StoredDocument | None:
        """The document of ``room``/``instance``, or None.

        A document that cannot be read is moved aside (see the class) and
        :class:`~verani.errors.CorruptDocumentError` is raised; the next load returns None.
        """
        fields = await self._read(room, instance)
        if fields is None:
            return None
        try:
            doc, whole = self._parse_fields(fields, room, instance)
        except UnreadableDocument as exc:
            cause = str(exc)
        else:
            if whole:
                # Written by the layout before (each log whole in its r: field): rewritten in
                # this one before a commit adds frames to it.
                logs = {token: doc.recovery[token] for token in whole}
                await self._write(room, instance, Changes(recovery_put=logs), replace=False)
            return doc
        moved = await self._aside(room, instance, move=True)
        message = f"the document of {_name(room, instance)} is unreadable ({cause})" + (
            f"; moved it to {moved}" if moved else ""
        )
        _log.warning("%s", message)
        raise CorruptDocumentError(message)

    async def peek(self, room: str, instance: str) -> tuple[StoredDocument, int] | None:
        """The document and its size in bytes (fields and values), without ever writing: an
        unreadable one raises :class:`~verani.errors.CorruptDocumentError` and stays put."""
        fields = await self._read(room, instance)
        if fields is None:
            return None
        try:
            doc = self._parse(fields, room, instance)
        except UnreadableDocument as exc:
            raise CorruptDocumentError(
                f"the document of {_name(room, instance)} is unreadable: {exc}"
            ) from None
        return doc, sum(len(k) + len(v) for k, v in fields.items())

    async def list_instances(self, room: str | None = None) -> list[tuple[str, str]]:
        """The sorted ``(room, instance)`` pairs with a document, only ``room``'s if given."""
        if room is not None:
            validate_room_name(room)
        with self._errors("cannot list the stored instances"):
            raw = await self._client.smembers(keys.INSTANCES)
        members = [_text(m) for m in raw]
        if room is not None:
            members = [m for m in members if m.startswith(room + "/")]
        found = await self._resolve(members)
        return sorted(set(found.values()))

    async def refresh_due_times(self) -> None:
        """Reload the index of due times from :data:`.keys.DUE`, which every node writes."""
        with self._errors("cannot read the index of due schedules"):
            raw = await self._client.zrange(keys.DUE, 0, -1, withscores=True)
        scored = {_text(item.member): float(item.score) for item in raw}
        found = await self._resolve(list(scored))
        index = self._due_index()
        index.clear()
        for value, score in scored.items():
            if value in found:
                index[found[value]] = datetime.datetime.fromtimestamp(score, datetime.UTC)

    # --- writing ------------------------------------------------------------------------------

    async def save(
        self,
        room: str,
        instance: str,
        state: Mapping[str, JSONValue],
        storage: Mapping[str, JSONValue] | None = None,
        *,
        schedules: Mapping[str, JSONValue] | None = None,
        recovery: Mapping[str, JSONValue] | None = None,
    ) -> None:
        """Replace the document whole, in one script (the old hash is deleted inside it)."""
        changes = Changes(
            state=state,
            storage_put=storage or {},
            schedules=schedules or {},
            recovery_put=recovery or {},
        )
        await self._write(room, instance, changes, replace=True)

    async def commit(self, room: str, instance: str, changes: Changes) -> None:
        """Write ``changes`` (not the whole document) in one script; fenced when the store
        has a fence."""
        await self._write(room, instance, changes, replace=False)

    async def delete(self, room: str, instance: str) -> bool:
        """Remove the document (fenced when the store has a fence); whether there was one."""
        _validate(room, instance)
        epoch = self._epoch(room, instance)
        with self._errors(f"cannot delete {_name(room, instance)}"), self._replicated():
            reply: Any = await _DELETE_SCRIPT(
                keys=_instance_keys(room, instance),
                args=[epoch, keys.member(room, instance)],
                client=self._client,
            )
        self._check_fence(reply, room, instance, epoch)
        self.note_schedules(room, instance, {})
        return bool(int(reply[1]))

    async def set_aside(self, room: str, instance: str, reason: str) -> str | None:
        """Copy the document to ``verani:{ROOM/INSTANCE}:corrupt:<UTC time>`` (it stays in
        place) and log why; returns that key, or None when nothing is stored."""
        copy = await self._aside(room, instance, move=False)
        if copy is not None:
            _log.warning(
                "kept a copy of the document of %s at %s: %s", _name(room, instance), copy, reason
            )
        return copy

    # --- the parts ----------------------------------------------------------------------------

    async def _write(self, room: str, instance: str, changes: Changes, *, replace: bool) -> None:
        _validate(room, instance)
        epoch = self._epoch(room, instance)
        try:
            fields = _fields(room, instance, changes)
        except orjson.JSONEncodeError as exc:
            raise TypeError(f"state of {room}/{instance} is not JSON: {exc}") from exc
        due_op, score = "", ""
        if changes.schedules is not None:
            due = earliest_due(changes.schedules)
            due_op, score = ("rem", "0") if due is None else ("add", repr(due.timestamp()))
        args: list[str | bytes | int] = [
            epoch,
            "1" if replace else "0",
            keys.member(room, instance),
            due_op,
            score,
            len(fields.puts),
            len(fields.trims),
            len(fields.drops),
        ]
        for field, value in fields.puts:
            args += [field, value]
        for token, first in fields.trims:
            args += [token, first]
        args += fields.drops
        args += fields.deletes
        what = f"cannot write {_name(room, instance)}"
        if replace or self._wait_replicas > 0:
            with self._errors(what), self._replicated():
                reply: Any = await _WRITE_SCRIPT(
                    keys=_instance_keys(room, instance), args=args, client=self._client
                )
            self.round_trips += 1
        else:
            reply = await self._write_grouped(_Pending(_instance_keys(room, instance), args), what)
        self._check_fence(reply, room, instance, epoch)
        self.note_schedules(room, instance, changes.schedules)
        self.saves += 1

    @property
    def writes(self) -> int:
        """Round trips to Redis for the writes counted in :attr:`saves`."""
        return self.round_trips

    async def _write_grouped(self, pending: _Pending, what: str) -> Any:
        """One commit's script call, written with every other room's that is waiting (see
        :mod:`.group`)."""
        try:
            return await self._group.run(pending)
        except (StoreError, coredis.exceptions.RedisError) as exc:
            raise _again(exc, what) from exc

    async def _write_batch(self, jobs: list[Job]) -> None:
        batch: list[_Pending] = [job.payload for job in jobs]
        try:
            with self._errors("cannot write"):
                calls = [(p.keys, p.args) for p in batch]
                outcomes = await run_scripts(self._client, _WRITE, _WRITE_SCRIPT.sha, calls)
            self.round_trips += 1
            settle(jobs, outcomes)
        except StoreError as exc:
            for job in jobs:
                job.error = exc
        except Exception as exc:  # never raise out of a group write: its waiters are told
            for job in jobs:
                job.error = StoreError(f"cannot write: {type(exc).__name__}: {exc}")

    async def _read(self, room: str, instance: str) -> dict[bytes, bytes] | None:
        _validate(room, instance)
        with self._errors(f"cannot read {_name(room, instance)}"):
            raw = await self._client.hgetall(keys.doc_key(room, instance))
        return {bytes(k): bytes(v) for k, v in raw.items()} or None

    def _parse(self, fields: dict[bytes, bytes], room: str, instance: str) -> StoredDocument:
        return self._parse_fields(fields, room, instance)[0]

    def _parse_fields(
        self, fields: dict[bytes, bytes], room: str, instance: str
    ) -> tuple[StoredDocument, list[str]]:
        """The document, and the tokens of its session logs stored whole in their ``r:``
        field (the layout before ``rf:``), if any."""
        meta_raw = fields.get(b"meta")
        if meta_raw is None:
            raise UnreadableDocument("it has no meta field")
        try:
            meta = orjson.loads(meta_raw)
        except orjson.JSONDecodeError as exc:
            raise UnreadableDocument(f"meta is not JSON: {exc}") from None
        if not isinstance(meta, dict):
            raise UnreadableDocument(f"meta is not a JSON object but {type(meta).__name__}")
        sections: dict[str, dict[str, Any]] = {"s": {}, "t": {}, "r": {}}
        schedules: Any = {}
        firsts: dict[str, int] = {}
        frames: dict[tuple[str, int], bytes] = {}
        for raw_field, raw_value in fields.items():
            field = raw_field.decode("utf-8", "replace")
            if field == "meta":
                continue
            try:
                if field.startswith("rr:"):
                    firsts[field[3:]] = int(raw_value)
                    continue
                if field.startswith("rf:"):
                    token, _, number = field[3:].rpartition(":")
                    frames[(token, int(number))] = raw_value
                    continue
            except ValueError as exc:
                raise UnreadableDocument(f"field {field!r} is not a session frame: {exc}") from None
            try:
                value = orjson.loads(raw_value)
            except orjson.JSONDecodeError as exc:
                raise UnreadableDocument(f"field {field!r} is not JSON: {exc}") from None
            if field == "schedules":
                schedules = value
            elif field[:2] in ("s:", "t:", "r:"):
                sections[field[0]][field[2:]] = value
            # Other fields are ignored: a newer verani's additions are refused by version.
        logs = sections["r"]
        whole = [t for t, v in logs.items() if t not in firsts and _split(v) is not None]
        for token, first in firsts.items():
            part = logs.get(token)
            if not isinstance(part, dict):
                continue  # frames of no session (a commit's for one that had ended)
            kept: list[JSONValue] = []
            offset = first
            while (token, offset) in frames:
                try:
                    kept.append([offset, frames[(token, offset)].decode()])
                except UnicodeDecodeError as exc:
                    raise UnreadableDocument(f"a frame of a session is not text: {exc}") from None
                offset += 1
            logs[token] = {**{k: v for k, v in part.items() if k != "frames"}, "frames": kept}
        version = meta.get("version")
        known = version if type(version) is int else FORMAT_VERSION
        # Sections a format version did not have are left out, so the migrations add them.
        doc: dict[str, Any] = {**meta, "state": sections["s"]}
        if known >= 2:
            doc["storage"] = sections["t"]
        if known >= 4:
            doc["schedules"] = schedules
        if known >= 5:
            doc["recovery"] = logs
        return read_document(doc, room, instance, self.migrate), whole

    async def _aside(self, room: str, instance: str, *, move: bool) -> str | None:
        epoch = self._epoch(room, instance) if move else ""
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        for n in range(100):
            target = keys.corrupt_key(room, instance, stamp if n == 0 else f"{stamp}-{n}")
            with self._errors(f"cannot set aside {_name(room, instance)}"), self._replicated():
                reply: Any = await _ASIDE_SCRIPT(
                    keys=[*_instance_keys(room, instance), target],
                    args=[epoch, keys.member(room, instance), "1" if move else "0"],
                    client=self._client,
                )
            self._check_fence(reply, room, instance, epoch)
            status = _text(reply[0])
            if status == "gone":
                return None
            if status == "ok":
                if move:
                    self.note_schedules(room, instance, {})
                return target
        raise StoreError(f"cannot set aside {_name(room, instance)}: no free key for the copy")

    async def _resolve(self, members: Sequence[str]) -> dict[str, tuple[str, str]]:
        """``(room, instance)`` of each member string; long instance names are hashed in them,
        so those are read from their document's meta (members with no document are left out).
        """
        found: dict[str, tuple[str, str]] = {}
        hashed: list[str] = []
        for value in members:
            try:
                pair = keys.parse_member(value)
            except ValueError:
                continue  # not written by verani
            if pair is None:
                hashed.append(value)
            else:
                found[value] = pair
        for value in hashed:
            with self._errors("cannot read the name of a stored instance"):
                meta = await self._client.hget(keys.member_doc_key(value), "meta")
            try:
                parsed = orjson.loads(meta) if meta is not None else None
            except orjson.JSONDecodeError:
                parsed = None
            if isinstance(parsed, dict):
                room, instance = parsed.get("room"), parsed.get("instance")
                if isinstance(room, str) and isinstance(instance, str):
                    found[value] = (room, instance)
        return found

    def _epoch(self, room: str, instance: str) -> str:
        """The epoch this node writes at ('' unfenced); raises when it no longer owns it."""
        if self._fence is None:
            return ""
        epoch = self._fence(room, instance)
        if epoch is None:
            raise LeaseLostError(room, instance)
        return str(epoch)

    def _check_fence(self, reply: Any, room: str, instance: str, epoch: str) -> None:
        if _text(reply[0]) == "fenced":
            theirs = _text(reply[1])
            raise FencedError(room, instance, int(epoch), int(theirs) if theirs else None)

    @contextlib.contextmanager
    def _replicated(self) -> Iterator[None]:
        if self._wait_replicas <= 0:
            yield
            return
        with self._client.ensure_replication(self._wait_replicas, self._wait_timeout_ms):
            yield

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """At Redis' edge: what coredis and the network raise becomes a StoreError saying
        ``what`` could not be done, where, and why."""
        if self._owned and self._stack is None:
            # Checked first: coredis would make (and leak) a connection before failing.
            raise StoreError(
                f"{what}: the Redis client of {self._where} is not open (open the store first:"
                " RedisStore.open(), recover() or `async with store`)"
            )
        with redis_errors(what, self._where):
            try:
                yield
            except coredis.exceptions.ReplicationError as exc:
                raise StoreError(
                    f"{what}: fewer than {self._wait_replicas} replicas of Redis at "
                    f"{self._where} acknowledged the write within {self._wait_timeout_ms} ms "
                    f"(it is on the primary and may be lost in a failover): {exc}"
                ) from exc
            except RuntimeError as exc:
                if "not initialized" not in str(exc) and "has exited" not in str(exc):
                    raise
                # A caller's client that the caller has not entered (or already left).
                raise StoreError(
                    f"{what}: the Redis client of {self._where} is not open: {exc}"
                ) from exc


@attrs.define(eq=False)
class _Pending:
    """One commit's script call: its keys and arguments."""

    keys: list[str]
    args: list[str | bytes | int]


def _again(error: BaseException, what: str) -> StoreError:
    """The error of a group write, for one of its commits (its own message, its own type)."""
    if isinstance(error, StoreError):
        return type(error)(f"{what}: {str(error).removeprefix('cannot write: ')}")
    return StoreError(f"{what}: Redis answered: {error}")


@attrs.define
class _Fields:
    """What one write does to a document's hash (see ``_WRITE``)."""

    puts: list[tuple[str, bytes]] = attrs.field(factory=list)
    deletes: list[str] = attrs.field(factory=list)
    #: Session logs whose frames before an offset are deleted, and whose frames all are.
    trims: list[tuple[str, int]] = attrs.field(factory=list)
    drops: list[str] = attrs.field(factory=list)


def _fields(room: str, instance: str, changes: Changes) -> _Fields:
    """The hash fields ``changes`` set (``meta`` always: its ``saved_at``) and delete."""
    meta = {
        "format": DOCUMENT_FORMAT,
        "version": FORMAT_VERSION,
        "room": room,
        "instance": instance,
        "saved_at": datetime.datetime.now(datetime.UTC),
        "seq": 0,
    }
    out = _Fields()
    puts = out.puts
    puts.append(("meta", orjson.dumps(meta, option=orjson.OPT_UTC_Z)))
    puts += [(f"s:{k}", orjson.dumps(v)) for k, v in changes.state.items()]
    puts += [(f"t:{k}", orjson.dumps(v)) for k, v in changes.storage_put.items()]
    if changes.schedules is not None:
        puts.append(("schedules", orjson.dumps(dict(changes.schedules))))
    # As Changes.apply does: deletes first, then puts, then frames.
    deletes = [f"t:{k}" for k in changes.storage_delete if k not in changes.storage_put]
    out.deletes = deletes
    for token in changes.recovery_delete:
        out.drops.append(token)
        if token not in changes.recovery_put:
            deletes.append(f"r:{token}")
    deltas = dict(changes.recovery_frames)
    for token, value in changes.recovery_put.items():
        delta = deltas.pop(token, None)
        split = _split(value)
        if split is not None and delta is not None:
            # A whole log and frames to add to it: written whole, with them.
            part, kept, start = split
            frames = apply_frames([[o, text] for o, text in kept], delta)
            split = _split({**part, "frames": frames})
        if split is not None:
            # A whole log: its frames replace the stored ones.
            part, kept, start = split
            out.drops.append(token)
            puts.append((f"r:{token}", orjson.dumps(part)))
            puts.append((f"rr:{token}", b"%d" % start))
            puts += [(f"rf:{token}:{o}", text.encode()) for o, text in kept]
        elif delta is not None and isinstance(value, dict):
            # The session's non-frame part: its stored frames stay, then the delta applies.
            puts.append((f"r:{token}", orjson.dumps(value)))
            deltas[token] = delta
        else:
            # Any other value: stored as it is, and no frames.
            out.drops.append(token)
            puts.append((f"r:{token}", orjson.dumps(value)))
    for token, delta in deltas.items():
        first = delta.get("from") if isinstance(delta, dict) else None
        if not isinstance(delta, dict) or not isinstance(first, int) or isinstance(first, bool):
            continue
        out.trims.append((token, first))
        puts.append((f"rr:{token}", b"%d" % first))
        add = delta.get("add")
        for frame in add if isinstance(add, list) else ():
            if (
                isinstance(frame, list)
                and len(frame) == 2
                and type(frame[0]) is int
                and frame[0] >= first
                and isinstance(frame[1], str)
            ):
                puts.append((f"rf:{token}:{frame[0]}", frame[1].encode()))
    return out


def _split(value: Any) -> tuple[dict[str, Any], list[tuple[int, str]], int] | None:
    """A whole session log (as ``SessionLog.encode`` makes it) as its non-frame part, its frames
    and the offset of the first one kept; None for any other value (stored as it is)."""
    if not isinstance(value, dict):
        return None
    frames = value.get("frames")
    if not isinstance(frames, list):
        return None
    kept: list[tuple[int, str]] = []
    for frame in frames:
        if not (
            isinstance(frame, list)
            and len(frame) == 2
            and type(frame[0]) is int
            and isinstance(frame[1], str)
            and (not kept or frame[0] == kept[-1][0] + 1)
        ):
            return None
        kept.append((frame[0], frame[1]))
    offset = value.get("offset")
    first = kept[0][0] if kept else (offset + 1 if type(offset) is int else 1)
    return {k: v for k, v in value.items() if k != "frames"}, kept, first


def _instance_keys(room: str, instance: str) -> list[str]:
    return [
        keys.doc_key(room, instance),
        keys.epoch_key(room, instance),
        keys.INSTANCES,
        keys.DUE,
    ]


def _validate(room: str, instance: str) -> None:
    validate_room_name(room)
    encode_instance_name(instance)


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _name(room: str, instance: str) -> str:
    shown = repr(instance)
    return f"room {room!r} instance {shown if len(shown) <= 100 else shown[:100] + '...'}"
