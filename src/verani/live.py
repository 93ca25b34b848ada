"""Internal: the live inspector: the admin page's static files and the WebSocket it listens on.

Only with an API token (``verani serve --api-token``), on the server's own port:

- ``GET /_verani/admin`` (and ``/_verani/admin/admin.js``, ``/_verani/admin/admin.css``): the
  page, static files shipped in the package (``verani/admin/``), with a strict
  Content-Security-Policy;
- ``/_verani/api/live``: a WebSocket. A browser's upgrade from an origin other than the ``Host``
  it asks is refused (403). The first message must be ``{"type": "auth", "token": TOKEN}`` (the
  token is never in the URL); a wrong or missing token closes the socket with 4401.

Then the page says what it looks at, and may change it at any time:

- ``{"type": "list", "filter": TEXT, "offset": N, "limit": N}``: one page of the instances
  whose ``room/instance`` contains ``filter`` (case-insensitive), sorted;
- ``{"type": "watch", "room": R, "instance": I}`` (or without them: stop): one instance in detail;

and the server pushes, at once and then whenever it changed (looked at every
:data:`LIVE_INTERVAL` seconds; the page never polls the rooms):

- ``{"type": "hello", "rooms": {name: path}}`` once;
- ``{"type": "stats", ...}``: events, frames and store commits per second, and totals;
- ``{"type": "instances", "total", "offset", "limit", "filter", "rows": [...]}``;
- ``{"type": "detail", ...}``: what ``GET /_verani/api/rooms/R/I`` answers, plus ``rendered``:
  every value as ``verani inspect`` prints it; or ``{"type": "detail", "room", "instance",
  "error"}``.
"""

from __future__ import annotations

import functools
import hmac
import importlib.resources
import logging
import urllib.parse
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

import orjson
import trio

from .api import API_PREFIX
from .codec import make_codec
from .control import dispatch
from .errors import CorruptDocumentError, RoomNotFoundError, WebSocketClosed
from .handshake import HttpAnswer
from .inspection import inspect_instance
from .render import render
from .store import FileStore
from .transport import WebSocket

if TYPE_CHECKING:
    from .server import Server

log = logging.getLogger("verani.live")

#: The admin page.
ADMIN_PATH: Final = "/_verani/admin"
#: The live WebSocket the page listens on.
LIVE_PATH: Final = API_PREFIX + "/live"
#: Seconds between two looks at what the page watches.
LIVE_INTERVAL: Final = 1.0
#: Largest page of instances one list message may ask for.
MAX_PAGE: Final = 500
#: Largest message the page may send.
MAX_MESSAGE: Final = 16 * 1024
#: Live sockets open at once; past it, 503.
MAX_LIVE: Final = 32
#: Close code for a missing or wrong token.
UNAUTHORIZED: Final = 4401

_FILES: Final = {
    ADMIN_PATH: ("index.html", "text/html; charset=utf-8"),
    ADMIN_PATH + "/": ("index.html", "text/html; charset=utf-8"),
    ADMIN_PATH + "/admin.js": ("admin.js", "text/javascript; charset=utf-8"),
    ADMIN_PATH + "/admin.css": ("admin.css", "text/css; charset=utf-8"),
}

