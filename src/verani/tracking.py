"""Internal: change-tracking copies of the values kept under persisted keys. Pure.

A persisted key's value is a tree of lists, dicts, sets, tuples and attrs/dataclass instances.
When it is assigned to the key, loaded from the store, or put inside such a tree, every list,
dict, set and attrs/dataclass instance in it is copied once into a *tracking* type: a subclass
of ``list``, ``dict`` or ``set`` below, or (made on first use and cached) a subclass of the
user's class. Each tracking value points to its :class:`Owner`, the persisted key it belongs to,
and every in-place change (``append``, ``d[k] = v``, ``s.add(x)``, ``obj.field = v``…) marks that
key as changed: one set insertion. Verani's deep proxy does the same for JavaScript objects.

Because a value put in is adopted on the way in, every container under a persisted key is a
tracking one, so reading and iterating cost what they cost on the built-ins, and the cost of a
change is the change: O(1) to mark, plus copying what it inserts.

What users see: tracking values are instances of their plain type (``isinstance``), compare equal
to plain values, and even say so through ``__class__``; only ``type()`` tells them apart. Copies,
pickles and ``.copy()`` of them are plain. One thing differs from plain Python: the state keeps
*its own copy* of a plain container or attrs/dataclass instance put in, so a change made
afterwards through the variable that held the original does not reach the state (change it
through the state instead: ``state.items[-1]["done"] = True``). A value already tracking is not
copied: placed under a second persisted key, it stays one object and marks both keys. A tracking
value taken out of the state still marks its old key when changed: at worst an extra write.

Not seen: a change that bypasses the tracking types (``list.append(state.items, x)``,
``object.__setattr__``). Values of other types are immutable (a tuple, a frozenset, a dict's keys)
or refused by the codec. The full flush at hibernation and shutdown still saves what was missed.
"""

from __future__ import annotations

import datetime as dt
import decimal
import re
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any, SupportsIndex

import attrs

__all__ = ["ATOMS", "PLAIN_TYPES", "Owner", "TrackedDict", "TrackedList", "TrackedSet", "adopt"]

_OWNER = "_verani_owner"

#: Values that cannot change in place: adopted as they are, with no copy and no lookup.
ATOMS: frozenset[type] = frozenset(
    {str, int, float, bool, type(None), bytes, complex, range, frozenset, re.Pattern}
    | {decimal.Decimal, uuid.UUID, dt.datetime, dt.date, dt.time, dt.timedelta}
)


class Owner:
    """The persisted key of one state object that a tracking value belongs to."""

    __slots__ = ("_changes", "_key")

    def __init__(self, changes: set[str], key: str) -> None:
        self._changes = changes
        self._key = key

    def mark(self) -> None:
        """Record that the key's value changed (in place)."""
        self._changes.add(self._key)

    @property
    def parts(self) -> frozenset[Owner]:
        """The single-key owners this one marks."""
        return frozenset((self,))


class _Joint(Owner):
    """Several keys: a value reachable from more than one persisted key marks all of them."""

    __slots__ = ("_parts",)

    def __init__(self, parts: frozenset[Owner]) -> None:
        self._parts = parts

    def mark(self) -> None:
        for part in self._parts:
            part.mark()

    @property
    def parts(self) -> frozenset[Owner]:
        return self._parts


def _joined(current: Owner | None, owner: Owner) -> Owner | None:
    """The owner covering both, or None when ``current`` already covers ``owner``."""
    if current is None:
        return owner
    if current is owner or owner.parts <= current.parts:
        return None
    return _Joint(current.parts | owner.parts)


def _mark(value: Any) -> None:
    owner: Owner | None = getattr(value, _OWNER, None)
    # None: made by ``type(value)()`` rather than adopted; it belongs to no key.
    if owner is not None:
        owner.mark()


def _into(container: Any, value: Any) -> Any:
    """``value`` as ``container`` keeps it."""
    if type(value) in ATOMS:
        return value
    owner: Owner | None = getattr(container, _OWNER, None)
    return value if owner is None else adopt(value, owner)


def _all_into(container: Any, values: Iterable[Any]) -> list[Any]:
    owner: Owner | None = getattr(container, _OWNER, None)
    if owner is None:
        return list(values)
    memo: dict[int, Any] = {}
    return [v if type(v) in ATOMS else adopt(v, owner, memo) for v in values]


