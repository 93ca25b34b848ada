"""Internal: WebSocket frames (RFC 6455 §5), sans-IO: bytes in, events out; no sockets, no Trio.

:class:`FrameReader` reads what a client sends. It is the whole receive side of the protocol —
framing, masking, fragmentation, UTF-8, control frames — and it enforces what a server of many
sockets needs from each peer, so that no client can make it grow memory or hold the event loop:

- a message is size-checked while its fragments arrive, not after it is buffered whole;
- a message may be cut into at most ``max_fragments`` frames (empty fragments cost nothing to
  send and would otherwise grow a list forever);
- control frames are limited per second (a token bucket on the clock the caller gives);
- the work of one call is bounded: after a few hundred frames or 64 KiB parsed without the
  caller yielding, :meth:`FrameReader.next_event` returns :data:`PAUSE`, so the caller lets the
  other sockets run before it parses on.

The functions below it write the frames a server sends (never masked).
"""

from __future__ import annotations

import codecs
import struct
import time
from collections.abc import Callable
from typing import Final

import attrs

#: Frames parsed between two pauses (see the module docstring).
BUDGET_FRAMES: Final = 256
#: Bytes parsed between two pauses.
BUDGET_BYTES: Final = 64 * 1024

TEXT, BINARY, CLOSE, PING, PONG = 0x1, 0x2, 0x8, 0x9, 0xA
_DATA_OPCODES = frozenset({0x0, TEXT, BINARY})
_CONTROL_OPCODES = frozenset({CLOSE, PING, PONG})


@attrs.frozen(slots=True)
class Ping:
    """The peer sent a Ping; answer with :func:`control_frame` (``PONG``, ``payload``)."""

    payload: bytes


@attrs.frozen(slots=True)
class CloseReceived:
    """The peer sent a Close frame (1005 when it carried no code)."""

    code: int
    reason: str


@attrs.frozen(slots=True)
class Violation:
    """The peer broke the protocol or a limit: close with ``code``, saying ``reason``."""

    code: int
    reason: str


class _Signal:
    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


#: :meth:`FrameReader.next_event`: no complete frame is buffered; feed more bytes.
NEED_DATA: Final = _Signal("NEED_DATA")
#: :meth:`FrameReader.next_event`: the work budget is spent; yield to the scheduler, then ask
#: again (nothing is lost).
PAUSE: Final = _Signal("PAUSE")

#: What :meth:`FrameReader.next_event` returns: a whole message (``str`` for text, ``bytes``
#: for binary), a control event, or a signal.
Event = str | bytes | Ping | CloseReceived | Violation | _Signal

_U16 = struct.Struct("!H")
_U64 = struct.Struct("!Q")


def _valid_close_code(code: int) -> bool:
    # RFC 6455 §7.4: the codes a peer may send; 1004-1006 and 1015 are reserved for reports.
    return code in (1000, 1001, 1002, 1003) or 1007 <= code <= 1014 or 3000 <= code <= 4999


