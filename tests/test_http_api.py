"""The HTTP API under /_verani/api: a real server on a free port, real HTTP (httpx or raw bytes),
the clients of verani.remote, and `verani emit --api` from a separate process."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import orjson
import pytest
import trio

from verani import RemoteError, Server, ServerConfig, open_server
from verani.loader import load_rooms
from verani.remote import AsyncRoomsClient, RoomsClient

from helpers import ROOMS, VERANI, connect, http_request, run, serving

TOKEN = "s3cret-token"
API = "/_verani/api"


@asynccontextmanager
async def api_server(
    store: pathlib.Path, token: str | None = TOKEN, **limits: Any
) -> AsyncIterator[tuple[Server, str]]:
    """The counter and channels rooms served with the API on (unless ``token`` is None); yields
    the server and its http:// URL."""
    rooms = load_rooms([ROOMS / "counter.py", ROOMS / "channels.py"])
    config = ServerConfig(api_token=token, **limits)
    async with open_server(rooms, store=str(store), durability="os", config=config) as server:
        yield server, f"http://127.0.0.1:{server.port}"


async def got(client: Any, name: str | None = None) -> tuple[str, Any]:
    """The next event (of ``name``) a client got, its data without the event's name in it."""
    event, data = await client.next_event(name)
    return event, {k: v for k, v in data.items() if k != "type"}


