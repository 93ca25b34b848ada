"""Internal: what ``verani inspect`` reports: the store, read without writing, and a server's view.

The store is read with :meth:`FileStore.peek` (never moves or rewrites a file, safe beside a
server: writes are atomic renames). If a server serves the store, its control endpoint adds
what only it knows — awake or hibernated, sessions, ephemeral keys, time to hibernation.
Values stay in the store's JSON form here (special types tagged, see ``cli.md``); rendering for
people is the CLI's job.
"""

from __future__ import annotations

import os
from typing import Any

from .control import control_request
from .errors import CorruptDocumentError, NoServerError, RoomNotFoundError
from .store import FileStore


async def _server(
    store_dir: str | os.PathLike[str], request: dict[str, Any]
) -> dict[str, Any] | None:
    try:
        return await control_request(store_dir, request, timeout=10)
    except NoServerError:
        return None


async def list_instances(
    store_dir: str | os.PathLike[str], room: str | None = None
) -> list[dict[str, Any]]:
    """One summary row per room instance in the store or awake in the server, sorted.

    Row: ``room``, ``instance``, ``status`` (``awake``, ``hibernated``, or ``stored`` when no
    server runs or the running one does not serve that room), ``served`` (whether the running
    server serves the room; None without a server), ``bytes`` and ``saved_at`` of the stored
    document (None when not stored or unreadable), ``sessions`` (None without a server or when
    it does not serve the room), ``error`` (why the document is unreadable).
    """
    store = FileStore(store_dir)
    status = await _server(store_dir, {"op": "status"})
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
        raise RoomNotFoundError(f"no room named {room!r} in store {store_dir}")
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
    store_dir: str | os.PathLike[str], room: str, instance: str
) -> dict[str, Any]:
    """Everything known of one room instance (the shape is documented in ``cli.md``).

    Raises :class:`RoomNotFoundError` when neither the store nor a running server knows it.
    """
    store = FileStore(store_dir)
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
    reply = await _server(store_dir, {"op": "inspect", "room": room, "instance": instance})
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
