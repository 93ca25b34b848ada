"""Internal: the HTTP side of a connection — the request head, the upgrade checks, the answers.

Every socket starts here. The request head is read with h11 (bounded in size), checked against
the routes and RFC 6455's rules, and answered through the same h11 connection: a refusal with
its status and a reason in the body, or ``101 Switching Protocols`` for a well-formed upgrade to
a room path. Only then does :mod:`verani.transport` take the stream. Nothing here knows about
the server's limits or its logs; the server decides and this module speaks HTTP.
"""

from __future__ import annotations

import base64
import contextlib
import http
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import attrs
import h11
import trio
from wsproto.utilities import generate_accept_token

from .errors import HandshakeRefused
from .room import RoomDefinition, normalize_origin
from .routing import Route
from .sessions import ConnectionMeta, HandshakeRequest, default_meta


@attrs.frozen
class HttpAnswer:
    """An HTTP answer sent instead of the upgrade (a refusal, or an answer of the HTTP API):
    ``status``, a ``body`` (with a trailing newline unless ``verbatim``) and extra ``headers``."""

    status: int
    body: str
    headers: tuple[tuple[str, str], ...] = ()
    #: Send ``body`` byte for byte (a room's own refusal reason), without our trailing newline.
    verbatim: bool = False
    #: What ``body`` is: plain text, or JSON for the HTTP API (:mod:`verani.api`).
    content_type: str = "text/plain; charset=utf-8"

    def encode(self, conn: h11.Connection) -> bytes:
        """The whole answer (head and body), written by ``conn``: the h11 connection the request
        was read with, so h11 checks the answer against what was asked."""
        body = self.body.encode() if self.verbatim else (self.body + "\n").encode()
        try:
            phrase = http.HTTPStatus(self.status).phrase
        except ValueError:  # a status the standard library does not name (e.g. 499)
            phrase = ""
        headers = [
            ("Content-Type", self.content_type),
            ("Content-Length", str(len(body))),
            ("Connection", "close"),
            *self.headers,
        ]
        response = h11.Response(status_code=self.status, headers=headers, reason=phrase)
        return conn.send(response) + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())


@attrs.frozen
class RequestHead:
    """A complete request head: the h11 ``connection`` that read it (and will answer it), the
    ``request``, and the bytes read past it (a client may send its first frame at once)."""

    connection: h11.Connection
    request: h11.Request
    trailing: bytes


