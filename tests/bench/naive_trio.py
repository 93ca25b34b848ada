"""Baseline: the counter room written by hand on trio-websocket — "what you'd write yourself".

Same wire protocol and semantics as ``rooms/counter.py`` (``/ws/counter/NAME``, ``userId`` from
the query, ``counter:sync`` on connect, ``counter:update`` to every socket of the instance on
each increment), no framework, no persistence, one ``send_message`` per frame, a broadcast that
awaits each socket in turn.

Usage: ``python tests/bench/naive_trio.py [PORT]``; prints ``LISTENING <port>``.
"""

from __future__ import annotations

import sys
import urllib.parse
from typing import Any

import orjson
import trio
import trio_websocket


class Counter:
    def __init__(self) -> None:
        self.count = 0
        self.sockets: set[trio_websocket.WebSocketConnection] = set()


COUNTERS: dict[str, Counter] = {}


def frame(data: dict[str, Any]) -> str:
    return orjson.dumps({"type": "event", "channel": "default", "data": data}).decode()


async def handler(request: trio_websocket.WebSocketRequest) -> None:
    parts = urllib.parse.urlsplit(request.path)
    if not parts.path.startswith("/ws/counter"):
        await request.reject(404)
        return
    instance = parts.path.removeprefix("/ws/counter").strip("/") or "default"
    user = urllib.parse.parse_qs(parts.query).get("userId", ["anonymous"])[0]
    ws = await request.accept()
    counter = COUNTERS.setdefault(instance, Counter())
    counter.sockets.add(ws)
    try:
        await ws.send_message(frame({"type": "counter:sync", "count": counter.count}))
        while True:
            message = orjson.loads(await ws.get_message())
            if message.get("type") == "ping":
                await ws.send_message('{"type":"pong"}')
            elif message.get("type") == "counter:increment":
                counter.count += (message.get("data") or {}).get("amount", 1)
                update = frame(
                    {"type": "counter:update", "count": counter.count, "updatedBy": user}
                )
                for other in list(counter.sockets):
                    try:
                        await other.send_message(update)
                    except trio_websocket.ConnectionClosed:
                        counter.sockets.discard(other)
    except trio_websocket.ConnectionClosed:
        pass
    finally:
        counter.sockets.discard(ws)


async def main(port: int) -> None:
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            trio_websocket.serve_websocket, handler, "127.0.0.1", port, None
        )
        print(f"LISTENING {server.port}", flush=True)


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]) if len(sys.argv) > 1 else 0)
