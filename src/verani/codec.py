"""Internal: turns persisted room-state values into JSON trees and back, losslessly.

A value is written by its *declared* type (a field type of the state class) where it has one and
by its runtime type everywhere else (``Any``). Plain JSON values stay plain; any other value
becomes a tagged object ``{"$t": TAG, "v": ...}``. The tags: ``int`` (past 64 bits), ``float``
(NaN, ±inf), ``dict`` (a str-keyed dict with a ``"$t"`` key), ``map`` (a dict with other keys, as
``[[key, value], ...]``), ``set``, ``frozenset``, ``tuple``, ``bytes`` (base64), ``datetime`` and
``time`` (ISO text, plus ``"zone"`` for a ZoneInfo and ``"fold": 1``), ``date``, ``timedelta``
(``[days, seconds, microseconds]``), ``decimal``, ``uuid``, ``regexp`` (source in ``"v"``, plus
``"flags"``) and ``any`` (a value that does not fit its declared type, written by the untyped
rules so that it reads back as itself). A set's elements are written sorted, so that the same set
is always the same document, whatever its hash order.

attrs classes and dataclasses are written as plain objects of their fields, enums by value, and
only where their type is declared: a document never names a class, so reading one cannot make the
server import or call anything it does not already expect. Reading never coerces: a stored value
that does not fit its declared type comes back as what it is. Types are exact: subclasses of the
built-in types (``OrderedDict``, named tuples, an ``IntEnum`` where no type is declared) are
refused rather than turned into their base type — except the state's own change-tracking copies
(:mod:`verani.tracking`), which are written exactly as the type they stand for (:func:`_kind`).
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import decimal
import enum
import functools
import inspect
import io
import math
import re
import reprlib
import socket
import threading
import types
import typing
import uuid
import zoneinfo
from collections.abc import Callable
from typing import Any

import attrs
import cattrs
import cattrs.preconf.orjson
import orjson
from cattrs.errors import (
    AttributeValidationNote,
    BaseValidationError,
    ClassValidationError,
    IterableValidationError,
    IterableValidationNote,
)
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override
from cattrs.v import transform_error

from verani.errors import CorruptDocumentError, NotPersistableError

from .tracking import PLAIN_TYPES

__all__ = ["MAX_DEPTH", "Codec", "JSONValue", "dumps", "loads", "make_codec"]

# One definition, shared with the store that writes these trees.
from .store.base import JSONValue

MAX_DEPTH = 200
"""How many JSON levels a value may nest. orjson writes at most 254 and the store's document
wraps each value, so values stop well short of that."""

_I64 = 2**63
_NoneType = type(None)
_MISSING = object()

#: The types a JSON document holds as themselves. Reading takes any value of these as itself;
#: writing does only where :func:`_as_themselves` says so.
_JSON_SCALARS: frozenset[type] = frozenset({str, int, float, bool, _NoneType})


def _kind(value: object) -> type:
    """The type ``value`` is written as: its own, or for a change-tracking copy, the type it
    stands for. The codec's one exception to exact types."""
    kind = type(value)
    return PLAIN_TYPES.get(kind, kind)


def _as_themselves(values: Any) -> bool:
    """The codec's one rule for scalars: whether every value is written as itself.

    That is a JSON scalar that orjson writes and reads back exactly: a bool, None, an int within
    64 bits, a finite float, or an ASCII str. Any other str is written as itself too, but only
    after the check for lone surrogates that this rule leaves to :func:`_encode_str` (it is the
    slow part); any other value is tagged or refused. Takes an iterable so that a list of
    scalars costs one call, not one per element.
    """
    for value in values:
        kind = type(value)
        if kind is str:
            if not value.isascii():
                return False
        elif kind is int:
            if not -_I64 <= value < _I64:
                return False
        elif kind is float:
            if not math.isfinite(value):
                return False
        elif kind is not bool and value is not None:
            return False
    return True


@attrs.frozen(eq=False)
class _Hook:
    """How values of one declared type are written and read back.

    ``fits(value)``: the value has the declared type. ``accepts(raw)``: the stored value is in the
    form the declared type writes. ``encode`` and ``decode`` may assume those hold.
    """

    fits: Callable[[Any], bool]
    accepts: Callable[[Any], bool]
    encode: Callable[[Any, int, set[int]], JSONValue]
    decode: Callable[[Any, int], Any]
    #: JSON scalars (str, int, float, bool, None) pass through this hook unchanged both ways.
    plain: bool = False

    def __call__(self, value: Any) -> JSONValue:
        # Makes every hook a cattrs unstructure hook. As with cattrs' own hooks, what cannot be
        # written is raised as a validation group whose notes say where.
        return _encode(self, value, 0, set())


def _encode(hook: _Hook, value: Any, depth: int, active: set[int]) -> JSONValue:
    if hook is ANY:  # the common case, spared a call to fits
        return _encode_any(value, depth, active)
    if hook.fits(value):
        return hook.encode(value, depth, active)
    return _self_describing(hook, value, depth, active)