class FrameReader:
    """Parses a client's frames into events; see the module docstring.

    ``max_message_size`` counts characters for text and bytes for binary messages.
    ``max_control_per_second`` is both the sustained rate and the burst allowed, measured on
    ``clock`` (seconds; asked only when a control frame arrives).
    """

    # One reader per open socket: slots keep an idle socket small.
    __slots__ = (
        "_buf",
        "_bytes",
        "_clock",
        "_control_rate",
        "_decoder",
        "_failed",
        "_fragments",
        "_frames",
        "_max",
        "_max_fragments",
        "_opcode",
        "_parts",
        "_size",
        "_tokens",
        "_tokens_at",
    )

    def __init__(
        self,
        *,
        max_message_size: int,
        max_fragments: int = 1024,
        max_control_per_second: float = 100.0,
        clock: Callable[[], float] = time.monotonic,
        data: bytes = b"",
    ) -> None:
        self._buf = bytearray(data)
        self._clock = clock
        self._max = max_message_size
        self._max_fragments = max_fragments
        self._control_rate = max_control_per_second
        self._tokens = max_control_per_second
        self._tokens_at: float | None = None
        # The message being reassembled from fragments: its opcode, parts, size, frame count.
        self._opcode = 0
        self._parts: list[str | bytes] = []
        self._size = 0
        self._fragments = 0
        self._decoder: codecs.IncrementalDecoder | None = None
        self._frames = 0
        self._bytes = 0
        self._failed: Violation | None = None

    def receive_data(self, data: bytes | bytearray) -> None:
        """Bytes from the peer, in order."""
        self._buf += data

    def next_event(self) -> Event:
        """The next event. After a :class:`Violation` every call returns that violation
        again."""
        if self._failed is not None:
            return self._failed
        while True:
            if self._frames >= BUDGET_FRAMES or self._bytes >= BUDGET_BYTES:
                self._frames = self._bytes = 0
                return PAUSE
            raw = self._buf
            # The frame nearly every message is — final, masked, text, under 126 bytes, no
            # message in progress — read here without the general path's calls and checks
            # (_next_frame makes exactly the same decisions for it).
            if len(raw) > 6 and raw[0] == 0x81 and raw[1] > 0x80 and raw[1] < 0xFE:
                size = raw[1] & 0x7F
                end = 6 + size
                if not self._opcode and len(raw) >= end:
                    mask = int.from_bytes((raw[2:6] * (size // 4 + 1))[:size], "little")
                    data = int.from_bytes(raw[6:end], "little") ^ mask
                    del raw[:end]
                    self._frames += 1
                    self._bytes += end
                    try:
                        text = data.to_bytes(size, "little").decode()
                    except UnicodeDecodeError as exc:
                        return self._fail(1007, f"invalid UTF-8 in a text message: {exc}")
                    if len(text) > self._max:
                        return self._fail(1009, f"message over {self._max} characters")
                    return text
            event = self._next_frame()
            if event is None:
                continue  # a frame that needs no event (a pong, a fragment)
            if isinstance(event, Violation):
                return self._fail(event.code, event.reason)
            if event is NEED_DATA:
                # The caller is about to wait for the socket, which yields: a fresh budget.
                self._frames = self._bytes = 0
            return event

    def _fail(self, code: int, reason: str) -> Violation:
        self._failed = Violation(code, reason)
        self._parts.clear()
        self._buf.clear()
        return self._failed

    def _next_frame(self) -> Event | None:
        raw = self._buf
        have = len(raw)
        if have < 2:
            return NEED_DATA
        first, second = raw[0], raw[1]
        opcode, size = first & 0x0F, second & 0x7F
        start = 6
        if size == 126:
            if have < 4:
                return NEED_DATA
            size = (raw[2] << 8) | raw[3]
            start = 8
            if size < 126:
                return Violation(1002, "a frame length not in its minimal encoding")
        elif size == 127:
            if have < 10:
                return NEED_DATA
            (size,) = _U64.unpack_from(raw, 2)
            start = 14
            if size >> 63:
                return Violation(1002, "a 64-bit frame length with its top bit set")
            if size < 65536:
                return Violation(1002, "a frame length not in its minimal encoding")
        if first & 0x70:
            return Violation(1002, "reserved bits set, but no extension was negotiated")
        if not second & 0x80:
            return Violation(1002, "a client frame must be masked")
        fin = first & 0x80
        if opcode in _CONTROL_OPCODES:
            if not fin:
                return Violation(1002, "a control frame must not be fragmented")
            if size > 125:
                return Violation(1002, "a control frame over 125 bytes")
        elif opcode in _DATA_OPCODES:
            if opcode == 0 and not self._opcode:
                return Violation(1002, "a continuation frame with no message to continue")
            if opcode and self._opcode:
                return Violation(1002, "a new message before the fragmented one was finished")
            # Refused before its bytes are buffered (a character takes at most 4 bytes); the
            # exact count of characters comes once the frame is decoded.
            if (opcode or self._opcode) == TEXT:
                too_big = size > 4 * self._max
            else:
                too_big = self._size + size > self._max
            if too_big:
                return Violation(1009, f"message over {self._max} characters")
        else:
            return Violation(1002, f"reserved opcode {opcode:#x}")
        end = start + size
        if have < end:
            return NEED_DATA
        payload = _unmask(raw, start, size)
        del raw[:end]
        self._frames += 1
        self._bytes += end
        if opcode >= CLOSE:
            return self._control(opcode, payload)
        if fin and not self._opcode:
            # The common case: a whole message in one frame.
            if opcode == TEXT:
                try:
                    text = payload.decode()
                except UnicodeDecodeError as exc:
                    return Violation(1007, f"invalid UTF-8 in a text message: {exc}")
                if len(text) > self._max:
                    return Violation(1009, f"message over {self._max} characters")
                return text
            return payload
        return self._fragment(opcode, payload, bool(fin))

    def _fragment(self, opcode: int, payload: bytes, fin: bool) -> Event | None:
        if opcode:
            self._opcode = opcode
            if opcode == TEXT:
                self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._fragments += 1
        if self._fragments > self._max_fragments:
            return Violation(1008, f"a message in over {self._max_fragments} fragments")
        part: str | bytes = payload
        if self._decoder is not None:
            try:
                part = self._decoder.decode(payload, final=fin)
            except UnicodeDecodeError as exc:
                return Violation(1007, f"invalid UTF-8 in a text message: {exc}")
        self._size += len(part)
        if self._size > self._max:
            return Violation(1009, f"message over {self._max} characters")
        if part:
            self._parts.append(part)
        if not fin:
            return None
        parts = self._parts
        text = self._decoder is not None
        self._opcode, self._parts, self._size, self._fragments = 0, [], 0, 0
        self._decoder = None
        if text:
            return "".join(parts)  # type: ignore[arg-type]
        return b"".join(parts)  # type: ignore[arg-type]

    def _control(self, opcode: int, payload: bytes) -> Event | None:
        # Token bucket: ``max_control_per_second`` as both rate and burst.
        rate, now = self._control_rate, self._clock()
        if self._tokens_at is not None:
            self._tokens = min(rate, self._tokens + (now - self._tokens_at) * rate)
        self._tokens_at = now
        if self._tokens < 1:
            return Violation(1008, f"over {rate:g} control frames per second")
        self._tokens -= 1
        if opcode == PING:
            return Ping(payload)
        if opcode == PONG:
            return None
        if not payload:
            return CloseReceived(1005, "")
        if len(payload) == 1:
            return Violation(1002, "a Close frame with a 1-byte payload")
        (code,) = _U16.unpack_from(payload)
        if not _valid_close_code(code):
            return Violation(1002, f"invalid close code {code}")
        try:
            reason = payload[2:].decode()
        except UnicodeDecodeError:
            return Violation(1007, "invalid UTF-8 in a close reason")
        return CloseReceived(code, reason)


def _unmask(raw: bytearray, start: int, size: int) -> bytes:
    if not size:
        return b""
    mask = bytes(raw[start - 4 : start])
    # One big-integer XOR runs in C; a loop over the bytes would cost more than the parsing.
    masked = int.from_bytes(raw[start : start + size], "little")
    key = int.from_bytes((mask * (size // 4 + 1))[:size], "little")
    return (masked ^ key).to_bytes(size, "little")


# --- frames the server sends -----------------------------------------------------------------

# The header of an unmasked, final text frame, for every payload length under 126.
_SHORT_HEADERS = [bytes((0x81, n)) for n in range(126)]
_MEDIUM_HEADER = struct.Struct("!BBH")
_LONG_HEADER = struct.Struct("!BBQ")


def text_frame_header(size: int) -> bytes:
    """The header of an unmasked (servers never mask), unfragmented text frame of ``size``
    payload bytes."""
    if size < 126:
        return _SHORT_HEADERS[size]
    if size < 65536:
        return _MEDIUM_HEADER.pack(0x81, 126, size)
    return _LONG_HEADER.pack(0x81, 127, size)


def encode_text_frame(payload: bytes) -> bytes:
    """One unmasked, unfragmented text frame carrying UTF-8 ``payload``."""
    return text_frame_header(len(payload)) + payload


def control_frame(opcode: int, payload: bytes = b"") -> bytes:
    """A Ping or Pong frame (``payload`` of at most 125 bytes)."""
    if len(payload) > 125:
        raise ValueError("a control frame carries at most 125 bytes")
    return bytes((0x80 | opcode, len(payload))) + payload


def close_frame(code: int | None, reason: str = "") -> bytes:
    """A Close frame with ``code`` and ``reason`` (cut to the 123 bytes that fit, on a
    character boundary); with no code, an empty one (the answer to a Close without a code)."""
    if code is None:
        return control_frame(CLOSE)
    data = reason.encode()[:123].decode(errors="ignore").encode()
    return control_frame(CLOSE, _U16.pack(code) + data)
