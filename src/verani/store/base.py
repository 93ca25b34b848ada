"""Internal: the store interface and the pieces every store shares.

A store keeps one document per room instance: the instance's persisted keys, each value already
encoded to JSON by the caller. A room commits what each write changed (:class:`Changes`); a store
may write those changes somewhere cheaper than the document (the file store's journal) and fold
them into the document later (a checkpoint). This module does no I/O, so it can be used by any
store.
"""

from __future__ import annotations

import abc
import datetime
import hashlib
import re
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeAlias

import attrs

__all__ = [
    "DOCUMENT_FORMAT",
    "FORMAT_VERSION",
    "MIGRATIONS",
    "Changes",
    "JSONValue",
    "Migration",
    "Store",
    "StoredDocument",
    "UnreadableDocument",
    "apply_frames",
    "apply_recovery",
    "decode_instance_name",
    "encode_instance_name",
    "new_document",
    "read_document",
    "validate_room_name",
]

JSONValue: TypeAlias = bool | int | float | str | list["JSONValue"] | dict[str, "JSONValue"] | None

FORMAT_VERSION = 5
"""The document format this version of verani writes; it reads this one and older ones.

Version 2 added the ``storage`` section (``actor.storage``); a version 1 document reads as one
with empty storage. Version 3 added ``seq``, the last journal record the document includes; an
older document includes none (``seq`` 0). Version 4 added ``schedules`` (none before). Version 5
added ``recovery``, the recoverable sessions of the instance by token (none before).
"""

Migration = Callable[[dict[str, Any]], dict[str, Any]]


def _v1_to_v2(doc: dict[str, Any]) -> dict[str, Any]:
    return {**doc, "version": 2, "storage": {}}


def _v2_to_v3(doc: dict[str, Any]) -> dict[str, Any]:
    return {**doc, "version": 3, "seq": 0}


def _v3_to_v4(doc: dict[str, Any]) -> dict[str, Any]:
    return {**doc, "version": 4, "schedules": {}}


def _v4_to_v5(doc: dict[str, Any]) -> dict[str, Any]:
    return {**doc, "version": 5, "recovery": {}}


#: ``MIGRATIONS[v]`` turns a parsed version ``v`` document into a version ``v + 1`` one.
MIGRATIONS: Mapping[int, Migration] = {1: _v1_to_v2, 2: _v2_to_v3, 3: _v3_to_v4, 4: _v4_to_v5}

_ROOM_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_SAFE_BYTES = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
# A stem over this many bytes is shortened, so that a stem plus ".json" plus the suffixes of temp
# and corrupt copies stays under the usual 255-byte file name limit.
_MAX_STEM = 180
_HASHED_PREFIX = 100
_HASH_CHARS = 32


@attrs.frozen
class StoredDocument:
    """What a store holds for one room instance.

    ``state`` maps each persisted key to its already-encoded JSON value; ``storage`` is the
    instance's ``actor.storage`` key space, encoded the same way. ``saved_at`` is the time of the
    save that wrote the document (aware, UTC). ``format_version`` is the format the document was
    written in (older documents are migrated when read). ``seq`` numbers the last commit the
    document includes (commits after it, if any, are still in the store's journal).
    """

    room: str
    instance: str
    state: dict[str, JSONValue]
    saved_at: datetime.datetime
    format_version: int
    storage: dict[str, JSONValue] = attrs.field(factory=dict)
    seq: int = 0
    #: The instance's schedules, encoded (see :mod:`verani.schedules`), by id.
    schedules: dict[str, JSONValue] = attrs.field(factory=dict)
    #: The instance's recoverable sessions (connection-state recovery), by token.
    recovery: dict[str, JSONValue] = attrs.field(factory=dict)


