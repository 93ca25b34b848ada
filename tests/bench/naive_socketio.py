"""Baseline: the counter room on python-socketio, served by uvicorn (``pip install -e '.[bench]'``).

Socket.IO's rooms play the instances: a client connects to ``/socket.io/?EIO=4&transport=websocket
&userId=U&room=NAME``; ``counter:get`` answers ``counter:sync`` to the sender; ``counter:increment``
emits ``counter:update`` to the whole room. No persistence, as in the other baselines.

Usage: ``python tests/bench/naive_socketio.py PORT``; prints ``LISTENING <port>`` once bound.
"""

from __future__ import annotations

import socket
import sys
import urllib.parse
from typing import Any

import socketio  # type: ignore[import-untyped]
import uvicorn

sio = socketio.AsyncServer(async_mode="asgi", transports=["websocket"], cors_allowed_origins="*")
app = socketio.ASGIApp(sio)
counts: dict[str, int] = {}
users: dict[str, tuple[str, str]] = {}


@sio.event
async def connect(sid: str, environ: dict[str, Any], auth: Any = None) -> None:
    query = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""))
    user = query.get("userId", ["anonymous"])[0]
    room = query.get("room", ["default"])[0]
    users[sid] = (user, room)
    await sio.enter_room(sid, room)


@sio.event
async def disconnect(sid: str, *args: Any) -> None:
    users.pop(sid, None)


@sio.on("counter:get")
async def get(sid: str, data: Any = None) -> None:
    _, room = users[sid]
    await sio.emit("counter:sync", {"count": counts.get(room, 0)}, to=sid)


@sio.on("counter:increment")
async def increment(sid: str, data: Any = None) -> None:
    user, room = users[sid]
    counts[room] = count = counts.get(room, 0) + 1
    await sio.emit("counter:update", {"count": count, "updatedBy": user}, room=room)


if __name__ == "__main__":
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", int(sys.argv[1]) if len(sys.argv) > 1 else 0))
    print(f"LISTENING {sock.getsockname()[1]}", flush=True)
    config = uvicorn.Config(app, log_level="warning", backlog=2048)
    uvicorn.Server(config).run(sockets=[sock])
