"""Internal: load room definitions from Python files and directories (``verani serve DIR``)."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pathlib
import sys
import traceback
from collections.abc import Iterable
from typing import Any

from .errors import RoomLoadError
from .room import RoomDefinition
from .routing import Router


def load_rooms(paths: Iterable[str | os.PathLike[str]]) -> list[RoomDefinition[Any]]:
    """Import each file (or every ``*.py`` file in each directory) and collect its rooms.

    A room is any :class:`RoomDefinition` bound to a module-level name. Raises
    :class:`RoomLoadError` naming the file (and line, for a syntax error) when a file cannot be
    loaded or defines no room, and :class:`RoomDefinitionError` when two rooms clash.
    """
    rooms: list[RoomDefinition[Any]] = []
    for path in _expand(paths):
        found = _load_file(path)
        if not found:
            raise RoomLoadError(
                f"{path} defines no rooms; define one at module level with "
                f"`my_room = define_room(name=..., ...)`"
            )
        rooms.extend(r for r in found if all(r is not seen for seen in rooms))
    Router(rooms)  # raises on two rooms with one path or one name
    return rooms


def _expand(paths: Iterable[str | os.PathLike[str]]) -> list[pathlib.Path]:
    files: list[pathlib.Path] = []
    for raw in paths:
        path = pathlib.Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.glob("*.py") if not p.name.startswith("_"))
            if not found:
                raise RoomLoadError(f"directory {path} has no room files (*.py)")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise RoomLoadError(f"room file {path} does not exist")
    return files


def _load_file(path: pathlib.Path) -> list[RoomDefinition[Any]]:
    resolved = path.resolve()
    digest = hashlib.sha256(str(resolved).encode()).hexdigest()[:12]
    module_name = f"verani_rooms_{resolved.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(module_name, resolved)
    if spec is None or spec.loader is None:
        raise RoomLoadError(f"{path} is not a Python file that can be imported")
    module = importlib.util.module_from_spec(spec)
    # Registered before running it, so annotations of its state classes can be resolved.
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        del sys.modules[module_name]
        raise RoomLoadError(f"{path}:{exc.lineno}: syntax error: {exc.msg}") from None
    except Exception as exc:
        del sys.modules[module_name]
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == str(resolved)]
        where = f"{path}:{frames[-1].lineno}" if frames else str(path)
        raise RoomLoadError(
            f"{where}: loading the room file raised {type(exc).__name__}: {exc}"
        ) from exc
    return [value for value in vars(module).values() if isinstance(value, RoomDefinition)]
