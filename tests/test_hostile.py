"""Hostile input against a real server: HTTP heads, WebSocket frames, instance names, origins.

Every test ends by showing the garbage cost nothing: a bystander on another room and one on the
attacked room are served as usual, no room instance was woken (``server.supervisor.status()``)
and nothing was stored, unless a well-formed request legitimately did so.

The hypothesis tests are plain ``def`` tests running one ``trio.run`` per example, each against
a fresh server on port 0 (a server starts and stops in a few milliseconds).
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import re
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest
import trio
import trio_websocket
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from wsproto.events import (
    AcceptConnection,
    Pong,
    RejectConnection,
)

from verani import (
    ConnectionMeta,
    HandshakeRefused,
    HandshakeRequest,
    RoomContext,
    RoomDefinition,
    Server,
    ServerConfig,
    define_room,
    open_server,
)

from helpers import (
    CLOSE,
    CONTINUATION,
    PING,
    TEXT,
    RawSocket,
    connect,
    frame,
    http_request,
    logged,
    upgrade_request,
    wait_logged,
)

#: Per-example settings of the hypothesis tests: the examples share the test's fixtures
#: (rooms, tmp_path, caplog) on purpose, and start a server each.
EXAMPLES = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)

#: Statuses a refused request may get: 4xx, or 501 for a transfer coding the server does not
#: implement (RFC 9112 §6.1) — never 101, and never a 500 (a crash).
REFUSED = re.compile(r"^(4\d\d|501)$")


# --- rooms ------------------------------------------------------------------------------------


def echo_room() -> RoomDefinition[Any]:
    """The bystanders' room: echoes ``echo`` events back."""
    room = define_room(name="echo")

    @room.on("echo")
    def echo(ctx: RoomContext[Any], data: Any) -> None:
        ctx.emit.emit("echo", data)

    return room


@asynccontextmanager
async def serve(
    counter_rooms: list[RoomDefinition[Any]],
    store: pathlib.Path,
    *extra: RoomDefinition[Any],
    config: ServerConfig | None = None,
) -> AsyncIterator[Server]:
    """A server on 127.0.0.1 port 0 serving the counter room, the echo room and ``extra``."""
    rooms = [*counter_rooms, echo_room(), *extra]
    async with open_server(rooms, store=str(store), durability="os", config=config) as server:
        yield server


def assert_nothing_woken(server: Server, store: pathlib.Path) -> None:
    assert server.supervisor.status() == []
    assert not (store / "rooms").exists()


async def assert_still_serving(server: Server, *, count: int = 0) -> None:
    """A client of another room, and one of the counter room, are served as usual."""
    async with connect(server.url, "/ws/echo", user_id="bystander") as other:
        await other.emit("echo", {"n": 1})
        assert await other.next_event("echo") == ("echo", {"n": 1, "type": "echo"})
    async with connect(server.url, "/ws/counter", user_id="bystander") as same:
        _, data = await same.next_event("counter:sync")
        assert data["count"] == count
        await same.emit("counter:get")
        _, data = await same.next_event("counter:sync")
        assert data["count"] == count


# --- raw HTTP ---------------------------------------------------------------------------------


async def send_raw(port: int, payload: bytes) -> tuple[int | None, bytes]:
    """Send ``payload``, half-close, and read until the server closes.

    Returns the answer's status (None when the server closed without one, or reset the
    connection before we could read it — it may close with unread request bytes) and the bytes.
    """
    answer = b""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        try:
            await stream.send_all(payload)
            await stream.send_eof()
            while chunk := await stream.receive_some(65536):
                answer += chunk
        except trio.BrokenResourceError:
            pass  # reset by the server: it closed before reading everything we sent
    match = re.match(rb"HTTP/1\.1 (\d{3}) ", answer)
    assert match is not None or answer == b"", answer[:300]
    return (int(match.group(1)) if match else None), answer


async def check_refused(
    server: Server, caplog: pytest.LogCaptureFixture, payload: bytes
) -> int | None:
    """Send a request that must not be upgraded: an error status or a close, promptly, and a
    log line of the server naming the status it answered."""
    caplog.clear()
    with trio.fail_after(5):
        status, answer = await send_raw(server.port, payload)
    assert status is None or REFUSED.match(str(status)), (answer[:300], payload[:300])
    pattern = rf"^{status} " if status is not None else r"^(4\d\d|501) "
    assert logged(caplog, "verani.server", pattern), (status, payload[:300], caplog.text)
    return status


# --- hostile HTTP heads -----------------------------------------------------------------------


