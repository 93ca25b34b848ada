"""Frame decoding and encoding, and request routing: pure."""

from __future__ import annotations

import re
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from verani import (
    ClientFrame,
    FrameEncodeError,
    FrameTooLargeError,
    ProtocolError,
    RoomDefinitionError,
    define_room,
)
from verani.protocol import (
    PING_MESSAGE,
    PONG_FRAME,
    decode_frame,
    decode_server_frame,
    encode_client_event,
    encode_event,
    encode_frame,
    event_data,
    is_pong,
    server_event,
)
from verani.routing import MAX_INSTANCE_NAME, InstanceRules, Router, split_target


def test_decode_event_frame() -> None:
    assert decode_frame('{"type":"counter:increment","data":{"amount":2}}') == ClientFrame(
        "counter:increment", {"amount": 2}, None
    )
    assert decode_frame('{"type":"x","channel":"c"}') == ClientFrame("x", None, "c")


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ("not json", "not valid JSON"),
        ("[1,2]", "must be a JSON object, not list"),
        ('"str"', "must be a JSON object, not str"),
        ("{}", 'no "type" string'),
        ('{"type": 5}', 'no "type" string'),
        ('{"type": ""}', 'no "type" string'),
        ('{"type": "x", "channel": 3}', '"channel" must be a string'),
        (b'{"type":"x"}', "binary frames are not part of the protocol"),
        ("[" * 5000 + "]" * 5000, "not valid JSON"),
    ],
)
def test_bad_frames_are_refused_with_a_reason(message: Any, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason.replace("(", r"\(").replace('"', '"')):
        decode_frame(message)


def test_oversized_frame() -> None:
    with pytest.raises(FrameTooLargeError, match="over the 10 limit"):
        decode_frame('{"type":"abcdefgh"}', max_size=10)


@given(st.binary() | st.text())
def test_decoder_never_fails_other_than_protocol_error(message: bytes | str) -> None:
    try:
        frame = decode_frame(message)
    except ProtocolError:
        return
    assert isinstance(frame.type, str) and frame.type


def test_encode_event_spreads_dict_payload_and_event_name_wins() -> None:
    frame = orjson.loads(encode_event("default", "counter:update", {"count": 1, "type": "evil"}))
    assert frame == {
        "type": "event",
        "channel": "default",
        "data": {"count": 1, "type": "counter:update"},
    }
    assert orjson.loads(encode_event("c", "e", None))["data"] == {"type": "e"}
    assert orjson.loads(encode_event("c", "e", [1, 2]))["data"] == {"type": "e", "data": [1, 2]}


def test_encode_unserialisable_data_names_the_event() -> None:
    with pytest.raises(FrameEncodeError, match="cannot send event 'e'"):
        encode_event("c", "e", {"x": object()})


def test_the_wire_bytes_both_ways() -> None:
    # Written from DESIGN.md §5, not from the encoders: Verani's JavaScript client depends on
    # these bytes, and every Python speaker of the protocol encodes through these functions.
    assert encode_client_event("counter:increment", {"amount": 2}) == (
        '{"type":"counter:increment","data":{"amount":2}}'
    )
    assert encode_client_event("counter:get") == '{"type":"counter:get","data":null}'
    assert encode_client_event("chat", [1], channel="lobby") == (
        '{"type":"chat","data":[1],"channel":"lobby"}'
    )
    assert PING_MESSAGE == '{"type":"ping"}'
    assert PONG_FRAME == b'{"type":"pong"}'
    assert encode_event("default", "counter:update", {"count": 1}) == (
        b'{"type":"event","channel":"default","data":{"count":1,"type":"counter:update"}}'
    )
    assert encode_event("c", "e", None) == b'{"type":"event","channel":"c","data":{"type":"e"}}'
    assert encode_frame("c", {"x": 1}) == b'{"type":"event","channel":"c","data":{"x":1}}'


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)


@given(st.text(min_size=1), json_values, st.none() | st.text())
def test_a_client_frame_reaches_the_server_as_sent(
    event: str, data: Any, channel: str | None
) -> None:
    assert decode_frame(encode_client_event(event, data, channel=channel)) == ClientFrame(
        event, data, channel
    )


@given(st.text(), st.text(), st.dictionaries(st.text(), json_values, max_size=3))
def test_a_server_event_reaches_the_client_as_sent(
    channel: str, event: str, payload: dict[str, Any]
) -> None:
    frame = decode_server_frame(encode_event(channel, event, payload))
    assert server_event(frame) == (event, {**payload, "type": event})
    assert not is_pong(frame)


