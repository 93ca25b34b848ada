"""Internal: the HTTP API other services reach rooms through, under ``/_verani/api``.

Off unless the server has an ``api_token``; then, on the server's own port:

- ``GET  /_verani/api/rooms``: every instance with its status (``verani inspect --json``);
- ``GET  /_verani/api/rooms/{room}/{instance}``: one instance (``verani inspect R/I --json``);
- ``POST /_verani/api/rooms/{room}/{instance}/emit``: ``{"event", "data", "channel"|"user_id"}``
  as a turn of that room (it wakes, and the answer waits for durability) → ``{"sent": N}``;
- ``POST /_verani/api/rooms/{room}/{instance}/hibernate``;
- ``POST /_verani/api/rooms/{room}/{instance}/disconnect``: ``{"client_id"}`` or ``{"user_id"}``
  closes that socket (every socket of that user) with 4000, as the room's ``actor.disconnect``
  → ``{"disconnected": N}``.

``GET /_verani/api/live`` is a WebSocket the admin page listens on (see :mod:`verani.live`).

Deciding what a request means (token, path, method, body) is pure and lives in the functions
here; the server reads the bytes and writes the answer, and :func:`perform` runs the decided
request against the running server.
"""

from __future__ import annotations

import functools
import hmac
import logging
import urllib.parse
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final, Literal

import attrs
import h11
import orjson
import trio

from .control import dispatch
from .errors import RoomNotFoundError, VeraniError
from .handshake import HttpAnswer
from .inspection import inspect_instance, list_instances
from .room import RoomDefinition
from .routing import InstanceRules
from .store import FileStore

if TYPE_CHECKING:
    from .server import Server

log = logging.getLogger("verani.api")

#: Every path of the API starts with this.
API_PREFIX: Final = "/_verani/api"

Action = Literal["rooms", "inspect", "emit", "hibernate", "disconnect"]

#: The one method each endpoint answers.
METHODS: Final[Mapping[Action, str]] = {
    "rooms": "GET",
    "inspect": "GET",
    "emit": "POST",
    "hibernate": "POST",
    "disconnect": "POST",
}

_EMIT_KEYS: Final = frozenset({"event", "data", "channel", "user_id"})


@attrs.frozen
class Endpoint:
    """What a request asks for: the ``action`` and, but for ``rooms``, which instance."""

    action: Action
    room: str = ""
    instance: str = ""


@attrs.frozen
class Emit:
    """A checked emit body: to ``user_id`` when set, otherwise to ``channel``."""

    event: str
    data: Any = None
    channel: str = "default"
    user_id: str | None = None


def json_answer(
    status: int, body: Mapping[str, Any], headers: tuple[tuple[str, str], ...] = ()
) -> HttpAnswer:
    """An answer whose body is ``body`` as JSON."""
    return HttpAnswer(
        status,
        orjson.dumps(body).decode(),
        headers,
        verbatim=True,
        content_type="application/json",
    )


def error(
    status: int, message: str, *, headers: tuple[tuple[str, str], ...] = (), **details: Any
) -> HttpAnswer:
    """An error answer: ``{"error": message, **details}``, with extra ``headers``."""
    return json_answer(status, {"error": message, **details}, headers)


def is_api_path(path: str) -> bool:
    """Whether ``path`` is under :data:`API_PREFIX` (the API answers it, when on)."""
    return path == API_PREFIX or path.startswith(API_PREFIX + "/")


def authorize(headers: Mapping[str, str], token: str) -> HttpAnswer | None:
    """The 401 for a request without ``Authorization: Bearer TOKEN``, or None when it has it."""
    scheme, _, credentials = headers.get("authorization", "").strip().partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        return error(
            401,
            "this API needs the header 'Authorization: Bearer TOKEN'",
            headers=(("WWW-Authenticate", 'Bearer realm="verani"'),),
        )
    # Constant time: how long a refusal takes must not tell how much of a guess was right.
    if not hmac.compare_digest(credentials.strip().encode(), token.encode()):
        return error(
            401,
            "the API token is wrong",
            headers=(("WWW-Authenticate", 'Bearer realm="verani", error="invalid_token"'),),
        )
    return None