# The tracking built-ins. Each mutating method adopts what it inserts, does the change with the
# built-in's own method, and marks the owner only if something changed (or may have: a sort or a
# slice assignment). A call that raises before changing anything marks nothing.


def _as_plain(self: Any, protocol: SupportsIndex) -> tuple[Any, ...]:
    """``__reduce_ex__`` of the tracking built-ins: copies and pickles are plain."""
    plain = self.__class__  # the built-in, as the tracking types say
    return (plain, (plain(self),))


def _marking(method: Callable[..., Any]) -> Callable[..., Any]:
    """A built-in's method that either changes the container or raises, then a mark."""

    def marked(self: Any, *args: Any) -> Any:
        result = method(self, *args)
        _mark(self)
        return result

    return marked


def _emptying(method: Callable[[Any], None]) -> Callable[[Any], None]:
    """A built-in's ``clear``, marking only a container that had something to clear."""

    def clear(self: Any) -> None:
        if self:
            method(self)
            _mark(self)

    return clear


class TrackedList(list[Any]):
    """A ``list`` that marks its persisted key when changed in place."""

    __slots__ = (_OWNER,)
    __class__ = property(lambda self: list)
    __reduce_ex__ = _as_plain

    def append(self, value: Any, /) -> None:
        list.append(self, _into(self, value))
        _mark(self)

    def extend(self, values: Iterable[Any], /) -> None:
        items = _all_into(self, values)
        if items:
            list.extend(self, items)
            _mark(self)

    def __iadd__(self, values: Iterable[Any], /) -> TrackedList:  # type: ignore[misc]
        self.extend(values)
        return self

    def __imul__(self, times: SupportsIndex, /) -> TrackedList:
        before = len(self)
        list.__imul__(self, times)
        if len(self) != before:
            _mark(self)
        return self

    def insert(self, index: SupportsIndex, value: Any, /) -> None:
        list.insert(self, index, _into(self, value))
        _mark(self)

    pop = _marking(list.pop)
    remove = _marking(list.remove)
    __delitem__ = _marking(list.__delitem__)
    clear = _emptying(list.clear)

    def sort(self, *, key: Callable[[Any], Any] | None = None, reverse: bool = False) -> None:
        try:
            list.sort(self, key=key, reverse=reverse)
        finally:  # a key function that raised may have left the list half sorted
            if len(self) > 1:
                _mark(self)

    def reverse(self) -> None:
        if len(self) > 1:
            list.reverse(self)
            _mark(self)

    def __setitem__(self, index: Any, value: Any, /) -> None:
        if isinstance(index, slice):
            list.__setitem__(self, index, _all_into(self, value))
        else:
            list.__setitem__(self, index, _into(self, value))
        _mark(self)


_MISSING: Any = object()


class TrackedDict(dict[Any, Any]):
    """A ``dict`` that marks its persisted key when changed in place."""

    __slots__ = (_OWNER,)
    __class__ = property(lambda self: dict)
    __reduce_ex__ = _as_plain

    @classmethod
    def fromkeys(cls, keys: Iterable[Any], value: Any = None, /) -> dict[Any, Any]:
        return dict.fromkeys(keys, value)

    def __setitem__(self, key: Any, value: Any, /) -> None:
        dict.__setitem__(self, key, _into(self, value))
        _mark(self)

    __delitem__ = _marking(dict.__delitem__)
    popitem = _marking(dict.popitem)
    clear = _emptying(dict.clear)

    def pop(self, key: Any, default: Any = _MISSING, /) -> Any:
        if key in self:
            value = dict.pop(self, key)
            _mark(self)
            return value
        if default is _MISSING:
            raise KeyError(key)
        return default

    def setdefault(self, key: Any, default: Any = None, /) -> Any:
        if key in self:
            return dict.__getitem__(self, key)
        # The stored (tracking) value is returned, so ``d.setdefault(k, []).append(x)`` is seen.
        value = _into(self, default)
        dict.__setitem__(self, key, value)
        _mark(self)
        return value

    def update(self, other: Any = (), /, **more: Any) -> None:
        items = dict(other, **more)
        if items:
            dict.update(self, zip(items, _all_into(self, items.values()), strict=True))
            _mark(self)

    def __ior__(self, other: Any, /) -> TrackedDict:  # type: ignore[misc]
        self.update(other)
        return self