def test_client_side_reading_of_server_frames() -> None:
    assert is_pong(decode_server_frame(PONG_FRAME))
    assert server_event(decode_server_frame(PONG_FRAME)) is None
    # Frames a client cannot dispatch are passed over, not errors: a newer server may send more.
    assert server_event({"type": "ack", "id": 1, "data": {"type": "x"}}) is None
    assert server_event({"type": "event", "channel": "c", "data": [1]}) is None
    typeless = {"type": "event", "channel": "c", "data": {"text": "hi"}}
    assert server_event(typeless) is None
    assert event_data(typeless) == {"text": "hi"}  # still an event, for a test to look at
    with pytest.raises(ProtocolError, match="not JSON"):
        decode_server_frame("nope")
    with pytest.raises(ProtocolError, match=r"not a JSON object: '\[1\]'"):
        decode_server_frame("[1]")


def test_client_encoding_refuses_what_the_server_could_not_read_as_sent() -> None:
    with pytest.raises(FrameEncodeError, match="cannot send event 'e'"):
        encode_client_event("e", {"x": object()})
    # The server would read it as a float: refused rather than silently changed.
    with pytest.raises(TypeError, match=r"cannot send event 'big'.*64-bit"):
        encode_client_event("big", 2**70)


def test_split_target_first_value_wins() -> None:
    assert split_target("/ws/counter?userId=a&userId=b&x=") == (
        "/ws/counter",
        {"userId": "a", "x": ""},
    )


def test_routing() -> None:
    room = define_room(name="counter")
    router = Router([room])
    assert router.route("/ws/counter").instance == "default"  # type: ignore[union-attr]
    assert router.route("/ws/counter/abc").instance == "abc"  # type: ignore[union-attr]
    assert router.route("/ws/counter/h%C3%A9llo").instance == "héllo"  # type: ignore[union-attr]
    assert router.route("/ws/other") is None
    assert router.route("/ws/counter/a/b") is None
    assert router.route("/ws/counterx") is None
    for bad in ("..", "%2e%2e", ".", "a%2Fb", "%00", "x" * (MAX_INSTANCE_NAME + 1), "%ff"):
        route = router.route(f"/ws/counter/{bad}")
        assert route is not None and route.error is not None, bad


def test_instance_name_rules_of_the_server_and_of_a_room() -> None:
    plain = define_room(name="plain")
    strict = define_room(name="strict", instance_pattern=r"[a-z]+", max_instance_name=4)
    router = Router([plain, strict], InstanceRules(max_length=300, pattern=re.compile(r"\w+")))
    assert router.route("/ws/plain/" + "x" * 300).error is None  # type: ignore[union-attr]
    assert "longer than 300" in router.route("/ws/plain/" + "x" * 301).error  # type: ignore[union-attr,operator]
    assert "does not match" in router.route("/ws/plain/a-b").error  # type: ignore[union-attr,operator]
    # The room's own rules win over the server's.
    assert router.route("/ws/strict/abcd").error is None  # type: ignore[union-attr]
    assert "longer than 4" in router.route("/ws/strict/abcde").error  # type: ignore[union-attr,operator]
    assert "match '[a-z]+'" in router.route("/ws/strict/ab1").error  # type: ignore[union-attr,operator]
    # No pattern can let a name reach outside the store.
    loose = define_room(name="loose", instance_pattern=r".*")
    for bad in ("..", "%2e%2e", "a%2Fb", "%00"):
        route = Router([loose]).route(f"/ws/loose/{bad}")
        assert route is not None and route.error is not None, bad


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"instance_pattern": "[a-"}, "instance_pattern '[a-' is not a regular expression"),
        ({"instance_pattern": 5}, "instance_pattern must be a regular expression"),
        ({"max_instance_name": 0}, "max_instance_name must be a positive int"),
    ],
)
def test_bad_instance_rules_are_definition_errors(options: dict[str, Any], message: str) -> None:
    with pytest.raises(RoomDefinitionError, match=re.escape(message)):
        define_room(name="r", **options)


def test_integers_past_64_bits_still_encode() -> None:
    frame = orjson.loads(encode_event("c", "big", {"n": 2**70, "neg": -(2**65)}))
    assert frame["data"] == {"type": "big", "n": 2**70, "neg": -(2**65)}