def resolve(
    method: str,
    path: str,
    rooms: Mapping[str, RoomDefinition[Any]],
    rules: InstanceRules,
) -> Endpoint | HttpAnswer:
    """The endpoint ``method path`` reaches, or the answer saying why none does: 404 for an
    unknown path or room, 405 for the wrong method, 400 for a bad instance name."""
    segments = path[len(API_PREFIX) :].split("/")[1:] if is_api_path(path) else []
    if segments == ["rooms"]:
        endpoint = Endpoint("rooms")
    elif (
        len(segments) in (3, 4)
        and segments[0] == "rooms"
        and (len(segments) == 3 or segments[3] in ("emit", "hibernate", "disconnect"))
    ):
        try:
            room, instance = (urllib.parse.unquote(s, errors="strict") for s in segments[1:3])
        except UnicodeDecodeError:
            return error(400, "bad room instance name: it is not valid UTF-8")
        action: Action = "inspect" if len(segments) == 3 else segments[3]  # type: ignore[assignment]
        endpoint = Endpoint(action, room, instance)
    else:
        return error(404, f"no API endpoint at {path}", path=path)
    allowed = METHODS[endpoint.action]
    if method != allowed:
        return error(
            405,
            f"{path} answers {allowed}, not {method}",
            allow=allowed,
            headers=(("Allow", allowed),),
        )
    if endpoint.action == "rooms":
        return endpoint
    definition = rooms.get(endpoint.room)
    if definition is None:
        known = ", ".join(sorted(rooms)) or "(none)"
        return error(
            404, f"no room named {endpoint.room!r} is served (rooms: {known})", room=endpoint.room
        )
    problem = rules.problem(definition, endpoint.instance)
    if problem is not None:
        return error(400, f"bad room instance name: {problem}", instance=endpoint.instance)
    return endpoint


def parse_emit(body: bytes) -> Emit | HttpAnswer:
    """The emit a request body asks for, or the 400 saying what is wrong with it."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return error(400, f"the body is not JSON: {exc}")
    if not isinstance(obj, dict):
        return error(400, 'the body must be a JSON object: {"event": ..., "data": ...}')
    unknown = sorted(set(obj) - _EMIT_KEYS)
    if unknown:
        # A misspelt "userId" must not quietly become an emit to everyone on "default".
        return error(
            400,
            f"unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(_EMIT_KEYS))}",
            fields=unknown,
        )
    event = obj.get("event")
    if not isinstance(event, str) or not event:
        return error(400, '"event" must be given, as a non-empty string', field="event")
    channel, user_id = obj.get("channel"), obj.get("user_id")
    for name, value in (("channel", channel), ("user_id", user_id)):
        if value is not None and (not isinstance(value, str) or not value):
            return error(400, f'"{name}" must be a non-empty string', field=name)
    if channel is not None and user_id is not None:
        return error(400, 'give "channel" or "user_id", not both', field="user_id")
    return Emit(event, obj.get("data"), channel or "default", user_id)


@attrs.frozen
class Disconnect:
    """A checked disconnect body: one of ``client_id`` and ``user_id``."""

    client_id: str | None = None
    user_id: str | None = None


def parse_disconnect(body: bytes) -> Disconnect | HttpAnswer:
    """The disconnect a request body asks for, or the 400 saying what is wrong with it."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return error(400, f"the body is not JSON: {exc}")
    usage = 'the body must be {"client_id": ...} or {"user_id": ...}'
    if not isinstance(obj, dict) or len(obj) != 1 or not set(obj) <= {"client_id", "user_id"}:
        return error(400, usage)
    (name, value), *_ = obj.items()
    if not isinstance(value, str) or not value:
        return error(400, f'"{name}" must be a non-empty string', field=name)
    return Disconnect(**{name: value})


