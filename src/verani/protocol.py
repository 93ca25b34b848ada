"""Internal: the wire protocol, shared with Verani's JavaScript client: pure encoding and decoding.

Client → server: ``{"type": EVENT, "data": PAYLOAD, "channel"?: CHANNEL, "id"?: ID}``;
``{"type": "ping"}`` is answered with ``{"type": "pong"}``.

Server → client: ``{"type": "event", "channel": CHANNEL, "data": {"type": EVENT, ...PAYLOAD}}``.
Verani's client unwraps ``data.type`` as the event name and hands ``data`` to its listeners.

Acknowledgements (opt-in: Verani's client never sends an ``"id"``, so it never sees one): a client
frame with an ``"id"`` (an integer, or a string of at most :data:`MAX_ACK_ID_LENGTH` characters) is
answered, once the turn's changes are durable, with ``{"type": "ack", "id": ID, "data": RESULT}``
or ``{"type": "ack", "id": ID, "error": {"code": CODE, "message": MESSAGE}}``.

Both directions live here, and the rest of verani encodes and decodes through them. The server's
side: :func:`decode_frame` reads what a client sends, :func:`encode_event` and :func:`encode_frame`
write what it sends back. The client's side (:mod:`verani.client`, :mod:`verani.testing`,
``verani emit``): :func:`encode_client_event` and :data:`PING_MESSAGE` write what a client sends,
:func:`decode_server_frame`, :func:`server_event` and :func:`is_pong` read what the server sends
back.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Mapping
from typing import Any, Final

import attrs
import orjson

from .errors import FrameEncodeError, FrameTooLargeError, ProtocolError

#: Default limit on one client frame, in characters of the decoded text.
MAX_FRAME_SIZE: Final = 1024 * 1024

#: The event name Verani's client and ours use for keepalive.
PING: Final = "ping"

#: Answer to an application-level ``{"type": "ping"}``; encoded once for every socket.
PONG_FRAME: Final = b'{"type":"pong"}'

#: Event sent to a client whose frame was dropped, so a developer sees why nothing happened.
ERROR_EVENT: Final = "verani:error"

#: A client's keepalive, as the text of one WebSocket message (a text frame, never binary: the
#: server refuses binary frames).
PING_MESSAGE: Final = '{"type":"ping"}'

#: The ``type`` of a server frame that carries an event; the event's own name is in ``data.type``.
EVENT_FRAME: Final = "event"

#: The ``type`` of the server's answer to :data:`PING_MESSAGE`.
PONG: Final = "pong"

#: The ``type`` of the server's answer to a client frame that carried an ``"id"``.
ACK: Final = "ack"

#: The longest string a client frame's ``"id"`` may be, in characters.
MAX_ACK_ID_LENGTH: Final = 64

#: What a client frame's ``"id"`` may be.
AckId = int | str


@attrs.frozen
class ClientFrame:
    """One decoded client frame: the event name, its payload, the optional channel, and the
    optional ``id`` the client wants an acknowledgement for (None: no answer is sent)."""

    type: str
    data: Any = None
    channel: str | None = None
    id: AckId | None = None


def decode_frame(message: str | bytes, *, max_size: int = MAX_FRAME_SIZE) -> ClientFrame:
    """Decode one client WebSocket message, or raise :class:`ProtocolError` saying why not.

    Binary messages are refused: the protocol is JSON text, and Verani's client never sends binary.
    """
    if isinstance(message, bytes):
        raise ProtocolError("binary frames are not part of the protocol; send JSON text frames")
    if len(message) > max_size:
        raise FrameTooLargeError(f"frame of {len(message)} characters is over the {max_size} limit")
    try:
        obj = orjson.loads(message)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"frame is not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"frame must be a JSON object, not {type(obj).__name__}")
    event = obj.get("type")
    if not isinstance(event, str) or not event:
        raise ProtocolError('frame has no "type" string naming the event')
    channel = obj.get("channel")
    if channel is not None and not isinstance(channel, str):
        raise ProtocolError('frame "channel" must be a string when present')
    return ClientFrame(type=event, data=obj.get("data"), channel=channel, id=_ack_id(obj))


def _ack_id(obj: dict[str, Any]) -> AckId | None:
    """The frame's ``"id"``, checked: ``null`` counts as none (JSON has no ``undefined``)."""
    ack_id = obj.get("id")
    if ack_id is None:
        return None
    # bool is an int to Python, but true/false are no ids; integers past 64 bits arrive as
    # floats from orjson and are refused with them.
    if isinstance(ack_id, int) and not isinstance(ack_id, bool):
        return ack_id
    if isinstance(ack_id, str):
        if len(ack_id) > MAX_ACK_ID_LENGTH:
            raise ProtocolError(
                f'frame "id" is a string of {len(ack_id)} characters; at most '
                f"{MAX_ACK_ID_LENGTH} are allowed"
            )
        return ack_id
    kind = "boolean" if isinstance(ack_id, bool) else _JSON_KINDS.get(type(ack_id), "value")
    raise ProtocolError(f'frame "id" must be an integer or a string, not a {kind}')