def _self_describing(hook: _Hook, value: Any, depth: int, active: set[int]) -> JSONValue:
    raw = _encode_any(value, depth, active)
    # Unwrapped, the declared type would read this back as one of its own values.
    return {"$t": "any", "v": raw} if hook.accepts(raw) else raw


def _decode(hook: _Hook, raw: Any, depth: int) -> Any:
    if hook is ANY or (type(raw) is dict and raw.get("$t") == "any") or not hook.accepts(raw):
        return _decode_any(raw, depth)
    return hook.decode(raw, depth)


class _Unpersistable(TypeError):
    """Why one value cannot be written; the containers around it add where (as in decoding)."""


def _enter(value: object, depth: int, active: set[int]) -> None:
    # ``active`` holds the containers on the current path only, so shared values are fine.
    # cattrs has no cycle detection of its own; the path comes from the containers' notes.
    if id(value) in active:
        raise _Unpersistable("circular reference")
    if depth >= MAX_DEPTH:
        raise _Unpersistable(f"nested more than {MAX_DEPTH} levels deep")
    active.add(id(value))


class _Malformed(ValueError):
    """What is wrong with one stored value. Where it is comes from the containers it is in, as
    cattrs notes (:func:`_within_item`, :func:`_within_field`, and cattrs' own on a class's
    fields), so that no path is built until something fails; :func:`_describe` names the place
    with cattrs' ``transform_error``.
    """


#: What a decode hook raises: a leaf problem, or one wrapped by the containers around it.
_DECODE_ERRORS = (_Malformed, BaseValidationError)
#: The same for encode hooks.
_ENCODE_ERRORS = (_Unpersistable, BaseValidationError)


class _Shown(str):
    """A note index that ``transform_error`` (which writes its ``repr``) shows as it is."""

    __repr__ = str.__str__


def _within_item(exc: Exception, index: Any, kind: Any) -> IterableValidationError:
    # Non-str keys are shortened as reprlib does: a key can be a large value.
    shown: Any = index if type(index) is str else _Shown(reprlib.repr(index))
    exc.add_note(IterableValidationNote(f"Structuring {kind} @ index {shown!r}", shown, kind))
    return IterableValidationError(f"While structuring {kind}", [exc], kind)


def _within_field(exc: Exception, name: str, cls: type) -> ClassValidationError:
    note = AttributeValidationNote(
        f"Structuring class {cls.__qualname__} @ attribute {name}", name, cls
    )
    exc.add_note(note)
    return ClassValidationError(f"While structuring {cls.__qualname__}", [exc], cls)


def _describe(exc: Exception, path: str) -> tuple[str, str, BaseException | None]:
    """Where the first problem in ``exc`` (raised by a hook) is, below ``path``; what it is; and
    the exception behind it when that is not the codec's own (a class's validator)."""
    leaf: BaseException = exc
    group, noted = None, False
    while isinstance(leaf, ClassValidationError | IterableValidationError):  # as transform_error
        with_notes, without = leaf.group_exceptions()
        group, noted = leaf, bool(with_notes)
        leaf = with_notes[0][0] if with_notes else without[0]
    where = transform_error(exc, path, lambda e, t: "")[0].removeprefix(" @ ")
    if isinstance(leaf, _Malformed | _Unpersistable) or not isinstance(group, ClassValidationError):
        return where, str(leaf), None
    # The rest come from a structure function cattrs generated for the class.
    name = group.cl.__qualname__
    if isinstance(leaf, KeyError) and noted:  # cattrs' sign of a missing field, at its path
        (field,) = leaf.args
        return where.removesuffix(f".{field}"), f"missing field {field!r} of {name}", None
    if isinstance(leaf, RecursionError):
        return where, "nested too deeply to read", None
    return where, f"stored fields do not make a {name}: {leaf!r}", leaf


def _check_depth(depth: int) -> None:
    if depth >= MAX_DEPTH:
        raise _Malformed(f"nested more than {MAX_DEPTH} levels deep")


def _has_tag(raw: Any, *tags: str) -> bool:
    return type(raw) is dict and raw.get("$t") in tags


def _is_plain(raw: Any) -> bool:
    return type(raw) is dict and "$t" not in raw


# --- untyped values: written by their runtime type ---------------------------------------------


def _encode_any(value: Any, depth: int, active: set[int]) -> JSONValue:
    if _as_themselves((value,)):
        return value  # type: ignore[no-any-return]
    scalar = _SCALARS.get(type(value))
    if scalar is not None:
        return scalar[1](value)
    container = _ANY_CONTAINERS.get(_kind(value))
    if container is not None:
        return container.encode(value, depth, active)
    raise _Unpersistable(_why_not(value))


