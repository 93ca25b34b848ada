"""The sans-IO frame reader (verani/frames.py) against wsproto, an independent parser of the same
RFC, on random streams of frames — valid and broken — cut into random reads."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage

from verani.frames import (
    NEED_DATA,
    PAUSE,
    CloseReceived,
    FrameReader,
    Violation,
    close_frame,
    control_frame,
)
from verani.frames import Ping as ReaderPing

from helpers import frame

PAYLOADS = st.one_of(
    st.binary(max_size=20),
    st.text(max_size=10).map(str.encode),
    st.sampled_from([b"\xc3", b"\xa9", b"\xff", b"\xed\xa0\x80", b"\x03\xe8", b"\x03\xe7"]),
    st.integers(0, 5000).map(lambda n: n.to_bytes(2, "big")),
)

FRAMES = st.builds(
    lambda opcode, payload, fin, rsv, masked, long_length: frame(
        opcode, payload, fin=fin, rsv=rsv, masked=masked, long_length=long_length
    ),
    opcode=st.sampled_from([0x0, 0x1, 0x2, 0x8, 0x9, 0xA, 0x3, 0xB]),
    payload=PAYLOADS,
    fin=st.booleans(),
    rsv=st.sampled_from([0, 0, 0, 0, 1, 4]),
    masked=st.sampled_from([True, True, True, False]),
    long_length=st.sampled_from([False, False, False, True]),
)


@st.composite
def _messages(draw: st.DrawFn) -> bytes:
    """A well-formed message, cut into fragments, maybe with control frames between them."""
    opcode = draw(st.sampled_from([0x1, 0x2]))
    payload = draw(st.text(max_size=12)).encode() if opcode == 0x1 else draw(st.binary())
    cuts = sorted(draw(st.lists(st.integers(0, len(payload)), max_size=3)))
    chunks = [payload[a:b] for a, b in zip([0, *cuts], [*cuts, len(payload)], strict=True)]
    out = []
    for i, chunk in enumerate(chunks):
        last = i == len(chunks) - 1
        out.append(frame(opcode if i == 0 else 0x0, chunk, fin=last))
        if not last and draw(st.booleans()):
            out.append(frame(draw(st.sampled_from([0x9, 0xA])), draw(st.binary(max_size=5))))
    return b"".join(out)


STREAMS = st.lists(st.one_of(_messages(), _messages(), _messages(), FRAMES), max_size=6)


def _wsproto_events(data: bytes) -> list[Any]:
    """What wsproto's server makes of ``data``, as comparable tuples, up to the first close."""
    conn = Connection(ConnectionType.SERVER)
    conn.receive_data(data)
    out: list[Any] = []
    parts: list[Any] = []
    for event in conn.events():
        if isinstance(event, TextMessage | BytesMessage):
            parts.append(event.data)
            if event.message_finished:
                joined = "".join(parts) if isinstance(event, TextMessage) else b"".join(parts)
                out.append(("message", joined))
                parts = []
        elif isinstance(event, Ping):
            out.append(("ping", bytes(event.payload)))
        elif isinstance(event, Pong):
            continue
        elif isinstance(event, CloseConnection):
            # wsproto reports a violation as a close event while the connection stays OPEN.
            kind = "close" if conn.state is ConnectionState.REMOTE_CLOSING else "violation"
            out.append((kind, event.code))
            break
    return out


def _reader_events(data: bytes, cuts: list[int]) -> list[Any]:
    reader = FrameReader(
        max_message_size=1 << 20, max_fragments=1 << 20, max_control_per_second=1e9
    )
    out: list[Any] = []
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    for piece in pieces:
        reader.receive_data(piece)
        while (event := reader.next_event()) is not NEED_DATA:
            if event is PAUSE:
                continue
            if isinstance(event, str | bytes):
                out.append(("message", event))
            elif isinstance(event, ReaderPing):
                out.append(("ping", event.payload))
            elif isinstance(event, CloseReceived):
                out.append(("close", event.code))
                return out
            else:
                assert isinstance(event, Violation)
                out.append(("violation", event.code))
                return out
    return out


@settings(max_examples=500, deadline=None)
@given(frames=STREAMS, data=st.data())
def test_the_reader_agrees_with_wsproto(frames: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(frames)
    cuts = sorted(set(data.draw(st.lists(st.integers(0, len(stream)), max_size=6))))
    assert _reader_events(stream, cuts) == _wsproto_events(stream)


def test_frames_the_server_writes_read_back_through_wsproto() -> None:
    client = Connection(ConnectionType.CLIENT)
    client.receive_data(control_frame(0x9, b"hi") + close_frame(1008, "é" * 100))
    ping, close = list(client.events())
    assert isinstance(ping, Ping) and ping.payload == b"hi"
    # The reason is cut to the 123 bytes a Close frame has room for, on a character boundary.
    assert isinstance(close, CloseConnection) and close.code == 1008
    assert close.reason == "é" * 61
