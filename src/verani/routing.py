"""Internal: which room instance an HTTP request target names. Pure.

``/ws/counter`` is instance ``default`` of the room whose ``websocket_path`` is ``/ws/counter``;
``/ws/counter/NAME`` is instance ``NAME`` (percent-decoded). Anything else is not a room path.
"""

from __future__ import annotations

import re
import unicodedata
import urllib.parse
from collections.abc import Iterable
from typing import Any, Final

import attrs

from .errors import RoomDefinitionError
from .room import RoomDefinition

#: The instance a room's bare path reaches.
DEFAULT_INSTANCE: Final = "default"

#: Longest instance name accepted, in characters.
MAX_INSTANCE_NAME: Final = 128


@attrs.frozen
class Route:
    """A request target resolved to a room and an instance (or a reason the name is bad)."""

    room: RoomDefinition[Any]
    instance: str
    #: Set when the path is a room's but the instance name is not acceptable (answer 400).
    error: str | None = None


def split_target(target: str) -> tuple[str, dict[str, str]]:
    """Split an HTTP request target into its path and query (first value of each key wins)."""
    parts = urllib.parse.urlsplit(target)
    query: dict[str, str] = {}
    for key, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
        query.setdefault(key, value)
    return parts.path, query


def instance_name_error(
    name: str, *, max_length: int = MAX_INSTANCE_NAME, pattern: re.Pattern[str] | None = None
) -> str | None:
    """Why ``name`` cannot be an instance name, or None when it can.

    Whatever ``pattern`` allows, names that could reach outside a store (``..``, ``/``, control
    characters) are always refused.
    """
    if not name:
        return "the instance name is empty"
    if len(name) > max_length:
        return f"the instance name is longer than {max_length} characters"
    if name in (".", ".."):
        return f"{name!r} is not an instance name"
    if "/" in name:
        return "an instance name cannot contain '/'"
    if any(unicodedata.category(ch) in ("Cc", "Cs") for ch in name):
        return "an instance name cannot contain control characters"
    if pattern is not None and not pattern.fullmatch(name):
        return f"the instance name does not match {pattern.pattern!r}"
    return None


@attrs.frozen
class InstanceRules:
    """The server's limits on instance names; a room's own ``max_instance_name`` and
    ``instance_pattern`` win for that room."""

    max_length: int = MAX_INSTANCE_NAME
    pattern: re.Pattern[str] | None = None

    def problem(self, room: RoomDefinition[Any], name: str) -> str | None:
        """Why ``name`` cannot be an instance of ``room``, or None when it can."""
        return instance_name_error(
            name,
            max_length=room.max_instance_name or self.max_length,
            pattern=room.instance_pattern or self.pattern,
        )


class Router:
    """Maps request paths to rooms; built once from the served room definitions."""

    def __init__(
        self, rooms: Iterable[RoomDefinition[Any]], rules: InstanceRules | None = None
    ) -> None:
        self.rules = rules or InstanceRules()
        self._by_path: dict[str, RoomDefinition[Any]] = {}
        names: dict[str, RoomDefinition[Any]] = {}
        for room in rooms:
            other = self._by_path.get(room.websocket_path)
            if other is not None:
                raise RoomDefinitionError(
                    f"rooms {other.name!r} and {room.name!r} both use websocket_path "
                    f"{room.websocket_path!r}; give each room its own path"
                )
            if room.name in names:
                raise RoomDefinitionError(
                    f"two rooms are named {room.name!r}; room names must be unique"
                )
            self._by_path[room.websocket_path] = room
            names[room.name] = room

    @property
    def rooms(self) -> list[RoomDefinition[Any]]:
        """The rooms, in the order they were given."""
        return list(self._by_path.values())

    def route(self, path: str) -> Route | None:
        """Resolve an (undecoded) URL path; None when it is no room's path."""
        room = self._by_path.get(path)
        if room is not None:
            return Route(room, DEFAULT_INSTANCE)
        head, sep, tail = path.rpartition("/")
        room = self._by_path.get(head) if sep else None
        if room is None:
            return None
        try:
            name = urllib.parse.unquote(tail, errors="strict")
        except UnicodeDecodeError:
            return Route(room, tail, "the instance name is not valid UTF-8")
        return Route(room, name, self.rules.problem(room, name))