def _decode_any(raw: Any, depth: int) -> Any:
    if type(raw) in _JSON_SCALARS:
        return raw
    if type(raw) is list or _is_plain(raw):
        return _ANY_CONTAINERS[type(raw)].decode(raw, depth)
    if type(raw) is not dict:
        raise _Malformed(f"{type(raw).__name__} is not a JSON value")
    tag = raw["$t"]
    if type(tag) is not str:
        raise _Malformed(f"tag {tag!r} is not a string")
    if tag == "any":
        _check_depth(depth)
        return _decode_any(_payload(raw), depth + 1)
    if tag in _TAGGED_CONTAINERS:
        return _TAGGED_CONTAINERS[tag].decode(raw, depth)
    if tag not in _SCALAR_DECODERS:
        raise _Malformed(f"unknown tag {tag!r}")
    payload = _payload(raw)
    try:
        return _SCALAR_DECODERS[tag](payload, raw)
    except (ValueError, TypeError, KeyError, ArithmeticError, re.error) as exc:
        raise _Malformed(f"bad {tag!r} value {reprlib.repr(payload)}: {exc}") from None


def _payload(raw: dict[str, Any]) -> Any:
    extra = raw.keys() - {"$t", "v"} - _TAG_EXTRA_KEYS.get(raw["$t"], frozenset())
    if extra or "v" not in raw:
        raise _Malformed(f"malformed {raw['$t']!r} tag with keys {sorted(raw)}")
    return raw["v"]


_LOCKS = (type(threading.Lock()), type(threading.RLock()), threading.Condition, threading.Event)
_LIVE_OBJECTS: tuple[tuple[type | tuple[type, ...], str], ...] = (
    (types.GeneratorType, "generator is not persistable"),
    (types.CoroutineType, "coroutine is not persistable"),
    (types.AsyncGeneratorType, "async generator is not persistable"),
    (types.ModuleType, "module is not persistable"),
    (type, "class is not persistable"),
    (socket.socket, "socket is not persistable"),
    (threading.Thread, "thread is not persistable"),
    ((*_LOCKS, threading.Semaphore, threading.Barrier), "lock is not persistable"),
    (io.IOBase, "open file is not persistable"),
    ((bytearray, memoryview), "mutable buffer is not persistable; store bytes instead"),
)


def _why_not(value: object) -> str:
    if inspect.isroutine(value) or isinstance(value, functools.partial):
        return "function is not persistable"
    for kinds, reason in _LIVE_OBJECTS:
        if isinstance(value, kinds):
            return reason
    return (
        f"object of undeclared class {type(value).__qualname__} is not persistable; "
        "declare its type on the state class"
    )


def _encode_int(value: int) -> JSONValue:
    # Past 64 bits (_as_themselves wrote the others): orjson refuses such ints.
    try:
        text = str(value)
    except ValueError:  # past Python's int-to-decimal digit limit; int(text, 0) reads hex too
        text = hex(value)
    return {"$t": "int", "v": text}


def _encode_float(value: float) -> JSONValue:
    # NaN or ±inf (_as_themselves wrote the others): orjson would write them as null.
    return {"$t": "float", "v": "nan" if math.isnan(value) else "inf" if value > 0 else "-inf"}


def _encode_str(value: str) -> str:
    if not value.isascii():  # ASCII cannot hold a surrogate; dict keys come here as they are
        try:
            value.encode()
        except UnicodeEncodeError:
            reason = "string with a lone surrogate is not persistable"
            raise _Unpersistable(reason) from None
    return value


def _encode_clock(value: dt.datetime | dt.time) -> JSONValue:
    out: dict[str, JSONValue] = {"$t": _SCALARS[type(value)][0], "v": value.isoformat()}
    if isinstance(value.tzinfo, zoneinfo.ZoneInfo) and value.tzinfo.key:
        out["zone"] = value.tzinfo.key
    if value.fold:
        out["fold"] = 1
    return out


def _encode_regexp(value: re.Pattern[Any]) -> JSONValue:
    source = value.pattern
    stored: JSONValue = source if type(source) is str else {"$t": "bytes", "v": _b64(source)}
    return {"$t": "regexp", "v": stored, "flags": value.flags}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _as_text(tag: str, text: Callable[[Any], str]) -> tuple[str, Callable[[Any], JSONValue]]:
    return tag, lambda value: {"$t": tag, "v": text(value)}


# The tag each scalar type is stored under (None: stored as itself) and its encoder, for the
# values _as_themselves does not write: a str that is not ASCII, an int past 64 bits, a NaN or
# ±inf, and every value of the other types.
_SCALARS: dict[type, tuple[str | None, Callable[[Any], JSONValue]]] = {
    _NoneType: (None, lambda value: None),
    bool: (None, lambda value: value),
    str: (None, _encode_str),
    int: ("int", _encode_int),
    float: ("float", _encode_float),
    bytes: _as_text("bytes", _b64),
    dt.datetime: ("datetime", _encode_clock),
    dt.time: ("time", _encode_clock),
    dt.date: _as_text("date", dt.date.isoformat),
    dt.timedelta: (
        "timedelta",
        lambda v: {"$t": "timedelta", "v": [v.days, v.seconds, v.microseconds]},
    ),
    decimal.Decimal: _as_text("decimal", str),
    uuid.UUID: _as_text("uuid", str),
    re.Pattern: ("regexp", _encode_regexp),
}
_TAG_EXTRA_KEYS = {"datetime": {"zone", "fold"}, "time": {"zone", "fold"}, "regexp": {"flags"}}


