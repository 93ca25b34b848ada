"""Internal: connection-state recovery — a session's numbered frames, kept for a reconnect.

A room defined with ``recovery=Recovery(...)`` gives each socket a *session log*: a token (the
client's proof that it is the same session), the offset of the last event frame sent to it, and
the last frames themselves (bounded in count and bytes). Every event frame the room sends that
socket gets a top-level ``"offset"``. When the socket drops, the session stays in its room,
detached, for ``max_disconnect`` seconds: frames sent to it are only logged, and its
``on_disconnect`` waits. A reconnect with ``?recover=TOKEN&offset=N`` takes the session back and
gets the frames after ``N`` first. Logs are part of the room's stored document (its ``recovery``
section), written with its state, so they survive hibernation and restarts.
"""

from __future__ import annotations

import collections
import secrets
from typing import Any, Final, TypeAlias

import attrs

from .codec import JSONValue
from .sessions import ConnectionMeta

#: The event a recoverable room sends first on every connection.
SESSION_EVENT: Final = "verani:session"

#: Query parameters of a reconnect that asks for its session back.
RECOVER_PARAM: Final = "recover"
OFFSET_PARAM: Final = "offset"

_EVENT_PREFIX: Final = b'{"type":"event",'


@attrs.frozen
class Recovery:
    """Connection-state recovery for a room (``define_room(..., recovery=Recovery())``).

    ``max_disconnect``: seconds a dropped session waits for its client to come back;
    ``max_frames`` and ``max_bytes``: how much of what was sent to a session is kept for it.
    """

    max_disconnect: float = 120.0
    max_frames: int = 500
    max_bytes: int = 1024 * 1024

    def __attrs_post_init__(self) -> None:
        if not self.max_disconnect > 0:
            raise ValueError(f"max_disconnect must be > 0, not {self.max_disconnect!r}")
        if self.max_frames < 1 or self.max_bytes < 1:
            raise ValueError("max_frames and max_bytes must be >= 1")


@attrs.frozen
class ResumeRequest:
    """What a reconnect asked for: ``?recover=TOKEN&offset=N``."""

    token: str
    offset: int


def resume_request(query: dict[str, str]) -> ResumeRequest | None:
    """The resume a handshake's query asks for, if it is well formed (else none: a new
    session, never an error)."""
    token = query.get(RECOVER_PARAM)
    raw = query.get(OFFSET_PARAM, "0")
    if not token or len(token) > 128 or not raw.isdigit() or len(raw) > 18:
        return None
    return ResumeRequest(token, int(raw))


def new_token() -> str:
    """An unguessable session token (192 bits)."""
    return secrets.token_urlsafe(24)


def number_frame(frame: bytes, offset: int) -> bytes | None:
    """``frame`` with a top-level ``"offset"``, if it is an event frame (None otherwise)."""
    if not frame.startswith(_EVENT_PREFIX):
        return None
    return b'{"type":"event","offset":%d,' % offset + frame[len(_EVENT_PREFIX) :]


