"""Internal: a store that keeps documents in memory: for tests and throw-away development servers.

It behaves like the file store as far as a room can tell — each save replaces the whole document
atomically, values go through JSON (so a test sees exactly what a file would hold) — but nothing
survives the process, and no worker thread is involved, which keeps tests on Trio's autojump
clock deterministic.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import Any

import orjson
import trio

from verani.store.base import (
    JSONValue,
    Store,
    StoredDocument,
    encode_instance_name,
    new_document,
    validate_room_name,
)

__all__ = ["MemoryStore"]


class MemoryStore(Store):
    """Documents in a dict, serialized to JSON bytes on save as a file store would write them."""

    def __init__(self) -> None:
        self._docs: dict[tuple[str, str], bytes] = {}
        self._aside: list[tuple[str, str, str, bytes]] = []

    async def load(self, room: str, instance: str) -> StoredDocument | None:
        """The document of ``room``/``instance``, or None."""
        await trio.lowlevel.checkpoint()
        data = self._docs.get(_key(room, instance))
        if data is None:
            return None
        doc: dict[str, Any] = orjson.loads(data)
        return StoredDocument(
            room=room,
            instance=instance,
            state=doc["state"],
            saved_at=datetime.datetime.fromisoformat(doc["saved_at"]),
            format_version=doc["version"],
            storage=doc["storage"],
            seq=doc["seq"],
            schedules=doc["schedules"],
            recovery=doc.get("recovery", {}),
        )

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
        """Replace the document; raises TypeError for values JSON cannot hold, as files do."""
        await trio.lowlevel.checkpoint()
        document = new_document(
            room, instance, state, storage, schedules=schedules, recovery=recovery
        )
        try:
            data = orjson.dumps(document)
        except orjson.JSONEncodeError as exc:
            raise TypeError(f"state of {room}/{instance} is not JSON: {exc}") from exc
        self._docs[_key(room, instance)] = data
        self.note_schedules(room, instance, schedules or {})
        self.saves += 1

    async def delete(self, room: str, instance: str) -> bool:
        """Forget the document; returns whether there was one."""
        await trio.lowlevel.checkpoint()
        self.note_schedules(room, instance, {})
        return self._docs.pop(_key(room, instance), None) is not None

    async def set_aside(self, room: str, instance: str, reason: str) -> str | None:
        """Keep a copy of the document (inspectable through :attr:`set_aside_copies`)."""
        await trio.lowlevel.checkpoint()
        data = self._docs.get(_key(room, instance))
        if data is None:
            return None
        self._aside.append((room, instance, reason, data))
        return f"memory:{room}/{instance}#{len(self._aside)}"

    @property
    def set_aside_copies(self) -> list[tuple[str, str, str, bytes]]:
        """``(room, instance, reason, document bytes)`` of every copy kept aside."""
        return list(self._aside)

    async def list_instances(self, room: str | None = None) -> list[tuple[str, str]]:
        """The stored ``(room, instance)`` pairs, sorted."""
        await trio.lowlevel.checkpoint()
        return sorted(k for k in self._docs if room is None or k[0] == room)


def _key(room: str, instance: str) -> tuple[str, str]:
    validate_room_name(room)
    encode_instance_name(instance)  # the same names a file store accepts
    return (room, instance)