_JSON_KINDS: Final = {float: "number with a fraction", list: "list", dict: "object"}


def event_payload(event: str, data: Any) -> dict[str, Any]:
    """The ``data`` object of a server frame: the payload's keys with ``type`` set to ``event``.

    A dict payload is spread into it, as Verani's ``{type: event, ...data}`` does; the event name
    wins over a ``type`` key in the payload so the client dispatches on the name the room chose.
    Any other payload (a list, a number) travels under ``"data"``.
    """
    if data is None:
        return {"type": event}
    if isinstance(data, dict):
        return {**data, "type": event}
    return {"type": event, "data": data}


def encode_event(channel: str, event: str, data: Any) -> bytes:
    """Encode one server → client event frame (UTF-8 JSON), once, ready to be sent to any number
    of sockets."""
    return _dumps(
        {"type": EVENT_FRAME, "channel": channel, "data": event_payload(event, data)}, event
    )


def encode_ack(ack_id: AckId, data: Any) -> bytes:
    """Encode ``{"type": "ack", "id": ack_id, "data": data}``: the answer to a client frame
    that carried ``ack_id``. Raises :class:`FrameEncodeError` when ``data`` cannot be encoded."""
    return _dumps({"type": ACK, "id": ack_id, "data": data}, None)


def encode_ack_error(ack_id: AckId, code: str, message: str) -> bytes:
    """Encode ``{"type": "ack", "id": ack_id, "error": {"code": code, "message": message}}``:
    the answer to a client frame that carried ``ack_id`` and could not be handled."""
    return _dumps({"type": ACK, "id": ack_id, "error": {"code": code, "message": message}}, None)


def encode_frame(channel: str, data: Any) -> bytes:
    """Encode ``{"type": "event", "channel": channel, "data": data}`` with ``data`` as given
    (Verani's ``broadcast`` and ``sendToUser``)."""
    return _dumps({"type": EVENT_FRAME, "channel": channel, "data": data}, None)


def encode_client_event(
    event: str, data: Any = None, *, channel: str | None = None, ack_id: AckId | None = None
) -> str:
    """Encode one client → server event, ``{"type": event, "data": data}`` (``"data": null``
    when there is none, as Verani's client sends it), with ``"channel"`` only when given, and
    ``"id"`` only when ``ack_id`` is given (the server then answers with an ack frame).

    Returns text: it must go out as a text frame. Raises :class:`FrameEncodeError` (a
    :class:`TypeError`) naming the event when ``data`` is not JSON-serialisable.
    """
    frame: dict[str, Any] = {"type": event, "data": data}
    if channel is not None:
        frame["channel"] = channel
    if ack_id is not None:
        frame["id"] = ack_id
    try:
        return orjson.dumps(frame).decode()
    except TypeError as exc:
        # No big-integer fallback here, unlike the server's encoder: the server reads integers
        # past 64 bits as floats, so sending one would change its value on the way.
        raise FrameEncodeError(
            f"cannot send event {event!r}: its data is not JSON-serialisable ({exc})"
        ) from None


