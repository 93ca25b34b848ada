"""The control endpoint, in process: bad requests get an answer and never hurt the server."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from verani import ControlError, NoServerError, RoomNotFoundError, StoreLockedError, open_server
from verani.control import control_request

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
            assert status["stats"] == {"connections": 0, "frames_dropped": 0, "http_rejected": 0}
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