#: No inline script, no other origin, no framing: a value that slipped into the page as HTML
#: would still run nothing.
_STATIC_HEADERS: Final = (
    ("Cache-Control", "no-store"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("X-Frame-Options", "DENY"),
    (
        "Content-Security-Policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
)


def is_admin_path(path: str) -> bool:
    """Whether ``path`` is the admin page or one of its files."""
    return path == ADMIN_PATH or path.startswith(ADMIN_PATH + "/")


@functools.cache
def _read_static(name: str) -> str:
    return (importlib.resources.files("verani") / "admin" / name).read_text(encoding="utf-8")


def static_answer(method: str, path: str) -> HttpAnswer:
    """The answer to ``method path`` under :data:`ADMIN_PATH`: a file of the page, 404 or 405."""
    found = _FILES.get(path)
    if found is None:
        return HttpAnswer(404, f"no file at {path}")
    if method != "GET":
        return HttpAnswer(405, f"{path} answers GET, not {method}", (("Allow", "GET"),))
    name, content_type = found
    return HttpAnswer(
        200, _read_static(name), _STATIC_HEADERS, verbatim=True, content_type=content_type
    )


def check_origin(headers: Mapping[str, str]) -> HttpAnswer | None:
    """The 403 for a browser's upgrade from another origin than the host it asks (no Origin: not
    a browser, which cannot be a cross-site page riding on a user's session)."""
    origin = headers.get("origin")
    if origin is None:
        return None
    parts = urllib.parse.urlsplit(origin.strip())
    if parts.scheme in ("http", "https") and _host(parts.scheme, parts.netloc) == _host(
        parts.scheme, headers.get("host", "")
    ):
        return None
    return HttpAnswer(403, f"origin {origin} may not open {LIVE_PATH}: only the server's own page")


def _host(scheme: str, netloc: str) -> str:
    host = netloc.strip().lower()
    default = ":80" if scheme == "http" else ":443"
    return host.removesuffix(default)


def authorized(message: str | bytes, token: str) -> bool:
    """Whether the first message of a live socket carries ``token``."""
    try:
        obj = orjson.loads(message)
    except orjson.JSONDecodeError:
        return False
    given = obj.get("token") if isinstance(obj, dict) and obj.get("type") == "auth" else None
    # Constant time: how long a refusal takes must not tell how much of a guess was right.
    return isinstance(given, str) and hmac.compare_digest(given.encode(), token.encode())


async def serve_live(server: Server, ws: WebSocket) -> None:
    """Run one live socket (already upgraded) until either side closes it."""
    token = server.config.api_token
    assert token is not None
    code, reason = UNAUTHORIZED, "the API token is wrong"
    try:
        first: str | bytes = b""
        with trio.move_on_after(server.config.handshake_timeout):
            first = await ws.receive()
        if authorized(first, token):
            ending = await _Live(server, ws).run()
            if ending is None:
                return
            code, reason = ending
    except WebSocketClosed:
        return
    with trio.move_on_after(server.config.close_timeout):
        await ws.aclose(code, reason)


def _encode(message: Mapping[str, Any]) -> bytes:
    return orjson.dumps(message, option=orjson.OPT_NON_STR_KEYS)


class _Live:
    """One authorized live socket: what its page looks at, and what was last sent of each."""

    def __init__(self, server: Server, ws: WebSocket) -> None:
        self.server = server
        self.ws = ws
        self.filter = ""
        self.offset = 0
        self.limit = 50
        self.watch: tuple[str, str] | None = None
        self._wake = trio.Event()
        self._sent: dict[str, bytes] = {}
        self._sample: tuple[float, int, int, int] | None = None
        self.gone = False

    async def run(self) -> tuple[int, str] | None:
        """Push until the page goes (None) or the server stops (the close code and reason)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._read, nursery.cancel_scope)
            try:
                await self._loop()
            except WebSocketClosed:
                self.gone = True
            nursery.cancel_scope.cancel()
        return None if self.gone else (1001, "server shutting down")

    async def _loop(self) -> None:
        rooms = {r.name: r.websocket_path for r in self.server.router.rooms}
        await self._send({"type": "hello", "rooms": rooms, "interval": LIVE_INTERVAL})
        while not self.server.supervisor.stopping:
            self._wake = trio.Event()
            await self._push()
            with trio.move_on_after(LIVE_INTERVAL):
                await self._wake.wait()

    async def _read(self, scope: trio.CancelScope) -> None:
        while True:
            try:
                message = await self.ws.receive()
            except WebSocketClosed:
                self.gone = True
                scope.cancel()
                return
            try:
                obj = orjson.loads(message)
            except orjson.JSONDecodeError:
                continue
            if not isinstance(obj, dict):
                continue
            if obj.get("type") == "list":
                self.filter = _text(obj.get("filter"))[:200]
                self.offset = max(0, _int(obj.get("offset"), 0))
                self.limit = min(MAX_PAGE, max(1, _int(obj.get("limit"), 50)))
            elif obj.get("type") == "watch":
                room, instance = obj.get("room"), obj.get("instance")
                if isinstance(room, str) and isinstance(instance, str):
                    self.watch = (room, instance)
                else:
                    self.watch = None
                self._sent.pop("detail", None)
            self._wake.set()

    async def _send(self, message: Mapping[str, Any], kind: str | None = None) -> None:
        data = _encode(message)
        if kind is not None:
            if self._sent.get(kind) == data:
                return
            self._sent[kind] = data
        await self.ws.send_frames([data])

    async def _push(self) -> None:
        stats = self._stats()
        if stats is not None:
            await self._send(stats, "stats")
        await self._send(await self._instances(), "instances")
        if self.watch is not None:
            await self._send(await self._detail(*self.watch), "detail")

    def _stats(self) -> dict[str, Any] | None:
        server = self.server
        now = trio.current_time()
        sample = (
            now,
            server.stats.events_received,
            server.stats.frames_sent,
            server.supervisor.store.saves,
        )
        before, self._sample = self._sample, sample
        if before is not None and now - before[0] < LIVE_INTERVAL / 2:
            self._sample = before  # a look the page asked for: rates need a longer span
            return None
        span = now - before[0] if before is not None else 0.0

        def rate(i: int) -> float:
            return round((sample[i] - before[i]) / span, 1) if before is not None else 0.0

        instances = server.supervisor.instances.values()
        return {
            "type": "stats",
            "events_per_s": rate(1),
            "frames_per_s": rate(2),
            "commits_per_s": rate(3),
            "events": sample[1],
            "frames": sample[2],
            "commits": sample[3],
            "connections": server.open_connections,
            "awake": sum(1 for i in instances if i.awake),
        }

    async def _instances(self) -> dict[str, Any]:
        supervisor = self.server.supervisor
        store = supervisor.store
        keys = set(await store.list_instances()) | set(supervisor.instances)
        needle = self.filter.lower()
        names = sorted(k for k in keys if needle in f"{k[0]}/{k[1]}".lower())
        total, limit = len(names), self.limit
        offset = min(self.offset, max(0, (total - 1) // limit * limit))
        rows = [await self._row(*key) for key in names[offset : offset + limit]]
        return {
            "type": "instances",
            "total": total,
            "offset": offset,
            "limit": limit,
            "filter": self.filter,
            "rows": rows,
        }

    async def _row(self, room: str, instance: str) -> dict[str, Any]:
        supervisor = self.server.supervisor
        row: dict[str, Any] = {
            "room": room,
            "instance": instance,
            "bytes": None,
            "saved_at": None,
            "hibernates_in": None,
            "write_pending": False,
            "error": None,
        }
        store = supervisor.store
        if isinstance(store, FileStore):
            try:
                found = await store.peek(room, instance)
            except CorruptDocumentError as exc:
                found, row["error"] = None, str(exc)
            if found is not None:
                row["bytes"], row["saved_at"] = found[1], found[0].saved_at.isoformat()
        served = room in supervisor.rooms
        inst = supervisor.instances.get((room, instance))
        awake = inst is not None and inst.awake
        row["status"] = "stored" if not served else "awake" if awake else "hibernated"
        row["sessions"] = None if not served else len(inst.sessions) if inst else 0
        actor = inst.actor if inst is not None else None
        if awake and actor is not None and actor.state is not None:
            row["hibernates_in"] = round(actor.hibernates_in)
            row["write_pending"] = actor.write_pending
        return row

    async def _detail(self, room: str, instance: str) -> dict[str, Any]:
        store = self.server.supervisor.store
        base = {"type": "detail", "room": room, "instance": instance}
        if not isinstance(store, FileStore):
            return {**base, "error": "inspection needs a file store"}
        try:
            report = await inspect_instance(
                store, room, instance, ask=functools.partial(dispatch, self.server)
            )
        except RoomNotFoundError as exc:
            return {**base, "error": str(exc)}
        live = report["live"]
        if live and "hibernates_in" in live:
            live["hibernates_in"] = round(live["hibernates_in"])
        return {**base, **report, "rendered": rendered(report)}


def rendered(report: Mapping[str, Any]) -> dict[str, Any]:
    """Every value of an inspect report as ``verani inspect`` prints it."""
    stored, live = report.get("stored") or {}, report.get("live") or {}
    schedules = live.get("schedules", stored.get("schedules")) or {}
    return {
        "stored_state": _values(stored.get("state")),
        "storage": _values(stored.get("storage")),
        "live_state": _values(live.get("state")),
        "ephemeral": _values(live.get("ephemeral")),
        "schedules": {
            key: {
                "event": raw.get("event"),
                "due": raw.get("due"),
                "every": raw.get("every"),
                "data": _value(raw.get("data"), key),
            }
            for key, raw in schedules.items()
            if isinstance(raw, dict)
        },
    }


def _values(values: Mapping[str, Any] | None) -> dict[str, str]:
    return {key: _value(raw, key) for key, raw in (values or {}).items()}


def _value(raw: Any, key: str) -> str:
    try:
        return render(_codec().decode(raw, path=key))
    except CorruptDocumentError:
        return orjson.dumps(raw).decode()  # not a value this verani reads: shown as is


@functools.cache
def _codec() -> Any:
    return make_codec()


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _int(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default