def _one_http_example(
    payload: bytes,
    counter_rooms: list[RoomDefinition[Any]],
    store: pathlib.Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        with trio.fail_after(10):
            async with serve(counter_rooms, store) as server:
                await check_refused(server, caplog, payload)
                assert_nothing_woken(server, store)
                await assert_still_serving(server)

    trio.run(main)


@EXAMPLES
@given(payload=st.binary(max_size=4096))
def test_random_bytes_get_an_error_status_or_a_close(
    payload: bytes,
    counter_rooms: list[RoomDefinition[Any]],
    tmp_path: pathlib.Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="verani")
    _one_http_example(payload, counter_rooms, tmp_path, caplog)


#: Header names that change what the request means; random extra headers avoid them.
_MEANINGFUL = {"host", "upgrade", "connection", "content-length", "transfer-encoding", "origin"}

_token_names = st.from_regex(r"[A-Za-z][A-Za-z0-9!#$%&'*+.^_`|~-]{0,24}", fullmatch=True).filter(
    lambda n: n.lower() not in _MEANINGFUL and not n.lower().startswith("sec-websocket")
)


def _one_line(data: bytes) -> bool:
    # A CR or LF could end a line early and splice a valid request (or header) together.
    return b"\r" not in data and b"\n" not in data


# Anything on one line; a NUL in it is a defect of its own.
_header_values = st.binary(max_size=64).filter(_one_line)

_Head = tuple[bytes, bytes, bytes, list[tuple[bytes, bytes]]]
_Defect = Callable[[_Head], _Head]


def _set_method(method: bytes) -> _Defect:
    return lambda h: (method, h[1], h[2], h[3])


def _set_target(target: bytes) -> _Defect:
    return lambda h: (h[0], target, h[2], h[3])


def _set_version(version: bytes) -> _Defect:
    return lambda h: (h[0], h[1], version, h[3])


def _add_header(name: bytes, value: bytes) -> _Defect:
    return lambda h: (h[0], h[1], h[2], [*h[3], (name, value)])


def _add_headers(more: list[tuple[bytes, bytes]]) -> _Defect:
    return lambda h: (h[0], h[1], h[2], [*h[3], *more])


def _replace_header(name: bytes, value: bytes) -> _Defect:
    def apply(h: _Head) -> _Head:
        others = [(k, v) for k, v in h[3] if k.lower() != name.lower()]
        return (h[0], h[1], h[2], [*others, (name, value)])

    return apply


def _drop_header(name: bytes) -> _Defect:
    return lambda h: (h[0], h[1], h[2], [(k, v) for k, v in h[3] if k.lower() != name.lower()])


def _invalid_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


_bad_methods = st.sampled_from(
    [b"POST", b"PUT", b"get", b"HEAD", b"CONNECT", b"OPTIONS", b"DELETE", b"PRI", b"G ET", b""]
) | st.binary(min_size=1, max_size=12).filter(lambda m: m != b"GET" and _one_line(m))

_bad_targets = st.one_of(
    # Invalid UTF-8 (and any non-ASCII byte) in the raw target.
    st.binary(min_size=1, max_size=40)
    .filter(lambda b: _invalid_utf8(b) and _one_line(b))
    .map(lambda b: b"/ws/counter/" + b),
    # Percent-encoded invalid UTF-8, NUL, control characters, traversal: bad instance names.
    st.sampled_from(
        [
            b"/ws/counter/%ff",
            b"/ws/counter/%C0%AE%C0%AE",
            b"/ws/counter/%ED%A0%80",
            b"/ws/counter/%00",
            b"/ws/counter/a%00b",
            b"/ws/counter/%0d%0aSet-Cookie:%20x",
            b"/ws/counter/..",
            b"/ws/counter/%2e%2e",
            b"/ws/counter/%2F..%2F..%2Fetc",
            b"/ws/counter/",
            b"/ws/counter/" + b"x" * 200,
        ]
    ),
    # Not a room's path at all.
    st.sampled_from(
        [b"/", b"*", b"/ws", b"/ws/counterx", b"/ws/counter/a/b", b"/ws/counter%00", b"/%2e%2e/"]
    ),
    # NUL, spaces or controls in the raw target: an illegal request line.
    st.sampled_from([b"/ws/co\x00unter", b"/ws/counter x", b"/ws/\x7fcounter", b"/ws/\tcounter"]),
)

_bad_versions = st.sampled_from(
    [b"HTTP/1.1x", b"HTTP/11", b"FTP/1.1", b"HTTP/", b"http/1.1", b"HTTP/1.1 extra"]
)

_huge_headers = st.one_of(
    # One value past 16 KiB plus a read's worth (the head is read 4 KiB at a time).
    st.integers(21 * 1024, 64 * 1024).map(lambda n: _add_header(b"X-Big", b"a" * n)),
    # Many small headers adding up past it.
    st.integers(2000, 3000).map(
        lambda n: _add_headers([(b"X-%d" % i, b"v" * 8) for i in range(n)])
    ),
)

_absurd_content_lengths = st.sampled_from(
    [b"-1", b"+5", b"1e9", b"0x10", b"1 2", b"1, 2", b"abc", b"", b"\xff", b"9" * 21, b"5" * 40]
).map(lambda v: _add_header(b"Content-Length", v)) | st.just(
    lambda h: (h[0], h[1], h[2], [*h[3], (b"Content-Length", b"1"), (b"Content-Length", b"2")])
)

_bad_transfer_encodings = st.sampled_from(
    [b"gzip", b"chunked, gzip", b"identity", b"xchunked", b"chunked;q=1", b"compress, chunked"]
).map(lambda v: _add_header(b"Transfer-Encoding", v))

_bad_header_lines = st.one_of(
    st.sampled_from([b"Bad Header", b"X\xff", b"(x)", b"a@b", b"", b"X\x00"]).map(
        lambda n: _add_header(n, b"v")
    ),
    st.sampled_from([b"a\x00b", b"a\rb", b"\x00"]).map(lambda v: _add_header(b"X-Evil", v)),
)

_incomplete_upgrades = st.one_of(
    st.sampled_from([b"Host", b"Upgrade", b"Connection", b"Sec-WebSocket-Key"]).map(_drop_header),
    st.just(_drop_header(b"Sec-WebSocket-Version")),
    st.sampled_from([b"8", b"12", b"14", b"13, 13", b"", b"thirteen"]).map(
        lambda v: _replace_header(b"Sec-WebSocket-Version", v)
    ),
    st.sampled_from([b"h2c", b"web socket", b""]).map(lambda v: _replace_header(b"Upgrade", v)),
    st.sampled_from([b"keep-alive", b"close", b""]).map(
        lambda v: _replace_header(b"Connection", v)
    ),
    # Two Host headers, even when another defect dropped the first one.
    st.just(_add_headers([(b"Host", b"one.example"), (b"Host", b"other.example")])),
)

_defects = st.one_of(
    _bad_methods.map(_set_method),
    _bad_targets.map(_set_target),
    _bad_versions.map(_set_version),
    _huge_headers,
    _absurd_content_lengths,
    _bad_transfer_encodings,
    _bad_header_lines,
    _incomplete_upgrades,
)


@st.composite
def mutated_upgrades(draw: st.DrawFn) -> bytes:
    """A valid upgrade to the counter room with random extra headers and at least one defect
    that must get it refused; sometimes cut short before its end, or followed by more bytes."""
    head: _Head = (
        b"GET",
        b"/ws/counter",
        b"HTTP/1.1",
        [
            (b"Host", b"127.0.0.1"),
            (b"Upgrade", b"websocket"),
            (b"Connection", b"Upgrade"),
            (b"Sec-WebSocket-Key", b"dGhlIHNhbXBsZSBub25jZQ=="),
            (b"Sec-WebSocket-Version", b"13"),
        ],
    )
    for name, value in draw(st.lists(st.tuples(_token_names, _header_values), max_size=4)):
        at = draw(st.integers(0, len(head[3])))
        head[3].insert(at, (name.encode(), value))
    for defect in draw(st.lists(_defects, min_size=1, max_size=3)):
        head = defect(head)
    method, target, version, headers = head
    raw = b"%s %s %s\r\n" % (method, target, version)
    raw += b"".join(b"%s: %s\r\n" % kv for kv in headers) + b"\r\n"
    ending = draw(st.sampled_from(["whole", "cut", "more"]))
    if ending == "cut":
        return raw[: draw(st.integers(0, len(raw) - 1))]
    if ending == "more":
        raw += draw(st.binary(max_size=64))  # bytes after the head (a body, or frames)
    return raw


@EXAMPLES
@given(payload=mutated_upgrades())
def test_mutated_upgrade_requests_are_refused(
    payload: bytes,
    counter_rooms: list[RoomDefinition[Any]],
    tmp_path: pathlib.Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="verani")
    _one_http_example(payload, counter_rooms, tmp_path, caplog)


async def test_hostile_heads_name_their_cause_in_the_log(
    counter_rooms: list[RoomDefinition[Any]],
    tmp_path: pathlib.Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="verani")
    ok = upgrade_request("/ws/counter")
    cases: list[tuple[bytes, int, str]] = [
        # Cut before its blank line, so the server reads all of it before it answers.
        (upgrade_request("/ws/counter", X_Big="a" * 18_000)[:-4], 431, "Receive buffer too long"),
        (upgrade_request("/ws/counter", Content_Length="9" * 30), 400, "bad Content-Length"),
        (upgrade_request("/ws/counter", Content_Length="-1"), 400, "bad Content-Length"),
        (
            upgrade_request("/ws/counter", Transfer_Encoding="gzip, chunked"),
            501,
            "Only Transfer-Encoding: chunked",
        ),
        (ok.replace(b"/ws/counter", b"/ws/counter/\xc3\xa9\xff"), 400, "illegal request line"),
        (upgrade_request("/ws/counter/%ff"), 400, "not valid UTF-8"),
        (upgrade_request("/ws/counter/%00"), 400, "control characters"),
        (upgrade_request("/ws/counter/%2F..%2F..%2Fetc"), 400, "cannot contain '/'"),
        (ok.replace(b"GET", b"TRACE", 1), 405, "must use GET"),
        (ok.replace(b"Host: 127.0.0.1\r\n", b""), 400, "Missing mandatory Host"),
        (ok[:-30], 400, "closed before a complete request"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64), 400, "bad HTTP request"),
    ]
    with trio.fail_after(10):
        async with serve(counter_rooms, tmp_path) as server:
            for payload, status, cause in cases:
                caplog.clear()
                with trio.fail_after(5):
                    got, answer = await send_raw(server.port, payload)
                # (431 may come as a reset if the head arrived in pieces and some was unread.)
                assert got == status or (status, got) == (431, None), (payload[:80], answer[:200])
                assert logged(caplog, "verani.server", rf"^{status} .*{re.escape(cause)}"), (
                    cause,
                    caplog.text,
                )
            assert_nothing_woken(server, tmp_path)
            await assert_still_serving(server)


