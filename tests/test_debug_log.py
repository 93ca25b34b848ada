"""``--log-level debug``: what a person debugging a room needs to follow it, line by line."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import trio

from verani import RoomDefinition, open_server

from helpers import connect, logged


async def test_debug_log_follows_a_connection_its_events_the_store_and_hibernation(
    tmp_path: Any, counter_rooms: list[RoomDefinition[Any]], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="verani")

    def lines(pattern: str) -> list[str]:
        return logged(caplog, "verani", pattern, level=logging.DEBUG)

    with trio.fail_after(20):
        async with open_server(counter_rooms, store=str(tmp_path / "store")) as server:
            async with connect(server.url, user_id="alice") as alice:
                await alice.next_event("counter:sync")
                await alice.emit("counter:increment", {"amount": 2})
                await alice.next_event("counter:update")
            while server.supervisor.status()[0].sessions:
                await trio.sleep(0.01)
            await server.hibernate("counter", "default")
            async with connect(server.url, user_id="bob") as bob:
                assert (await bob.next_event("counter:sync"))[1]["count"] == 2

    room = "room counter/default"
    assert lines(rf"^{room}: awake \(initial state, 0 sessions\) in [\d.]+ ms$")
    assert lines(rf"^{room}: client [\w-]+ \(user alice\) connected; 1 connected$")
    assert lines(
        rf"^{room}: handled 'counter:increment' from client [\w-]+ \(user alice\) in [\d.]+ ms$"
    )
    assert lines(r"^room 'counter' instance 'default': saved \d+ bytes \(fsync\) in [\d.]+ ms$")
    assert lines(rf"^{room}: client [\w-]+ \(user alice\) disconnected \(\d+[^)]*\); 0 connected$")
    assert lines(rf"^{room}: hibernated on request$")
    assert lines(rf"^{room}: awake \(state restored, 0 sessions\) in [\d.]+ ms$")
