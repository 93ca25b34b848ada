"""Tests of verani.codec: lossless JSON encoding of persisted room-state values."""

from __future__ import annotations

import ast
import collections
import dataclasses
import datetime as dt
import decimal
import enum
import functools
import math
import os
import pathlib
import re
import socket
import subprocess
import sys
import threading
import typing
import uuid
import zoneinfo
from decimal import Decimal
from typing import Any, Literal, NamedTuple

import attrs
import cattrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import verani.codec
from verani.codec import MAX_DEPTH, dumps, loads, make_codec
from verani.errors import CorruptDocumentError, NotPersistableError

CODEC = make_codec()
PARIS = zoneinfo.ZoneInfo("Europe/Paris")


# --- helpers ------------------------------------------------------------------------------------


def roundtrip(value: Any, declared: Any = Any, *, pretty: bool = False) -> Any:
    """Encode, write as JSON bytes, read back and decode, as the store does."""
    raw = CODEC.encode(value, declared, path="k")
    return CODEC.decode(loads(dumps(raw, pretty=pretty)), declared, path="k")


def same(a: Any, b: Any) -> bool:
    """Equality that also compares types all the way down, NaN, the sign of zero and time zones."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        if math.isnan(a):
            return math.isnan(b)
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    if isinstance(a, decimal.Decimal):
        return str(a) == str(b)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, dict):
        pairs = zip(a.items(), b.items(), strict=False)
        return len(a) == len(b) and all(
            same(ka, kb) and same(va, vb) for (ka, va), (kb, vb) in pairs
        )
    if isinstance(a, set | frozenset):
        return len(a) == len(b) and all(any(same(x, y) for y in b) for x in a)
    if isinstance(a, dt.datetime | dt.time):
        return (
            a.replace(tzinfo=None) == b.replace(tzinfo=None)
            and a.fold == b.fold
            and type(a.tzinfo) is type(b.tzinfo)
            and getattr(a.tzinfo, "key", None) == getattr(b.tzinfo, "key", None)
            and a.utcoffset() == b.utcoffset()
        )
    return bool(a == b)


def assert_roundtrips(value: Any, declared: Any = Any) -> Any:
    back = roundtrip(value, declared)
    assert same(back, value), f"{value!r} came back as {back!r}"
    return back


def json_only(tree: Any) -> bool:
    if tree is None or type(tree) in (bool, int, float, str):
        return type(tree) is not float or math.isfinite(tree)
    if type(tree) is list:
        return all(map(json_only, tree))
    return type(tree) is dict and all(type(k) is str and json_only(v) for k, v in tree.items())


# --- declared types used by the tests ----------------------------------------------------------


@attrs.define
class Item:
    name: str
    qty: int = 0


@dataclasses.dataclass
class Point:
    x: float
    y: float


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"


class Size(enum.IntEnum):
    SMALL = 1
    LARGE = 2


class Perm(enum.Flag):
    READ = 1
    WRITE = 2


class Corner(enum.Enum):
    TOP_LEFT = (0, 0)
    BOTTOM_RIGHT = (1, 1)


@attrs.define
class State:
    tags: set[str]
    by_id: dict[int, Item]
    when: dt.datetime
    color: Color
    anything: Any
    maybe: Item | None = None
    origin: Point = attrs.field(factory=lambda: Point(0.0, 0.0))
    pair: tuple[int, str] = (0, "")
    many: tuple[Decimal, ...] = ()
    frozen: frozenset[uuid.UUID] = frozenset()
    names: dict[str, list[Item]] = attrs.Factory(dict)
    mode: Literal["on", "off"] = "off"
    size: Size = Size.SMALL
    perm: Perm = Perm.READ
    pattern: re.Pattern[str] = re.compile("x")
    _secret: str = "s"
    computed: int = attrs.field(init=False, default=0)


@attrs.define
class Counter:
    count: int = 0
    ratio: float = 0.0
    label: str = ""
    flag: bool = False
    color: Color = Color.RED
    item: Item | None = None
    pair: tuple[int, int] = (0, 0)
    tags: set[str] = attrs.Factory(set)
    choice: Color | str = "x"
    mixed: Item | dict[str, int] = attrs.Factory(dict)


@attrs.define(eq=False)
class Node:
    name: str
    children: list[Node] = attrs.Factory(list)
    parent: Node | None = None


@attrs.define
class Entry:
    cb: Any = None


@attrs.define
class Bag:
    items: list[Entry]


@attrs.define
class Positive:
    n: int = attrs.field(validator=attrs.validators.gt(0))


@attrs.frozen
class Box:
    width: int
    area: int = attrs.field(init=False)
    label: str = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "area", self.width * 2)  # label is never set


class Pair(NamedTuple):
    a: int
    b: int


# --- untyped values ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        False,
        0,
        -7,
        2**63 - 1,
        -(2**63),
        2**63,
        -(2**63) - 1,
        2**200,
        -(10**50),
        1.5,
        0.0,
        -0.0,
        1e308,
        5e-324,
        math.inf,
        -math.inf,
        "",
        "héllo ✓ 🎉",
        b"",
        b"\x00\xff bytes",
        dt.date(2024, 2, 29),
        dt.timedelta(days=-3, seconds=5, microseconds=7),
        dt.timedelta(0),
        Decimal("1.50"),
        Decimal("-0"),
        Decimal("1E+3"),
        Decimal("-Infinity"),
        Decimal("sNaN"),
        uuid.UUID("12345678-1234-5678-1234-567812345678"),
        [],
        [1, "a", None],
        (),
        (1, (2, (3,))),
        set(),
        {1, "a", (2, 3)},
        frozenset(),
        frozenset({1.5, b"x"}),
        {},
        {"a": 1, "b": [2]},
    ],
    ids=repr,
)
def test_untyped_values_round_trip_to_the_same_type_and_value(value: Any) -> None:
    assert_roundtrips(value)


def test_negative_zero_and_nan_survive() -> None:
    assert math.copysign(1, roundtrip(-0.0)) == -1
    assert math.isnan(roundtrip(math.nan))
    assert CODEC.encode(math.nan) == {"$t": "float", "v": "nan"}
    assert CODEC.encode([math.inf, -math.inf]) == [
        {"$t": "float", "v": "inf"},
        {"$t": "float", "v": "-inf"},
    ]


def test_ints_are_native_within_64_bits_and_tagged_past_them() -> None:
    assert CODEC.encode(2**63 - 1) == 2**63 - 1
    assert CODEC.encode(-(2**63)) == -(2**63)
    assert CODEC.encode(2**63) == {"$t": "int", "v": "9223372036854775808"}
    assert CODEC.encode(-(2**63) - 1) == {"$t": "int", "v": "-9223372036854775809"}
    assert roundtrip(10**5000) == 10**5000


def test_bool_is_not_written_as_int() -> None:
    back = roundtrip([True, 1, False, 0])
    assert [type(x) for x in back] == [bool, int, bool, int]


@pytest.mark.parametrize(
    "value",
    [
        dt.datetime(2024, 5, 6, 7, 8, 9, 123456),
        dt.datetime(2024, 5, 6, tzinfo=dt.UTC),
        dt.datetime(2024, 5, 6, tzinfo=dt.timezone(dt.timedelta(hours=5, minutes=30))),
        dt.datetime(2024, 5, 6, tzinfo=dt.timezone(-dt.timedelta(hours=3, seconds=7))),
        dt.datetime(2024, 7, 1, 12, tzinfo=PARIS),
        dt.datetime(2024, 10, 27, 2, 30, tzinfo=PARIS, fold=0),
        dt.datetime(2024, 10, 27, 2, 30, tzinfo=PARIS, fold=1),
        dt.datetime(2024, 3, 31, 2, 30, tzinfo=PARIS),  # in the spring gap
        dt.datetime(1, 1, 1, tzinfo=zoneinfo.ZoneInfo("Asia/Tokyo")),
        dt.time(1, 2, 3, 4),
        dt.time(1, 2, tzinfo=dt.timezone(dt.timedelta(hours=-4))),
        dt.time(1, 2, tzinfo=PARIS, fold=1),
    ],
    ids=repr,
)
def test_clock_values_keep_offset_zone_and_fold(value: dt.datetime | dt.time) -> None:
    back = assert_roundtrips(value)
    assert back.tzinfo is value.tzinfo or back.tzinfo == value.tzinfo


def test_zoneinfo_comes_back_as_that_zoneinfo() -> None:
    value = dt.datetime(2024, 1, 15, 9, tzinfo=zoneinfo.ZoneInfo("America/New_York"))
    raw = CODEC.encode(value)
    assert raw == {"$t": "datetime", "v": "2024-01-15T09:00:00-05:00", "zone": "America/New_York"}
    back = roundtrip(value)
    assert isinstance(back.tzinfo, zoneinfo.ZoneInfo)
    assert back.tzinfo.key == "America/New_York"
    assert back.utcoffset() == dt.timedelta(hours=-5)


def test_decimal_keeps_its_exponent_and_specials() -> None:
    assert str(roundtrip(Decimal("1.50"))) == "1.50"
    assert str(roundtrip(Decimal("1.500E+7"))) == "1.500E+7"
    assert roundtrip(Decimal("NaN")).is_qnan()
    assert roundtrip(Decimal("sNaN")).is_snan()
    assert roundtrip(Decimal("-0")).is_signed()


@pytest.mark.parametrize(
    "pattern",
    [
        re.compile(r"a+b", re.IGNORECASE | re.MULTILINE),
        re.compile(r"\d+", re.ASCII | re.VERBOSE),
        re.compile(r".", re.DOTALL),
        re.compile(rb"\x00[ab]", re.IGNORECASE),
    ],
    ids=repr,
)
def test_regexp_keeps_source_and_flags(pattern: re.Pattern[Any]) -> None:
    back = roundtrip(pattern)
    assert type(back) is re.Pattern
    assert back.pattern == pattern.pattern
    assert type(back.pattern) is type(pattern.pattern)
    assert back.flags == pattern.flags


def test_user_dicts_that_look_like_tags_round_trip_unchanged() -> None:
    value = {"$t": "datetime", "v": "2024-01-01"}
    assert CODEC.encode(value) == {"$t": "dict", "v": {"$t": "datetime", "v": "2024-01-01"}}
    assert same(roundtrip(value), value)
    nested = {"a": [{"$t": "any", "v": 1}, {"$t": {"$t": "x"}}], "$t": None}
    assert same(roundtrip(nested), nested)


def test_dicts_with_non_str_keys_become_maps_with_encoded_keys() -> None:
    value = {
        7: "int",
        (1, "a"): "tuple",
        None: "none",
        True: "bool",
        2.5: "float",
        frozenset({1}): "frozenset",
        dt.date(2020, 1, 1): "date",
        "s": "str",
    }
    raw = CODEC.encode(value)
    assert type(raw) is dict
    assert raw["$t"] == "map"
    assert raw["v"][0] == [7, "int"]
    assert raw["v"][1] == [{"$t": "tuple", "v": [1, "a"]}, "tuple"]
    assert same(roundtrip(value), value)


def test_everything_nested_inside_everything() -> None:
    value = {
        "list": [
            (1, {2, 3}, frozenset({(4, b"5")})),
            {dt.date(2020, 1, 1): [Decimal("1.0"), {"$t": uuid.UUID(int=1)}]},
        ],
        "tuple": ([math.nan], {None: {1: (dt.timedelta(1), re.compile("x", re.I))}}),
        "when": {(1, 2): dt.datetime(2024, 1, 1, tzinfo=PARIS)},
        "big": {2**100: [2**100, -(2**64)]},
    }
    raw = CODEC.encode(value, path="k")
    assert json_only(raw)
    assert same(roundtrip(value), value)


def test_encoded_trees_are_plain_json_and_pretty_dumps_indents() -> None:
    raw = CODEC.encode({"a": [1, {2}], "b": b"x"})
    assert json_only(raw)
    text = dumps(raw, pretty=True).decode()
    assert text.startswith('{\n  "a": [\n    1,')
    assert loads(text) == raw
    assert dumps(raw) == b'{"a":[1,{"$t":"set","v":[2]}],"b":{"$t":"bytes","v":"eA=="}}'


def test_a_shared_but_not_circular_value_is_fine() -> None:
    shared = [1, {"x": 2}]
    value = [shared, shared, {"again": shared}, (shared,)]
    back = roundtrip(value)
    assert same(back, value)
    item = Item("x")
    assert roundtrip({"a": item, "b": item}, dict[str, Item]) == {"a": item, "b": item}


def test_sets_are_written_in_one_order_whatever_their_hash_order() -> None:
    grown = set(range(100))
    for n in range(100):
        if n not in (1, 8):
            grown.discard(n)
    assert list(grown) != list({1, 8})  # the same set, iterated in another order
    assert CODEC.encode(grown) == CODEC.encode({1, 8}) == {"$t": "set", "v": [1, 8]}
    # str hashes, and so the order of a set of str, change from one process to the next.
    script = (
        "import sys, uuid; from verani.codec import dumps, make_codec; codec = make_codec(); "
        "tags = {f'tag-{n}' for n in range(40)}; "
        "mixed = frozenset({'a', 1, 2.5, None, b'x', (2, 'b'), uuid.UUID(int=3), 2**70}); "
        "sys.stdout.buffer.write(dumps(codec.encode([tags, mixed]) ))"
        "; sys.stdout.buffer.write(dumps(codec.encode(tags, set[str])))"
    )
    written = {
        subprocess.run(
            [sys.executable, "-c", script],
            env={**os.environ, "PYTHONHASHSEED": str(seed)},
            capture_output=True,
            check=True,
        ).stdout
        for seed in (1, 2, 3)
    }
    assert len(written) == 1


# --- hypothesis: any untyped value round-trips ------------------------------------------------

zones = st.none() | st.timezones() | st.just(dt.UTC)
fixed = st.timedeltas(min_value=dt.timedelta(hours=-23), max_value=dt.timedelta(hours=23))
offsets = fixed.map(lambda d: dt.timezone(dt.timedelta(minutes=d // dt.timedelta(minutes=1))))
patterns = st.sampled_from([re.compile("a+", re.I), re.compile(b"x.", re.S), re.compile(r"\w")])
hashable_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.binary(max_size=8)
    | st.dates()
    | st.timedeltas()
    | st.uuids()
)
hashables = st.recursive(
    hashable_scalars,
    lambda inner: st.lists(inner, max_size=3).map(tuple) | st.frozensets(inner, max_size=3),
    max_leaves=6,
)
scalars = (
    hashable_scalars
    | st.floats()
    | st.decimals()
    | st.datetimes(timezones=zones | offsets)
    | st.times(timezones=zones | offsets)
    | patterns
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.lists(inner, max_size=3).map(tuple)
        | st.dictionaries(st.text(max_size=3) | st.sampled_from(["$t", "v"]), inner, max_size=4)
        | st.dictionaries(hashables, inner, max_size=3)
        | st.sets(hashables, max_size=4)
        | st.frozensets(hashables, max_size=4)
    ),
    max_leaves=25,
)


@settings(max_examples=300, deadline=None)
@given(values)
def test_any_untyped_value_round_trips_through_json(value: Any) -> None:
    raw = CODEC.encode(value, path="k")
    assert json_only(raw)
    back = CODEC.decode(loads(dumps(raw)), path="k")
    assert same(back, value)


# --- declared types ----------------------------------------------------------------------------


def make_state() -> State:
    state = State(
        tags={"a", "b"},
        by_id={1: Item("x", 2), 20: Item("y")},
        when=dt.datetime(2024, 6, 1, 12, tzinfo=PARIS),
        color=Color.GREEN,
        anything={"at": dt.datetime(2024, 1, 1, 9, 30), "n": (1, 2), "d": Decimal("2.50")},
        maybe=Item("z", 9),
        origin=Point(1.5, -0.0),
        pair=(3, "c"),
        many=(Decimal("1.0"), Decimal("NaN")),
        frozen=frozenset({uuid.UUID(int=5)}),
        names={"$t": [Item("t")], "plain": []},
        mode="on",
        size=Size.LARGE,
        perm=Perm.READ | Perm.WRITE,
        pattern=re.compile("^a", re.M),
        secret="hidden",
    )
    state.computed = 42
    return state


def test_typed_state_class_structures_back_to_its_declared_types() -> None:
    state = make_state()
    back = roundtrip(state, State)
    assert type(back) is State
    assert back.tags == {"a", "b"}
    assert type(back.tags) is set
    assert back.by_id == {1: Item("x", 2), 20: Item("y")}
    assert all(type(k) is int and type(v) is Item for k, v in back.by_id.items())
    assert same(back.when, state.when)
    assert back.color is Color.GREEN
    assert same(back.anything, state.anything)
    assert back.maybe == Item("z", 9)
    assert type(back.origin) is Point
    assert math.copysign(1, back.origin.y) == -1
    assert same(back.pair, (3, "c"))
    assert same(back.many, state.many)
    assert back.frozen == frozenset({uuid.UUID(int=5)})
    assert type(back.frozen) is frozenset
    assert back.names == {"$t": [Item("t")], "plain": []}
    assert back.mode == "on"
    assert back.size is Size.LARGE
    assert back.perm == Perm.READ | Perm.WRITE
    assert type(back.perm) is Perm
    assert back.pattern == re.compile("^a", re.M)
    assert back._secret == "hidden"
    assert back.computed == 42


def test_declared_values_are_written_without_class_names() -> None:
    raw = CODEC.encode(make_state(), State, path="state")
    assert type(raw) is dict
    assert "$t" not in raw
    assert raw["by_id"] == {
        "$t": "map",
        "v": [[1, {"name": "x", "qty": 2}], [20, {"name": "y", "qty": 0}]],
    }
    assert raw["color"] == "green"
    assert raw["size"] == 2
    assert raw["perm"] == 3
    assert raw["origin"] == {"x": 1.5, "y": -0.0}
    assert raw["maybe"] == {"name": "z", "qty": 9}
    text = dumps(raw).decode()
    for class_name in ("State", "Item", "Point", "Color", "Size", "Perm"):
        assert class_name not in text


def test_any_fields_use_the_untyped_rules_not_a_pass_through() -> None:
    raw = CODEC.encode(make_state(), State)
    assert type(raw) is dict
    anything = raw["anything"]
    assert type(anything) is dict
    assert anything["at"] == {"$t": "datetime", "v": "2024-01-01T09:30:00"}
    assert anything["n"] == {"$t": "tuple", "v": [1, 2]}


def test_each_persisted_key_can_be_coded_by_its_field_type() -> None:
    state = make_state()
    for field in attrs.fields(State):
        declared = typing.get_type_hints(State)[field.name]
        value = getattr(state, field.name)
        back = CODEC.decode(loads(dumps(CODEC.encode(value, declared))), declared)
        assert same(back, value), field.name


def test_typed_containers_with_element_types() -> None:
    assert roundtrip({}, dict[int, Item]) == {}
    assert roundtrip({"$t": Item("a")}, dict[str, Item]) == {"$t": Item("a")}
    assert roundtrip([Item("a"), Item("b")], list[Item]) == [Item("a"), Item("b")]
    assert roundtrip((Item("a"), 1), tuple[Item, int]) == (Item("a"), 1)
    assert roundtrip((), tuple[()]) == ()
    assert roundtrip({Color.RED}, set[Color]) == {Color.RED}
    assert roundtrip({Color.RED: Item("r")}, dict[Color, Item]) == {Color.RED: Item("r")}
    assert roundtrip([[Point(1, 2)]], list[list[Point]]) == [[Point(1, 2)]]
    assert roundtrip(None, Item | None) is None
    assert roundtrip(Corner.TOP_LEFT, Corner) is Corner.TOP_LEFT
    assert roundtrip([1, "a"], list[typing.Annotated[int, "meta"] | str]) == [1, "a"]
    assert roundtrip([Item("a")], list[typing.Annotated[Item, ["unhashable"]]]) == [Item("a")]


def test_fields_outside_init_are_written_and_read_back_strictly() -> None:
    assert CODEC.encode(Box(3), Box) == {"width": 3, "area": 6}
    assert roundtrip({Box(3)}, set[Box]) == {Box(3)}
    back = CODEC.decode({"width": 3, "area": 7}, Box)  # what was stored, even in a frozen class
    assert back.area == 7
    assert not hasattr(back, "label")
    with pytest.raises(CorruptDocumentError, match=r"^k\.area: bad 'int' value 'x'"):
        CODEC.decode({"width": 3, "area": {"$t": "int", "v": "x"}}, Box, path="k")


def test_recursive_declared_types() -> None:
    root = Node("root", [Node("a"), Node("b", [Node("c")])])
    back = roundtrip(root, Node)
    assert [child.name for child in back.children] == ["a", "b"]
    assert back.children[1].children[0].name == "c"
    assert type(back.children[1].children[0]) is Node


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("count", 0.5),
        ("count", 5.0),
        ("count", "5"),
        ("count", True),
        ("count", 2**70),
        ("ratio", 3),
        ("label", 12),
        ("label", b"bytes"),
        ("flag", 1),
        ("color", "red"),
        ("color", "blue"),
        ("color", None),
        ("item", {"name": "x", "qty": 1}),
        ("item", {"$t": "x"}),
        ("item", "not an item"),
        ("pair", [1, 2]),
        ("pair", (1, 2, 3)),
        ("pair", (1, "2")),
        ("tags", ["a", "b"]),
        ("tags", frozenset({"a"})),
        ("tags", {1, 2.5}),
        ("choice", "red"),
        ("choice", Color.RED),
        ("choice", 3),
        ("mixed", {"name": 1}),
        ("mixed", Item("i")),
    ],
    ids=repr,
)
def test_values_that_do_not_fit_their_declared_type_come_back_exactly(
    field: str, value: Any
) -> None:
    counter = Counter(**{field: value})
    back = roundtrip(counter, Counter)
    assert same(getattr(back, field), value), getattr(back, field)


items = st.builds(Item, name=st.text(max_size=5) | values, qty=st.integers() | values)


@settings(max_examples=200, deadline=None)
@given(
    st.builds(
        Counter,
        count=st.integers() | values,
        ratio=st.floats() | values,
        label=st.text(max_size=5) | values,
        flag=st.booleans() | values,
        color=st.sampled_from(Color) | values,
        item=st.none() | items | values,
        pair=st.tuples(st.integers(), st.integers()) | values,
        tags=st.sets(st.text(max_size=3)) | values,
        choice=st.sampled_from(Color) | st.text(max_size=3) | values,
        mixed=st.dictionaries(st.text(max_size=3), st.integers()) | items | values,
    )
)
def test_any_values_in_declared_fields_come_back_exactly(counter: Counter) -> None:
    def same_fields(a: Any, b: Any) -> bool:  # attrs' == fails on NaN
        if not attrs.has(type(a)):
            return same(a, b)
        names = [f.name for f in attrs.fields(type(a))]
        return type(a) is type(b) and all(same_fields(getattr(a, n), getattr(b, n)) for n in names)

    assert same_fields(roundtrip(counter, Counter), counter)


def test_misfits_that_would_read_back_as_the_declared_type_are_marked() -> None:
    raw = CODEC.encode(Counter(color="red", item={"name": "x"}), Counter)
    assert type(raw) is dict
    assert raw["color"] == {"$t": "any", "v": "red"}
    assert raw["item"] == {"$t": "any", "v": {"name": "x"}}
    assert raw["count"] == 0
    assert CODEC.encode(0.5, int) == 0.5
    assert CODEC.encode(True, int) is True  # nothing to mark: int never reads a bool
    assert CODEC.decode(0.5, int) == 0.5
    assert CODEC.decode("5", int) == "5"


def test_literal_and_union_members_are_exact() -> None:
    assert roundtrip("on", Literal["on", "off"]) == "on"
    assert same(roundtrip(True, Literal[1, 2]), True)
    assert same(roundtrip(1, Literal[1, 2]), 1)
    assert same(roundtrip(1, int | float), 1)
    assert same(roundtrip(1.0, int | float), 1.0)
    assert same(roundtrip("red", Color | str), "red")
    assert roundtrip(Color.RED, Color | str) is Color.RED
    assert roundtrip(Color.RED, Literal[Color.RED]) is Color.RED


def test_a_private_converter_is_used() -> None:
    codec = make_codec()
    codec.encode(make_state(), State)
    when = dt.datetime(2024, 1, 1)
    assert cattrs.global_converter.unstructure(when) is when
    assert codec._converter is not cattrs.global_converter
    assert codec._converter is not make_codec()._converter


def test_the_converter_itself_structures_and_unstructures_declared_types() -> None:
    codec = make_codec()
    state = make_state()
    raw = codec._converter.unstructure(state, State)
    assert raw == codec.encode(state, State)
    back = codec._converter.structure(loads(dumps(raw)), State)
    expected = codec.decode(raw, State)
    assert type(back) is State
    for field in attrs.fields(State):  # State's == fails on its Decimal("NaN")
        assert same(getattr(back, field.name), getattr(expected, field.name)), field.name
    # cattrs' class hooks for int and str would take these by their base class.
    assert codec._converter.structure(2, Size) is Size.LARGE
    assert codec._converter.structure(True, bool) is True
    assert same(codec._converter.structure({"$t": "int", "v": "5"}, int), 5)
    with pytest.raises(cattrs.IterableValidationError) as info:
        codec._converter.unstructure([1, len], list[int])
    errors = cattrs.transform_error(info.value, "k", lambda exc, _: str(exc))
    assert errors == ["function is not persistable @ k[1]"]


# --- values that cannot be persisted ----------------------------------------------------------


def undeclared(name: str) -> str:
    return (
        f"object of undeclared class {name} is not persistable; declare its type on the state class"
    )


def gen() -> Any:
    yield 1


async def coro() -> None:
    return None


async def agen() -> Any:
    yield 1


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (lambda: 0, "function is not persistable"),
        (gen, "function is not persistable"),
        ([].append, "function is not persistable"),
        (len, "function is not persistable"),
        (Item("x").__repr__, "function is not persistable"),
        (functools.partial(len, "x"), "function is not persistable"),
        (gen(), "generator is not persistable"),
        (agen(), "async generator is not persistable"),
        (math, "module is not persistable"),
        (int, "class is not persistable"),
        (Item, "class is not persistable"),
        (threading.Lock(), "lock is not persistable"),
        (threading.RLock(), "lock is not persistable"),
        (threading.Event(), "lock is not persistable"),
        (threading.Thread(), "thread is not persistable"),
        (bytearray(b"x"), "mutable buffer is not persistable; store bytes instead"),
        ("\ud800", "string with a lone surrogate is not persistable"),
        (Item("x"), undeclared("Item")),
        (Point(1, 2), undeclared("Point")),
        (Color.RED, undeclared("Color")),
        (Size.SMALL, undeclared("Size")),
        (collections.OrderedDict(), undeclared("OrderedDict")),
        (Pair(1, 2), undeclared("Pair")),
    ],
    ids=repr,
)
def test_not_persistable_values_are_refused_with_their_path(value: Any, reason: str) -> None:
    with pytest.raises(NotPersistableError) as info:
        CODEC.encode(["a", "b", value], path="items")
    assert str(info.value) == f"items[2]: {reason}"
    assert info.value.path == "items[2]"
    assert info.value.reason == reason


def test_live_resources_are_refused(tmp_path: pathlib.Path) -> None:
    coroutine = coro()
    sock = socket.socket()
    with open(tmp_path / "f", "w") as file:
        try:
            cases = [(coroutine, "coroutine"), (sock, "socket"), (file, "open file")]
            for value, what in cases:
                with pytest.raises(NotPersistableError) as info:
                    CODEC.encode({"x": [value]}, path="k")
                assert str(info.value) == f"k['x'][0]: {what} is not persistable"
        finally:
            coroutine.close()
            sock.close()


def test_paths_name_fields_indexes_and_keys() -> None:
    bag = Bag([Entry(1), Entry("two"), Entry(lambda: 3)])
    with pytest.raises(
        NotPersistableError, match=r"^bag\.items\[2\]\.cb: function is not persistable$"
    ):
        CODEC.encode(bag, Bag, path="bag")
    with pytest.raises(NotPersistableError, match=r"^scores\['a'\]: function is not persistable$"):
        CODEC.encode({"a": len}, path="scores")
    with pytest.raises(NotPersistableError, match=r"^scores\[\(1, 2\)\]\[0\]: module"):
        CODEC.encode({(1, 2): [math]}, path="scores")
    with pytest.raises(NotPersistableError, match=r"^t\[1\]\[0\]: generator"):
        CODEC.encode((1, {gen()}), path="t")
    with pytest.raises(NotPersistableError, match=r"^s\.by_id\[1\]\.name: function"):
        CODEC.encode(
            State(set(), {1: Item(len)}, dt.datetime.now(), Color.RED, None), State, path="s"
        )


def test_nothing_is_returned_when_a_deep_part_is_not_persistable() -> None:
    value = {"ok": [1, 2], "bad": {"deeper": [0, 0, 0, lambda: 0]}}
    with pytest.raises(NotPersistableError) as info:
        CODEC.encode(value, path="v")
    assert info.value.path == "v['bad']['deeper'][3]"


def test_circular_references_are_refused_with_their_path() -> None:
    loop: list[Any] = [1]
    loop.append(loop)
    with pytest.raises(NotPersistableError, match=r"^x\[1\]: circular reference$"):
        CODEC.encode(loop, path="x")
    me: dict[str, Any] = {}
    me["me"] = me
    with pytest.raises(NotPersistableError, match=r"^x\['me'\]: circular reference$"):
        CODEC.encode(me, path="x")
    through_tuple: tuple[list[Any]] = ([],)
    through_tuple[0].append(through_tuple)
    with pytest.raises(NotPersistableError, match=r"^x\[0\]\[0\]: circular reference$"):
        CODEC.encode(through_tuple, path="x")
    through_both: dict[str, Any] = {"items": []}
    through_both["items"].append({"owner": through_both})
    with pytest.raises(NotPersistableError, match=r"^x\['items'\]\[0\]\['owner'\]: circular "):
        CODEC.encode(through_both, path="x")
    tree = Node("root")
    tree.children.append(Node("child", parent=tree))
    with pytest.raises(
        NotPersistableError, match=r"^tree\.children\[0\]\.parent: circular reference$"
    ):
        CODEC.encode(tree, Node, path="tree")


def nested_list(levels: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(levels - 1):
        value = [value]
    return value


def test_nesting_up_to_the_limit_round_trips_and_past_it_is_refused() -> None:
    deepest = nested_list(MAX_DEPTH)
    assert roundtrip(deepest) == deepest
    with pytest.raises(NotPersistableError, match=f"nested more than {MAX_DEPTH} levels deep"):
        CODEC.encode(nested_list(MAX_DEPTH + 1), path="x")
    with pytest.raises(NotPersistableError, match=f"nested more than {MAX_DEPTH} levels deep"):
        CODEC.encode(nested_list(5000), path="x")
    with pytest.raises(CorruptDocumentError, match=f"nested more than {MAX_DEPTH} levels deep"):
        CODEC.decode(nested_list(MAX_DEPTH + 1), path="x")


# --- malformed input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"$t": "os.system", "v": "rm -rf /"}, "k: unknown tag 'os.system'"),
        ({"$t": "builtins.eval", "v": "1"}, "k: unknown tag 'builtins.eval'"),
        ({"$t": 5, "v": 1}, "k: tag 5 is not a string"),
        ({"$t": "int"}, "k: malformed 'int' tag with keys ['$t']"),
        ({"$t": "int", "v": "1", "x": 2}, "k: malformed 'int' tag with keys ['$t', 'v', 'x']"),
        ({"$t": "int", "v": 5}, "k: bad 'int' value 5: expected str, not int"),
        ({"$t": "int", "v": "abc"}, "k: bad 'int' value 'abc'"),
        ({"$t": "float", "v": "nope"}, "k: bad 'float' value 'nope'"),
        ({"$t": "bytes", "v": "!!!"}, "k: bad 'bytes' value '!!!'"),
        ({"$t": "datetime", "v": "yesterday"}, "k: bad 'datetime' value 'yesterday'"),
        ({"$t": "datetime", "v": "2024-01-01T00:00", "zone": "No/Where"}, "k: bad 'datetime'"),
        ({"$t": "datetime", "v": "2024-01-01T00:00", "zone": "../../etc"}, "k: bad 'datetime'"),
        ({"$t": "datetime", "v": "2024-01-01T00:00", "fold": 2}, "k: bad 'datetime'"),
        ({"$t": "time", "v": "25:00"}, "k: bad 'time' value '25:00'"),
        ({"$t": "date", "v": "2024-13-01"}, "k: bad 'date' value '2024-13-01'"),
        ({"$t": "timedelta", "v": [1, 2]}, "k: bad 'timedelta' value [1, 2]"),
        ({"$t": "timedelta", "v": [1, 2, 3.5]}, "k: bad 'timedelta'"),
        ({"$t": "decimal", "v": "x"}, "k: bad 'decimal' value 'x'"),
        ({"$t": "uuid", "v": "x"}, "k: bad 'uuid' value 'x'"),
        ({"$t": "regexp", "v": "(", "flags": 32}, "k: bad 'regexp' value '('"),
        ({"$t": "regexp", "v": "a"}, "k: bad 'regexp' value 'a': expected int, not NoneType"),
        ({"$t": "regexp", "v": 1, "flags": 0}, "k: bad 'regexp' value 1"),
        ({"$t": "set", "v": 3}, "k: malformed 'set' tag"),
        ({"$t": "set", "v": [[1]]}, "k: set element is not hashable"),
        ({"$t": "tuple", "v": {}}, "k: malformed 'tuple' tag"),
        ({"$t": "dict", "v": []}, "k: malformed 'dict' tag"),
        ({"$t": "map", "v": [[1]]}, "k: malformed 'map' tag"),
        ({"$t": "map", "v": [[[1], 2]]}, "k: map key is not hashable"),
        ({"$t": "any"}, "k: malformed 'any' tag"),
        ([1, {"a": {"$t": "bogus"}}], "k[1]['a']: unknown tag 'bogus'"),
        ({"$t": "map", "v": [[1, {"$t": "bogus", "v": 0}]]}, "k[1]: unknown tag 'bogus'"),
        ({"$t": "tuple", "v": [0, {"$t": "int", "v": "z"}]}, "k[1]: bad 'int' value 'z'"),
    ],
    ids=repr,
)
def test_malformed_tagged_input_is_a_corrupt_document(raw: Any, message: str) -> None:
    with pytest.raises(CorruptDocumentError) as info:
        CODEC.decode(raw, path="k")
    assert str(info.value).startswith(message)


@pytest.mark.parametrize(
    ("raw", "declared", "message"),
    [
        ({"name": "x", "bogus": 1}, Item, "k: Item has no field 'bogus'"),
        ({"qty": 1}, Item, "k: missing field 'name' of Item"),
        ({"x": 1.0}, Point, "k: missing field 'y' of Point"),
        ({"n": 0}, Positive, "k: stored fields do not make a Positive"),
        ({"$t": "map", "v": [[1, {}]]}, dict[int, Item], "k[1]: missing field 'name' of Item"),
        ([{"name": "a"}, {"nom": "b"}], list[Item], "k[1]: Item has no field 'nom'"),
        ({"maybe": {"qty": 1}}, Counter, "k: Counter has no field 'maybe'"),
        ({"item": {"qty": 1}}, Counter, "k.item: missing field 'name' of Item"),
        ({"$t": "tuple", "v": [1, {"$t": "x", "v": 0}]}, tuple[int, int], "k[1]: unknown tag 'x'"),
    ],
    ids=repr,
)
def test_wrong_shapes_for_declared_classes_are_corrupt(
    raw: Any, declared: Any, message: str
) -> None:
    with pytest.raises(CorruptDocumentError) as info:
        CODEC.decode(raw, declared, path="k")
    assert str(info.value).startswith(message)


def test_data_never_chooses_a_class() -> None:
    raw = {"__class__": "os.system", "__module__": "os", "type": "Item", "name": "x"}
    back = CODEC.decode(raw, path="k")
    assert back == raw
    assert type(back) is dict


def test_loads_reports_bad_json_as_corrupt() -> None:
    with pytest.raises(CorruptDocumentError, match="not JSON"):
        loads(b"{not json")


def test_codec_module_does_not_import_trio() -> None:
    tree = ast.parse(pathlib.Path(verani.codec.__file__).read_text())
    imported = [
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    ] + [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    assert imported
    assert not any(name.split(".")[0] == "trio" for name in imported)


@pytest.mark.parametrize("declared", [Any, list[str], list[int], list[float]])
def test_lists_of_json_scalars_take_the_fast_path_without_losing_anything(
    declared: Any,
) -> None:
    codec = make_codec()
    plain = ["a", 1, 2.5, -0.0, True, None]
    assert codec.encode(plain, declared, path="xs") == plain
    tricky = ["é", 2**70, math.inf, -(2**63) - 1, "ascii"]
    raw = loads(dumps(codec.encode(tricky, declared, path="xs")))
    assert raw[1] == {"$t": "int", "v": str(2**70)} and raw[2] == {"$t": "float", "v": "inf"}
    back = codec.decode(raw, declared, path="xs")
    assert back == tricky and [type(v) for v in back] == [type(v) for v in tricky]
    with pytest.raises(NotPersistableError, match=r"xs\[1\]: string with a lone surrogate"):
        codec.encode(["ok", "\ud800"], declared, path="xs")


@settings(max_examples=60, deadline=None)
@given(value=values)
def test_values_round_trip_through_the_real_file_store(
    value: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    import trio

    from verani.store import FileStore

    store = FileStore(tmp_path_factory.mktemp("store"), durability="os")
    encoded = CODEC.encode(value, path="v")

    async def save_and_load() -> Any:
        await store.save("room", "instance", {"v": encoded}, {"k": encoded})
        return await store.load("room", "instance")

    doc = trio.run(save_and_load)
    assert doc is not None
    assert same(CODEC.decode(doc.state["v"], path="v"), value)
    assert same(CODEC.decode(doc.storage["k"], path="k"), value)


_SCALAR_DECLARATIONS = [
    Any,
    int,
    str,
    bool,
    type(None),
    str | None,
    int | None,
    bool | None,
    int | str,
    int | bool,
    float,
    int | float,
]


@given(
    value=st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=2**62, max_value=2**66)
    | st.text(max_size=20)
    | st.floats(),
    declared=st.sampled_from(_SCALAR_DECLARATIONS),
)
def test_the_scalar_fast_path_writes_what_the_hooks_write(value: Any, declared: Any) -> None:
    codec = make_codec()
    slow = codec._hook(declared)(value)  # the full path, hooks only
    assert repr(codec.encode(value, declared)) == repr(slow)
    assert codec.decode(codec.encode(value, declared), declared) == value or value != value


@given(
    raw=st.none() | st.booleans() | st.integers() | st.text(max_size=20) | st.floats(),
    declared=st.sampled_from(_SCALAR_DECLARATIONS),
)
def test_the_scalar_fast_path_reads_what_the_hooks_read(raw: Any, declared: Any) -> None:
    codec = make_codec()
    slow = codec._structure(raw, declared)  # the full path, hooks only
    assert same(codec.decode(raw, declared), slow)