def _want(value: Any, kind: type) -> Any:
    if type(value) is not kind:
        raise TypeError(f"expected {kind.__name__}, not {type(value).__name__}")
    return value


def _with_zone(value: Any, raw: dict[str, Any]) -> Any:
    fold = raw.get("fold", 0)
    if type(fold) is not int or fold not in (0, 1):
        raise ValueError(f"fold must be 0 or 1, not {fold!r}")
    if "zone" in raw:
        return value.replace(tzinfo=zoneinfo.ZoneInfo(_want(raw["zone"], str)), fold=fold)
    return value.replace(fold=fold)


def _decode_timedelta(parts: Any) -> dt.timedelta:
    if type(parts) is not list or len(parts) != 3:
        raise ValueError("expected [days, seconds, microseconds]")
    days, seconds, micros = (_want(part, int) for part in parts)
    return dt.timedelta(days=days, seconds=seconds, microseconds=micros)


def _decode_regexp(source: Any, raw: dict[str, Any]) -> re.Pattern[Any]:
    if _has_tag(source, "bytes") and source.keys() == {"$t", "v"}:
        source = base64.b64decode(_want(source["v"], str), validate=True)
    elif type(source) is not str:
        raise TypeError(f"expected a str or bytes source, not {type(source).__name__}")
    return re.compile(source, _want(raw.get("flags"), int))


_FLOAT_WORDS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
_SCALAR_DECODERS: dict[str, Callable[[Any, dict[str, Any]], Any]] = {
    "int": lambda v, raw: int(_want(v, str), 0),
    "float": lambda v, raw: _FLOAT_WORDS[_want(v, str)],
    "bytes": lambda v, raw: base64.b64decode(_want(v, str), validate=True),
    "datetime": lambda v, raw: _with_zone(dt.datetime.fromisoformat(_want(v, str)), raw),
    "time": lambda v, raw: _with_zone(dt.time.fromisoformat(_want(v, str)), raw),
    "date": lambda v, raw: dt.date.fromisoformat(_want(v, str)),
    "timedelta": lambda v, raw: _decode_timedelta(v),
    "decimal": lambda v, raw: decimal.Decimal(_want(v, str)),
    "uuid": lambda v, raw: uuid.UUID(_want(v, str)),
    "regexp": _decode_regexp,
}


# --- containers -------------------------------------------------------------------------------


def _sequence_hook(kind: Any, items: list[_Hook] | None, rest: _Hook) -> _Hook:
    """A list, set, frozenset or tuple: ``items`` gives a hook per position, else ``rest``."""
    tag = None if kind is list else kind.__name__
    inner = 1 if tag is None else 2  # a tagged list sits one JSON level further down
    unordered = kind in (set, frozenset)

    def sized(elements: Any) -> bool:
        return type(elements) is list and (items is None or len(elements) == len(items))

    def encode(value: Any, depth: int, active: set[int]) -> JSONValue:
        _enter(value, depth, active)
        out: list[JSONValue]
        if items is None and rest.plain and _as_themselves(value):
            out = list(value)  # the common case, spared a call per element
        else:
            out = []
            i = 0
            try:
                for i, element in enumerate(value):
                    hook = rest if items is None else items[i]
                    out.append(_encode(hook, element, depth + inner, active))
            except _ENCODE_ERRORS as exc:
                raise _within_item(exc, i, kind) from None
        active.discard(id(value))
        if unordered and len(out) > 1:
            _in_stable_order(out)
        return out if tag is None else {"$t": tag, "v": out}

    def decode(raw: Any, depth: int) -> Any:
        _check_depth(depth)
        payload = raw if tag is None else _payload(raw)
        if not sized(payload):
            raise _Malformed(f"malformed {tag!r} tag: 'v' is not a fitting list")
        if items is None and rest.plain and all(type(e) in _JSON_SCALARS for e in payload):
            out = list(payload)
        else:
            out = []
            i = 0
            try:
                for i, element in enumerate(payload):
                    hook = rest if items is None else items[i]
                    out.append(_decode(hook, element, depth + inner))
            except _DECODE_ERRORS as exc:
                raise _within_item(exc, i, kind) from None
        try:
            return out if tag is None else kind(out)
        except TypeError as exc:
            raise _Malformed(f"{tag} element is not hashable: {exc}") from None

    def accepts(raw: Any) -> bool:
        return type(raw) is list if tag is None else _has_tag(raw, tag) and sized(raw.get("v"))

    def fits(value: Any) -> bool:
        return _kind(value) is kind and (items is None or len(value) == len(items))

    return _Hook(fits, accepts, encode, decode)


def _in_stable_order(elements: list[JSONValue]) -> None:
    """Sort a set's written elements: a set iterates in hash order, which changes from one
    process to the next (str hashes) and with the set's history, so the same set would be
    written differently after a restart and read as a change."""
    try:
        elements.sort()  # all str or all numbers, the common case
    except TypeError:  # mixed kinds, or tagged values: by their JSON text
        elements.sort(key=orjson.dumps)


