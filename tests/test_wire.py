"""Bad input over real sockets: HTTP answers before the upgrade, bad frames after it."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio_websocket

from verani import (
    ConnectionMeta,
    HandshakeRefused,
    HandshakeRequest,
    RoomContext,
    RoomDefinition,
    ServerConfig,
    define_room,
    open_server,
)

from helpers import connect, http_request, upgrade_request


async def test_http_answers_before_upgrade(
    tmp_path: Any, counter_rooms: list[RoomDefinition[Any]]
) -> None:
    with trio.fail_after(10):
        async with open_server(counter_rooms, store=str(tmp_path)) as server:
            status, headers, body = await http_request(
                server.port, b"GET /ws/counter HTTP/1.1\r\nHost: x\r\n\r\n"
            )
            assert (status, headers["upgrade"]) == (426, "websocket")
            assert b"WebSocket endpoint of room 'counter'" in body

            status, _, body = await http_request(server.port, upgrade_request("/nowhere"))
            assert status == 404 and b"no room is served at /nowhere" in body

            for bad in (
                "/ws/counter/..",
                "/ws/counter/%2e%2e",
                "/ws/counter/a%2Fb",
                "/ws/counter/%00",
                "/ws/counter/" + "x" * 200,
            ):
                status, _, body = await http_request(server.port, upgrade_request(bad))
                assert status == 400 and b"bad room instance name" in body, bad

            status, _, _ = await http_request(server.port, b"\x16\x03\x01garbage\r\n\r\n")
            assert status == 400
            status, _, _ = await http_request(
                server.port, upgrade_request("/ws/counter", Sec_WebSocket_Version="8")
            )
            assert status == 426

            # None of that touched a room or the store, and the server still serves.
            assert server.supervisor.status() == []
            assert not (tmp_path / "rooms").exists()
            async with connect(server.url) as client:
                await client.next_event("counter:sync")


async def test_bad_frames_change_nothing_and_get_an_error_event(
    tmp_path: Any, counter_rooms: list[RoomDefinition[Any]]
) -> None:
    with trio.fail_after(10):
        async with open_server(counter_rooms, store=str(tmp_path)) as server:
            async with connect(server.url, user_id="eve") as eve, connect(server.url) as other:
                await eve.next_event("counter:sync")
                await other.next_event("counter:sync")
                await eve.emit("counter:increment", {"amount": 2})
                await eve.next_event("counter:update")
                await other.next_event("counter:update")

                bad = ["not json", "[1]", '"x"', "{}", '{"type": 7}', '{"type":"x","channel":1}']
                for frame in bad:
                    await eve.send(frame)
                    _, data = await eve.next_event("verani:error")
                    assert data["code"] == "bad_frame"
                await eve.send(b'{"type": "counter:increment"}')
                _, data = await eve.next_event("verani:error")
                assert "binary frames" in data["message"]
                await eve.emit("counter:nope", {})
                _, data = await eve.next_event("verani:error")
                assert (data["code"], data["event"]) == ("unknown_event", "counter:nope")
                # A handler that refuses its input (amount must be an integer) changes nothing,
                # and the sender is told why (the room raised verani.ClientError).
                await eve.emit("counter:increment", {"amount": 1.5})
                _, data = await eve.next_event("verani:error")
                assert data == {
                    "type": "verani:error",
                    "code": "bad_amount",
                    "event": "counter:increment",
                    "message": "amount must be an integer, not 1.5",
                }

                await eve.emit("counter:get")
                _, data = await eve.next_event("counter:sync")
                assert data["count"] == 2
                assert server.stats.frames_dropped == len(bad) + 1
                # The other client saw nothing of it and still works.
                await other.emit("counter:get")
                assert (await other.recv())["data"] == {
                    "type": "counter:sync",
                    "count": 2,
                    "lastUpdatedBy": "eve",
                }


async def test_oversized_frame_closes_only_that_socket(
    tmp_path: Any, counter_rooms: list[RoomDefinition[Any]]
) -> None:
    config = ServerConfig(max_frame_size=1000)
    with trio.fail_after(10):
        async with open_server(counter_rooms, store=str(tmp_path), config=config) as server:
            async with connect(server.url) as big, connect(server.url) as other:
                await big.next_event("counter:sync")
                await other.next_event("counter:sync")
                await big.emit("counter:increment", {"pad": "x" * 2000})
                try:
                    while True:
                        await big.recv()
                except trio_websocket.ConnectionClosed as closed:
                    assert closed.reason is not None and closed.reason.code == 1009
                await other.emit("counter:increment")
                _, data = await other.next_event("counter:update")
                assert data["count"] == 1


def meta_room() -> Any:
    room = define_room(name="private")

    @room.extract_meta
    async def extract(request: HandshakeRequest) -> ConnectionMeta:
        token = request.query.get("token")
        if token is None:
            raise HandshakeRefused(401, "missing token")
        if token != "good":
            raise HandshakeRefused(403, "bad token")
        # The user id comes from the token check, not from the client's own claim.
        return ConnectionMeta(user_id="verified", client_id=request.query.get("cid", "c1"))

    @room.on("whoami")
    def whoami(ctx: RoomContext[Any], data: Any) -> None:
        ctx.emit.emit("me", {"user": ctx.meta.user_id, "client": ctx.meta.client_id})

    return room


async def test_extract_meta_refuses_before_upgrade_and_sets_meta(tmp_path: Any) -> None:
    with trio.fail_after(10):
        async with open_server([meta_room()], store=str(tmp_path)) as server:
            status, _, body = await http_request(server.port, upgrade_request("/ws/private"))
            assert (status, body) == (401, b"missing token")
            req = upgrade_request("/ws/private?token=nope")
            status, _, body = await http_request(server.port, req)
            assert (status, body) == (403, b"bad token")
            assert server.supervisor.status() == []  # no room code ran, nothing woke

            async with connect(server.url, "/ws/private?token=good&userId=admin") as client:
                await client.emit("whoami")
                _, data = await client.next_event("me")
                assert data == {"type": "me", "user": "verified", "client": "c1"}


async def test_duplicate_client_id_refuses_only_the_newcomer(tmp_path: Any) -> None:
    with trio.fail_after(10):
        async with open_server([meta_room()], store=str(tmp_path)) as server:
            async with connect(server.url, "/ws/private?token=good&cid=same") as first:
                await first.emit("whoami")
                await first.next_event("me")
                async with connect(server.url, "/ws/private?token=good&cid=same") as second:
                    with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                        await second.recv()
                    assert closed.value.reason is not None
                    assert closed.value.reason.code == 1008
                await first.emit("whoami")
                assert (await first.next_event("me"))[1]["client"] == "same"
