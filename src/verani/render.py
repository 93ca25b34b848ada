"""Internal: readable text for persisted values, for ``verani inspect``. Pure.

Values are shown close to how Python writes them, except where the JavaScript twin is clearer:
datetimes as ISO text, ``set{...}``, ``Map{key => value}`` for dicts with non-str keys, and
patterns as ``/source/flags``.
"""

from __future__ import annotations

import datetime as dt
import decimal
import re
import uuid
from typing import Any, NamedTuple

#: Past this width a container is shown one item per line.
WIDTH = 88

_FLAG_LETTERS = (
    (re.IGNORECASE, "i"),
    (re.MULTILINE, "m"),
    (re.DOTALL, "s"),
    (re.VERBOSE, "x"),
    (re.ASCII, "a"),
)


def render(value: Any, indent: int = 0) -> str:
    """``value`` as readable text; containers wider than :data:`WIDTH` break over lines."""
    flat = _flat(value)
    if len(flat) + indent <= WIDTH or not _is_container(value):
        return flat
    pad = " " * (indent + 2)
    opener, closer, items = _parts(value)
    if not any(_is_container(i) or isinstance(i, _Entry) for i in items):
        # Scalars fill lines, as a person would write a long list of numbers.
        lines, line = [], pad
        for text in (f"{_flat(i)}," for i in items):
            if len(line) + len(text) > WIDTH and line.strip():
                lines.append(line.rstrip())
                line = pad
            line += text + " "
        lines.append(line.rstrip())
    else:
        lines = [f"{pad}{render_item(item, indent + 2)}," for item in items]
    return "\n".join([opener, *lines, " " * indent + closer])


class _Entry(NamedTuple):
    arrow: bool  # Map entries show ``key => value``, str-keyed ones ``'key': value``
    key: Any
    value: Any


def render_item(item: Any, indent: int) -> str:
    """One entry of a container, or a bare value."""
    if isinstance(item, _Entry):
        key = f"{_flat(item.key)} =>" if item.arrow else f"{item.key!r}:"
        return f"{key} {render(item.value, indent)}"
    return render(item, indent)


def _is_container(value: Any) -> bool:
    return isinstance(value, list | tuple | set | frozenset | dict)


def _parts(value: Any) -> tuple[str, str, list[Any]]:
    if isinstance(value, dict):
        if all(type(k) is str for k in value):
            return "{", "}", [_Entry(False, k, v) for k, v in value.items()]
        return "Map{", "}", [_Entry(True, k, v) for k, v in value.items()]
    if isinstance(value, frozenset):
        return "frozenset{", "}", _sorted(value)
    if isinstance(value, set):
        return "set{", "}", _sorted(value)
    if isinstance(value, tuple):
        return "(", ")", list(value)
    return "[", "]", list(value)


def _sorted(items: set[Any] | frozenset[Any]) -> list[Any]:
    try:
        return sorted(items)
    except TypeError:
        return sorted(items, key=_flat)


def _flat(value: Any) -> str:
    if _is_container(value):
        opener, closer, items = _parts(value)
        if isinstance(value, tuple) and len(items) == 1:
            return f"({_flat(items[0])},)"
        return opener + ", ".join(render_item(i, 10**6) for i in items) + closer
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return f"timedelta({value})"
    if isinstance(value, re.Pattern):
        flags = "".join(letter for flag, letter in _FLAG_LETTERS if value.flags & flag)
        source = value.pattern if isinstance(value.pattern, str) else repr(value.pattern)
        return f"/{source}/{flags}"
    if isinstance(value, decimal.Decimal):
        return f"Decimal('{value}')"
    if isinstance(value, uuid.UUID):
        return f"UUID('{value}')"
    if isinstance(value, bytes) and len(value) > 64:
        return f"{value[:64]!r}… ({len(value)} bytes)"
    return repr(value)
