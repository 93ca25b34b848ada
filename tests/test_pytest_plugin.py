"""The pytest fixtures verani installs (verani.pytest_plugin), as a room author uses them."""

from __future__ import annotations

from typing import Any

import pytest

from verani.testing import TestServer

from helpers import ROOMS


@pytest.fixture
def verani_rooms() -> list[Any]:
    return [ROOMS / "counter.py", ROOMS / "chat.py"]


async def test_verani_server_fixture_serves_the_named_rooms(verani_server: TestServer) -> None:
    assert sorted(r.name for r in verani_server.rooms) == ["chat", "counter"]
    client = await verani_server.connect("/ws/counter", user_id="ann")
    assert (await client.receive("counter:sync"))["count"] == 0
    await client.emit("counter:increment", {"amount": 4})
    assert (await client.receive("counter:update"))["count"] == 4
    assert (await verani_server.state("counter"))["count"] == 4