async def read_request_head(
    stream: trio.abc.ReceiveStream, limit: int
) -> RequestHead | tuple[h11.Connection, HttpAnswer]:
    """Read one request head of at most ``limit`` bytes; or the answer for a head that is not
    one, with the connection to send it through."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limit)
    raw = bytearray()
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            return conn, HttpAnswer(exc.error_status_hint, f"bad HTTP request: {exc}")
        if event is h11.NEED_DATA:
            data = bytes(await stream.receive_some(4096))
            raw += data
            conn.receive_data(data)
            if not data:
                # h11 learns of the early end too, so that it lets us answer.
                with contextlib.suppress(h11.RemoteProtocolError):
                    conn.next_event()
                return conn, HttpAnswer(400, "the connection closed before a complete request")
            continue
        if isinstance(event, h11.Request):
            # h11 knows where the head ended, whatever line endings it used.
            trailing = conn.trailing_data[0]
            # h11 bounds only a head still incomplete; a complete one may have come in a read
            # that crossed the limit.
            if len(raw) - len(trailing) > limit:
                return conn, HttpAnswer(431, f"the request head is over {limit} bytes")
            return RequestHead(conn, event, bytes(trailing))
        return conn, HttpAnswer(400, "bad HTTP request")


def accept_response(conn: h11.Connection, key: str) -> bytes:
    """The ``101 Switching Protocols`` answer to the upgrade request ``conn`` read, whose
    ``Sec-WebSocket-Key`` is ``key``."""
    token = generate_accept_token(key.encode("ascii")).decode("ascii")
    return conn.send(
        h11.InformationalResponse(
            status_code=101,
            headers=[
                ("Upgrade", "websocket"),
                ("Connection", "Upgrade"),
                ("Sec-WebSocket-Accept", token),
            ],
            reason="Switching Protocols",
        )
    )


def check_upgrade(request: h11.Request, route: Route | None, path: str) -> HttpAnswer | None:
    """The refusal for a request that is not a well-formed WebSocket upgrade to a room path."""
    headers = headers_of(request.headers)
    wants_ws = "websocket" in headers.get("upgrade", "").lower()
    if route is None:
        return HttpAnswer(404, f"no room is served at {path}")
    if not wants_ws:
        return HttpAnswer(
            426,
            f"{path} is a WebSocket endpoint of room {route.room.name!r}; connect with a "
            f"WebSocket client",
            (("Upgrade", "websocket"), ("Connection", "Upgrade")),
        )
    if route.error is not None:
        return HttpAnswer(400, f"bad room instance name: {route.error}")
    return check_websocket(request, headers)


def check_websocket(request: h11.Request, headers: dict[str, str]) -> HttpAnswer | None:
    """The refusal for a request that is not a well-formed RFC 6455 upgrade (any path)."""
    if request.method != b"GET":
        return HttpAnswer(405, "a WebSocket upgrade must use GET", (("Allow", "GET"),))
    problem = _upgrade_problem(request, headers)
    if problem is not None:
        return HttpAnswer(400, problem)
    if headers.get("sec-websocket-version") != "13":
        return HttpAnswer(
            426, "unsupported WebSocket version; use 13", (("Sec-WebSocket-Version", "13"),)
        )
    return None


def _upgrade_problem(request: h11.Request, headers: dict[str, str]) -> str | None:
    """Why a GET is not a well-formed RFC 6455 upgrade, checked here so that every refusal is
    ours (logged, with a reason) rather than a bare 400."""
    if request.http_version != b"1.1":
        return "a WebSocket upgrade needs HTTP/1.1"
    if headers.get("upgrade", "").strip().lower() != "websocket":
        return "the Upgrade header must be exactly 'websocket'"
    if "upgrade" not in [t.strip() for t in headers.get("connection", "").lower().split(",")]:
        return "the Connection header must include 'Upgrade'"
    if "content-length" in headers and headers["content-length"].strip() != "0":
        return "a WebSocket upgrade carries no body (Content-Length)"
    if "transfer-encoding" in headers:
        return "a WebSocket upgrade carries no body (Transfer-Encoding)"
    try:
        key = base64.b64decode(headers.get("sec-websocket-key", ""), validate=True)
    except ValueError:
        key = b""
    if len(key) != 16:
        return "Sec-WebSocket-Key must be 16 bytes in base64"
    return None


def check_origin(request: h11.Request, route: Route | None) -> HttpAnswer | None:
    """The refusal for a browser's upgrade from an origin the room does not allow."""
    allowed = route.room.allowed_origins if route is not None else None
    if route is None or allowed is None:
        return None
    origin = headers_of(request.headers).get("origin")
    # Browsers always send Origin on a WebSocket upgrade; a request without one is not a
    # browser's, so it cannot be a cross-site attempt riding on a user's cookies.
    if origin is None or normalize_origin(origin) in allowed:
        return None
    return HttpAnswer(403, f"origin {origin} is not allowed for room {route.room.name!r}")


def headers_of(raw: Sequence[tuple[bytes, bytes]]) -> dict[str, str]:
    """Header names lower-cased; repeated headers joined with ``", "``."""
    headers: dict[str, str] = {}
    for name, value in raw:
        key, text = name.decode("latin-1").lower(), value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return headers


async def extract_meta(
    room: RoomDefinition[Any],
    request: HandshakeRequest,
    log_refusal: Callable[[str], None],
    log_error: Callable[[str, BaseException | None], None],
) -> ConnectionMeta | HttpAnswer:
    """Run the room's ``extract_meta`` (or Verani's default) on ``request``: the meta, or the
    answer to refuse the connection with (the room's own refusal, or 500 for its bug)."""
    extract = room.hooks.extract_meta or default_meta
    where = f"room {room.name}/{request.instance}"
    try:
        result = extract(request)
        meta = await result if isinstance(result, Awaitable) else result
    except HandshakeRefused as refusal:
        log_refusal(f"{where}: refused connection from {request.remote}: {refusal}")
        return HttpAnswer(refusal.status, refusal.reason, verbatim=True)
    except Exception as exc:
        log_error(f"{where}: extract_meta raised {type(exc).__name__}: {exc}", exc)
        return HttpAnswer(500, "the room could not accept the connection")
    if not isinstance(meta, ConnectionMeta):
        log_error(f"{where}: extract_meta returned {meta!r}, not a ConnectionMeta", None)
        return HttpAnswer(500, "the room could not accept the connection")
    return meta
