"""define_room, state classes, the handler registry and room loading: pure, no sockets."""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import attrs
import pytest

from verani import RoomDefinitionError, RoomLoadError, define_room
from verani.loader import load_rooms
from verani.routing import Router
from verani.state import take_changes, track


@attrs.define
class Typed:
    count: int = 0
    name: str | None = None


def test_persisted_key_not_in_state_is_named() -> None:
    with pytest.raises(
        RoomDefinitionError,
        match=r"persisted key 'cuont' is not a state key \(state keys: count, name\)",
    ):
        define_room(name="c", state=Typed, persisted_keys=["cuont"])


def test_persisted_keys_as_a_string_is_refused() -> None:
    with pytest.raises(RoomDefinitionError, match="must be a list of key names"):
        define_room(name="c", state=Typed, persisted_keys="count")


@pytest.mark.parametrize("path", ["ws/x", "/", "/ws/", "/ws//x", "/ws/x?y", "/ws/a b", 5])
def test_bad_websocket_path_is_named(path: Any) -> None:
    with pytest.raises(RoomDefinitionError, match="websocket_path"):
        define_room(name="c", websocket_path=path)


@pytest.mark.parametrize("name", ["", "has space", "a/b", "x" * 65, "dot.ted"])
def test_bad_room_name(name: str) -> None:
    with pytest.raises(RoomDefinitionError, match="room name"):
        define_room(name=name)


def test_default_path_is_ws_name() -> None:
    assert define_room(name="chat").websocket_path == "/ws/chat"


def test_two_rooms_on_one_path_are_refused() -> None:
    a = define_room(name="a", websocket_path="/ws/same")
    b = define_room(name="b", websocket_path="/ws/same")
    with pytest.raises(
        RoomDefinitionError, match="rooms 'a' and 'b' both use websocket_path '/ws/same'"
    ):
        Router([a, b])


def test_dict_state_is_attribute_access_and_unknown_keys_raise() -> None:
    room = define_room(name="d", state={"count": 0, "items": []}, persisted_keys=["count"])
    one, two = room.state_spec.new(), room.state_spec.new()
    one.count += 1
    one.items.append("x")
    assert (one.count, one.items, two.items) == (1, ["x"], [])  # no shared mutable default
    assert take_changes(one) == {"count"}
    with pytest.raises(
        AttributeError, match="room 'd' has no state key 'cuont' \\(state keys: count, items\\)"
    ):
        one.cuont = 3


@attrs.define
class Converted:
    tags: list[str] = attrs.field(
        factory=list, converter=lambda v: v.split(",") if isinstance(v, str) else v
    )
    note: str = ""
    scratch: list[str] = attrs.Factory(list)


def test_deep_keys_record_in_place_changes_and_keep_what_the_class_stored() -> None:
    room = define_room(name="deep", state=Converted, persisted_keys=["tags", "note"])
    state = room.state_spec.new_untracked()
    track(state, room.persisted_keys)
    state.tags.append("a")
    assert take_changes(state) == {"tags"}
    state.tags = "x,y"  # the class's converter makes a list: that list is what gets tracked
    state.tags.append("z")
    assert state.tags == ["x", "y", "z"] and take_changes(state) == {"tags"}
    state.scratch.append("not persisted")  # ephemeral keys are left as they are
    state.note = "hi"
    assert take_changes(state) == {"note"}
    assert type(state.scratch) is list


def test_typed_state_keeps_its_class_and_rejects_unknown_keys() -> None:
    room = define_room(name="t", state=Typed, persisted_keys=["count"])
    state = room.state_spec.new()
    assert isinstance(state, Typed)
    state.name = "x"
    assert take_changes(state) == {"name"}
    with pytest.raises(AttributeError, match="no state key 'foo'"):
        state.foo = 1


