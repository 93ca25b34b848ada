"""The seed's counter room as a plain `websockets` server, written from DESIGN.md §5 alone.

It shares no code with verani, so tests can check verani's client against a second, independent
implementation of the wire protocol:

- client → server: ``{"type": EVENT, "data": PAYLOAD}``; ``{"type": "ping"}`` is answered with
  ``{"type": "pong"}`` (unless ``--no-pong``);
- server → client: ``{"type": "event", "channel": "default", "data": {"type": EVENT, ...}}``;
- ``/ws/counter`` is instance ``default``, ``/ws/counter/NAME`` instance ``NAME``; ``userId`` comes
  from the query string (else ``"anonymous"``). Counts live in memory only.

Usage: ``python tests/interop/websockets_counter_server.py PORT [--no-pong]`` (PORT may be 0).
Prints ``LISTENING <port>`` once it accepts connections, then ``CONNECTED <userId>`` and
``DISCONNECTED <userId>`` per connection, and runs until killed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import urllib.parse
from http import HTTPStatus
from typing import Any

from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

ROOM_PATH = "/ws/counter"


class Counter:
    """One instance of the counter room: its state and its connections."""

    def __init__(self) -> None:
        self.count = 0
        self.last_updated_by: str | None = None
        self.connections: set[ServerConnection] = set()

    def sync(self) -> str:
        return frame("counter:sync", count=self.count, lastUpdatedBy=self.last_updated_by)


def frame(event: str, **payload: Any) -> str:
    return json.dumps({"type": "event", "channel": "default", "data": {"type": event, **payload}})


def amount_of(data: Any) -> int:
    amount = data.get("amount", 1) if isinstance(data, dict) else 1
    return amount if isinstance(amount, int) and not isinstance(amount, bool) else 1


def instance_name(path: str) -> str | None:
    """The instance a request path names, or None when it is not the counter room's."""
    if path == ROOM_PATH:
        return "default"
    name = path.removeprefix(ROOM_PATH + "/")
    if name != path and name and "/" not in name:
        return name
    return None


class CounterServer:
    def __init__(self, *, pong: bool) -> None:
        self.pong = pong
        self.instances: dict[str, Counter] = {}

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = urllib.parse.urlsplit(request.path).path
        if instance_name(path) is None:
            return connection.respond(HTTPStatus.NOT_FOUND, f"no room is served at {path}\n")
        return None

    async def handle(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        parts = urllib.parse.urlsplit(ws.request.path)
        room = self.instances.setdefault(instance_name(parts.path) or "default", Counter())
        user_id = urllib.parse.parse_qs(parts.query).get("userId", ["anonymous"])[0]
        room.connections.add(ws)
        print("CONNECTED", user_id, flush=True)
        try:
            await ws.send(room.sync())
            async for message in ws:
                await self.on_message(ws, room, user_id, message)
        except ConnectionClosed:
            pass
        finally:
            room.connections.discard(ws)
            print("DISCONNECTED", user_id, flush=True)

    async def on_message(
        self, ws: ServerConnection, room: Counter, user_id: str, message: str | bytes
    ) -> None:
        try:
            msg = json.loads(message)
        except ValueError:
            return  # not JSON: dropped
        if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
            return
        event, data = msg["type"], msg.get("data")
        if event == "ping":
            if self.pong:
                await ws.send(json.dumps({"type": "pong"}))
        elif event in ("counter:increment", "counter:decrement"):
            sign = 1 if event == "counter:increment" else -1
            room.count += sign * amount_of(data)
            room.last_updated_by = user_id
            update = frame("counter:update", count=room.count, updatedBy=user_id)
            broadcast(room.connections, update)
        elif event == "counter:reset":
            room.count = 0
            room.last_updated_by = user_id
            broadcast(room.connections, frame("counter:reset", resetBy=user_id))
        elif event == "counter:get":
            await ws.send(room.sync())


async def main(port: int, *, pong: bool) -> None:
    server = CounterServer(pong=pong)
    # No protocol-level pings: keepalive is the client's {"type": "ping"} alone.
    async with serve(
        server.handle,
        "127.0.0.1",
        port,
        process_request=server.process_request,
        ping_interval=None,
    ) as ws_server:
        (sock,) = ws_server.sockets
        print("LISTENING", sock.getsockname()[1], flush=True)
        await ws_server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", type=int, help="the port on 127.0.0.1 to listen on (0: any)")
    parser.add_argument("--no-pong", action="store_true", help='never answer {"type": "ping"}')
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C: stop quietly
        asyncio.run(main(args.port, pong=not args.no_pong))