def bearer(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def verani_json(*args: str) -> Any:
    """Run the ``verani`` command in another process and parse what it printed."""
    done = await trio.run_process(
        [sys.executable, "-m", "verani", *args], capture_stdout=True, capture_stderr=True
    )
    return orjson.loads(done.stdout)


async def test_refused_without_a_token_or_with_a_wrong_one(tmp_path: pathlib.Path) -> None:
    async with api_server(tmp_path) as (_, base), httpx.AsyncClient(base_url=base) as http:
        for headers in ({}, bearer("wrong"), {"Authorization": f"Basic {TOKEN}"}):
            for method, path in (("GET", "/rooms"), ("POST", "/rooms/counter/x/emit")):
                answer = await http.request(method, API + path, headers=headers, json={})
                assert answer.status_code == 401
                assert answer.headers["www-authenticate"].startswith("Bearer")
                assert "error" in answer.json()
        # Refused before anything else: not even whether a path exists is told.
        assert (await http.get(f"{API}/nothing")).status_code == 401


async def test_the_api_is_off_without_a_token(tmp_path: pathlib.Path) -> None:
    async with api_server(tmp_path, token=None) as (_, base), httpx.AsyncClient() as http:
        for method, path in (("GET", "/rooms"), ("POST", "/rooms/counter/default/emit")):
            answer = await http.request(method, base + API + path, headers=bearer(), json={})
            assert answer.status_code == 404
            assert "no room is served" in answer.text


async def test_emit_reaches_a_channel_and_a_user_with_counts(tmp_path: pathlib.Path) -> None:
    async with api_server(tmp_path) as (server, base):
        async with AsyncRoomsClient(base, TOKEN) as rooms:
            async with (
                connect(server.url, "/ws/channels/lobby", "alice") as alice,
                connect(server.url, "/ws/channels/lobby", "bob") as bob,
                connect(server.url, "/ws/channels/lobby", "bob") as bob2,
            ):
                await alice.emit("channels:join", {"channel": "news"})
                await alice.next_event("channels:joined")
                assert await rooms.emit("channels", "lobby", "hello", {"n": 1}) == 3
                for client in (alice, bob, bob2):
                    assert await got(client, "hello") == ("hello", {"n": 1})
                sent = await rooms.emit("channels", "lobby", "flash", {"n": 2}, channel="news")
                assert sent == 1
                assert await got(alice, "flash") == ("flash", {"n": 2})
                assert (
                    await rooms.emit("channels", "lobby", "dm", {"l": [1, 2]}, user_id="bob") == 2
                )
                for client in (bob, bob2):
                    assert await got(client, "dm") == ("dm", {"l": [1, 2]})
                assert await rooms.emit("channels", "lobby", "dm", user_id="nobody") == 0
                # The next frame alice sees is the one after the emits she was not sent.
                assert await rooms.emit("channels", "lobby", "last") == 3
                assert await got(alice) == ("last", {})


async def test_emit_wakes_a_hibernated_room(tmp_path: pathlib.Path) -> None:
    async with api_server(tmp_path) as (server, base):
        async with AsyncRoomsClient(base, TOKEN) as rooms:
            async with connect(server.url, "/ws/counter/a", "zoe") as zoe:
                await zoe.next_event("counter:sync")
                await zoe.emit("counter:increment", {"amount": 5})
                await zoe.next_event("counter:update")
                reply = await rooms.hibernate("counter", "a")
                assert reply == {
                    "ok": True,
                    "hibernated": [{"room": "counter", "instance": "a", "error": None}],
                }
                assert (await rooms.inspect("counter", "a"))["status"] == "hibernated"
                assert await rooms.emit("counter", "a", "note", {"x": 1}) == 1
                assert await got(zoe, "note") == ("note", {"x": 1})
                report = await rooms.inspect("counter", "a")
                assert report["status"] == "awake"
                # Woken with its state from the store: the emit's turn ran in the restored room.
                assert report["live"]["state"]["count"] == 5
                assert report["stored"]["state"]["count"] == 5
            # Asleep already: nothing to do, and said so.
            await rooms.hibernate("counter", "a")
            assert await rooms.hibernate("counter", "a") == {"ok": True, "hibernated": []}


async def test_listing_and_inspect_equal_verani_inspect_json(tmp_path: pathlib.Path) -> None:
    async with api_server(tmp_path) as (server, base):
        async with AsyncRoomsClient(base, TOKEN) as rooms:
            for instance in ("a", "b"):
                async with connect(server.url, f"/ws/counter/{instance}") as client:
                    await client.next_event("counter:sync")
                    await client.emit("counter:increment")
                    await client.next_event("counter:update")
            await server.hibernate()  # no timer left in the reports: both are comparable
            listing = await rooms.rooms()
            assert [(r["instance"], r["status"]) for r in listing] == [
                ("a", "hibernated"),
                ("b", "hibernated"),
            ]
            cli = await verani_json("inspect", "--store", str(tmp_path), "--json")
            assert {"instances": listing} == cli
            report = await rooms.inspect("counter", "a")
            cli = await verani_json("inspect", "counter/a", "--store", str(tmp_path), "--json")
            assert report == cli
            assert report["stored"]["state"]["count"] == 1


async def test_every_error_has_its_status(tmp_path: pathlib.Path) -> None:
    async with (
        api_server(tmp_path, max_frame_size=1000) as (_, base),
        httpx.AsyncClient(base_url=base, headers=bearer()) as http,
    ):

        async def check(method: str, path: str, status: int, **kw: Any) -> httpx.Response:
            answer = await http.request(method, API + path, **kw)
            assert answer.status_code == status, answer.text
            assert answer.headers["content-type"] == "application/json"
            assert isinstance(answer.json()["error"], str)
            return answer

        emit = "/rooms/counter/x/emit"
        await check("GET", "/nothing", 404)
        await check("GET", "/rooms/", 404)
        await check("GET", "/rooms/counter/x/explode", 404)
        await check("POST", "/rooms/nope/x/emit", 404, json={"event": "e"})
        await check("GET", "/rooms/counter/never-seen", 404)
        await check("POST", "/rooms/nope/x/hibernate", 404)
        assert (await check("GET", emit, 405)).headers["allow"] == "POST"
        assert (await check("POST", "/rooms", 405)).headers["allow"] == "GET"
        assert (await check("DELETE", "/rooms/counter/x", 405)).headers["allow"] == "GET"
        await check("POST", emit, 413, json={"event": "e", "data": "x" * 2000})
        await check("POST", emit, 400, content=b"{not json")
        await check("POST", emit, 400, json=["event"])
        await check("POST", emit, 400, json={"data": 1})
        await check("POST", emit, 400, json={"event": ""})
        await check("POST", emit, 400, json={"event": "e", "userId": "bob"})
        await check("POST", emit, 400, json={"event": "e", "channel": "a", "user_id": "b"})
        await check("POST", emit, 400, json={"event": "e", "channel": 5})
        await check("POST", "/rooms/counter/%2E%2E/emit", 400, json={"event": "e"})
        await check("POST", "/rooms/counter/a%2Fb/emit", 400, json={"event": "e"})
        await check("POST", "/rooms/counter/%FF/emit", 400, json={"event": "e"})
        # The server goes on.
        assert (await http.post(API + emit, json={"event": "e"})).json() == {"sent": 0}


async def test_raw_bodies_over_the_limit_and_chunked(tmp_path: pathlib.Path) -> None:
    async with api_server(tmp_path, max_frame_size=1000) as (server, _):
        head = (
            f"POST {API}/rooms/counter/x/emit HTTP/1.1\r\nHost: h\r\n"
            f"Authorization: Bearer {TOKEN}\r\n"
        )
        # Declared too big: refused before a byte of the body is read.
        big = (head + "Content-Length: 5000\r\n\r\n").encode() + b"x" * 5000
        status, _, body = await http_request(server.port, big)
        assert status == 413 and b"1000" in body
        # Chunked, growing past the limit while read.
        chunk = b"x" * 600
        chunked = (
            (head + "Transfer-Encoding: chunked\r\n\r\n").encode()
            + (b"258\r\n" + chunk + b"\r\n") * 2
            + b"0\r\n\r\n"
        )
        status, _, _ = await http_request(server.port, chunked)
        assert status == 413
        small = b'{"event": "e"}'
        ok = (head + f"Transfer-Encoding: chunked\r\n\r\n{len(small):x}\r\n").encode() + (
            small + b"\r\n0\r\n\r\n"
        )
        status, headers, body = await http_request(server.port, ok)
        assert (status, orjson.loads(body)) == (200, {"sent": 0})
        assert headers["connection"] == "close"


async def test_the_sync_client_and_remote_errors(tmp_path: pathlib.Path) -> None:
    async with api_server(tmp_path) as (server, base):
        async with connect(server.url, "/ws/counter/s", "ann") as ann:
            await ann.next_event("counter:sync")

            def use() -> tuple[int, list[dict[str, Any]], dict[str, Any]]:
                with RoomsClient(base, TOKEN) as rooms:
                    sent = rooms.emit("counter", "s", "ping", {"a": 1}, user_id="ann")
                    return sent, rooms.rooms(), rooms.inspect("counter", "s")

            sent, listing, report = await trio.to_thread.run_sync(use)
            assert sent == 1
            assert await got(ann, "ping") == ("ping", {"a": 1})
            assert [(r["instance"], r["status"]) for r in listing] == [("s", "awake")]
            assert [s["user_id"] for s in report["live"]["sessions"]] == ["ann"]

        def fail(token: str, room: str) -> RemoteError:
            with RoomsClient(base, token) as rooms, pytest.raises(RemoteError) as caught:
                rooms.emit(room, "s", "x")
            return caught.value

        wrong = await trio.to_thread.run_sync(fail, "nope", "counter")
        assert (wrong.status, wrong.message) == (401, "the API token is wrong")
        missing = await trio.to_thread.run_sync(fail, TOKEN, "nope")
        assert missing.status == 404 and "no room named 'nope'" in missing.message
        async with AsyncRoomsClient(base, TOKEN) as rooms:
            with pytest.raises(RemoteError) as caught:
                await rooms.inspect("counter", "never")
            assert caught.value.status == 404
    async with AsyncRoomsClient(base, TOKEN, timeout=2) as rooms:
        with pytest.raises(RemoteError) as caught:
            await rooms.rooms()
        assert caught.value.status is None and "cannot reach" in caught.value.message


def test_verani_emit_api_from_another_process_wakes_a_hibernated_room(
    tmp_path: pathlib.Path,
) -> None:
    with serving(tmp_path, "--api-token", TOKEN) as (_, url):
        base = url.replace("ws://", "http://")
        assert (
            run("emit", f"{url}/ws/counter/w", "counter:increment", "--wait", "0").returncode == 0
        )
        assert run("hibernate", "counter/w", "--store", str(tmp_path)).returncode == 0
        with RoomsClient(base, TOKEN) as rooms:
            assert rooms.inspect("counter", "w")["status"] == "hibernated"
            sent = run("emit", "--api", base, "--token", TOKEN, "counter/w", "note", '{"a": 1}')
            assert (sent.returncode, sent.stderr) == (0, "")
            assert orjson.loads(sent.stdout) == {"sent": 0}
            assert rooms.inspect("counter", "w")["status"] == "awake"
        # The token from the environment, to a user; a wrong one fails with the server's message.
        from_env = subprocess.run(
            [*VERANI, "emit", "--api", base, "counter/w", "note", "--user-id", "zoe"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "VERANI_API_TOKEN": TOKEN},
        )
        assert (from_env.returncode, from_env.stdout) == (0, '{"sent":0}\n')
        wrong = run("emit", "--api", base, "--token", "bad", "counter/w", "note")
        assert wrong.returncode == 1
        assert "401" in wrong.stderr and "the API token is wrong" in wrong.stderr