def _in_place(method: Callable[[Any, Any], None]) -> Callable[[Any, Any], Any]:
    """A set's in-place operator (``|=``…) from its method: it takes sets only, as the
    built-in's do (``s |= [1]`` is a TypeError)."""

    def operator(self: Any, other: Any) -> Any:
        if not isinstance(other, set | frozenset):
            return NotImplemented
        method(self, other)
        return self

    return operator


class TrackedSet(set[Any]):
    """A ``set`` that marks its persisted key when changed in place."""

    __slots__ = (_OWNER,)
    __class__ = property(lambda self: set)
    __reduce_ex__ = _as_plain

    def __repr__(self) -> str:
        return repr(set(self))

    def add(self, value: Any, /) -> None:
        if value not in self:
            set.add(self, _into(self, value))
            _mark(self)

    def discard(self, value: Any, /) -> None:
        if value in self:
            set.discard(self, value)
            _mark(self)

    remove = _marking(set.remove)
    pop = _marking(set.pop)
    clear = _emptying(set.clear)

    def update(self, *others: Iterable[Any]) -> None:
        new = set().union(*others).difference(self)
        if new:
            set.update(self, _all_into(self, new))
            _mark(self)

    def difference_update(self, *others: Iterable[Any]) -> None:
        before = len(self)
        set.difference_update(self, *others)
        if len(self) != before:
            _mark(self)

    def intersection_update(self, *others: Iterable[Any]) -> None:
        before = len(self)
        set.intersection_update(self, *others)
        if len(self) != before:
            _mark(self)

    def symmetric_difference_update(self, other: Iterable[Any], /) -> None:
        items = set(other)
        if items:
            added = items.difference(self)
            set.difference_update(self, items)
            set.update(self, _all_into(self, added))
            _mark(self)

    __ior__ = _in_place(update)
    __iand__ = _in_place(intersection_update)
    __isub__ = _in_place(difference_update)
    __ixor__ = _in_place(symmetric_difference_update)


#: Every tracking type with the plain type it stands for (the user's class for attrs/dataclass
#: values): the codec writes a tracking value as that type.
PLAIN_TYPES: dict[type, type] = {TrackedList: list, TrackedDict: dict, TrackedSet: set}


# --- attrs and dataclass instances ------------------------------------------------------------


def _field_names(cls: type) -> tuple[str, ...]:
    if attrs.has(cls):
        return tuple(a.name for a in attrs.fields(cls))
    return tuple(f.name for f in getattr(cls, "__dataclass_fields__", {}).values())


def _rebuild(cls: Any, fields: dict[str, Any]) -> Any:
    """An instance of ``cls`` with these attributes, made as ``copy`` makes one (no __init__)."""
    obj = cls.__new__(cls)
    for name, value in fields.items():
        object.__setattr__(obj, name, value)
    return obj


def _contents(obj: Any, names: Iterable[str]) -> dict[str, Any]:
    """The attributes of ``obj`` that a copy carries: its fields (unset ones left out) and
    anything else in its ``__dict__``."""
    out = dict(getattr(obj, "__dict__", ()))
    for name in names:
        value = getattr(obj, name, _MISSING)
        if value is not _MISSING:
            out[name] = value
    out.pop(_OWNER, None)
    return out


#: Each class seen in persisted values, with its tracking subclass (None: not tracked).
_TRACKING: dict[type, type | None] = {}


def _tracking_class(cls: type) -> type | None:
    """The tracking subclass of an attrs class or dataclass (None for any other class, or one
    that cannot be subclassed)."""
    try:
        return _TRACKING[cls]
    except KeyError:
        tracking = _TRACKING[cls] = _make_tracking_class(cls)
        return tracking


def _make_tracking_class(cls: Any) -> type | None:
    if not (attrs.has(cls) or hasattr(cls, "__dataclass_fields__")):
        return None
    fields = frozenset(_field_names(cls))
    base_setattr: Callable[[Any, str, Any], None] = cls.__setattr__
    base_delattr: Callable[[Any, str], None] = cls.__delattr__

    def __setattr__(self: Any, name: str, value: Any) -> None:
        base_setattr(self, name, value)  # the class's validators, converters, frozenness
        owner: Owner | None = getattr(self, _OWNER, None)
        if owner is None:
            return
        if name in fields:
            stored = getattr(self, name)  # as the class's converters left it
            adopted = adopt(stored, owner)
            if adopted is not stored:
                object.__setattr__(self, name, adopted)
        owner.mark()

    def __delattr__(self: Any, name: str) -> None:
        base_delattr(self, name)
        _mark(self)

    def __reduce_ex__(self: Any, protocol: SupportsIndex) -> tuple[Any, ...]:
        return (_rebuild, (cls, _contents(self, fields)))

    namespace: dict[str, Any] = {
        "__slots__": (_OWNER,),
        "__class__": property(lambda self: cls),  # the user's class, for attrs' and
        "__setattr__": __setattr__,  # dataclasses' __eq__ (they compare __class__)
        "__delattr__": __delattr__,
        "__reduce_ex__": __reduce_ex__,
        "__qualname__": cls.__qualname__,
        "__module__": cls.__module__,
    }
    try:
        tracking: type = type(cls)(cls.__name__, (cls,), namespace)
    except Exception:  # e.g. an __init_subclass__ that refuses: the values stay untracked
        return None
    PLAIN_TYPES[tracking] = cls
    return tracking


