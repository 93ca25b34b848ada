"""Internal: the file store's write-ahead journal: every room's changes, one sync per batch.

The journal is the Durable Objects / SQLite-WAL design on plain files. A commit appends one
record holding one room instance's changes (:class:`~verani.store.base.Changes`) to the active
segment, ``STORE/journal/<n>.wal``; the file store's documents are checkpoints of it, rewritten in
the background, and a segment is removed once every record in it is in a document.

Group commit across rooms: the records of every room that commits while a write is on its way go
out together in the next write, made durable by one ``fdatasync``. No task of its own does this:
whichever committing task finds no write in progress writes everything pending, while the others
wait for that write to end. So a store behaves the same inside a server and out.

A record is framed as ``length (4 bytes, little-endian) | CRC-32 of the payload (4 bytes) |
payload`` (the payload is JSON: ``room``, ``instance``, ``seq``, ``state``, ``put``, ``delete``,
``schedules`` when they changed, ``recovery`` (``put``, ``delete`` and ``frames``, the frames
appended to and dropped from session logs; older records have no ``frames``), and ``drop`` for a
deleted document), so a torn or corrupt tail is found when the journal is read and
everything from it on in that segment is dropped with a warning naming the file and offset,
never applied. ``seq`` counts each instance's commits; a document records the last one it includes
and a record at or below it is skipped.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import struct
import zlib
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, BinaryIO

import attrs
import orjson
import trio

from verani.errors import StoreError, store_errors
from verani.store.base import Changes

__all__ = [
    "CHECKPOINT_BYTES",
    "SEGMENT_BYTES",
    "Journal",
    "Record",
    "fsync_dir",
    "read_journal",
    "read_segment",
]

_log = logging.getLogger("verani.store")

#: A segment past this size is closed and the next record starts a new one.
SEGMENT_BYTES = 4 * 1024 * 1024
#: An awake instance whose records since its last checkpoint pass this size is checkpointed.
CHECKPOINT_BYTES = 1024 * 1024

_HEADER = struct.Struct("<II")
_SUFFIX = ".wal"

Key = tuple[str, str]


@attrs.frozen
class Record:
    """One commit of one room instance, as read back from a segment."""

    room: str
    instance: str
    seq: int
    changes: Changes
    #: The document was deleted: what came before this record no longer counts.
    drop: bool = False
    #: Bytes the record takes in its segment.
    size: int = 0


def encode_record(
    room: str, instance: str, seq: int, changes: Changes, drop: bool = False
) -> bytes:
    """One framed record. Raises TypeError when a value is not JSON (as a document save does)."""
    body: dict[str, Any] = {"room": room, "instance": instance, "seq": seq}
    if drop:
        body["drop"] = True
    else:
        body["state"] = changes.state
        body["put"] = changes.storage_put
        body["delete"] = list(changes.storage_delete)
        if changes.schedules is not None:
            body["schedules"] = changes.schedules
        if changes.recovery_put or changes.recovery_delete or changes.recovery_frames:
            body["recovery"] = {
                "put": changes.recovery_put,
                "delete": list(changes.recovery_delete),
            }
            if changes.recovery_frames:
                # Optional when read: records written before it existed have none.
                body["recovery"]["frames"] = changes.recovery_frames
    try:
        payload = orjson.dumps(body, option=orjson.OPT_UTC_Z)
    except orjson.JSONEncodeError as exc:
        raise TypeError(f"state of room {room!r} instance {instance!r} is not JSON: {exc}") from exc
    return _HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def read_segment(data: bytes) -> tuple[list[Record], int | None, str]:
    """The records of a segment's bytes, in order; then the offset where reading stopped early
    (None when every byte was a whole, intact record) and why."""
    records: list[Record] = []
    offset, end = 0, len(data)
    while offset < end:
        if end - offset < _HEADER.size:
            return records, offset, "a record header cut short (a torn write)"
        length, crc = _HEADER.unpack_from(data, offset)
        start = offset + _HEADER.size
        if start + length > end:
            return records, offset, f"a record of {length} bytes cut short (a torn write)"
        payload = data[start : start + length]
        if zlib.crc32(payload) != crc:
            return records, offset, "a record whose checksum does not match (corrupt)"
        try:
            records.append(_parse_record(orjson.loads(payload), _HEADER.size + length))
        except (orjson.JSONDecodeError, ValueError, TypeError, KeyError) as exc:
            return records, offset, f"an unreadable record ({exc})"
        offset = start + length
    return records, None, ""


def _parse_record(body: Any, size: int) -> Record:
    room, instance, seq = body["room"], body["instance"], body["seq"]
    if not (isinstance(room, str) and isinstance(instance, str)):
        raise TypeError("room and instance must be strings")
    if type(seq) is not int or seq < 1:
        raise ValueError(f"seq {seq!r} is not a positive integer")
    if body.get("drop") is True:
        return Record(room, instance, seq, Changes(), drop=True, size=size)
    state, put, delete = body["state"], body["put"], body["delete"]
    if not (isinstance(state, dict) and isinstance(put, dict) and isinstance(delete, list)):
        raise TypeError("state and put must be objects, delete a list")
    if not all(isinstance(k, str) for k in delete):
        raise ValueError("deleted storage keys must be strings")
    schedules = body.get("schedules")
    if schedules is not None and not isinstance(schedules, dict):
        raise TypeError("schedules must be an object")
    recovery = body.get("recovery") or {"put": {}, "delete": []}
    r_put, r_delete = recovery["put"], recovery["delete"]
    if not (isinstance(r_put, dict) and isinstance(r_delete, list)):
        raise TypeError("recovery put must be an object, delete a list")
    if not all(isinstance(k, str) for k in r_delete):
        raise ValueError("deleted recovery tokens must be strings")
    r_frames = recovery.get("frames", {})
    if not isinstance(r_frames, dict):
        raise TypeError("recovery frames must be an object")
    changes = Changes(state, put, delete, schedules, r_put, r_delete, r_frames)
    return Record(room, instance, seq, changes, size=size)


def segment_paths(directory: pathlib.Path) -> list[tuple[int, pathlib.Path]]:
    """The journal's segments, oldest first (missing directory: none)."""
    found = []
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return []  # no journal yet (or no store: the document's own write says so)
    for entry in entries:
        stem = entry.name.removesuffix(_SUFFIX)
        if entry.name.endswith(_SUFFIX) and stem.isdigit():
            found.append((int(stem), pathlib.Path(entry.path)))
    return sorted(found)


