"""Frame decoding and encoding, and request routing: pure."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from verani import ClientFrame, FrameEncodeError, FrameTooLargeError, ProtocolError, define_room
from verani.protocol import decode_frame, encode_event
from verani.routing import MAX_INSTANCE_NAME, Router, split_target


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


def test_integers_past_64_bits_still_encode() -> None:
    frame = orjson.loads(encode_event("c", "big", {"n": 2**70, "neg": -(2**65)}))
    assert frame["data"] == {"type": "big", "n": 2**70, "neg": -(2**65)}