def _dict_hook(key: _Hook, item: _Hook) -> _Hook:
    def encode(value: dict[Any, Any], depth: int, active: set[int]) -> JSONValue:
        _enter(value, depth, active)
        out: JSONValue
        if all(type(k) is str for k in value):
            escaped = "$t" in value  # user data that would read back as a tag
            if (
                item.plain
                and not escaped
                and _as_themselves(value)
                and _as_themselves(value.values())
            ):
                active.discard(id(value))
                return dict(value)  # the common case, spared a call per item
            obj: dict[str, JSONValue] = {}
            k = ""
            try:
                for k, element in value.items():
                    obj[_encode_str(k)] = _encode(item, element, depth + 1 + escaped, active)
            except _ENCODE_ERRORS as exc:
                raise _within_item(exc, k, dict) from None
            out = {"$t": "dict", "v": obj} if escaped else obj
        elif key.plain and item.plain and _as_themselves(value) and _as_themselves(value.values()):
            out = {"$t": "map", "v": [[k, element] for k, element in value.items()]}
        else:
            pairs: list[JSONValue] = []
            try:
                for k, element in value.items():
                    stored_key = _encode(key, k, depth + 3, active)
                    pairs.append([stored_key, _encode(item, element, depth + 3, active)])
            except _ENCODE_ERRORS as exc:
                raise _within_item(exc, k, dict) from None
            out = {"$t": "map", "v": pairs}
        active.discard(id(value))
        return out

    def decode(raw: dict[str, Any], depth: int) -> dict[Any, Any]:
        _check_depth(depth)
        if "$t" in raw and raw["$t"] == "map":
            return decode_map(_payload(raw), depth)
        obj, inner = (_payload(raw), depth + 2) if "$t" in raw else (raw, depth + 1)
        if type(obj) is not dict:
            raise _Malformed("malformed 'dict' tag: 'v' is not an object")
        if item.plain and all(type(v) in _JSON_SCALARS for v in obj.values()):
            return dict(obj)
        # Keys of an object were plain strings when written, whatever the declared key type.
        out: dict[Any, Any] = {}
        k = ""
        try:
            for k, v in obj.items():
                out[k] = _decode(item, v, inner)
        except _DECODE_ERRORS as exc:
            raise _within_item(exc, k, dict) from None
        return out

    def decode_map(pairs: Any, depth: int) -> dict[Any, Any]:
        if type(pairs) is not list or any(type(p) is not list or len(p) != 2 for p in pairs):
            raise _Malformed("malformed 'map' tag: 'v' is not a list of [key, value]")
        if (
            key.plain
            and item.plain
            and all(type(k) in _JSON_SCALARS and type(v) in _JSON_SCALARS for k, v in pairs)
        ):
            return dict(pairs)
        out: dict[Any, Any] = {}
        for i, (raw_key, raw_value) in enumerate(pairs):
            try:
                k = _decode(key, raw_key, depth + 3)
            except _DECODE_ERRORS as exc:
                raise _within_item(exc, _Shown(f"<key {i}>"), dict) from None
            try:
                value = _decode(item, raw_value, depth + 3)
            except _DECODE_ERRORS as exc:
                raise _within_item(exc, k, dict) from None
            try:
                out[k] = value
            except TypeError as exc:
                raise _Malformed(f"map key is not hashable: {exc}") from None
        return out

    def accepts(raw: Any) -> bool:
        return _is_plain(raw) or _has_tag(raw, "dict", "map")

    return _Hook(lambda value: _kind(value) is dict, accepts, encode, decode)


ANY = _Hook(lambda value: True, lambda raw: True, _encode_any, _decode_any, plain=True)
_ANY_CONTAINERS: dict[type, _Hook] = {
    list: _sequence_hook(list, None, ANY),
    dict: _dict_hook(ANY, ANY),
    tuple: _sequence_hook(tuple, None, ANY),
    set: _sequence_hook(set, None, ANY),
    frozenset: _sequence_hook(frozenset, None, ANY),
}
_TAGGED_CONTAINERS = {"map": _ANY_CONTAINERS[dict]} | {
    kind.__name__: _ANY_CONTAINERS[kind] for kind in (dict, tuple, set, frozenset)
}


# --- declared types ----------------------------------------------------------------------------


def _scalar_hook(kind: type) -> _Hook:
    tag = _SCALARS[kind][0]
    native = kind if kind in _JSON_SCALARS else None

    def accepts(raw: Any) -> bool:
        return type(raw) is native or (tag is not None and _has_tag(raw, tag))

    return _Hook(
        lambda value: type(value) is kind, accepts, _encode_any, _decode_any, native is not None
    )