# --- adoption ---------------------------------------------------------------------------------


def adopt(value: Any, owner: Owner, memo: dict[int, Any] | None = None) -> Any:
    """``value`` as it is kept under ``owner``: atoms as they are; a tracking value as it is,
    its owner extended to ``owner`` (through everything in it); anything else with every list,
    dict, set and attrs/dataclass instance in it copied into tracking types owned by ``owner``.

    Values adopted with one ``memo`` (the items of one ``extend``) share their copies, so a
    value given twice stays one object.
    """
    if type(value) in ATOMS:
        return value
    try:
        return _adopt(value, owner, {} if memo is None else memo)
    except RecursionError:  # nested past any depth the codec writes: it reports the key
        return value


def _adopt(value: Any, owner: Owner, memo: dict[int, Any]) -> Any:
    kind = type(value)
    if kind in ATOMS:
        return value
    if kind in PLAIN_TYPES:
        _join(value, owner)
        return value
    done = memo.get(id(value))
    if done is not None:  # shared within the value, or a cycle: one copy, as in the original
        return done
    if kind is list:
        new_list = memo[id(value)] = TrackedList()
        object.__setattr__(new_list, _OWNER, owner)
        list.extend(new_list, _adopt_all(value, owner, memo))
        return new_list
    if kind is dict:
        new_dict = memo[id(value)] = TrackedDict()
        object.__setattr__(new_dict, _OWNER, owner)
        dict.update(new_dict, zip(value, _adopt_all(value.values(), owner, memo), strict=True))
        return new_dict
    if kind is set:
        new_set = memo[id(value)] = TrackedSet()
        object.__setattr__(new_set, _OWNER, owner)
        set.update(new_set, _adopt_all(value, owner, memo))
        return new_set
    if kind is tuple:
        items = _adopt_all(value, owner, memo)
        same = all(a is b for a, b in zip(items, value, strict=True))
        return value if same else tuple(items)
    tracking = _tracking_class(kind)
    if tracking is None:
        return value
    fields = _field_names(kind)
    obj = memo[id(value)] = tracking.__new__(tracking)  # type: ignore[call-overload]
    object.__setattr__(obj, _OWNER, owner)
    for name, item in _contents(value, fields).items():
        object.__setattr__(obj, name, _adopt(item, owner, memo) if name in fields else item)
    return obj


def _adopt_all(values: Iterable[Any], owner: Owner, memo: dict[int, Any]) -> Iterable[Any]:
    values = values if isinstance(values, list | tuple) else list(values)
    if set(map(type, values)) <= ATOMS:  # the common case, spared a call per element
        return values
    return [_adopt(v, owner, memo) for v in values]


def _join(node: Any, owner: Owner) -> None:
    """Extend the owner of a tracking value, and of everything in it, to cover ``owner``."""
    joined = _joined(getattr(node, _OWNER, None), owner)
    if joined is None:  # covered already, and so (as adoption keeps it) is all that is in it
        return
    object.__setattr__(node, _OWNER, joined)
    _join_all(_children(node), owner)


def _join_all(values: Iterable[Any], owner: Owner) -> None:
    for value in values:
        if type(value) in PLAIN_TYPES:
            _join(value, owner)
        elif type(value) is tuple:  # not tracking itself, but may hold tracking values
            _join_all(value, owner)


def _children(node: Any) -> Iterator[Any]:
    if isinstance(node, dict):
        return iter(node.values())
    if isinstance(node, list | set):
        return iter(node)
    kind = PLAIN_TYPES[type(node)]
    return iter(_contents(node, _field_names(kind)).values())
