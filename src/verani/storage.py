"""Internal: ``ctx.actor.storage``, a room instance's own key-value space (``getStorage()``'s twin).

Values are kept encoded (the same codec as persisted state), so ``put`` takes a snapshot of the
value, as Durable Object storage's structured clone does, and ``get`` returns a fresh copy. The
key space lives in the room instance's stored document: changes made in a turn are written in the
same atomic write as that turn's state changes, and the turn's frames wait for it (output gate).
Pure: the methods are ``async`` for parity with Verani and with stores that will need I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, overload

from .codec import Codec, JSONValue

#: Longest key accepted, in characters (Durable Object storage allows 2 KiB keys).
MAX_KEY_LENGTH = 2048

_MISSING: Any = object()


class RoomStorage:
    """Async key-value storage of one room instance (``ctx.actor.storage``)."""

    def __init__(
        self, codec: Codec, stored: Mapping[str, JSONValue], on_change: Callable[[], None]
    ) -> None:
        self._codec = codec
        self._data: dict[str, JSONValue] = dict(stored)
        self._on_change = on_change
        # Keys put or deleted since the last take_changes(), for the next commit.
        self._changed: set[str] = set()

    def snapshot(self) -> dict[str, JSONValue]:
        """The encoded key space, for the store (a copy: later puts do not change it)."""
        return dict(self._data)

    def take_changes(self) -> tuple[dict[str, JSONValue], list[str], set[str]]:
        """What changed since the last call: the keys put (with their values), the keys
        deleted, and every changed key (for :meth:`restore_changes` if the commit fails)."""
        changed, self._changed = self._changed, set()
        put = {k: self._data[k] for k in changed if k in self._data}
        return put, sorted(changed - put.keys()), changed

    def restore_changes(self, keys: set[str]) -> None:
        """A commit of ``keys`` failed: they go in the next one again."""
        self._changed |= keys

    @overload
    async def get(self, key: str) -> Any: ...
    @overload
    async def get(self, key: Iterable[str]) -> dict[str, Any]: ...
    async def get(self, key: str | Iterable[str]) -> Any:
        """The value of ``key`` (None when absent), or a dict of the present keys of a list."""
        if isinstance(key, str):
            raw = self._data.get(_check_key(key), _MISSING)
            return None if raw is _MISSING else self._decode(key, raw)
        return {k: self._decode(k, self._data[k]) for k in map(_check_key, key) if k in self._data}

    @overload
    async def put(self, key: str, value: Any) -> None: ...
    @overload
    async def put(self, key: Mapping[str, Any]) -> None: ...
    async def put(self, key: str | Mapping[str, Any], value: Any = _MISSING) -> None:
        """Store ``value`` under ``key``, or every entry of a dict; all or nothing.

        Raises :class:`~verani.errors.NotPersistableError` naming the key and the path inside
        the value when it cannot be stored; nothing is changed then.
        """
        if isinstance(key, str):
            if value is _MISSING:
                raise TypeError("storage.put(key, value) needs a value")
            entries: Mapping[str, Any] = {key: value}
        else:
            if value is not _MISSING:
                raise TypeError("storage.put(entries) takes no value; pass a dict of entries")
            entries = key
        encoded = {
            _check_key(k): self._codec.encode(v, Any, path=f"storage[{k!r}]")
            for k, v in entries.items()
        }
        self._data.update(encoded)
        self._changed.update(encoded)
        if encoded:
            self._on_change()

    @overload
    async def delete(self, key: str) -> bool: ...
    @overload
    async def delete(self, key: Iterable[str]) -> int: ...
    async def delete(self, key: str | Iterable[str]) -> bool | int:
        """Remove ``key`` (returns whether it was there) or a list of keys (returns how many)."""
        keys = [_check_key(key)] if isinstance(key, str) else [_check_key(k) for k in key]
        removed = 0
        for k in keys:
            if self._data.pop(k, _MISSING) is not _MISSING:
                removed += 1
                self._changed.add(k)
        if removed:
            self._on_change()
        return bool(removed) if isinstance(key, str) else removed

    async def delete_all(self) -> None:
        """Remove every key."""
        if self._data:
            self._changed.update(self._data)
            self._data.clear()
            self._on_change()

    async def list(
        self,
        *,
        prefix: str = "",
        start: str | None = None,
        end: str | None = None,
        reverse: bool = False,
        limit: int | None = None,
    ) -> dict[str, Any]:
        """Keys in order (``start`` inclusive, ``end`` exclusive, only those with ``prefix``),
        with their values, as Durable Object storage's ``list()``."""
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0, not {limit}")
        keys = sorted(
            k
            for k in self._data
            if k.startswith(prefix) and (start is None or k >= start) and (end is None or k < end)
        )
        if reverse:
            keys.reverse()
        if limit is not None:
            keys = keys[:limit]
        return {k: self._decode(k, self._data[k]) for k in keys}

    def _decode(self, key: str, raw: JSONValue) -> Any:
        return self._codec.decode(raw, Any, path=f"storage[{key!r}]")


def _check_key(key: object) -> str:
    if not isinstance(key, str) or not key:
        raise TypeError(f"storage keys are non-empty strings, not {key!r}")
    if len(key) > MAX_KEY_LENGTH:
        raise ValueError(f"storage key of {len(key)} characters is over {MAX_KEY_LENGTH}")
    return key
