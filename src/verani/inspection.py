"""Internal: what ``verani inspect`` reports: the store, read without writing, and a server's view.

The store is read with :meth:`FileStore.peek` (never moves or rewrites a file, safe beside a
server: writes are atomic renames). If a server serves the store, its control endpoint adds
what only it knows — awake or hibernated, sessions, ephemeral keys, time to hibernation.
Values stay in the store's JSON form here (special types tagged, see ``cli.md``); rendering for
people is the CLI's job.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Awaitable, Callable
from typing import Any

from .control import control_request
from .errors import CorruptDocumentError, NoServerError, RoomNotFoundError
from .store import FileStore

#: How a report asks the server for what only it knows: a control request (``status`` or
#: ``inspect``) in, its reply out, or None when no server runs. The CLI goes through the control
#: socket; the server's own HTTP API answers in process, so both print the same JSON.
AskServer = Callable[[dict[str, Any]], Awaitable[dict[str, Any] | None]]


async def _server(
    store_dir: str | os.PathLike[str], request: dict[str, Any]
) -> dict[str, Any] | None:
    try:
        return await control_request(store_dir, request, timeout=10)
    except NoServerError:
        return None


#: A store directory, or the store itself (the server's own, already open, for its HTTP API).
StoreArg = str | os.PathLike[str] | FileStore


def _opened(store: StoreArg, ask: AskServer | None) -> tuple[FileStore, AskServer, str]:
    """The store to read, how to reach its server, and the store's name for messages."""
    if isinstance(store, FileStore):
        return store, ask or functools.partial(_server, store.directory), str(store.directory)
    return FileStore(store), ask or functools.partial(_server, store), os.fspath(store)


async def list_instances(
    store_dir: StoreArg, room: str | None = None, *, ask: AskServer | None = None
) -> list[dict[str, Any]]:
    """One summary row per room instance in the store or awake in the server, sorted.

    Row: ``room``, ``instance``, ``status`` (``awake``, ``hibernated``, or ``stored`` when no
    server runs or the running one does not serve that room), ``served`` (whether the running
    server serves the room; None without a server), ``bytes`` and ``saved_at`` of the stored
    document (None when not stored or unreadable), ``sessions`` (None without a server or when
    it does not serve the room), ``error`` (why the document is unreadable). ``ask`` replaces
    the control socket as the way to reach the server.
    """
    store, ask_server, where = _opened(store_dir, ask)
    status = await ask_server({"op": "status"})
    stored = await store.list_instances(room)
    live = {
        (i["room"], i["instance"]): i
        for i in (status["instances"] if status else [])
        if room is None or i["room"] == room
    }
    if (
        room is not None
        and not stored
        and not live
        and (status is None or room not in status["rooms"])
    ):
        raise RoomNotFoundError(f"no room named {room!r} in store {where}")
    rows = []
    for key in sorted(set(stored) | set(live)):
        row: dict[str, Any] = {"room": key[0], "instance": key[1], "bytes": None, "saved_at": None}
        row["error"] = None
        try:
            found = await store.peek(*key)
        except CorruptDocumentError as exc:
            found, row["error"] = None, str(exc)
        if found is not None:
            doc, size = found
            row["bytes"], row["saved_at"] = size, doc.saved_at.isoformat()
        info = live.get(key)
        row["served"] = None if status is None else key[0] in status["rooms"]
        row["status"] = _status(row["served"], info is not None and info["awake"])
        row["sessions"] = None if not row["served"] else info["sessions"] if info else 0
        rows.append(row)
    return rows


async def inspect_instance(
    store_dir: StoreArg, room: str, instance: str, *, ask: AskServer | None = None
) -> dict[str, Any]:
    """Everything known of one room instance (the shape is documented in ``cli.md``); ``ask``
    as for :func:`list_instances`.

    Raises :class:`RoomNotFoundError` when neither the store nor a running server knows it.
    """
    store, ask_server, _ = _opened(store_dir, ask)
    stored: dict[str, Any] | None = None
    error = None
    try:
        found = await store.peek(room, instance)
    except CorruptDocumentError as exc:
        found, error = None, str(exc)
    if found is not None:
        doc, size = found
        stored = {
            "path": str(store.path_for(room, instance)),
            "bytes": size,
            "saved_at": doc.saved_at.isoformat(),
            "format_version": doc.format_version,
            "state": doc.state,
            "storage": doc.storage,
            "schedules": doc.schedules,
        }
    reply = await ask_server({"op": "inspect", "room": room, "instance": instance})
    live = reply["live"] if reply else None
    if stored is None and live is None and error is None:
        if reply is not None and not reply["served"]:
            raise RoomNotFoundError(
                f"no room named {room!r} is served, and nothing is stored for it"
            )
        raise RoomNotFoundError(
            f"room {room!r} has no instance {instance!r} (nothing stored, not live)"
        )
    served = None if reply is None else bool(reply["served"])
    return {
        "room": room,
        "instance": instance,
        "status": _status(served, bool(live and live["awake"])),
        "served": served,
        "stored": stored,
        "error": error,
        "live": live,
    }


def _status(served: bool | None, awake: bool) -> str:
    # A room the running server does not serve is not asleep in it: `verani hibernate` and a
    # connection would both be refused. Only its stored document exists.
    if not served:
        return "stored"
    return "awake" if awake else "hibernated"