def _choice_hook(choices: list[Any], fits: Callable[[Any], bool], flag: Any = None) -> _Hook:
    """An enum (members are written by value) or a Literal: one of a fixed set of values."""

    def stored(value: Any) -> Any:
        return value.value if isinstance(value, enum.Enum) else value

    def json_key(raw: Any) -> bytes | None:
        try:
            return orjson.dumps(raw, option=orjson.OPT_SORT_KEYS)
        except orjson.JSONEncodeError:
            return None

    table: dict[bytes | None, Any] = {}
    for choice in choices:
        try:
            table[json_key(_encode_any(stored(choice), 0, set()))] = choice
        except _ENCODE_ERRORS:
            continue  # such a choice can never be written, so it never needs to be read
    table.pop(None, None)

    def find(raw: Any) -> Any:
        found = table.get(json_key(raw), _MISSING)
        if found is _MISSING and flag is not None and type(raw) is int:
            try:  # a combination of flags, which is not one of the listed members
                return flag(raw)
            except ValueError:
                pass
        return found

    def encode(value: Any, depth: int, active: set[int]) -> JSONValue:
        return _encode_any(stored(value), depth, active)

    return _Hook(fits, lambda raw: find(raw) is not _MISSING, encode, lambda raw, depth: find(raw))


def _union_hook(members: list[_Hook]) -> _Hook:
    def first(raw: Any) -> _Hook | None:
        return next((member for member in members if member.accepts(raw)), None)

    def encode(value: Any, depth: int, active: set[int]) -> JSONValue:
        chosen = next(member for member in members if member.fits(value))
        raw = chosen.encode(value, depth, active)
        if first(raw) is chosen:
            return raw
        # An earlier member would read this back as one of its own values.
        return _self_describing(hook, value, depth, active)

    def decode(raw: Any, depth: int) -> Any:
        return typing.cast(_Hook, first(raw)).decode(raw, depth)

    def fits(value: Any) -> bool:
        return any(member.fits(value) for member in members)

    # Plain members: a JSON scalar fits the first member that reads it, so it is written as is.
    plain = all(member.plain for member in members)
    hook = _Hook(fits, lambda raw: first(raw) is not None, encode, decode, plain)
    return hook


class _Walk(threading.local):
    """How deep the walk in progress is and (encoding) the containers on its path, for the field
    hooks of the functions cattrs generates for a class: cattrs calls them with the field's
    value alone. The class hook sets them around that call."""

    def __init__(self) -> None:
        self.depth = 0
        self.active: set[int] = set()


_WALK = _Walk()

_FieldHooks = tuple[Callable[[Any], JSONValue], Callable[[Any, Any], Any]]


def _field_hooks(hook: _Hook, name: str, cls: type) -> _FieldHooks:
    # _encode and _decode written out: a frame less per level of a recursive class, and the
    # common case (a count, a name) spared the rest.
    plain = hook.plain

    def unstructure(value: Any) -> JSONValue:
        if plain and _as_themselves((value,)):
            return value  # type: ignore[no-any-return]
        try:
            if hook.fits(value):
                return hook.encode(value, _WALK.depth, _WALK.active)
            return _self_describing(hook, value, _WALK.depth, _WALK.active)
        except _ENCODE_ERRORS as exc:  # cattrs notes where only errors in structuring are
            raise _within_field(exc, name, cls) from None

    def structure(raw: Any, _: Any) -> Any:
        if plain and type(raw) in _JSON_SCALARS:
            return raw
        if (type(raw) is dict and raw.get("$t") == "any") or not hook.accepts(raw):
            return _decode_any(raw, _WALK.depth)
        return hook.decode(raw, _WALK.depth)

    return unstructure, structure


class _Generated(typing.NamedTuple):
    """What cattrs generates for a class, and what the codec keeps beside it."""

    unstructure: Callable[[Any], dict[str, JSONValue]]
    structure: Callable[[Any], Any]
    names: frozenset[str]
    late: dict[str, _FieldHooks]  # the fields outside __init__