@attrs.frozen
class Changes:
    """What one commit changes in one room instance's document: the persisted keys it sets
    (encoded), the ``actor.storage`` keys it puts (encoded) and the ones it deletes, and all its
    schedules when they changed (None: unchanged), and what it changes in the recoverable
    sessions (by token): the ones it deletes, the ones it puts (each replacing the stored
    entry, unless ``recovery_frames`` also has its token: then it is the session's non-frame
    part and the stored frames are kept), and the frames it appends to and drops from each
    session's log (``recovery_frames``: token to ``{"from": FIRST_KEPT, "add": [[offset,
    frame], ...]}``, see :func:`apply_frames`)."""

    state: Mapping[str, JSONValue] = attrs.field(factory=dict)
    storage_put: Mapping[str, JSONValue] = attrs.field(factory=dict)
    storage_delete: Sequence[str] = ()
    schedules: Mapping[str, JSONValue] | None = None
    recovery_put: Mapping[str, JSONValue] = attrs.field(factory=dict)
    recovery_delete: Sequence[str] = ()
    recovery_frames: Mapping[str, JSONValue] = attrs.field(factory=dict)

    def __bool__(self) -> bool:
        return bool(
            self.state
            or self.storage_put
            or self.storage_delete
            or self.schedules is not None
            or self.recovery_put
            or self.recovery_delete
            or self.recovery_frames
        )

    def apply(
        self,
        state: dict[str, JSONValue],
        storage: dict[str, JSONValue],
        schedules: dict[str, JSONValue] | None = None,
        recovery: dict[str, JSONValue] | None = None,
    ) -> None:
        """Apply these changes to a document's ``state``, ``storage``, ``schedules`` and
        ``recovery``, in place."""
        state.update(self.state)
        for key in self.storage_delete:
            storage.pop(key, None)
        storage.update(self.storage_put)
        if self.schedules is not None and schedules is not None:
            schedules.clear()
            schedules.update(self.schedules)
        if recovery is not None:
            apply_recovery(self, recovery)


def apply_recovery(changes: Changes, recovery: dict[str, JSONValue]) -> None:
    """Apply the recovery part of ``changes`` to a document's ``recovery`` section, in place:
    deletes, then puts, then frames (see :class:`Changes`)."""
    for token in changes.recovery_delete:
        recovery.pop(token, None)
    for token, value in changes.recovery_put.items():
        old = recovery.get(token)
        if token in changes.recovery_frames and isinstance(value, dict) and "frames" not in value:
            # The non-frame part: the stored frames stay (then the delta applies to them).
            kept = old.get("frames") if isinstance(old, dict) else None
            value = {**value, "frames": kept if isinstance(kept, list) else []}
        recovery[token] = value
    for token, delta in changes.recovery_frames.items():
        entry = recovery.get(token)
        if isinstance(entry, dict):
            frames = entry.get("frames")
            entry = {
                **entry,
                "frames": apply_frames(frames if isinstance(frames, list) else [], delta),
            }
            recovery[token] = entry


def apply_frames(frames: list[JSONValue], delta: JSONValue) -> list[JSONValue]:
    """A session log's stored ``frames`` (``[[offset, frame], ...]``, in order) after ``delta``
    (``{"from": FIRST_KEPT, "add": [[offset, frame], ...]}``): the frames before ``from`` are
    dropped, then those of ``add`` after the last one kept are appended (so applying a delta
    twice, or to a document that already has some of its frames, changes nothing more)."""
    if not isinstance(delta, dict):
        return frames
    first = delta.get("from")
    add = delta.get("add")
    start = first if type(first) is int else 0
    kept = [f for f in frames if _frame_offset(f) >= start]
    last = _frame_offset(kept[-1]) if kept else start - 1
    for frame in add if isinstance(add, list) else ():
        offset = _frame_offset(frame)
        if offset > last:
            kept.append(frame)
            last = offset
    return kept


def _frame_offset(frame: JSONValue) -> int:
    if isinstance(frame, list) and frame and type(frame[0]) is int:
        return frame[0]
    return -1


#: The ``format`` field of every stored document.
DOCUMENT_FORMAT = "verani.room"