def decode_server_frame(message: str | bytes) -> dict[str, Any]:
    """Decode one server → client message into its JSON object, or raise
    :class:`ProtocolError` saying why it is not one.

    Any object is returned, whatever its ``type``: the client reads the ones it knows with
    :func:`server_event` and :func:`is_pong`, and passes over the others, so a newer server's
    frames do not break an older client.
    """
    try:
        frame = orjson.loads(message)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"the server sent a frame that is not JSON ({exc})") from None
    if not isinstance(frame, dict):
        raise ProtocolError(f"the server sent a frame that is not a JSON object: {message!r}")
    return frame


def is_pong(frame: Mapping[str, Any]) -> bool:
    """Whether a decoded server frame is the answer to a client's ping."""
    return frame.get("type") == PONG


@attrs.frozen
class AckAnswer:
    """A decoded ack frame: the ``id`` it answers, and either ``data`` (the handler's result)
    or ``error`` (``{"code", "message"}``)."""

    id: AckId
    data: Any = None
    error: dict[str, Any] | None = None


def ack_answer(frame: Mapping[str, Any]) -> AckAnswer | None:
    """The answer a decoded server frame carries, if it is an ack frame with a usable id; an
    ``error`` that is not an object is read as one with code ``"bad_answer"``."""
    ack_id = frame.get("id")
    if frame.get("type") != ACK or not isinstance(ack_id, int | str) or isinstance(ack_id, bool):
        return None
    if "error" not in frame:
        return AckAnswer(ack_id, frame.get("data"))
    error = frame["error"]
    if not isinstance(error, dict):
        error = {"code": "bad_answer", "message": f"the server sent an error that is {error!r}"}
    return AckAnswer(ack_id, None, error)


def event_data(frame: Mapping[str, Any]) -> dict[str, Any] | None:
    """The ``data`` object of a decoded server event frame, as listeners get it; ``None`` for a
    frame that is not an event, or whose ``data`` is not an object."""
    data = frame.get("data")
    if frame.get("type") != EVENT_FRAME or not isinstance(data, dict):
        return None
    return data


def server_event(frame: Mapping[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """``(event, data)`` of a decoded server event frame, as Verani's client dispatches it: the
    name is ``data.type``. ``None`` for any other frame, and for an event whose ``data`` has no
    string ``type`` (no listener could be named by it)."""
    data = event_data(frame)
    if data is None:
        return None
    name = data.get("type")
    return (name, data) if isinstance(name, str) else None


def _dumps(frame: dict[str, Any], event: str | None) -> bytes:
    try:
        encoded = orjson.dumps(frame)
        # orjson's bytes keep the 4 KiB buffer they were written into; a frame may wait in
        # queues (held for the disk, queued for a slow socket), so keep only what it needs.
        return bytes(memoryview(encoded)) if len(encoded) < 2048 else encoded
    except TypeError as exc:
        problem: Exception = exc
    if "64-bit" in str(problem):
        # orjson refuses integers past 64 bits; JSON has no such limit (a JavaScript client
        # reads them as its numbers do). Rare, so the slower encoder only serves this case.
        try:
            # ASCII escapes: a lone surrogate (which orjson refuses) cannot reach the wire as
            # invalid UTF-8.
            return json.dumps(frame, separators=(",", ":"), default=_plain).encode()
        except (TypeError, ValueError) as exc:
            problem = exc
    what = f"event {event!r}" if event is not None else "a frame"
    raise FrameEncodeError(f"cannot send {what}: its data is not JSON-serialisable ({problem})")


def _plain(value: Any) -> Any:
    # What orjson writes natively, for the fallback encoder.
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError(f"Type is not JSON serializable: {type(value).__name__}")