async def read_body(
    conn: h11.Connection, stream: trio.abc.ReceiveStream, limit: int
) -> bytes | HttpAnswer:
    """The body of the request ``conn`` read the head of: at most ``limit`` bytes, else 413."""
    body = bytearray()
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            return error(exc.error_status_hint, f"bad HTTP request: {exc}")
        if event is h11.NEED_DATA:
            data = await stream.receive_some(65536)
            if not data:
                return error(400, "the connection closed before the whole body")
            conn.receive_data(bytes(data))
            continue
        if isinstance(event, h11.Data):
            body += event.data
            if len(body) > limit:
                return too_large(limit)
            continue
        if isinstance(event, h11.EndOfMessage):
            return bytes(body)
        return error(400, "bad HTTP request")


def too_large(limit: int) -> HttpAnswer:
    """The 413 for a body over ``limit`` bytes."""
    return error(413, f"the body is over {limit} bytes, the frame size limit", limit=limit)


def declared_length(headers: Mapping[str, str]) -> int | None:
    """The ``Content-Length`` a request declares (None without one, or when h11 will refuse it)."""
    try:
        return int(headers.get("content-length", ""))
    except ValueError:
        return None


async def perform(server: Server, endpoint: Endpoint, body: bytes) -> HttpAnswer:
    """Run ``endpoint`` (already authorized and resolved) against ``server``."""
    try:
        return await _perform(server, endpoint, body)
    except RoomNotFoundError as exc:
        return error(404, str(exc))
    except VeraniError as exc:
        if server.supervisor.stopping:
            return error(503, "the server is shutting down", headers=(("Retry-After", "5"),))
        return error(500, str(exc))
    except Exception as exc:
        # A room's bug (a hook that raised while waking it): the caller gets no traceback.
        log.error(
            "API %s %s/%s failed", endpoint.action, endpoint.room, endpoint.instance, exc_info=exc
        )
        return error(500, f"the request failed ({type(exc).__name__}); see the server's log")


async def _perform(server: Server, endpoint: Endpoint, body: bytes) -> HttpAnswer:
    store = server.supervisor.store
    ask = functools.partial(dispatch, server)
    room, instance = endpoint.room, endpoint.instance
    cluster = server.supervisor.cluster
    if endpoint.action in ("rooms", "inspect") and cluster is not None:
        # What `verani inspect --cluster --json` shows: the cluster's view, from Redis.
        from .cluster.tools import cluster_report, cluster_rows

        if endpoint.action == "rooms":
            return json_answer(200, {"instances": await cluster_rows(cluster.url, None)})
        return json_answer(200, await cluster_report(cluster.url, room, instance))
    if endpoint.action in ("rooms", "inspect") and not isinstance(store, FileStore):
        return error(501, "inspection through the API needs a file store or a cluster")
    if endpoint.action == "rooms":
        assert isinstance(store, FileStore)
        return json_answer(200, {"instances": await list_instances(store, ask=ask)})
    if endpoint.action == "inspect":
        assert isinstance(store, FileStore)
        return json_answer(200, await inspect_instance(store, room, instance, ask=ask))
    if endpoint.action == "hibernate":
        results = await server.hibernate(room, instance)
        reply = {
            "ok": all(e is None for _, _, e in results),
            "hibernated": [{"room": r, "instance": i, "error": e} for r, i, e in results],
        }
        if not reply["ok"]:
            return json_answer(500, {"error": f"room {room}/{instance} could not save", **reply})
        return json_answer(200, reply)
    if endpoint.action == "disconnect":
        which = parse_disconnect(body)
        if isinstance(which, HttpAnswer):
            return which
        closed = await server.room(room, instance).disconnect(
            which.client_id, user_id=which.user_id
        )
        return json_answer(200, {"disconnected": closed})
    parsed = parse_emit(body)
    if isinstance(parsed, HttpAnswer):
        return parsed
    handle = server.room(room, instance)
    if parsed.user_id is not None:
        sent = await handle.emit_to_user(parsed.user_id, parsed.event, parsed.data)
    else:
        sent = await handle.emit_to_channel(parsed.channel, parsed.event, parsed.data)
    return json_answer(200, {"sent": sent})