def test_dataclass_state_and_missing_defaults() -> None:
    @dataclasses.dataclass
    class Good:
        items: list[int] = dataclasses.field(default_factory=list)

    @dataclasses.dataclass
    class NoDefault:
        items: list[int]

    assert define_room(name="g", state=Good, persisted_keys=["items"]).state_spec.key_types == {
        "items": list[int]
    }
    with pytest.raises(RoomDefinitionError, match="give every state field a default"):
        define_room(name="n", state=NoDefault)


def test_frozen_state_is_refused() -> None:
    @attrs.frozen
    class Frozen:
        x: int = 0

    with pytest.raises(RoomDefinitionError, match="is frozen"):
        define_room(name="f", state=Frozen)


def test_unpersistable_initial_value_is_refused() -> None:
    with pytest.raises(RoomDefinitionError, match="initial value of persisted key 'fn'"):
        define_room(name="u", state={"fn": print}, persisted_keys=["fn"])


def test_handlers_run_in_order_with_wildcard_last_and_off_removes() -> None:
    room = define_room(name="h")

    def first(ctx: Any, data: Any) -> None: ...
    def second(ctx: Any, data: Any) -> None: ...
    def every(ctx: Any, data: Any) -> None: ...

    room.on("e", first)
    room.on("e")(second)
    room.on("*", every)
    assert room.handlers_for("e") == [first, second, every]
    assert room.handlers_for("other") == [every]
    room.off("e", first)
    assert room.handlers_for("e") == [second, every]
    room.off("e")
    assert room.handlers_for("e") == [every]


def test_hooks_by_option_or_decorator() -> None:
    def connect(ctx: Any) -> None: ...

    room = define_room(name="k", on_connect=connect)
    assert room.hooks.on_connect is connect

    @room.on_disconnect
    def gone(ctx: Any) -> None: ...

    assert room.hooks.on_disconnect is gone


def test_load_rooms_errors_name_the_file(tmp_path: pathlib.Path) -> None:
    (tmp_path / "bad.py").write_text(
        "from verani import define_room\n\nroom = define_room(name='x'\n"
    )
    with pytest.raises(RoomLoadError, match=r"bad\.py:3: syntax error"):
        load_rooms([tmp_path / "bad.py"])
    (tmp_path / "empty.py").write_text("x = 1\n")
    with pytest.raises(RoomLoadError, match=r"empty\.py defines no rooms"):
        load_rooms([tmp_path / "empty.py"])
    with pytest.raises(RoomLoadError, match=r"missing\.py does not exist"):
        load_rooms([tmp_path / "missing.py"])
    (tmp_path / "raises.py").write_text("x = 1\nraise ValueError('nope')\n")
    with pytest.raises(
        RoomLoadError, match=r"raises\.py:2: loading the room file raised ValueError: nope"
    ):
        load_rooms([tmp_path / "raises.py"])


def test_load_rooms_from_a_directory_and_clashes(tmp_path: pathlib.Path) -> None:
    for name in ("one", "two"):
        (tmp_path / f"{name}.py").write_text(
            f"from verani import define_room\nroom = define_room(name='{name}')\n"
        )
    assert [r.name for r in load_rooms([tmp_path])] == ["one", "two"]
    (tmp_path / "three.py").write_text(
        "from verani import define_room\n"
        "room = define_room(name='three', websocket_path='/ws/one')\n"
    )
    with pytest.raises(RoomDefinitionError, match="both use websocket_path '/ws/one'"):
        load_rooms([tmp_path])


def test_counter_room_file_loads() -> None:
    root = pathlib.Path(__file__).resolve().parent.parent
    (room,) = load_rooms([root / "rooms" / "counter.py"])
    assert (room.name, room.websocket_path, room.persisted_keys) == (
        "counter",
        "/ws/counter",
        ("count", "last_updated_by"),
    )
    assert set(room.events) == {
        "counter:increment",
        "counter:decrement",
        "counter:reset",
        "counter:get",
    }
