"""A file store with faults a test switches on: held saves, slow saves, failing saves and loads.

``FaultyStore`` is the real :class:`~verani.store.FileStore` with one knob per kind of fault,
so every test that needs a misbehaving store uses the same one:

- a gate: while ``hold_saves`` is true, each save (a room's commit, or a whole document) sets
  ``save_reached`` and waits for ``save_gate`` (``release_saves()`` opens it for good);
- a delay: each save first sleeps ``save_delay`` seconds, as on a slow disk;
- OS faults: ``fail_writes(error)`` and ``fail_reads(error)`` raise an :class:`OSError` inside the
  store's own file work, where the file system would raise it, so FileStore's handling of it
  (StoreError naming the room and path, the temp file removed, nothing moved aside) is the code
  under test. They stand for what the tests cannot cause for real: as root, chmod denies nothing,
  and a full disk or an I/O error cannot be made on demand;
- interface faults: ``fail_saves(error)`` and ``fail_loads(error)`` raise from ``commit`` or
  ``save``, or from ``load``, before any file work, for errors FileStore itself never raises (a
  store with a bug).

Each fault fires ``times`` times, or until ``heal()`` when ``times`` is None.

``settle(until)`` waits for a condition the way race tests should: no guessed delay.
"""

from __future__ import annotations

import os
import pathlib
import threading
from collections.abc import Callable, Mapping
from typing import Literal

import trio
import trio.testing

from verani.store import FileStore, JSONValue, StoredDocument
from verani.store.base import Changes

_PosixPath = type(pathlib.Path())


async def settle(until: Callable[[], bool]) -> None:
    """Let every task run until ``until()`` holds, however slow or fast the machine.

    Worker threads (the store's file work) and the kernel's loopback are not tasks: every task
    may be blocked while they still work and ``until()`` is still false, so it tries again.
    """
    while not until():
        await trio.testing.wait_all_tasks_blocked()


class _Fault:
    """An error to raise, ``times`` more times (None: until healed); taken from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # OS faults are taken in the store's worker threads
        self._error: BaseException | None = None
        self._times: int | None = None

    def arm(self, error: BaseException | None, times: int | None) -> None:
        with self._lock:
            self._error, self._times = error, times

    def take(self) -> BaseException | None:
        with self._lock:
            error = self._error
            if error is not None and self._times is not None:
                self._times -= 1
                if self._times <= 0:
                    self._error = None
            return error


class _UnreadablePath(_PosixPath):  # type: ignore[valid-type,misc]
    """The document's path, whose read fails with ``error`` as the OS would refuse it."""

    error: OSError

    def read_bytes(self) -> bytes:
        raise self.error


class FaultyStore(FileStore):
    """A FileStore whose saves and loads can be held, slowed, or made to fail (see the module)."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        durability: Literal["fsync", "os"] = "fsync",
        hold_saves: bool = False,
        save_delay: float = 0.0,
    ) -> None:
        super().__init__(directory, durability=durability)
        self.hold_saves = hold_saves
        self.save_reached = trio.Event()
        self.save_gate = trio.Event()
        self.save_delay = save_delay
        self._save_fault = _Fault()
        self._load_fault = _Fault()
        self._write_fault = _Fault()
        self._read_fault = _Fault()

    def release_saves(self) -> None:
        """Let every held save through, and hold no more."""
        self.hold_saves = False
        self.save_gate.set()

    def fail_saves(self, error: BaseException, *, times: int | None = None) -> None:
        """``save`` raises ``error`` before touching a file."""
        self._save_fault.arm(error, times)

    def fail_loads(self, error: BaseException, *, times: int | None = None) -> None:
        """``load`` raises ``error`` before touching a file."""
        self._load_fault.arm(error, times)

    def fail_writes(self, error: OSError, *, times: int | None = None) -> None:
        """Saves get ``error`` from the file system as they start writing in the room's
        directory (a read-only directory, a full disk)."""
        self._write_fault.arm(error, times)

    def fail_reads(self, error: OSError, *, times: int | None = None) -> None:
        """Loads get ``error`` from the file system when they read the document."""
        self._read_fault.arm(error, times)

    def heal(self) -> None:
        """Clear every fault (held saves stay held until ``release_saves``)."""
        for fault in (self._save_fault, self._load_fault, self._write_fault, self._read_fault):
            fault.arm(None, None)

    async def _before_save(self) -> None:
        if self.hold_saves:
            self.save_reached.set()
            await self.save_gate.wait()
        if self.save_delay:
            await trio.sleep(self.save_delay)
        error = self._save_fault.take()
        if error is not None:
            raise error

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
        await self._before_save()
        await super().save(room, instance, state, storage, schedules=schedules, recovery=recovery)

    async def commit(self, room: str, instance: str, changes: Changes) -> None:
        await self._before_save()
        await super().commit(room, instance, changes)

    async def load(self, room: str, instance: str) -> StoredDocument | None:
        error = self._load_fault.take()
        if error is not None:
            raise error
        return await super().load(room, instance)

    # The OS faults enter below FileStore's own error handling, in its worker-thread code: the
    # directory step is the first thing a document save or a journal append does inside its
    # error handling, and the load reads its document through the path it is given.

    def _make_dirs(self, directory: pathlib.Path) -> None:
        super()._make_dirs(directory)
        error = self._write_fault.take()
        if error is not None:
            raise error

    def _load_sync(self, path: pathlib.Path, room: str, instance: str) -> StoredDocument | None:
        error = self._read_fault.take()
        if error is not None:
            assert isinstance(error, OSError)
            path = _UnreadablePath(path)
            path.error = error
        return super()._load_sync(path, room, instance)