def _class_hook(
    declared: Any, converter: cattrs.Converter, lookup: Callable[[Any], _Hook]
) -> _Hook:
    """An attrs class or dataclass, written as an object of its fields by the functions cattrs
    generates for it, with the codec's hooks as the fields' overrides. cattrs finds missing
    fields and wraps what the class raises; a generic class's type variables are written
    untyped.

    Fields outside ``__init__`` are left to the codec: cattrs would set them with ``setattr``,
    which a frozen class refuses, and would drop what their hooks raise.
    """
    cls = typing.get_origin(declared) or declared
    unbound = getattr(declared, "__parameters__", ())  # cattrs' structure function wants them
    target = declared[tuple(Any for _ in unbound)] if unbound else declared

    @functools.cache
    def generated() -> _Generated:
        # Made on first use, not with the hook: a field's type may name the class itself.
        try:
            hints = typing.get_type_hints(cls)
        except NameError as exc:
            raise TypeError(f"cannot resolve the field types of {cls.__qualname__}: {exc}") from exc
        fields = attrs.fields(cls) if attrs.has(cls) else dataclasses.fields(cls)
        hooks = {f.name: _field_hooks(lookup(hints.get(f.name, Any)), f.name, cls) for f in fields}
        overrides: dict[str, Any] = {
            name: override(unstruct_hook=unstructure, struct_hook=structure)
            for name, (unstructure, structure) in hooks.items()
        }
        return _Generated(
            make_dict_unstructure_fn(target, converter, **overrides),
            make_dict_structure_fn(
                target, converter, _cattrs_detailed_validation=True, **overrides
            ),
            frozenset(hooks),
            {f.name: hooks[f.name] for f in fields if not f.init},
        )

    def encode(value: Any, depth: int, active: set[int]) -> JSONValue:
        gen = generated()
        _enter(value, depth, active)
        outer = _WALK.depth, _WALK.active
        _WALK.depth, _WALK.active = depth + 1, active
        try:
            out = gen.unstructure(value)
            for name, (field, _) in gen.late.items():
                current = getattr(value, name, _MISSING)
                if current is not _MISSING:  # it may never have been set
                    out[name] = field(current)
        finally:
            _WALK.depth, _WALK.active = outer
        active.discard(id(value))
        return out

    def decode(raw: dict[str, Any], depth: int) -> Any:
        gen = generated()
        _check_depth(depth)
        unknown = raw.keys() - gen.names  # before what is missing: the likelier mistake
        if unknown:
            raise _Malformed(
                f"{cls.__qualname__} has no field {', '.join(map(repr, sorted(unknown)))}"
            )
        outer = _WALK.depth
        _WALK.depth = depth + 1
        try:
            obj = gen.structure(raw)
            for name, (_, field) in gen.late.items():
                if name in raw:
                    try:
                        object.__setattr__(obj, name, field(raw[name], None))
                    except _DECODE_ERRORS as exc:
                        raise _within_field(exc, name, cls) from None
        finally:
            _WALK.depth = outer
        return obj

    return _Hook(lambda value: _kind(value) is cls, _is_plain, encode, decode)


class _PlainHooks(dict[Any, bool]):
    """Whether each declared type's hook is plain, looked up once: the shortcut of
    :meth:`Codec.encode` and :meth:`Codec.decode` for JSON scalars, the per-turn case."""

    def __init__(self, hook: Callable[[Any], _Hook]) -> None:
        super().__init__()
        self._hook = hook

    def __missing__(self, declared: Any) -> bool:
        plain = self[declared] = self._hook(declared).plain
        return plain


