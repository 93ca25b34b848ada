"""Internal: room state: the typed state object, its declared key types, change tracking. Pure.

A room's state is an instance of the user's attrs class or dataclass (or of an attrs class built
from a dict of initial values). The runtime uses a subclass of it that records which keys were
assigned, so ``ctx.actor.room_state.count += 1`` is noticed without the user calling ``put()``.
The instance keeps the user's type for ``isinstance`` and for the type checker.

Keys tracked *deeply* (the persisted keys, unless the room opts out with ``shallow=True``) also
hold their values as :mod:`verani.tracking` copies, which record changes made in place
(``state.items.append(x)``) under the key's name, in the same set as assignments.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import keyword
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs

from .errors import RoomDefinitionError
from .tracking import ATOMS, Owner, adopt

_CHANGES = "_verani_changes"
_OWNERS = "_verani_owners"


@attrs.frozen
class StateSpec:
    """What the runtime knows about a room's state class."""

    user_class: type[Any]
    tracked_class: type[Any]
    #: Every state key with its declared type (``Any`` for dict-defined state).
    key_types: Mapping[str, Any]

    def new(self) -> Any:
        """A fresh state object with every key at its initial value, assignments tracked."""
        state = self.tracked_class()
        track(state)
        return state

    def new_untracked(self) -> Any:
        """A fresh state object whose assignments are not recorded until :func:`track` is called."""
        return self.tracked_class()


def track(state: Any, deep: Iterable[str] = ()) -> None:
    """Start recording assignments on a state object made by :meth:`StateSpec.new_untracked`,
    and for the ``deep`` keys changes in place too (their current values become tracking
    copies)."""
    changes: set[str] = set()
    owners: dict[str, Owner] = {}
    for key in deep:
        owners[key] = Owner(changes, key)
        value = getattr(state, key)
        adopted = adopt(value, owners[key])
        if adopted is not value:
            object.__setattr__(state, key, adopted)
    object.__setattr__(state, _OWNERS, owners)
    object.__setattr__(state, _CHANGES, changes)


def take_changes(state: Any) -> set[str]:
    """The keys assigned or changed in place since the last call, and forget them."""
    changes: set[str] = getattr(state, _CHANGES)
    # Emptied, not replaced: the owners of tracking values hold this set.
    taken = set(changes)
    changes.clear()
    return taken


def set_untracked(state: Any, key: str, value: Any) -> None:
    """Restore a key (from the store) without counting it as a change."""
    changes = getattr(state, _CHANGES, None)
    setattr(state, key, value)
    if changes is not None:
        changes.discard(key)


def build_state_spec(room_name: str, state: type[Any] | Mapping[str, Any] | None) -> StateSpec:
    """Validate a room's ``state`` option and build its :class:`StateSpec`.

    ``state`` is an attrs class or dataclass whose fields all have defaults, or a dict of initial
    values (each new state object gets a deep copy of them), or None for a stateless room.
    """
    if state is None:
        state = {}
    if isinstance(state, Mapping):
        user_class = _class_from_dict(room_name, state)
    elif isinstance(state, type) and (attrs.has(state) or dataclasses.is_dataclass(state)):
        user_class = state
    else:
        raise RoomDefinitionError(
            f"room {room_name!r}: state must be an attrs class, a dataclass or a dict of initial "
            f"values, not {state!r}"
        )
    key_types = _key_types(room_name, user_class)
    tracked = _tracked_subclass(room_name, user_class, frozenset(key_types))
    try:
        tracked()
    except TypeError as exc:
        raise RoomDefinitionError(
            f"room {room_name!r}: state class {user_class.__name__} cannot be created without "
            f"arguments ({exc}); give every state field a default"
        ) from None
    return StateSpec(user_class=user_class, tracked_class=tracked, key_types=key_types)


def _class_from_dict(room_name: str, initial: Mapping[str, Any]) -> type[Any]:
    fields: dict[str, Any] = {}
    for key, value in initial.items():
        if not isinstance(key, str) or not key.isidentifier() or keyword.iskeyword(key):
            raise RoomDefinitionError(
                f"room {room_name!r}: state key {key!r} must be a Python identifier"
            )
        if key.startswith("_"):
            raise RoomDefinitionError(
                f"room {room_name!r}: state key {key!r} must not start with an underscore"
            )
        # A factory, not a shared default, so rooms never share a mutable initial value.
        fields[key] = attrs.field(factory=functools.partial(copy.deepcopy, value))
    name = "".join(part.capitalize() for part in room_name.replace("-", "_").split("_")) + "State"
    cls: type[Any] = attrs.make_class(name, fields, slots=True)
    cls.__verani_dict_state__ = True
    return cls


def _key_types(room_name: str, cls: type[Any]) -> dict[str, Any]:
    if getattr(cls, "__verani_dict_state__", False):
        return {a.name: Any for a in attrs.fields(cls)}
    names = (
        [a.name for a in attrs.fields(cls)]
        if attrs.has(cls)
        else [f.name for f in dataclasses.fields(cls)]
    )
    try:
        hints = typing.get_type_hints(cls)
    except Exception as exc:
        raise RoomDefinitionError(
            f"room {room_name!r}: cannot resolve the type annotations of state class "
            f"{cls.__name__} ({type(exc).__name__}: {exc})"
        ) from None
    frozen = (
        attrs.has(cls) and getattr(cls.__setattr__, "__name__", "") == "_frozen_setattrs"
    ) or (dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen)  # type: ignore[attr-defined]
    if frozen:
        raise RoomDefinitionError(
            f"room {room_name!r}: state class {cls.__name__} is frozen; room state must be "
            f"assignable"
        )
    return {name: hints.get(name, Any) for name in names}


def _tracked_subclass(room_name: str, cls: type[Any], keys: frozenset[str]) -> type[Any]:
    listing = ", ".join(sorted(keys)) or "(none)"
    # The class's own __setattr__ (attrs validators and on_setattr hooks included).
    base_setattr: Callable[[Any, str, Any], None] = cls.__setattr__  # type: ignore[assignment]

    def __setattr__(self: Any, name: str, value: Any) -> None:
        if name not in keys:
            raise AttributeError(
                f"room {room_name!r} has no state key {name!r} (state keys: {listing})"
            )
        base_setattr(self, name, value)
        changes = getattr(self, _CHANGES, None)
        if changes is not None:
            changes.add(name)
            stored = getattr(self, name)  # as the class's converters left it
            if type(stored) not in ATOMS:  # a count or a name: nothing to track inside
                owner = getattr(self, _OWNERS).get(name)
                if owner is not None:
                    adopted = adopt(stored, owner)
                    if adopted is not stored:
                        object.__setattr__(self, name, adopted)

    namespace: dict[str, Callable[..., Any] | tuple[str, ...] | str] = {
        "__setattr__": __setattr__,
        "__slots__": (_CHANGES, _OWNERS),
        "__qualname__": cls.__qualname__,
        "__module__": cls.__module__,
    }
    return type(cls.__name__, (cls,), namespace)