async def test_a_head_that_never_ends_is_dropped_after_the_handshake_timeout(
    counter_rooms: list[RoomDefinition[Any]],
    tmp_path: pathlib.Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="verani")
    config = ServerConfig(handshake_timeout=0.5)
    with trio.fail_after(10):
        async with serve(counter_rooms, tmp_path, config=config) as server:
            # Slowloris: a valid head, a byte every 10 ms (1.5 s in all), never finished.
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            answer = b""
            async with stream:
                with trio.fail_after(3):
                    try:
                        for byte in upgrade_request("/ws/counter")[:-2]:
                            await stream.send_all(bytes([byte]))
                            await trio.sleep(0.01)
                        while chunk := await stream.receive_some():
                            answer += chunk
                    except trio.BrokenResourceError:
                        pass  # the server closed while we were still sending
            assert answer == b""
            assert logged(caplog, "verani.server", r"no complete HTTP request within 0.5s")
            assert_nothing_woken(server, tmp_path)
            await assert_still_serving(server)


@pytest.mark.parametrize(
    "extra",
    [
        b"Content-Length: 5\r\n\r\nhello",
        b"Content-Length: 99999999999999999999\r\n\r\n",
        b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n",
    ],
    ids=["content-length-5", "content-length-20-digits", "chunked", "chunked+content-length"],
)
async def test_upgrade_with_a_request_body_is_refused(
    extra: bytes, counter_rooms: list[RoomDefinition[Any]], tmp_path: pathlib.Path
) -> None:
    payload = upgrade_request("/ws/counter/smuggled")[:-2] + extra
    with trio.fail_after(10):
        async with serve(counter_rooms, tmp_path) as server:
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            async with stream:
                await stream.send_all(payload)
                with trio.fail_after(5):
                    answer = await stream.receive_some(65536)
            assert answer.startswith(b"HTTP/1.1 4"), answer[:200]
            assert_nothing_woken(server, tmp_path)


