from __future__ import annotations

import sys
from typing import Any

import pytest

from verani import RoomDefinition
from verani.loader import load_rooms

sys.path.insert(0, __file__.rsplit("/", 1)[0])  # tests/helpers.py

from helpers import ROOMS


@pytest.fixture
def counter_rooms() -> list[RoomDefinition[Any]]:
    """The seed's counter room, loaded from rooms/counter.py as `verani serve` loads it."""
    return load_rooms([ROOMS / "counter.py"])
