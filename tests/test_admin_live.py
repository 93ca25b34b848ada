"""The live inspector's server side: the page's files, the live WebSocket (/_verani/api/live) and
the disconnect endpoint of the HTTP API, on a real server (the page itself: test_admin_page.py)."""

from __future__ import annotations

import pathlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import orjson
import pytest
import trio
import trio_websocket

from verani import RemoteError, Server, ServerConfig, open_server
from verani.loader import load_rooms
from verani.remote import AsyncRoomsClient

from helpers import ROOMS, connect, http_request, upgrade_request

TOKEN = "live-token"

LIVE = "/_verani/api/live"


@asynccontextmanager
async def api_server(
    store: pathlib.Path, token: str | None = TOKEN
) -> AsyncIterator[tuple[Server, str]]:
    """The counter and channels rooms served with the API on (unless ``token`` is None)."""
    rooms = load_rooms([ROOMS / "counter.py", ROOMS / "channels.py"])
    config = ServerConfig(api_token=token)
    async with open_server(rooms, store=str(store), durability="os", config=config) as server:
        yield server, f"http://127.0.0.1:{server.port}"


@asynccontextmanager
async def open_live(url: str) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """A WebSocket to ``url``, its TCP stream closed however it ends (trio-websocket's client
    leaves it open when the server closed first)."""
    async with trio_websocket.open_websocket_url(url) as ws:
        try:
            yield ws
        finally:
            await trio.aclose_forcefully(ws._stream)


async def live_messages(ws: trio_websocket.WebSocketConnection, kind: str) -> dict[str, Any]:
    """The next message of type ``kind`` the live socket pushes."""
    while True:
        message: dict[str, Any] = orjson.loads(await ws.get_message())
        if message["type"] == kind:
            return message


async def test_the_page_is_served_only_with_a_token(tmp_path: pathlib.Path) -> None:
    async with api_server(tmp_path / "a") as (_, base), httpx.AsyncClient(base_url=base) as http:
        page = await http.get("/_verani/admin")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert '<script type="module" src="/_verani/admin/admin.js">' in page.text
        script = await http.get("/_verani/admin/admin.js")
        assert script.headers["content-type"].startswith("text/javascript")
        assert "innerHTML" not in script.text
        assert (await http.get("/_verani/admin/admin.css")).status_code == 200
        assert (await http.get("/_verani/admin/nope.js")).status_code == 404
        assert (await http.post("/_verani/admin")).status_code == 405
    async with api_server(tmp_path / "b", token=None) as (_, base):
        async with httpx.AsyncClient(base_url=base) as http:
            assert (await http.get("/_verani/admin")).status_code == 404
            assert (await http.get("/_verani/admin/admin.js")).status_code == 404


async def test_the_live_socket_refuses_a_wrong_token_and_other_origins(
    tmp_path: pathlib.Path,
) -> None:
    async with api_server(tmp_path) as (server, base):
        url = base.replace("http://", "ws://") + LIVE
        async with open_live(url) as ws:
            await ws.send_message(orjson.dumps({"type": "auth", "token": "wrong"}).decode())
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                await ws.get_message()
            assert closed.value.reason.code == 4401
        async with open_live(url) as ws:
            await ws.send_message("not even JSON")
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                await ws.get_message()
            assert closed.value.reason.code == 4401
        host = f"127.0.0.1:{server.port}"
        status, _, body = await http_request(
            server.port, upgrade_request(LIVE, Host=host, Origin="http://evil.example")
        )
        assert status == 403, body
        # The page's own origin is welcome.
        async with trio_websocket.open_websocket_url(
            url, extra_headers=[(b"Origin", f"http://{host}".encode())]
        ) as ws:
            await ws.send_message(orjson.dumps({"type": "auth", "token": TOKEN}).decode())
            assert (await live_messages(ws, "hello"))["rooms"]


async def test_the_live_socket_pushes_stats_instances_and_one_instance(
    tmp_path: pathlib.Path,
) -> None:
    async with api_server(tmp_path) as (server, base):
        async with connect(server.url, "/ws/counter/x", user_id="ann") as client:
            await client.next_event("counter:sync")
            await client.emit("counter:increment", {"amount": 2})
            await client.next_event("counter:update")
            url = base.replace("http://", "ws://") + LIVE
            async with open_live(url) as ws:
                await ws.send_message(orjson.dumps({"type": "auth", "token": TOKEN}).decode())
                hello = await live_messages(ws, "hello")
                assert hello["rooms"] == {"counter": "/ws/counter", "channels": "/ws/channels"}
                stats = await live_messages(ws, "stats")
                assert stats["connections"] == 1 and stats["events"] >= 1
                await ws.send_message(
                    orjson.dumps({"type": "list", "filter": "X", "limit": 10}).decode()
                )
                listed = await live_messages(ws, "instances")
                while listed["filter"] != "X":
                    listed = await live_messages(ws, "instances")
                assert listed["total"] == 1
                (row,) = listed["rows"]
                assert (row["room"], row["instance"], row["status"]) == ("counter", "x", "awake")
                assert row["sessions"] == 1 and row["hibernates_in"] > 0
                watch = {"type": "watch", "room": "counter", "instance": "x"}
                await ws.send_message(orjson.dumps(watch).decode())
                detail = await live_messages(ws, "detail")
                assert detail["rendered"]["live_state"] == {
                    "count": "2",
                    "last_updated_by": "'ann'",
                }
                assert detail["live"]["sessions"][0]["user_id"] == "ann"
                # A change is pushed: no request from the page.
                await client.emit("counter:increment", {"amount": 1})
                with trio.fail_after(5):
                    while detail["rendered"]["live_state"]["count"] != "3":
                        detail = await live_messages(ws, "detail")


async def test_disconnect_through_the_api(tmp_path: pathlib.Path) -> None:
    async with api_server(tmp_path) as (server, base):
        async with connect(server.url, "/ws/counter/d", user_id="bo") as client:
            await client.next_event("counter:sync")
            async with AsyncRoomsClient(base, token=TOKEN) as rooms:
                assert await rooms.disconnect("counter", "d", user_id="nobody") == 0
                info = await rooms.inspect("counter", "d")
                client_id = info["live"]["sessions"][0]["client_id"]
                assert await rooms.disconnect("counter", "d", client_id=client_id) == 1
                with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                    while True:
                        await client.recv()
                assert closed.value.reason.code == 4000
                with pytest.raises(TypeError):
                    await rooms.disconnect("counter", "d")
            async with httpx.AsyncClient(
                base_url=base, headers={"Authorization": f"Bearer {TOKEN}"}
            ) as http:
                path = "/_verani/api/rooms/counter/d/disconnect"
                for body in ({}, {"client_id": 1}, {"client_id": "a", "user_id": "b"}, []):
                    reply = await http.post(path, json=body)
                    assert reply.status_code == 400, (body, reply.text)
                assert (await http.get(path)).status_code == 405
            with pytest.raises(RemoteError):
                async with AsyncRoomsClient(base, token="wrong") as rooms:
                    await rooms.disconnect("counter", "d", user_id="bo")