def new_document(
    room: str,
    instance: str,
    state: Mapping[str, JSONValue],
    storage: Mapping[str, JSONValue] | None,
    seq: int = 0,
    schedules: Mapping[str, JSONValue] | None = None,
    recovery: Mapping[str, JSONValue] | None = None,
) -> dict[str, Any]:
    """The document a store writes for one save (``saved_at`` is now, as an aware datetime)."""
    return {
        "format": DOCUMENT_FORMAT,
        "version": FORMAT_VERSION,
        "room": room,
        "instance": instance,
        "saved_at": datetime.datetime.now(datetime.UTC),
        "seq": seq,
        "state": state,
        "storage": storage or {},
        "schedules": schedules or {},
        "recovery": recovery or {},
    }


class UnreadableDocument(Exception):
    """A document's content is not a valid document; the message says why."""


class Store(abc.ABC):
    """The interface every store implements (the file store now; SQLite, Redis, Postgres later).

    Room names must match ``[A-Za-z0-9_-]{1,64}``; instance names are any non-empty string.
    Failures are reported as :class:`verani.errors.StoreError`.
    """

    #: Documents written since the store was made (the server reports it; benchmarks divide it
    #: by events to show how many changes each group commit carried).
    saves: int = 0

    @property
    def writes(self) -> int:
        """Durable writes made for the saves counted in :attr:`saves`: fewer when one write
        carries the commits of several rooms (the file store's journal)."""
        return self.saves

    @abc.abstractmethod
    async def load(self, room: str, instance: str) -> StoredDocument | None:
        """Return the stored document of ``room``/``instance``, or None when nothing is stored.

        Raises :class:`verani.errors.CorruptDocumentError` when a document exists but cannot be
        read (the store has set it aside, so the next load returns None), and
        :class:`verani.errors.StoreError` when the store itself cannot be read.
        """

    @abc.abstractmethod
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
        """Replace the stored document of ``room``/``instance`` with ``state``, ``storage``,
        ``schedules`` and ``recovery`` (empty when None), atomically: a reader sees all of the
        new document or none of it. The store's index of due times (:meth:`due_times`) follows:
        an implementation calls :meth:`note_schedules` with the schedules it wrote.

        When this returns, the new document is stored; if it raises
        :class:`verani.errors.StoreError`, the previous document is still the stored one.
        """

    async def commit(self, room: str, instance: str, changes: Changes) -> None:
        """Make ``changes`` to the document of ``room``/``instance`` durable.

        When this returns they are stored (a later :meth:`load` sees them, whatever happens to
        the process); if it raises :class:`verani.errors.StoreError`, none of them are. The
        default reads the document, applies the changes and saves it whole; a store with a
        cheaper way (the file store's journal) overrides it.
        """
        doc = await self.load(room, instance)
        state = dict(doc.state) if doc is not None else {}
        storage = dict(doc.storage) if doc is not None else {}
        schedules = dict(doc.schedules) if doc is not None else {}
        recovery = dict(doc.recovery) if doc is not None else {}
        changes.apply(state, storage, schedules, recovery)
        await self.save(room, instance, state, storage, schedules=schedules, recovery=recovery)

    async def checkpoint(
        self,
        room: str,
        instance: str,
        state: Mapping[str, JSONValue],
        storage: Mapping[str, JSONValue] | None = None,
        *,
        schedules: Mapping[str, JSONValue] | None = None,
        recovery: Mapping[str, JSONValue] | None = None,
    ) -> None:
        """Rewrite the document whole from a room's own state, which includes every commit it
        made so far (see :meth:`checkpoint_due`). The default is :meth:`save`."""
        await self.save(room, instance, state, storage, schedules=schedules, recovery=recovery)

    def due_times(self) -> dict[tuple[str, str], datetime.datetime]:
        """The index of schedules: each stored instance's earliest due time, without reading
        any document (what a server wakes after a restart)."""
        return dict(self._due_index())

    async def refresh_due_times(self) -> None:  # noqa: B027 - an optional hook
        """Reload the index of :meth:`due_times` from where the store keeps it, for a store
        that other processes write too (the Redis store of a cluster); the server's waker calls
        it before reading :meth:`due_times`. The default has nothing to reload: this process
        wrote every due time it knows."""

    def _due_index(self) -> dict[tuple[str, str], datetime.datetime]:
        index: dict[tuple[str, str], datetime.datetime] | None = self.__dict__.get("_due")
        if index is None:
            index = self.__dict__["_due"] = {}
        return index

    def note_schedules(
        self, room: str, instance: str, schedules: Mapping[str, JSONValue] | None
    ) -> None:
        """Keep the index in step with an instance's schedules as written (None: unchanged)."""
        if schedules is None:
            return
        due = earliest_due(schedules)
        index = self._due_index()
        if due is None:
            index.pop((room, instance), None)
        else:
            index[(room, instance)] = due

    def checkpoint_due(self, room: str, instance: str, *, at_rest: bool = False) -> bool:
        """Whether the document of ``room``/``instance`` should be rewritten whole from the
        room's state (:meth:`save`) so the store can let go of its commits: ``at_rest`` asks for
        a room about to hibernate (any commit not yet in the document), otherwise for a room
        still awake (enough commits piled up). Stores without a journal: never."""
        return False

    def forget(self, room: str, instance: str) -> None:  # noqa: B027 - an optional hook
        """``room``/``instance`` went to sleep with everything in its document: let go of what
        is kept in memory for it (its next load reads it again). The default keeps nothing."""

    async def recover(self) -> None:  # noqa: B027 - an optional hook, not an abstract method
        """Bring every document up to date with what was committed before a crash; run once
        before serving. The default has nothing to do."""

    @abc.abstractmethod
    async def delete(self, room: str, instance: str) -> bool:
        """Remove the stored document of ``room``/``instance``; returns whether there was one."""

    @abc.abstractmethod
    async def set_aside(self, room: str, instance: str, reason: str) -> str | None:
        """Keep a copy of the current document (it stays in place) before the runtime replaces
        values it could not read; returns where the copy is, or None when nothing is stored.
        """

    def migrate(self, document: dict[str, Any]) -> dict[str, Any]:
        """Bring a parsed document of an older format version up to :data:`FORMAT_VERSION`.

        The hook a store (or a subclass of one) overrides to read documents written in older
        formats; the default applies :data:`MIGRATIONS` one version at a time. Raise ValueError
        when a document cannot be migrated: the store then sets it aside as unreadable.
        """
        version = document["version"]
        while version < FORMAT_VERSION:
            step = MIGRATIONS.get(version)
            if step is None:
                raise ValueError(f"no migration from format version {version}")
            document = step(document)
            version = document["version"]
        return document

    @abc.abstractmethod
    async def list_instances(self, room: str | None = None) -> list[tuple[str, str]]:
        """Return the sorted ``(room, instance)`` pairs that have a stored document.

        Only pairs of ``room`` when it is given.
        """

    async def aclose(self) -> None:  # noqa: B027 - an optional hook, not an abstract method
        """Release what the store holds (connections, files). The default does nothing."""


