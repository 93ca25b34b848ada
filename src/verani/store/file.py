"""Internal: the file store: one JSON document per room instance under a directory, and a journal
of the changes not yet in the documents (:mod:`verani.store.journal`)."""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import pathlib
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import UTC
from typing import Any, Literal

import orjson
import trio

from verani.errors import CorruptDocumentError, StoreError, store_errors
from verani.store.base import (
    DOCUMENT_FORMAT,
    FORMAT_VERSION,
    Changes,
    JSONValue,
    Store,
    StoredDocument,
    UnreadableDocument,
    decode_instance_name,
    earliest_due,
    encode_instance_name,
    new_document,
    read_document,
    validate_room_name,
)
from verani.store.journal import Journal, Record, fsync_dir, read_segment

__all__ = ["FileStore"]

_log = logging.getLogger("verani.store")

_FORMAT = DOCUMENT_FORMAT
_SUFFIX = ".json"
#: The index of schedules: each instance's earliest due time.
_INDEX = "schedules.json"


_Unreadable = UnreadableDocument


class FileStore(Store):
    """Keeps each room instance in ``DIRECTORY/rooms/<room>/<encoded instance>.json``.

    A document is indented JSON a person can read::

        {"format": "verani.room", "version": 3, "room": "...", "instance": "...",
         "saved_at": "2025-01-31T12:00:00.123456Z", "seq": 12, "state": {"key": <value>, ...},
         "storage": {"key": <value>, ...}}

    A room's commits (:meth:`commit`) are appended to the journal, ``DIRECTORY/journal/``, where
    the commits of every room made at the same time share one write and one sync; only what each
    changed is written. Documents are checkpoints: rewritten whole (:meth:`save`) when a room
    hibernates or its journal records pile up, and then the journal segments no record needs are
    removed. ``seq`` is the last commit a document includes. :meth:`recover`, run before
    serving, folds whatever a crash left in the journal into the documents; until then
    :meth:`load` and :meth:`peek` apply it as they read.

    Each save writes a temp file next to the document and renames it over the document, so a
    reader (or a crash) sees the old document or the new one, never a mix. With
    ``durability="fsync"`` (the default) the temp file and then the directory are fsynced, so a
    saved document also survives a power loss or kernel crash. ``durability="os"`` skips the
    fsyncs: much faster, and still safe against a crash of the process, but after a power loss
    the last saves may be missing (the older document is found instead). Use it for tests and
    development. Journal appends follow the same choice (``fdatasync`` or none).

    Saves and loads of the same document run one at a time, in the order they were called, so the
    last save called is the one left on disk. The file work runs in worker threads, at most
    ``max_threads`` at once. The store assumes one server per directory.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        durability: Literal["fsync", "os"] = "fsync",
        max_threads: int = 4,
    ) -> None:
        if durability not in ("fsync", "os"):
            raise ValueError(f"durability must be 'fsync' or 'os', not {durability!r}")
        if max_threads < 1:
            raise ValueError(f"max_threads must be at least 1, not {max_threads!r}")
        # File I/O runs in worker threads, at most this many at once: on a small machine more
        # buy no speed, and each thread costs memory (its stack, and a malloc arena of its own
        # that keeps its peak) — thousands of rooms hibernating at once would otherwise spread
        # their writes over dozens of threads.
        self._threads = trio.CapacityLimiter(max_threads)
        # Absolute, so a later chdir cannot move the store.
        self._directory = pathlib.Path(directory).absolute()
        self._fsync = durability == "fsync"
        self._locks: dict[pathlib.Path, trio.Lock] = {}
        self._journal = Journal(
            self._directory / "journal",
            fsync=self._fsync,
            threads=self._threads,
            make_dirs=self._make_dirs,
            before_remove=self._write_index,
        )
        self._opened = False
        self._opening = trio.Lock()
        #: The index of schedules changed since it was last written.
        self._index_dirty = False
        #: Documents rewritten whole from an awake or hibernating room's state.
        self.checkpoints = 0

    @property
    def directory(self) -> pathlib.Path:
        """The store's directory (absolute)."""
        return self._directory

    def path_for(self, room: str, instance: str) -> pathlib.Path:
        """Return the path of the document of ``room``/``instance``.

        Raises ValueError for an invalid room name or instance name.
        """
        room_dir = self._directory / "rooms" / validate_room_name(room)
        return room_dir / (encode_instance_name(instance) + _SUFFIX)

    async def load(self, room: str, instance: str) -> StoredDocument | None:
        """Return the stored document of ``room``/``instance``, or None when there is none.

        A document that cannot be read as one (not JSON, wrong format, a newer version, missing
        or ill-typed fields, another room's or instance's document) is renamed to
        ``<file>.corrupt-<UTC time>`` next to it, logged as a warning on ``verani.store``, and
        :class:`~verani.errors.CorruptDocumentError` is raised; the next load returns None.
        An OS error (permission denied, I/O error) raises :class:`~verani.errors.StoreError` and
        moves nothing; so does a corrupt document that cannot be moved aside, so that it is not
        overwritten by a fresh room.
        """
        path = self.path_for(room, instance)
        await self._open()
        async with self._lock(path):
            doc = await trio.to_thread.run_sync(
                self._load_sync, path, room, instance, limiter=self._threads
            )
        self._journal.loaded((room, instance), doc.seq if doc is not None else 0)
        return await self._with_journal(room, instance, doc)

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
        """Write ``state``, ``storage``, ``schedules`` and ``recovery`` as the document of
        ``room``/``instance``, atomically (see the class); it replaces the document and every
        commit before it.

        ``state`` values must already be JSON values (``orjson`` writes NaN and infinities as
        null, so encode those first). Raises TypeError when they are not, and
        :class:`~verani.errors.StoreError` when the document cannot be written; the previous
        document is then left as it was.
        """
        await self._write_document(room, instance, state, storage, schedules, recovery)
        self.saves += 1

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
        """:meth:`save` for a room's own state, which includes every commit it made so far: the
        journal segments only it needed are removed."""
        await self._write_document(room, instance, state, storage, schedules, recovery)
        self.checkpoints += 1

    async def _write_document(
        self,
        room: str,
        instance: str,
        state: Mapping[str, JSONValue],
        storage: Mapping[str, JSONValue] | None,
        schedules: Mapping[str, JSONValue] | None,
        recovery: Mapping[str, JSONValue] | None = None,
    ) -> None:
        path = self.path_for(room, instance)
        await self._open()
        key = (room, instance)
        # Encoded now, not in the worker thread: the caller may change `state` once we yield.
        # A room's own checkpoint is of an instance the store knows: its seq is read now, as its
        # state includes every commit up to here. Any other save is numbered under the lock.
        seq = self._journal.last_seq(key) if self._journal.knows(key) else None
        try:
            if seq is not None:
                data = _document_bytes(room, instance, state, storage, seq, schedules, recovery)
            else:
                snapshot = orjson.dumps([state, storage or {}, schedules or {}, recovery or {}])
        except orjson.JSONEncodeError as exc:
            raise TypeError(f"state of {_name(room, instance)} is not JSON: {exc}") from exc
        started = time.perf_counter()
        async with self._lock(path):
            if seq is None:
                await self._learn_seq(room, instance)
                seq = self._journal.last_seq(key)
                state, storage, schedules, recovery = orjson.loads(snapshot)
                data = _document_bytes(room, instance, state, storage, seq, schedules, recovery)
            if seq < self._journal.doc_seq(key):
                return  # a newer checkpoint got there first; this one would go back in time
            await trio.to_thread.run_sync(
                self._save_sync, path, room, instance, data + b"\n", limiter=self._threads
            )
            self.note_schedules(room, instance, schedules or {})
            await self._journal.checkpointed(key, seq)
        _log.debug(
            "%s: saved %d bytes (%s) in %.2f ms",
            _name(room, instance),
            len(data) + 1,
            "fsync" if self._fsync else "os",
            (time.perf_counter() - started) * 1000,
        )

    async def _open(self) -> None:
        """Once: read the journal (the index of what it holds) and the index of schedules, with
        the journal's later schedule changes applied."""
        if self._opened:
            return
        async with self._opening:
            if self._opened:
                return
            segments = await self._journal.open()
            index = await trio.to_thread.run_sync(self._read_index_sync, limiter=self._threads)
            self._due_index().update(index)
            for _, records in segments:
                for record in records:
                    changed = {} if record.drop else record.changes.schedules
                    self.note_schedules(record.room, record.instance, changed)
            self._opened = True

    def _read_index_sync(self) -> dict[tuple[str, str], datetime.datetime]:
        path = self._directory / _INDEX
        with store_errors(f"cannot read the index of schedules {path}"):
            try:
                data = path.read_bytes()
            except (FileNotFoundError, NotADirectoryError):
                return {}
        try:
            body = orjson.loads(data)
            return {
                (room, instance): datetime.datetime.fromisoformat(due)
                for room, instance, due in body["due"]
            }
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            # Rebuilt from the documents, as a missing index would be (slow, but complete).
            _log.warning("the index of schedules %s is unreadable (%s); rebuilding it", path, exc)
            return self._rebuild_index_sync()

    def _rebuild_index_sync(self) -> dict[tuple[str, str], datetime.datetime]:
        index = {}
        for room, instance in self._list_sync(None):
            found = self._peek_sync(self.path_for(room, instance), room, instance)
            due = earliest_due(found[0].schedules) if found is not None else None
            if due is not None:
                index[(room, instance)] = due
        return index

    async def _write_index(self) -> None:
        """Write the index of schedules durably: before journal segments holding schedule
        changes are removed, the index must hold them."""
        body = {
            "format": "verani.schedules",
            "version": 1,
            "due": sorted(
                [room, instance, due.isoformat()]
                for (room, instance), due in self._due_index().items()
            ),
        }
        data = orjson.dumps(body, option=orjson.OPT_INDENT_2)
        path = self._directory / _INDEX
        self._index_dirty = False
        if not body["due"] and not await trio.Path(path).exists():
            return  # no schedule was ever made here: no file either
        await trio.to_thread.run_sync(
            self._save_sync, path, "*", "index of schedules", data + b"\n", limiter=self._threads
        )

    @property
    def writes(self) -> int:
        """Journal appends (each with one ``fdatasync``) plus documents written whole."""
        return self._journal.writes + self.checkpoints

    async def commit(self, room: str, instance: str, changes: Changes) -> None:
        """Append ``changes`` to the journal; returns once they are durable (see the class).

        Raises TypeError when a value is not JSON, and :class:`~verani.errors.StoreError` when
        the journal cannot be written (none of the changes are stored then).
        """
        await self._open()
        key = (room, instance)
        if not self._journal.knows(key):
            await self._learn_seq(room, instance)
        started = time.perf_counter()
        seq = await self._journal.append(room, instance, changes)
        self.note_schedules(room, instance, changes.schedules)
        self.saves += 1
        _log.debug(
            "%s: committed #%d (%d keys, %d storage keys) in %.2f ms",
            _name(room, instance),
            seq,
            len(changes.state),
            len(changes.storage_put) + len(changes.storage_delete),
            (time.perf_counter() - started) * 1000,
        )

    def checkpoint_due(self, room: str, instance: str, *, at_rest: bool = False) -> bool:
        """See :meth:`Store.checkpoint_due`: at rest, any commit not in the document; awake,
        1 MiB of them, or one in a segment that is no longer the one appended to."""
        return self._journal.checkpoint_due((room, instance), at_rest=at_rest)

    def forget(self, room: str, instance: str) -> None:
        """See :meth:`Store.forget`: the journal's index drops the instance unless a record of
        it is still waiting for its document."""
        self._journal.forget((room, instance))

    async def recover(self) -> None:
        """Fold every commit in the journal into its document, durably, then empty the journal.

        A torn or corrupt record ends what is read of its segment (a warning names the file and
        offset); what came before it is applied, nothing after it.
        """
        await self._open()
        for room, instance in sorted(self._journal.instances()):
            try:
                path = self.path_for(room, instance)
            except ValueError as exc:
                _log.warning("journal: skipping a record for an invalid name: %s", exc)
                continue
            try:
                doc = await self.load(room, instance)
            except CorruptDocumentError:
                doc = await self._with_journal(room, instance, None)
            if doc is None:
                await trio.to_thread.run_sync(
                    self._delete_sync, path, room, instance, limiter=self._threads
                )
            else:
                await self._write_document(
                    room, instance, doc.state, doc.storage, doc.schedules, doc.recovery
                )
                _log.info("journal: recovered %s up to commit #%d", _name(room, instance), doc.seq)
        await self._journal.clear()  # the index of schedules is written first

    async def _learn_seq(self, room: str, instance: str) -> None:
        """Where the commits of an instance this store has not seen yet are numbered from: its
        document's ``seq``. Numbers never go back while a segment may hold older records."""
        path = self.path_for(room, instance)  # also the names' checks
        try:
            found = await trio.to_thread.run_sync(
                self._peek_sync, path, room, instance, limiter=self._threads
            )
        except CorruptDocumentError:
            found = None  # it is set aside when loaded; numbering starts afresh
        self._journal.loaded((room, instance), found[0].seq if found is not None else 0)

    async def _with_journal(
        self, room: str, instance: str, doc: StoredDocument | None
    ) -> StoredDocument | None:
        """``doc`` with the journal's later commits of ``room``/``instance`` applied."""
        key = (room, instance)
        numbers = self._journal.pending_segments(key)
        if not numbers:
            return doc
        records = await trio.to_thread.run_sync(
            self._records_sync, numbers, key, limiter=self._threads
        )
        return _apply(room, instance, doc, *records)

    def _records_sync(
        self, numbers: list[int], key: tuple[str, str]
    ) -> tuple[list[Record], datetime.datetime | None]:
        """The records of ``key`` in those segments, and when the last segment holding one was
        written (records carry no time of their own)."""
        found: list[Record] = []
        written = None
        for number in sorted(numbers):
            path = self._journal.directory / f"{number:08d}.wal"
            with store_errors(f"cannot read the journal segment {path}"):
                try:
                    data = path.read_bytes()
                    mtime = path.stat().st_mtime
                except FileNotFoundError:
                    continue
            records, _, _ = read_segment(data)
            mine = [r for r in records if (r.room, r.instance) == key]
            if mine:
                found.extend(mine)
                written = datetime.datetime.fromtimestamp(mtime, datetime.UTC)
        return found, written

    async def peek(self, room: str, instance: str) -> tuple[StoredDocument, int] | None:
        """Read the document and its size in bytes without ever writing: an unreadable document
        raises :class:`~verani.errors.CorruptDocumentError` and stays where it is. For tools
        such as ``verani inspect`` that may run beside a server (atomic renames mean they see
        the old document or the new one)."""
        path = self.path_for(room, instance)
        await self._open()
        found = await trio.to_thread.run_sync(
            self._peek_sync, path, room, instance, limiter=self._threads
        )
        doc = await self._with_journal(room, instance, found[0] if found else None)
        if doc is None:
            return None
        return doc, found[1] if found else 0

    def _peek_sync(
        self, path: pathlib.Path, room: str, instance: str
    ) -> tuple[StoredDocument, int] | None:
        data = _read(path, room, instance)
        if data is None:
            return None
        try:
            return _parse(data, room, instance, self.migrate), len(data)
        except _Unreadable as exc:
            raise CorruptDocumentError(
                f"the document of {_name(room, instance)} at {path} is unreadable: {exc}"
            ) from None

    async def delete(self, room: str, instance: str) -> bool:
        """Remove the document of ``room``/``instance`` (durably with ``fsync``), and whatever
        the journal holds of it."""
        path = self.path_for(room, instance)
        await self._open()
        key = (room, instance)
        journaled = bool(self._journal.pending_segments(key))
        if journaled:
            # Recorded first: a crash before the file is gone must not bring the commits back.
            await self._journal.append(room, instance, Changes(), drop=True)
        async with self._lock(path):
            existed = await trio.to_thread.run_sync(
                self._delete_sync, path, room, instance, limiter=self._threads
            )
            self.note_schedules(room, instance, {})
            await self._journal.checkpointed(key, self._journal.last_seq(key))
        return existed or journaled

    async def set_aside(self, room: str, instance: str, reason: str) -> str | None:
        """Copy the document to ``<file>.corrupt-<UTC time>`` (it stays in place) and log why."""
        path = self.path_for(room, instance)
        async with self._lock(path):
            copy = await trio.to_thread.run_sync(_copy_aside, path, limiter=self._threads)
        if copy is not None:
            _log.warning(
                "kept a copy of the document of %s at %s: %s", _name(room, instance), copy, reason
            )
        return None if copy is None else str(copy)

    async def list_instances(self, room: str | None = None) -> list[tuple[str, str]]:
        """Return the sorted ``(room, instance)`` pairs stored, only those of ``room`` if given.

        Temp files, ``.corrupt-*`` copies and files the store did not write are ignored.
        """
        if room is not None:
            validate_room_name(room)
        await self._open()
        found = await trio.to_thread.run_sync(self._list_sync, room, limiter=self._threads)
        journaled = {k for k in self._journal.instances() if room is None or k[0] == room}
        return sorted(set(found) | journaled)

    async def aclose(self) -> None:
        """Close the journal; when every commit in it is in a document (as after every room
        hibernated), its segments are removed."""
        self._journal.close()
        if self._journal.opened and not self._journal.instances():
            await self._journal.clear()
        if self._index_dirty:
            await self._write_index()  # saves made without the journal (tools, tests)

    def note_schedules(
        self, room: str, instance: str, schedules: Mapping[str, JSONValue] | None
    ) -> None:
        """See :meth:`Store.note_schedules`; the index file is brought up to date before journal
        segments go, and at :meth:`aclose`."""
        if schedules is not None:
            self._index_dirty = True
        super().note_schedules(room, instance, schedules)

    @contextlib.asynccontextmanager
    async def _lock(self, path: pathlib.Path) -> AsyncIterator[None]:
        lock = self._locks.setdefault(path, trio.Lock())
        try:
            async with lock:
                yield
        finally:
            # Trio's lock hands itself straight to the next waiter, so "unlocked with no waiters"
            # means nobody else holds this lock object and it can go.
            if not lock.locked() and not lock.statistics().tasks_waiting:
                self._locks.pop(path, None)

    # --- in worker threads ----------------------------------------------------------------------

    def _save_sync(self, path: pathlib.Path, room: str, instance: str, data: bytes) -> None:
        tmp: str | None = None
        with store_errors(f"cannot save {_name(room, instance)} to {path}"):
            try:
                self._make_dirs(path.parent)
                # Starts with "." and ends with ".tmp" so listing skips it; mkstemp makes it 0600.
                fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
                with open(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    if self._fsync:
                        os.fsync(f.fileno())
                os.replace(tmp, path)
                tmp = None
                if self._fsync:
                    fsync_dir(path.parent)
            except OSError:
                if tmp is not None:  # the write failed midway: no half-written file is left
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
                raise

    def _delete_sync(self, path: pathlib.Path, room: str, instance: str) -> bool:
        with store_errors(f"cannot delete {_name(room, instance)} at {path}"):
            try:
                path.unlink()
            except FileNotFoundError:
                return False
        if self._fsync:
            fsync_dir(path.parent)
        return True

    def _make_dirs(self, directory: pathlib.Path) -> None:
        # os.makedirs would give the intermediate directories the default mode, not 0700.
        if directory.is_dir():
            return
        self._make_dirs(directory.parent)
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            return
        if self._fsync:
            # The new directory's entry must be durable too, or the document may vanish with it.
            fsync_dir(directory.parent)

    def _load_sync(self, path: pathlib.Path, room: str, instance: str) -> StoredDocument | None:
        data = _read(path, room, instance)
        if data is None:
            return None
        try:
            return _parse(data, room, instance, self.migrate)
        except _Unreadable as exc:
            cause = str(exc)
        try:
            moved = _move_aside(path)
        except OSError as exc:
            raise StoreError(
                f"the document of {_name(room, instance)} at {path} is unreadable ({cause}) and"
                f" cannot be moved aside: {exc}; move or fix it by hand"
            ) from exc
        message = (
            f"the document of {_name(room, instance)} is unreadable ({cause}); moved it to {moved}"
        )
        _log.warning("%s", message)
        raise CorruptDocumentError(message)

    def _list_sync(self, only_room: str | None) -> list[tuple[str, str]]:
        rooms_dir = self._directory / "rooms"
        found: list[tuple[str, str]] = []
        with store_errors(f"cannot list the rooms in {rooms_dir}"):
            if only_room is not None:
                rooms = [only_room]
            elif rooms_dir.is_dir():
                with os.scandir(rooms_dir) as entries:
                    rooms = [e.name for e in entries if _is_room_dir(e)]
            else:
                rooms = []
            for room in rooms:
                room_dir = rooms_dir / room
                if not room_dir.is_dir():
                    continue
                with os.scandir(room_dir) as entries:
                    names = [_instance_of(e) for e in entries]
                found.extend((room, name) for name in names if name is not None)
        return sorted(found)


def _read(path: pathlib.Path, room: str, instance: str) -> bytes | None:
    """The document's bytes, or None when there is none."""
    with store_errors(f"cannot read {_name(room, instance)} from {path}"):
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None


def _name(room: str, instance: str) -> str:
    return f"room {room!r} instance {_short(instance)}"


def _short(value: object) -> str:
    # Instance names may be thousands of characters long; messages only need to identify them.
    shown = repr(value)
    return shown if len(shown) <= 100 else shown[:100] + "..."


def _aside_name(path: pathlib.Path) -> pathlib.Path:
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 0
    # Checked then used: safe because saves and loads of this path hold its lock and only one
    # server uses the directory.
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
    return target


def _move_aside(path: pathlib.Path) -> pathlib.Path:
    target = _aside_name(path)
    os.rename(path, target)
    return target


def _copy_aside(path: pathlib.Path) -> pathlib.Path | None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    target = _aside_name(path)
    target.write_bytes(data)
    return target


def _parse(
    data: bytes, room: str, instance: str, migrate: Callable[[dict[str, Any]], dict[str, Any]]
) -> StoredDocument:
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise _Unreadable(f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise _Unreadable(f"not a JSON object but {type(doc).__name__}")
    return read_document(doc, room, instance, migrate)


def _document_bytes(
    room: str,
    instance: str,
    state: Mapping[str, JSONValue],
    storage: Mapping[str, JSONValue] | None,
    seq: int,
    schedules: Mapping[str, JSONValue] | None,
    recovery: Mapping[str, JSONValue] | None = None,
) -> bytes:
    document = new_document(room, instance, state, storage, seq, schedules, recovery)
    return orjson.dumps(document, option=orjson.OPT_INDENT_2 | orjson.OPT_UTC_Z)


def _apply(
    room: str,
    instance: str,
    doc: StoredDocument | None,
    records: list[Record],
    written: datetime.datetime | None,
) -> StoredDocument | None:
    """``doc`` (None: no document) with the commits of ``records`` after its ``seq`` applied;
    ``written``: when the last of them was written."""
    seq = doc.seq if doc is not None else 0
    state = dict(doc.state) if doc is not None else {}
    storage = dict(doc.storage) if doc is not None else {}
    schedules = dict(doc.schedules) if doc is not None else {}
    recovery = dict(doc.recovery) if doc is not None else {}
    exists = doc is not None
    for record in records:
        if record.seq <= seq:
            continue
        seq = record.seq
        if record.drop:
            state, storage, schedules, recovery, exists = {}, {}, {}, {}, False
        else:
            record.changes.apply(state, storage, schedules, recovery)
            exists = True
    if not exists:
        return None
    if doc is not None and seq == doc.seq:
        return doc
    return StoredDocument(
        room=room,
        instance=instance,
        state=state,
        saved_at=written or (doc.saved_at if doc is not None else datetime.datetime.now(UTC)),
        format_version=FORMAT_VERSION,
        storage=storage,
        seq=seq,
        schedules=schedules,
        recovery=recovery,
    )


def _is_room_dir(entry: os.DirEntry[str]) -> bool:
    try:
        validate_room_name(entry.name)
    except ValueError:
        return False
    return entry.is_dir()


def _instance_of(entry: os.DirEntry[str]) -> str | None:
    """The instance name stored in ``entry``, or None when it is not a document."""
    if entry.name.startswith(".") or not entry.name.endswith(_SUFFIX):
        return None
    stem = entry.name.removesuffix(_SUFFIX)
    try:
        name = decode_instance_name(stem)
    except ValueError:
        return None
    if name is not None:
        return name
    # A hashed stem: the real name is only in the document.
    try:
        doc = orjson.loads(pathlib.Path(entry.path).read_bytes())
    except orjson.JSONDecodeError:
        doc = None
    name = doc.get("instance") if isinstance(doc, dict) else None
    with contextlib.suppress(ValueError):
        if isinstance(name, str) and encode_instance_name(name) == stem:
            return name
    _log.warning("skipping %s: it does not name its instance", entry.path)
    return None
