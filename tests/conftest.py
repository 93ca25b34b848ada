from __future__ import annotations

import pathlib
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from verani import RoomDefinition
from verani.loader import load_rooms

sys.path.insert(0, __file__.rsplit("/", 1)[0])  # tests/helpers.py

from redis_server import RedisServer

from helpers import ROOMS


@pytest.fixture
def counter_rooms() -> list[RoomDefinition[Any]]:
    """The seed's counter room, loaded from rooms/counter.py as `verani serve` loads it."""
    return load_rooms([ROOMS / "counter.py"])


@pytest.fixture
def redis_server(tmp_path: pathlib.Path) -> Iterator[RedisServer]:
    """A real ``redis-server`` of this test alone (a fresh one is faster than flushing a shared
    one and keeps tests that stop it apart); fails, never skips, when Redis is not installed."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """``redis://127.0.0.1:PORT/0`` of :func:`redis_server`."""
    return redis_server.url