def read_document(
    doc: dict[str, Any],
    room: str,
    instance: str,
    migrate: Callable[[dict[str, Any]], dict[str, Any]],
) -> StoredDocument:
    """Check a parsed document of ``room``/``instance``, migrate it to :data:`FORMAT_VERSION`
    and return it; raises :class:`UnreadableDocument` saying what is wrong with it."""
    if doc.get("format") != DOCUMENT_FORMAT:
        raise UnreadableDocument(f"format is {_short(doc.get('format'))}, not {DOCUMENT_FORMAT!r}")
    version = doc.get("version")
    if type(version) is not int or version < 1:
        raise UnreadableDocument(f"version is {_short(version)}, not a positive integer")
    if version > FORMAT_VERSION:
        raise UnreadableDocument(
            f"version {version} is newer than this verani reads ({FORMAT_VERSION});"
            " it was written by a newer verani"
        )
    if version < FORMAT_VERSION:
        try:
            doc = migrate(doc)
        except (ValueError, KeyError, TypeError) as exc:
            raise UnreadableDocument(f"cannot migrate it from version {version}: {exc}") from None
    for field, expected in (("room", room), ("instance", instance)):
        if doc.get(field) != expected:
            raise UnreadableDocument(
                f"its {field} is {_short(doc.get(field))}, not {_short(expected)}"
            )
    saved_at = doc.get("saved_at")
    try:
        when = datetime.datetime.fromisoformat(saved_at if isinstance(saved_at, str) else "")
    except ValueError:
        raise UnreadableDocument(f"saved_at {_short(saved_at)} is not an ISO 8601 time") from None
    if when.tzinfo is None:
        raise UnreadableDocument(f"saved_at {saved_at!r} has no time zone")
    state = doc.get("state")
    if not isinstance(state, dict):
        raise UnreadableDocument(f"state is {type(state).__name__}, not an object")
    storage = doc.get("storage")
    if not isinstance(storage, dict):
        raise UnreadableDocument(f"storage is {type(storage).__name__}, not an object")
    seq = doc.get("seq")
    if type(seq) is not int or seq < 0:
        raise UnreadableDocument(f"seq is {_short(seq)}, not an integer >= 0")
    schedules = doc.get("schedules")
    if not isinstance(schedules, dict):
        raise UnreadableDocument(f"schedules is {type(schedules).__name__}, not an object")
    recovery = doc.get("recovery")
    if not isinstance(recovery, dict):
        raise UnreadableDocument(f"recovery is {type(recovery).__name__}, not an object")
    return StoredDocument(
        room=room,
        instance=instance,
        state=state,
        saved_at=when.astimezone(datetime.UTC),
        format_version=version,
        storage=storage,
        seq=seq,
        schedules=schedules,
        recovery=recovery,
    )


