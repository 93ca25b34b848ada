"""rooms/poll.py: a poll that closes itself at its time, asleep or restarted meanwhile."""

from __future__ import annotations

import pathlib
import subprocess
import sys
from typing import Any

import trio

from verani.store import FileStore, MemoryStore
from verani.testing import open_test_server

from helpers import ROOMS

POLL = ROOMS / "poll.py"
HOUR = 3600


async def test_the_poll_closes_on_time_after_hibernation_and_a_restart(
    autojump_clock: Any,
) -> None:
    # The memory store: no worker threads, so Trio's virtual clock never jumps past a write.
    async with open_test_server(POLL, store=MemoryStore(), idle_timeout=60) as server:
        ann = await server.connect("/ws/poll", user_id="ann")
        await ann.receive("poll:state")
        await ann.emit(
            "poll:open", {"question": "lunch?", "options": ["pizza", "soup"], "seconds": HOUR}
        )
        opened = await ann.receive("poll:state")
        assert opened["closed"] is False and opened["closesAt"]
        await ann.emit("poll:vote", {"option": "soup"})
        assert (await ann.receive("poll:state"))["tally"] == {"pizza": 0, "soup": 1}
        await ann.emit("poll:vote", {"option": "tea"})
        error = await ann.receive("verani:error")
        assert (error["code"], error["event"]) == ("bad_option", "poll:vote")
        started = trio.current_time()
        await server.restart()  # every room saved and asleep; a new server on the same store
        assert not server.server.supervisor.instances
        bob = await server.connect("/ws/poll", user_id="bob")
        assert (await bob.receive("poll:state"))["tally"] == {"pizza": 0, "soup": 1}
        await bob.emit("poll:vote", {"option": "pizza"})
        await bob.receive("poll:state")
        await bob.close()
        await trio.sleep(300)  # idle: the room hibernates long before it closes
        inst = server.server.supervisor.instances.get(("poll", "default"))
        assert inst is None or not inst.awake
        carol = await server.connect("/ws/poll", user_id="carol")
        await carol.receive("poll:state")
        ran = await server.advance_to_next_schedule()
        assert ran is not None and ran[:2] == ("poll", "default") and ran[2].id == "close"
        assert trio.current_time() - started >= HOUR - 1
        closed = await carol.receive("poll:closed")
        assert closed == {
            "type": "poll:closed",
            "question": "lunch?",
            "tally": {"pizza": 1, "soup": 1},
            "winner": None,
        }
        assert (await server.state("poll"))["closed"] is True
        assert await server.advance_to_next_schedule() is None


def test_inspect_shows_a_sleeping_rooms_schedules(tmp_path: pathlib.Path) -> None:
    async def open_one() -> None:
        async with open_test_server(POLL, store=FileStore(tmp_path)) as server:
            ann = await server.connect("/ws/poll", user_id="ann")
            await ann.emit("poll:open", {"question": "q", "options": ["a", "b"], "seconds": HOUR})
            await ann.receive("poll:state")

    trio.run(open_one)
    shown = subprocess.run(
        [sys.executable, "-m", "verani", "inspect", "poll/default", "--store", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    assert "schedules:\n  close: poll:close due " in shown.stdout, shown.stdout