def read_journal(directory: pathlib.Path, *, warn: bool) -> list[tuple[int, list[Record]]]:
    """Every intact record of every segment, per segment, oldest first. What follows a torn or
    corrupt record in a segment is left out (logged as a warning when ``warn``)."""
    segments = []
    for number, path in segment_paths(directory):
        with store_errors(f"cannot read the journal segment {path}"):
            data = path.read_bytes()
        records, stopped, why = read_segment(data)
        if stopped is not None and warn:
            _log.warning(
                "journal segment %s: dropped %d bytes from offset %d: %s",
                path,
                len(data) - stopped,
                stopped,
                why,
            )
        segments.append((number, records))
    return segments


class Journal:
    """The journal of one file store: appends, group commit, and which segments still hold
    records not yet in a document."""

    def __init__(
        self,
        directory: pathlib.Path,
        *,
        fsync: bool,
        threads: trio.CapacityLimiter,
        make_dirs: Callable[[pathlib.Path], None],
        before_remove: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.directory = directory
        self._fsync = fsync
        # The store's own: directories 0700, made durable with fsync.
        self._make_dirs = make_dirs
        # Called before segments are removed: what the store keeps beside the documents (the
        # index of schedules) must not depend on them any more.
        self._before_remove = before_remove
        self._threads = threads
        self._opened = False
        self._opening = trio.Lock()
        # segment number -> instance -> the highest seq of that instance in the segment.
        self._segments: dict[int, dict[Key, int]] = {}
        self._active: int | None = None
        self._file: BinaryIO | None = None
        self._size = 0
        #: The last seq given to each instance's commits, and the one its document includes.
        self._seq: dict[Key, int] = {}
        self._doc_seq: dict[Key, int] = {}
        #: Bytes of each instance's records since its last checkpoint, and the oldest segment
        #: holding one of them.
        self._since: dict[Key, tuple[int, int]] = {}
        # Group commit: records waiting for the next write, and the batches' outcomes.
        self._pending: list[bytes] = []
        self._pending_index: list[tuple[Key, int, int]] = []
        self._writing = False
        self._next_batch = 1
        self._finished_batch = 0
        self._failures: dict[int, StoreError] = {}
        self._finished = trio.Event()
        #: Writes made (each one ``fdatasync`` with durability "fsync").
        self.writes = 0

    # --- the index ------------------------------------------------------------------------

    async def open(self) -> list[tuple[int, list[Record]]]:
        """Read the segments once (later calls return nothing): the index of what they hold is
        built, and their records are returned for whoever must apply them."""
        if self._opened:
            return []
        async with self._opening:
            if self._opened:  # another task opened it meanwhile
                return []
            segments = await trio.to_thread.run_sync(
                lambda: read_journal(self.directory, warn=True), limiter=self._threads
            )
            self._opened = True
        for number, records in segments:
            held = self._segments.setdefault(number, {})
            for rec in records:
                key = (rec.room, rec.instance)
                held[key] = rec.seq
                self._seq[key] = max(self._seq.get(key, 0), rec.seq)
                size, oldest = self._since.get(key, (0, number))
                self._since[key] = (size + rec.size, oldest)
        # Appends go to a new segment: an old one may end in a torn record.
        self._active = (segments[-1][0] if segments else 0) + 1
        return segments

    @property
    def opened(self) -> bool:
        """Whether :meth:`open` has read the segments."""
        return self._opened

    def knows(self, key: Key) -> bool:
        """Whether the last seq of ``key`` is known (loaded, committed or in the journal)."""
        return key in self._seq

    def loaded(self, key: Key, doc_seq: int) -> None:
        """The document of ``key`` was read and includes its commits up to ``doc_seq``."""
        self._seq[key] = max(self._seq.get(key, 0), doc_seq)
        self._doc_seq[key] = doc_seq

    def last_seq(self, key: Key) -> int:
        """The last seq given to a commit of ``key`` (0: none)."""
        return self._seq.get(key, 0)

    def doc_seq(self, key: Key) -> int:
        """The last commit the document of ``key`` includes, as far as this store knows."""
        return self._doc_seq.get(key, 0)

    def pending_segments(self, key: Key) -> list[int]:
        """The segments holding records of ``key`` not yet in its document."""
        return [n for n, held in self._segments.items() if key in held]

    def instances(self) -> set[Key]:
        """Instances with records not yet in their documents."""
        return {key for held in self._segments.values() for key in held}

    def checkpoint_due(self, key: Key, *, at_rest: bool) -> bool:
        """See :meth:`verani.store.base.Store.checkpoint_due`."""
        since = self._since.get(key)
        if since is None:
            return False
        size, oldest = since
        return at_rest or size >= CHECKPOINT_BYTES or oldest != self._active

    async def checkpointed(self, key: Key, seq: int) -> None:
        """The document of ``key`` now includes its commits up to ``seq``: segments holding no
        other record still needed are removed."""
        self._doc_seq[key] = max(self._doc_seq.get(key, 0), seq)
        done = []
        for number, held in self._segments.items():
            if held.get(key, seq + 1) <= seq:
                del held[key]
            if not held and number != self._active:
                done.append(number)
        if seq >= self._seq.get(key, 0):
            self.forget(key)
        else:
            # Commits made after the checkpoint's snapshot: they are in the active segment.
            self._since[key] = (0, self._active or 0)
        for number in done:
            del self._segments[number]
        if done:
            if self._before_remove is not None:
                await self._before_remove()
            await trio.to_thread.run_sync(self._remove_sync, done, limiter=self._threads)

    def forget(self, key: Key) -> None:
        """Keep nothing for ``key`` unless a record of it is still waiting for its document:
        ten thousand hibernated rooms cost no memory here, and a forgotten instance's next
        commit reads its numbering from its document again."""
        if self._seq.get(key, 0) > self._doc_seq.get(key, 0):
            return  # a commit not yet in the document
        if any(key in held for held in self._segments.values()):
            return
        self._since.pop(key, None)
        self._seq.pop(key, None)
        self._doc_seq.pop(key, None)

    # --- appending ------------------------------------------------------------------------

    async def append(
        self, room: str, instance: str, changes: Changes, *, drop: bool = False
    ) -> int:
        """Append one record and return its seq once it is durable (with every other record
        pending: group commit). Raises StoreError when its write failed."""
        key = (room, instance)
        seq = self._seq[key] = self._seq.get(key, 0) + 1
        record = encode_record(room, instance, seq, changes, drop)
        self._pending.append(record)
        self._pending_index.append((key, seq, len(record)))
        batch = self._next_batch
        while self._finished_batch < batch:
            if self._writing:
                await self._finished.wait()
            else:
                with trio.CancelScope(shield=True):
                    # Shielded: others wait on this write, and it must end with its outcome.
                    await self._write_pending()
        failure = self._failures.get(batch)
        if failure is not None:
            raise StoreError(str(failure)) from failure
        return seq

    async def _write_pending(self) -> None:
        self._writing = True
        records, index = self._pending, self._pending_index
        self._pending, self._pending_index = [], []
        batch = self._next_batch
        self._next_batch += 1
        try:
            segment = await trio.to_thread.run_sync(
                self._append_sync, b"".join(records), limiter=self._threads
            )
        except StoreError as exc:
            self._failures[batch] = exc
        else:
            held = self._segments.setdefault(segment, {})
            for key, seq, size in index:
                held[key] = seq
                total, oldest = self._since.get(key, (0, segment))
                self._since[key] = (total + size, oldest)
            self.writes += 1
        finally:
            self._failures.pop(batch - 64, None)  # waiters of old batches have long read theirs
            self._finished_batch = batch
            self._writing = False
            self._finished.set()
            self._finished = trio.Event()

    def _append_sync(self, data: bytes) -> int:
        with store_errors(f"cannot append to the journal in {self.directory}"):
            self._make_dirs(self.directory)
            if self._file is None or self._size >= SEGMENT_BYTES:
                self._next_segment()
            assert self._file is not None and self._active is not None
            start = self._size
            try:
                self._file.write(data)
                self._file.flush()
                if self._fsync:
                    os.fdatasync(self._file.fileno())
            except OSError:
                self._cut_back(start)
                raise
            self._size += len(data)
            return self._active

    def _cut_back(self, start: int) -> None:
        # A failed append may have left part of a record: cut it off so the next one follows
        # whole records. If even that fails, the next append starts a new segment, and reading
        # this one stops at the torn record.
        assert self._file is not None
        try:
            self._file.truncate(start)
            self._file.seek(start)
        except OSError:
            self._close_file()

    def _next_segment(self) -> None:
        self._close_file()
        # The active number unless a file has it already (appends never reopen a segment).
        existing = [n for n, _ in segment_paths(self.directory)]
        number = max([*existing, (self._active or 1) - 1]) + 1
        path = self.directory / f"{number:08d}{_SUFFIX}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        self._file = open(fd, "ab", buffering=0)  # noqa: SIM115 - kept open across appends
        if self._fsync:
            fsync_dir(self.directory)  # the new segment's name must survive a power loss too
        self._active = number
        self._size = 0
        self._segments.setdefault(number, {})

    def _close_file(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None

    def _remove_sync(self, numbers: Iterable[int]) -> None:
        numbers = list(numbers)
        if not numbers:
            return
        with store_errors(f"cannot remove checkpointed segments of {self.directory}"):
            for number in numbers:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.directory / f"{number:08d}{_SUFFIX}")
            if self._fsync:
                fsync_dir(self.directory)

    async def clear(self) -> None:
        """Everything in the journal is in the documents: remove every segment."""
        self._close_file()
        numbers = [n for n, _ in segment_paths(self.directory)]
        self._segments = {}
        self._since = {}
        self._active = max(numbers, default=0) + 1
        if numbers and self._before_remove is not None:
            await self._before_remove()
        await trio.to_thread.run_sync(self._remove_sync, numbers, limiter=self._threads)

    def close(self) -> None:
        """Close the active segment (nothing is pending once every commit has returned)."""
        self._close_file()


def fsync_dir(directory: pathlib.Path) -> None:
    """Make a directory's entries (names created, renamed or removed) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