class SessionLog:
    """One recoverable session: its token, last offset and kept frames (see the module)."""

    def __init__(
        self,
        config: Recovery,
        token: str,
        *,
        offset: int = 0,
        frames: list[tuple[int, bytes]] | None = None,
    ) -> None:
        self.config = config
        self.token = token
        self.offset = offset
        self.frames: collections.deque[tuple[int, bytes]] = collections.deque(frames or ())
        self.size = sum(len(f) for _, f in self.frames)
        #: While detached: Trio's time when the session ends, and the wall time (epoch s).
        self.deadline: float | None = None
        self.expires: float | None = None
        #: The close that detached it, for its deferred ``on_disconnect``.
        self.close_code = 1006
        self.close_reason: str | None = None
        #: Read from the store (no socket of this process had it): its meta is only the
        #: identity part of the original.
        self.restored = False
        #: What the store holds of this log as of the last commit that carried it (None:
        #: nothing known): a commit carries only what changed since (see :meth:`changes`).
        self.stored: LogMark | None = None

    def number(self, frame: bytes) -> bytes:
        """Give ``frame`` the next offset and keep it (a non-event frame is returned as is)."""
        numbered = number_frame(frame, self.offset + 1)
        if numbered is None:
            return frame
        self.offset += 1
        self.frames.append((self.offset, numbered))
        self.size += len(numbered)
        cfg = self.config
        while self.frames and (len(self.frames) > cfg.max_frames or self.size > cfg.max_bytes):
            self.size -= len(self.frames.popleft()[1])
        return numbered

    def after(self, offset: int) -> list[bytes] | None:
        """The frames after ``offset``, in order; None when some of them are no longer kept
        (or ``offset`` is past what was sent)."""
        if offset > self.offset:
            return None
        first = self.frames[0][0] if self.frames else self.offset + 1
        if offset < first - 1:
            return None
        return [f for o, f in self.frames if o > offset]

    @property
    def first(self) -> int:
        """The offset of the first kept frame (the next one's when none is kept)."""
        return self.frames[0][0] if self.frames else self.offset + 1

    def encode_meta(self, meta: ConnectionMeta) -> dict[str, JSONValue]:
        """The log as the store keeps it, but its frames: the session's non-frame part."""
        return {
            "user_id": meta.user_id,
            "client_id": meta.client_id,
            "channels": list(meta.channels),
            "offset": self.offset,
            "expires": self.expires,
            "close_code": self.close_code,
        }

    def encode(self, meta: ConnectionMeta) -> JSONValue:
        """The log as the store keeps it."""
        return {**self.encode_meta(meta), "frames": [[o, f.decode()] for o, f in self.frames]}

    def changes(
        self, meta: ConnectionMeta
    ) -> tuple[dict[str, JSONValue] | None, dict[str, JSONValue] | None, LogMark]:
        """What a commit writes of this log, given what the store has (:attr:`stored`): the
        non-frame part when it is new or changed, the frames appended and dropped since
        (``{"from": FIRST_KEPT, "add": [[offset, frame], ...]}``, see
        :class:`~verani.store.base.Changes`), each None when unchanged; and what the store has
        once that commit is stored (for :attr:`stored`, set when it is)."""
        part = self.encode_meta(meta)
        first = self.first
        mark = (part, first, self.offset)
        stored = self.stored
        if stored is None:
            frames: list[JSONValue] = [[o, f.decode()] for o, f in self.frames]
            return part, {"from": first, "add": frames}, mark
        stored_part, stored_first, stored_last = stored
        added: list[JSONValue] = []
        for o, f in reversed(self.frames):
            if o <= stored_last:
                break
            added.append([o, f.decode()])
        added.reverse()
        put = part if part != stored_part else None
        delta: dict[str, JSONValue] | None = None
        if added or first != stored_first or put is not None:
            # With a put always: a put without frames would replace the stored log whole.
            delta = {"from": first, "add": added}
        return put, delta, mark


#: What the store holds of a session log: its non-frame part, first kept offset, last offset.
LogMark: TypeAlias = tuple[dict[str, JSONValue], int, int]


def stored_mark(raw: Any) -> LogMark | None:
    """What a stored log (as :meth:`SessionLog.encode` made it) holds, for
    :attr:`SessionLog.stored`; None when it is not one."""
    try:
        frames = raw["frames"]
        offset = int(raw["offset"])
        first = int(frames[0][0]) if frames else offset + 1
        part = {k: v for k, v in raw.items() if k != "frames"}
    except (KeyError, TypeError, ValueError, IndexError, AttributeError):
        return None
    return part, first, offset


def decode_log(config: Recovery, token: str, raw: Any) -> tuple[SessionLog, ConnectionMeta]:
    """A stored log and the meta it was for; raises KeyError, TypeError or ValueError when it
    is not one."""
    frames = [(int(o), str(f).encode()) for o, f in raw["frames"]]
    log = SessionLog(config, token, offset=int(raw["offset"]), frames=frames)
    log.stored = stored_mark(raw)
    expires = raw.get("expires")
    log.expires = float(expires) if expires is not None else None
    log.close_code = int(raw.get("close_code", 1006))
    channels = raw["channels"]
    if not isinstance(channels, list) or not all(isinstance(c, str) for c in channels):
        raise TypeError("channels must be a list of strings")
    meta = ConnectionMeta(str(raw["user_id"]), str(raw["client_id"]), list(channels))
    return log, meta
