"""The control endpoint, in process: bad requests get an answer and never hurt the server."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from verani import ControlError, NoServerError, RoomNotFoundError, StoreLockedError, open_server
from verani.control import control_request
from verani.store import FileStore

from helpers import connect


async def test_bad_control_requests_are_answered_and_the_server_goes_on(
    tmp_path: Any, counter_rooms: Any
) -> None:
    with trio.fail_after(10):
        async with open_server(counter_rooms, store=str(tmp_path)) as server:
            bad = [
                {"op": "hibernate", "instance": "x"},
                {"op": "hibernate", "room": 5},
                {"op": "explode"},
                {"no": "op"},
            ]
            for request in bad:
                with pytest.raises(ControlError):
                    await control_request(tmp_path, request)
            with pytest.raises(RoomNotFoundError, match="no room named 'nope'"):
                await control_request(tmp_path, {"op": "hibernate", "room": "nope"})
            status = await control_request(tmp_path, {"op": "status"})
            assert status["rooms"] == {"counter": "/ws/counter"}
            assert status["stats"] == {
                "connections": 0,
                "frames_dropped": 0,
                "http_rejected": 0,
                "handshakes_dropped": 0,
                "accept_backoffs": 0,
                "ping_timeouts": 0,
                "events_received": 0,
                "frames_sent": 0,
            }
            assert (status["store_saves"], status["revive_ms"]) == (0, [])
            async with connect(server.url) as client:
                await client.next_event("counter:sync")


async def test_one_server_per_store_and_no_server_after_stop(
    tmp_path: Any, counter_rooms: Any
) -> None:
    long_store = tmp_path / ("a-rather-long-directory-name-" * 5) / "store"
    with trio.fail_after(10):
        async with open_server(counter_rooms, store=str(long_store)):
            with pytest.raises(StoreLockedError, match="already served by another verani server"):
                async with open_server(counter_rooms, store=str(long_store)):
                    pass  # pragma: no cover - never entered
            # The socket path is short even though the store path is long.
            status = await control_request(long_store, {"op": "status"})
            assert status["ok"] is True
        with pytest.raises(NoServerError, match="no verani server is running"):
            await control_request(long_store, {"op": "status"})


def _set_count(actor: Any) -> None:
    actor.room_state.count = 7


async def test_status_counts_saves_and_revivals_and_a_big_reply_arrives_whole(
    tmp_path: Any, counter_rooms: Any
) -> None:
    # 700 instances with long names: the hibernate reply (~100 KB) is over the request limit.
    names = [f"{i:04d}-" + "n" * 120 for i in range(700)]
    with trio.fail_after(60):
        async with open_server(counter_rooms, store=FileStore(tmp_path, durability="os")) as server:
            for name in names:
                await server.room("counter", name).call(_set_count)
            reply = await control_request(tmp_path, {"op": "hibernate"})
            assert reply["ok"] is True
            assert sorted(r["instance"] for r in reply["hibernated"]) == names
            status = await control_request(tmp_path, {"op": "status"})
            assert status["store_saves"] >= len(names)
            assert status["revive_ms"] == []  # nothing was stored before: no revival yet
            async with connect(server.url, f"/ws/counter/{names[0]}") as client:
                await client.next_event("counter:sync")
            await control_request(tmp_path, {"op": "hibernate", "room": "counter"})
            status = await control_request(tmp_path, {"op": "status"})
            assert len(status["revive_ms"]) == 1 and status["revive_ms"][0] > 0