def earliest_due(schedules: Mapping[str, JSONValue]) -> datetime.datetime | None:
    """The earliest ``due`` among encoded schedules (None: none)."""
    times = []
    for raw in schedules.values():
        due = raw.get("due") if isinstance(raw, dict) else None
        if isinstance(due, str):
            times.append(datetime.datetime.fromisoformat(due))
    return min(times, default=None)


def validate_room_name(room: str) -> str:
    """Return ``room`` when it is a valid room name, else raise ValueError naming it."""
    if not isinstance(room, str) or not _ROOM_NAME.fullmatch(room):
        raise ValueError(
            f"invalid room name {room!r}: use 1 to 64 ASCII letters, digits, '_' or '-'"
        )
    return room


def encode_instance_name(name: str) -> str:
    """Return a file-name-safe stem for the instance name ``name``.

    Every UTF-8 byte other than an ASCII letter, digit, ``_`` or ``-`` is percent-encoded
    (``%2E``), so the stem never contains ``.``, ``/``, ``\\`` or NUL and cannot leave its
    directory. Distinct names give distinct stems. A stem that would be over 180 characters is
    shortened to its first 100 characters, ``~`` and 32 hex digits of the name's SHA-256; such a
    stem cannot be decoded (the document holds the real name).

    Raises ValueError for an empty name or one that is not valid Unicode (a lone surrogate).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"instance name must be a non-empty string, not {name!r}")
    try:
        raw = name.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"instance name {name!r} is not valid Unicode: {exc.reason}") from None
    stem = "".join(chr(b) if b in _SAFE_BYTES else f"%{b:02X}" for b in raw)
    if len(stem) > _MAX_STEM:
        digest = hashlib.sha256(raw).hexdigest()[:_HASH_CHARS]
        stem = f"{stem[:_HASHED_PREFIX]}~{digest}"
    return stem


def decode_instance_name(stem: str) -> str | None:
    """Return the instance name encoded as ``stem``, or None when the stem was hashed.

    Raises ValueError for a stem that :func:`encode_instance_name` cannot produce.
    """
    if "~" in stem:
        return None
    try:
        name = urllib.parse.unquote_to_bytes(stem).decode("utf-8")
    except UnicodeDecodeError:
        name = ""
    # Only the canonical spelling is accepted, so each name has exactly one file (no "%41" for "A").
    if not name or encode_instance_name(name) != stem:
        raise ValueError(f"{stem!r} is not an encoded instance name")
    return name


def _short(value: object) -> str:
    # Instance names may be thousands of characters long; messages only need to identify them.
    shown = repr(value)
    return shown if len(shown) <= 100 else shown[:100] + "..."