@pytest.mark.parametrize(
    "payload",
    [
        upgrade_request("/ws/counter/v").replace(b"HTTP/1.1", b"HTTP/1.0"),
        upgrade_request("/ws/counter/v").replace(b"HTTP/1.1", b"HTTP/9.9"),
        upgrade_request("/ws/counter/v", Sec_WebSocket_Key="x"),
    ],
    ids=["http-1.0", "http-9.9", "short-key"],
)
async def test_malformed_handshake_is_refused(
    payload: bytes, counter_rooms: list[RoomDefinition[Any]], tmp_path: pathlib.Path
) -> None:
    with trio.fail_after(10):
        async with serve(counter_rooms, tmp_path) as server:
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            async with stream:
                await stream.send_all(payload)
                with trio.fail_after(5):
                    answer = await stream.receive_some(65536)
            assert answer.startswith((b"HTTP/1.1 400", b"HTTP/1.1 505")), answer[:200]
            assert_nothing_woken(server, tmp_path)


async def test_a_complete_head_over_the_limit_is_refused(
    counter_rooms: list[RoomDefinition[Any]], tmp_path: pathlib.Path
) -> None:
    head = upgrade_request("/ws/counter", X_Big="a" * 17_000)
    with trio.fail_after(10):
        async with serve(counter_rooms, tmp_path) as server:
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            async with stream:
                await stream.send_all(head[:16_384])  # the server reads all of it: not over yet
                await trio.sleep(0.2)
                await stream.send_all(head[16_384:])
                with trio.fail_after(5):
                    answer = await stream.receive_some(65536)
            assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
            assert_nothing_woken(server, tmp_path)


async def test_upgrade_refused_by_wsproto_is_logged_at_once(
    counter_rooms: list[RoomDefinition[Any]],
    tmp_path: pathlib.Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="verani")
    with trio.fail_after(10):
        async with serve(counter_rooms, tmp_path) as server:
            status, _, _ = await http_request(
                server.port, upgrade_request("/ws/counter", Upgrade="h2c, websocket")
            )
            assert status == 400
            await trio.sleep(0.5)
            assert logged(caplog, "verani.server", r"^400 .*[Uu]pgrade"), caplog.text


# --- hostile frames ---------------------------------------------------------------------------


@asynccontextmanager
async def raw_counter(port: int) -> AsyncIterator[RawSocket]:
    """A raw socket on the counter room, past its first counter:sync."""
    async with RawSocket.open(port, "/ws/counter") as (sock, answer):
        assert isinstance(answer, AcceptConnection), answer
        assert (await sock.next_json())["data"]["type"] == "counter:sync"
        yield sock


