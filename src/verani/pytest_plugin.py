"""pytest fixtures for room authors, loaded automatically when verani is installed.

In a ``conftest.py`` name the rooms under test, then take ``verani_server`` in async tests
(pytest-trio runs them)::

    @pytest.fixture
    def verani_rooms():
        return ["rooms/counter.py"]

    async def test_sync_on_connect(verani_server):
        client = await verani_server.connect("/ws/counter", user_id="ann")
        assert (await client.receive("counter:sync"))["count"] == 0
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from .testing import TestServer, open_test_server


@pytest.fixture
def verani_rooms() -> list[Any]:
    """The rooms ``verani_server`` serves: override it with room definitions or file paths."""
    raise pytest.UsageError(
        "verani_server needs a verani_rooms fixture: define one in conftest.py returning the "
        "room definitions or room files to serve, e.g. ['rooms/counter.py']"
    )


@pytest.fixture
async def verani_server(
    verani_rooms: list[Any], request: pytest.FixtureRequest
) -> AsyncIterator[TestServer]:
    """A test server (in-memory store, 127.0.0.1 port 0) serving ``verani_rooms``; relative
    room paths are found as :func:`open_test_server` finds them, from the test's file."""
    async with open_test_server(*verani_rooms, relative_to=request.path) as server:
        yield server