class Codec:
    """Encodes persisted values to JSON trees and decodes them back (see the module docstring).

    A codec owns a cattrs converter, made as cattrs' orjson converter is, and registers on it one
    hook factory per family of declared types (see :meth:`_families`). cattrs picks the factory
    for a declared type and caches the hook it builds, so each type is analysed once; a hook is a
    valid cattrs unstructure hook, and the converter's structure hooks read with it. For an attrs
    class or a dataclass, cattrs generates the functions that walk its fields. Errors inside
    hooks are cattrs' validation groups, whose paths :func:`cattrs.transform_error` writes.
    """

    def __init__(self) -> None:
        self._converter = cattrs.preconf.orjson.make_converter()
        self._factories = self._families()
        # cattrs tries the factories registered last first: the catch-all goes in first.
        for matches, factory in reversed(self._factories):
            self._converter.register_unstructure_hook_factory(matches, factory)
        # Class hooks outrank factories, and cattrs has these two (bytes as base85).
        for kind in (str, bytes):
            self._converter.register_unstructure_hook(kind, _scalar_hook(kind))
        # Reading a declared type takes the hook that writes it, so the structure side needs no
        # dispatch of its own: one factory, and the class hooks cattrs' would outrank it with
        # (these also match subclasses, an IntEnum by int, which _structure sends to its own).
        self._converter.register_structure_hook_factory(lambda t: True, lambda t: self._structure)
        for base in (int, float, str, bytes, bool, dt.datetime, dt.date):
            self._converter.register_structure_hook(base, self._structure)
        self._plain = _PlainHooks(self._hook)

    def encode(self, value: object, declared: Any = Any, *, path: str = "$") -> JSONValue:
        """Return ``value`` as a JSON tree, written according to its ``declared`` type.

        ``path`` names the value (a persisted key) in errors. Raises
        :class:`~verani.errors.NotPersistableError` naming the path of the first part of
        ``value`` that cannot be stored: a function or other live object, an object of an
        undeclared class, a circular reference, or nesting past :data:`MAX_DEPTH`.
        """
        try:
            plain = type(value) in _JSON_SCALARS and self._plain[declared]
        except TypeError:  # an unhashable declaration (Annotated[int, [...]]) has no entry
            plain = False
        if plain and _as_themselves((value,)):
            return value  # type: ignore[return-value]  # the per-turn case: a count, a name
        try:
            return self._hook(declared)(value)
        except _ENCODE_ERRORS as exc:
            where, problem, _ = _describe(exc, path)
            raise NotPersistableError(where, problem) from None
        except RecursionError:
            raise NotPersistableError(path, "nested too deeply to persist") from None

    def decode(self, raw: JSONValue, declared: Any = Any, *, path: str = "$") -> Any:
        """Return the value that :meth:`encode` turned into ``raw`` for the same ``declared``.

        Never coerces: a stored value that does not fit ``declared`` comes back as itself.
        Raises :class:`~verani.errors.CorruptDocumentError` naming the path of malformed input.
        """
        try:
            plain = type(raw) in _JSON_SCALARS and self._plain[declared]
        except TypeError:
            plain = False
        if plain:
            return raw
        try:
            return self._structure(raw, declared)
        except _DECODE_ERRORS as exc:
            where, problem, cause = _describe(exc, path)
            raise CorruptDocumentError(f"{where}: {problem}") from cause
        except RecursionError:
            raise CorruptDocumentError(f"{path}: nested too deeply to read") from None

    def _structure(self, raw: Any, declared: Any) -> Any:
        # The cattrs structure hook of every declared type.
        return _decode(self._hook(declared), raw, 0)

    def _hook(self, declared: Any) -> _Hook:
        try:
            hash(declared)
        except TypeError:  # e.g. Annotated with a list in it: cattrs cannot cache it
            return next(build for matches, build in self._factories if matches(declared))(declared)
        hook = self._converter.get_unstructure_hook(declared)
        if not isinstance(hook, _Hook):
            raise TypeError(f"no codec hook for {declared!r}")
        return hook

    def _families(self) -> list[tuple[Callable[[Any], bool], Callable[[Any], _Hook]]]:
        """Each family of declared types with the factory of its hooks, the first match first."""

        def kind(declared: Any) -> Any:
            return typing.get_origin(declared) or declared

        def args(declared: Any) -> list[_Hook]:
            return [self._hook(arg) for arg in typing.get_args(declared) if arg is not Ellipsis]

        def choices(declared: Any) -> _Hook:
            options = typing.get_args(declared)
            return _choice_hook(
                list(options), lambda v: any(type(v) is type(a) and v == a for a in options)
            )

        def members(declared: type[enum.Enum]) -> _Hook:
            flag = declared if issubclass(declared, enum.Flag) else None
            return _choice_hook(list(declared), lambda value: type(value) is declared, flag)

        def fixed_tuple(declared: Any) -> bool:
            # tuple[int, str], and tuple[()] (the empty tuple only), not tuple[int, ...]
            options = typing.get_args(declared)
            if typing.get_origin(declared) is not tuple:
                return False
            return (bool(options) and options[-1] is not Ellipsis) or options == ()

        def sequence(declared: Any) -> _Hook:
            hooks = args(declared)
            return _sequence_hook(kind(declared), None, hooks[0] if hooks else ANY)

        return [
            (
                lambda t: t is None or kind(t) in _SCALARS,
                lambda t: _scalar_hook(_NoneType if t is None else kind(t)),
            ),
            (
                lambda t: typing.get_origin(t) is typing.Annotated,
                lambda t: self._hook(typing.get_args(t)[0]),
            ),
            (
                lambda t: isinstance(t, typing.NewType),
                lambda t: self._hook(t.__supertype__),
            ),
            (
                lambda t: typing.get_origin(t) in (typing.Union, types.UnionType),
                lambda t: _union_hook(args(t)),
            ),
            (lambda t: typing.get_origin(t) is typing.Literal, choices),
            (lambda t: isinstance(t, type) and issubclass(t, enum.Enum), members),
            (
                lambda t: (
                    isinstance(kind(t), type)
                    and (attrs.has(kind(t)) or dataclasses.is_dataclass(kind(t)))
                ),
                lambda t: _class_hook(t, self._converter, self._hook),
            ),
            (
                lambda t: kind(t) is dict,
                lambda t: _dict_hook(*args(t)) if typing.get_args(t) else _dict_hook(ANY, ANY),
            ),
            (fixed_tuple, lambda t: _sequence_hook(tuple, args(t), ANY)),
            (lambda t: kind(t) in (list, tuple, set, frozenset), sequence),
            # TypeVars, protocols, abstract collections: written by runtime type
            (lambda t: True, lambda t: ANY),
        ]


def make_codec() -> Codec:
    """Return a new :class:`Codec` with its own cattrs Converter (never the global one)."""
    return Codec()


def dumps(doc: JSONValue, *, pretty: bool = False) -> bytes:
    """Serialize a JSON tree (as :meth:`Codec.encode` returns) to UTF-8 JSON bytes.

    ``pretty`` indents by two spaces, for documents a person reads.
    """
    return orjson.dumps(doc, option=orjson.OPT_INDENT_2 if pretty else None)


def loads(data: bytes | str) -> JSONValue:
    """Parse JSON text into a tree for :meth:`Codec.decode`.

    Raises :class:`~verani.errors.CorruptDocumentError` when ``data`` is not JSON.
    """
    try:
        return typing.cast(JSONValue, orjson.loads(data))
    except orjson.JSONDecodeError as exc:
        raise CorruptDocumentError(f"not JSON: {exc}") from None