def _json_text(value: Any) -> str:
    # The stdlib writes what orjson refuses to read: big integers, Infinity, NaN.
    return json.dumps(value, ensure_ascii=False)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=10,
)
_frame_objects = st.fixed_dictionaries(
    {},
    optional={
        "type": st.text(max_size=12) | _json_values,
        "data": _json_values,
        "channel": st.text(max_size=6) | _json_values,
    },
)
_jsonish = (_frame_objects | _json_values).map(_json_text)
_garbage_frames = st.lists(
    st.text()
    | st.binary()
    | _jsonish
    | _jsonish.map(lambda s: s[: len(s) // 2])
    | _jsonish.map(lambda s: s + "\x00"),
    min_size=1,
    max_size=6,
)


def _is_counter_command(message: str | bytes) -> bool:
    """Whether a frame is a real command of the counter room (left out: it changes the count)."""
    if isinstance(message, bytes):
        return False
    try:
        obj = orjson.loads(message)
    except orjson.JSONDecodeError:
        return False
    return isinstance(obj, dict) and str(obj.get("type")).startswith("counter:")


@EXAMPLES
@given(frames=_garbage_frames)
def test_garbage_frames_get_an_error_event_and_change_nothing(
    frames: list[str | bytes],
    counter_rooms: list[RoomDefinition[Any]],
    tmp_path: pathlib.Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    assume(not any(_is_counter_command(f) for f in frames))
    caplog.set_level(logging.INFO, logger="verani")

    async def main() -> None:
        caplog.clear()
        with trio.fail_after(10):
            async with serve(counter_rooms, tmp_path) as server:
                async with connect(server.url, user_id="mallory") as mallory:
                    await mallory.next_event("counter:sync")
                    for message in frames:
                        await mallory.send(message)
                    await mallory.emit("counter:get")
                    # One answer per garbage frame (an error event, or a pong for a ping),
                    # then the sync: the socket is still open and in order.
                    replies = []
                    while True:
                        reply = await mallory.recv()
                        if reply.get("data", {}).get("type") == "counter:sync":
                            break
                        replies.append(reply)
                    assert reply["data"]["count"] == 0
                assert len(replies) == len(frames), replies
                errors = [r for r in replies if r != {"type": "pong"}]
                for reply in errors:
                    assert reply["data"]["type"] == "verani:error", reply
                    assert reply["data"]["code"] in ("bad_frame", "unknown_event"), reply
                # Each dropped frame has a log line saying why.
                causes = logged(caplog, "verani.server", "dropped a frame") + logged(
                    caplog, "verani.actor", "no handler for event"
                )
                assert len(causes) == len(errors), caplog.text
                assert [s.instance for s in server.supervisor.status()] == ["default"]
                await assert_still_serving(server)
            assert not (tmp_path / "rooms").exists()  # the count never changed: nothing saved

    trio.run(main)


async def test_absurd_json_is_refused_and_changes_nothing(
    counter_rooms: list[RoomDefinition[Any]],
    tmp_path: pathlib.Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="verani")
    deep = "[" * 10_000 + "]" * 10_000
    big = "123456789012345678901234567890"
    # (frame, the error code the sender gets or None, a log line naming the cause)
    cases: list[tuple[str, str | None, str]] = [
        (deep, "bad_frame", "not valid JSON"),
        ('{"type":"counter:increment","data":{"amount":' + deep + "}}", "bad_frame", "JSON"),
        ('{"type":"counter:increment","data":{"amount":1e999999}}', "bad_frame", "infinity"),
        ('{"type":"counter:increment","data":{"amount":NaN}}', "bad_frame", "not valid JSON"),
        ('{"type": "x", "data": ' + big + "}", "unknown_event", "no handler for event 'x'"),
        (
            '{"type":"counter:increment","data":{"amount":' + big + "}}",
            "bad_amount",
            "must be an integer",
        ),
        (
            '{"type":"counter:increment","data":{"amount":-1e308}}',
            "bad_amount",
            "must be an integer",
        ),
        ('{"type":"counter:increment","data":{"amount":true}}', "bad_amount", "must be an integer"),
        ('\ufeff{"type":"counter:increment"}', "bad_frame", "not valid JSON"),
        ('{"type":"counter:increment"}\x00', "bad_frame", "not valid JSON"),
        ('{"type":"' + "t" * 100_000 + '"}', "unknown_event", "no handler for event 'tttt"),
        ('{"type":"counter:increment","channel":["default"]}', "bad_frame", "channel"),
    ]
    with trio.fail_after(10):
        async with serve(counter_rooms, tmp_path) as server:
            async with connect(server.url, user_id="mallory") as mallory:
                await mallory.next_event("counter:sync")
                for message, code, cause in cases:
                    caplog.clear()
                    await mallory.send(message)
                    await mallory.emit("counter:get")
                    if code is not None:
                        _, data = await mallory.next_event("verani:error")
                        assert data["code"] == code, (message[:80], data)
                    _, data = await mallory.next_event("counter:sync")
                    assert data["count"] == 0, message[:80]
                    assert logged(caplog, "verani", re.escape(cause)), (cause, caplog.text)
            assert [s.instance for s in server.supervisor.status()] == ["default"]
            await assert_still_serving(server)
        assert not (tmp_path / "rooms").exists()


async def test_a_huge_integer_does_not_brick_the_room(
    counter_rooms: list[RoomDefinition[Any]], tmp_path: pathlib.Path
) -> None:
    with trio.fail_after(10):
        async with serve(counter_rooms, tmp_path) as server:
            async with connect(server.url, "/ws/counter/big", user_id="mallory") as mallory:
                await mallory.next_event("counter:sync")
                await mallory.emit("counter:decrement", {"amount": 2**64 - 1})  # a u64: valid JSON
                await mallory.emit("nope")  # answered once the decrement's turn is over
                await mallory.next_event("verani:error")
            # Either the decrement was refused or the count still travels: a newcomer is served.
            async with connect(server.url, "/ws/counter/big", user_id="victim") as victim:
                _, data = await victim.next_event("counter:sync")
                assert isinstance(data["count"], int | float)
            await assert_still_serving(server)


async def test_fragments_and_pings_are_handled_as_the_rfc_says(
    counter_rooms: list[RoomDefinition[Any]], tmp_path: pathlib.Path
) -> None:
    message = '{"type":"counter:increment","data":{"amount":3},"note":"café ✓"}'.encode()
    cut = message.index("é".encode()) + 1  # inside the two bytes of é
    with trio.fail_after(10):
        async with serve(counter_rooms, tmp_path) as server, raw_counter(server.port) as sock:
            # Three fragments, a ping between them, a UTF-8 character split across two.
            await sock.send(
                frame(TEXT, message[:10], fin=False),
                frame(PING, b"between"),
                frame(CONTINUATION, message[10:cut], fin=False),
                frame(CONTINUATION, message[cut:]),
            )
            event = await sock.event()
            assert isinstance(event, Pong) and event.payload == b"between"
            assert (await sock.next_json())["data"]["count"] == 3
            # One byte per fragment.
            await sock.send(
                frame(TEXT, message[:1], fin=False),
                *(frame(CONTINUATION, message[i : i + 1], fin=False) for i in range(1, 60)),
                frame(CONTINUATION, message[60:]),
            )
            assert (await sock.next_json())["data"]["count"] == 6
            # Pings of every allowed size get their payload back (and never reach the room).
            for payload in (b"", b"x", os.urandom(125)):
                await sock.send(frame(PING, payload))
                event = await sock.event()
                assert isinstance(event, Pong) and event.payload == payload
            await sock.send(frame(CLOSE, (1000).to_bytes(2, "big")))
            assert await sock.close_code() == 1000
        async with serve(counter_rooms, tmp_path) as server:
            await assert_still_serving(server, count=6)


async def test_a_fragmented_message_over_the_limit_closes_with_1009(
    counter_rooms: list[RoomDefinition[Any]],
    tmp_path: pathlib.Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="verani")
    config = ServerConfig(max_frame_size=1000)
    part = b'{"type":"counter:increment","pad":"' + b"x" * 400
    with trio.fail_after(10):
        async with serve(counter_rooms, tmp_path, config=config) as server:
            async with raw_counter(server.port) as sock:
                await sock.send(
                    frame(TEXT, part, fin=False),
                    frame(CONTINUATION, b"y" * 400, fin=False),
                    frame(CONTINUATION, b"z" * 400 + b'"}'),
                )
                assert await sock.close_code() == 1009
            await wait_logged(
                caplog, "verani.server", "sent a frame over 1000 bytes; closed with 1009"
            )
            await assert_still_serving(server)
        assert not (tmp_path / "rooms").exists()


#: Frames that break RFC 6455, and the close code the RFC gives them.
PROTOCOL_VIOLATIONS = [
    pytest.param(frame(TEXT, b'{"type":"\xff"}'), 1007, id="text-invalid-utf8"),
    pytest.param(
        frame(TEXT, b'{"type":', fin=False) + frame(CONTINUATION, b'"\xc3\x28"}'),
        1007,
        id="fragment-invalid-utf8",
    ),
    pytest.param(frame(0x3, b"x"), 1002, id="reserved-data-opcode"),
    pytest.param(frame(0xB, b"x"), 1002, id="reserved-control-opcode"),
    pytest.param(frame(TEXT, b'{"type":"x"}', rsv=4), 1002, id="rsv1-without-extension"),
    pytest.param(frame(TEXT, b'{"type":"x"}', masked=False), 1002, id="unmasked"),
    pytest.param(frame(PING, b"x" * 126), 1002, id="control-over-125-bytes"),
    pytest.param(frame(PING, b"x", fin=False), 1002, id="fragmented-control"),
    pytest.param(frame(CONTINUATION, b"x"), 1002, id="continuation-first"),
    pytest.param(
        frame(TEXT, b"x", fin=False) + frame(TEXT, b"y"), 1002, id="new-message-mid-fragment"
    ),
    pytest.param(frame(CLOSE, (999).to_bytes(2, "big")), 1002, id="close-code-999"),
    pytest.param(frame(CLOSE, b"\x03"), 1002, id="close-one-byte"),
    pytest.param(frame(CLOSE, (1000).to_bytes(2, "big") + b"\xff"), 1007, id="close-bad-utf8"),
]


@pytest.mark.parametrize(("violation", "code"), PROTOCOL_VIOLATIONS)
async def test_a_protocol_violation_ends_only_that_socket(
    violation: bytes,
    code: int,
    counter_rooms: list[RoomDefinition[Any]],
    tmp_path: pathlib.Path,
) -> None:
    with trio.fail_after(10):
        async with serve(counter_rooms, tmp_path) as server:
            async with connect(server.url, user_id="other") as other:
                await other.next_event("counter:sync")
                async with raw_counter(server.port) as sock:
                    await sock.send(violation)
                    assert await sock.close_code() == code
                # The room let go of the socket; the other one is served.
                while server.supervisor.status()[0].sessions != 1:
                    await trio.sleep(0.01)
                await other.emit("counter:increment")
                assert (await other.next_event("counter:update"))[1]["count"] == 1
            await assert_still_serving(server, count=1)


@pytest.mark.parametrize(("violation", "code"), PROTOCOL_VIOLATIONS)
async def test_a_protocol_violation_gets_its_close_code_and_a_log_line(
    violation: bytes,
    code: int,
    counter_rooms: list[RoomDefinition[Any]],
    tmp_path: pathlib.Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="verani")
    with trio.fail_after(10):
        async with serve(counter_rooms, tmp_path) as server, raw_counter(server.port) as sock:
            await sock.send(violation)
            assert await sock.close_code() == code
            await wait_logged(caplog, "verani.server", str(code))


# --- instance names ---------------------------------------------------------------------------

#: Instance names (as sent, percent-encoded) that must be refused before the upgrade.
MUST_REFUSE = [
    "",
    ".",
    "..",
    "%2e",
    "%2e%2e",
    "%2E%2E",
    ".%2e",
    "%2F..%2F..%2Fetc",
    "..%2F..%2F..%2Fetc%2Fpasswd",
    "a%2Fb",
    "%2F",
    "%00",
    "a%00.json",
    "%0a",
    "%1b%5B31m",
    "%7F",
    "%ff",
    "%C0%AE%C0%AE",  # overlong UTF-8 for '..'
    "%ED%A0%80",  # a UTF-8-encoded surrogate
    "x" * 10_000,
    "%E2%80%AE" * 129,  # too long, counted in characters
]

#: Names an attacker would try that may be refused, or accepted as a harmless instance.
MAY_ACCEPT = [
    "CON",
    "NUL",
    "nul.txt",
    "COM1",
    "LPT1",
    "AUX",
    ".git",
    "%2Egit",
    ".htaccess",
    "...",
    "....",
    "%2e%2e%2e",
    "..%5C..%5Cwindows",
    "%5C",
    "~",
    "~root",
    "%25",
    "%252e%252e%252f",
    "a.json",
    "a.json.tmp",
    "server.lock",
    "rooms",
    "-rf",
    "%20",
    "a%20",
    "a.",
    "%EF%BC%8E%EF%BC%8E",  # fullwidth full stops
    "%E2%80%A5",  # two-dot leader
    "%E2%88%95etc%E2%88%95passwd",  # division slashes
    "%EF%BC%8F",  # fullwidth solidus
    "%E2%81%84",  # fraction slash
    "%E2%80%AE",  # right-to-left override
    "%E2%80%8B",  # zero-width space
    "%EF%BB%BF",  # byte order mark
    "%D0%B0dmin",  # Cyrillic small a, then "dmin"
    "admin",
    "%C3%A9",  # é precomposed
    "e%CC%81",  # é decomposed
    "%F0%9F%98%80" * 128,  # 128 emoji: a stem too long for a file name, hashed
    "x" * 128,
]


def _files(root: pathlib.Path, skip: pathlib.Path | None = None) -> set[str]:
    found = set()
    for dirpath, dirnames, filenames in os.walk(root):
        here = pathlib.Path(dirpath)
        if skip is not None and (here == skip or skip in here.parents):
            dirnames.clear()
            continue
        found.update(str(here / name) for name in [*dirnames, *filenames])
    return found


async def test_attacker_instance_names_stay_inside_the_store(
    counter_rooms: list[RoomDefinition[Any]],
    tmp_path: pathlib.Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="verani")
    store = tmp_path / "store"
    outside = _files(tmp_path.parent, skip=tmp_path)
    accepted: dict[str, int] = {}  # decoded name -> connections that reached it
    with trio.fail_after(20):
        async with serve(counter_rooms, store) as server:
            for sent in MUST_REFUSE + MAY_ACCEPT:
                caplog.clear()
                async with RawSocket.open(server.port, f"/ws/counter/{sent}") as (sock, answer):
                    if isinstance(answer, RejectConnection):
                        assert answer.status_code == 400, sent[:40]
                        assert logged(caplog, "verani.server", "^400 .*bad room instance name")
                        continue
                    assert sent not in MUST_REFUSE, sent[:40]
                    assert isinstance(answer, AcceptConnection), answer
                    # Two spellings of one name ("...", "%2e%2e%2e") reach one instance.
                    name = urllib.parse.unquote(sent, errors="strict")
                    seen = accepted[name] = accepted.get(name, 0) + 1
                    assert (await sock.next_json())["data"]["count"] == seen - 1
                    await sock.send_json({"type": "counter:increment"})
                    assert (await sock.next_json())["data"]["count"] == seen
                    await sock.send(frame(CLOSE, (1000).to_bytes(2, "big")))
                    assert await sock.close_code() == 1000
            assert {"CON", "NUL", ".git", "...", r"..\..\windows", "\u202e"} <= set(accepted)
            # Only the accepted names woke a room; a refused one woke nothing.
            assert {s.instance for s in server.supervisor.status()} == set(accepted)
            await server.hibernate("counter")  # every document on disk
            await assert_still_serving(server)
    room_dir = store / "rooms" / "counter"
    documents = {}
    for path in room_dir.iterdir():
        assert path.resolve().parent == room_dir.resolve(), path
        assert len(path.name.encode()) <= 255, path.name
        document = orjson.loads(path.read_bytes())
        assert document["room"] == "counter"
        assert document["state"]["count"] == accepted[document["instance"]]
        documents[document["instance"]] = path
    assert set(documents) == set(accepted)
    # Nothing under tmp_path but the store's own files and those documents...
    expected = {store, store / "server.lock", store / "rooms", room_dir, *documents.values()}
    # ...and the journal's directory, empty after a clean shutdown.
    expected.add(store / "journal")
    assert {pathlib.Path(p) for p in _files(tmp_path)} == expected
    # ... and nothing appeared (or went) next to it.
    assert _files(tmp_path.parent, skip=tmp_path) == outside


# --- cross-site WebSocket hijacking -----------------------------------------------------------


def cookie_room(calls: list[str]) -> RoomDefinition[Any]:
    """A room trusting a session cookie, for pages of https://app.example only."""
    room = define_room(name="app", allowed_origins=["https://app.example"])

    @room.extract_meta
    def extract(request: HandshakeRequest) -> ConnectionMeta:
        calls.append(request.headers.get("origin", "(none)"))
        cookie = request.headers.get("cookie", "")
        cookies = dict(part.strip().partition("=")[::2] for part in cookie.split(";"))
        if cookies.get("session") != "alice-secret":
            raise HandshakeRefused(401, "not logged in")
        return ConnectionMeta(user_id="alice", client_id=str(uuid.uuid4()))

    @room.on("whoami")
    def whoami(ctx: RoomContext[Any], data: Any) -> None:
        ctx.emit.emit("me", {"user": ctx.meta.user_id})

    return room


EVIL_ORIGINS = [
    "https://evil.example",
    "http://app.example",
    "https://app.example:8443",
    "https://app.example.evil.example",
    "https://evil.example/https://app.example",
    "https://app.example@evil.example",
    "https://evil-app.example",
    "null",
    "file://",
    "",
    "https://app.example, https://evil.example",
    "https://xn--pp-6kc.example",  # an IDN lookalike
]


@asynccontextmanager
async def app_client(
    port: int, origin: str | None
) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    headers = [(b"Cookie", b"theme=dark; session=alice-secret")]
    if origin is not None:
        headers.append((b"Origin", origin.encode()))
    async with trio_websocket.open_websocket(
        "127.0.0.1", port, "/ws/app", use_ssl=False, extra_headers=headers
    ) as ws:
        try:
            yield ws
        finally:
            await trio.aclose_forcefully(ws._stream)


async def test_cross_site_upgrade_with_the_cookie_is_refused_before_extract_meta(
    counter_rooms: list[RoomDefinition[Any]],
    tmp_path: pathlib.Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="verani")
    calls: list[str] = []
    cookie = "theme=dark; session=alice-secret"
    with trio.fail_after(10):
        async with serve(counter_rooms, tmp_path, cookie_room(calls)) as server:
            for origin in EVIL_ORIGINS:
                caplog.clear()
                request = upgrade_request("/ws/app", Cookie=cookie, Origin=origin)
                status, _, body = await http_request(server.port, request)
                assert status == 403, (origin, body)
                assert logged(caplog, "verani.server", rf"^403 .*origin {re.escape(origin)} is not")
            # Two Origin headers, the allowed one among them.
            for first, second in (("app", "evil"), ("evil", "app")):
                request = upgrade_request(
                    "/ws/app", Cookie=cookie, Origin=f"https://{first}.example"
                )
                request = request[:-2] + f"Origin: https://{second}.example\r\n\r\n".encode()
                status, _, _ = await http_request(server.port, request)
                assert status == 403, (first, second)
            assert calls == []  # the room's code never ran for any of them
            assert_nothing_woken(server, tmp_path)

            # The allowed origin, spelled as browsers may, gets in with the cookie.
            for origin in ("https://app.example", "HTTPS://App.Example:443"):
                async with app_client(server.port, origin) as ws:
                    await ws.send_message('{"type":"whoami"}')
                    reply = orjson.loads(await ws.get_message())
                    assert reply["data"] == {"type": "me", "user": "alice"}
            assert calls == ["https://app.example", "HTTPS://App.Example:443"]
            await assert_still_serving(server)
