"""The to-do example room end to end: every change it makes is in place (``items.append``,
``todo.done = ...``), with the default persist options. In-process over real sockets and files,
then a real ``verani serve`` killed with SIGKILL while clients are adding items."""

from __future__ import annotations

import pathlib
import signal
import subprocess
from typing import Any

import orjson
import trio
import trio.lowlevel
import trio_websocket

from test_cli import serving
from verani import open_server
from verani.loader import load_rooms
from verani.store import FileStore

from helpers import ROOMS, connect

TODO = ROOMS / "todo.py"


async def stored_texts(store: pathlib.Path) -> list[str]:
    """What the store holds durably: the document with the journal's later commits applied."""
    found = await FileStore(store).peek("todo", "default")
    assert found is not None
    return [item["text"] for item in found[0].state["items"]]


async def test_todo_changes_reach_everyone_and_survive_a_restart(tmp_path: pathlib.Path) -> None:
    with trio.fail_after(15):
        async with open_server(load_rooms([TODO]), store=str(tmp_path)) as server:
            async with (
                connect(server.url, "/ws/todo", user_id="ann") as ann,
                connect(server.url, "/ws/todo", user_id="bob") as bob,
            ):
                assert (await ann.next_event("todo:list"))[1]["items"] == []
                await bob.next_event("todo:list")
                ids = []
                for text in ("milk", "eggs", "bread"):
                    await ann.emit("todo:add", {"text": text})
                    _, added = await bob.next_event("todo:added")
                    assert added["item"]["text"] == text and added["item"]["done"] is False
                    ids.append(added["item"]["id"])
                    # The reply left once the append was on disk.
                    assert (await stored_texts(tmp_path))[-1] == text
                await bob.emit("todo:toggle", {"id": ids[1]})
                assert (await ann.next_event("todo:updated"))[1]["item"]["done"] is True
                await bob.emit("todo:remove", {"id": ids[0]})
                assert (await ann.next_event("todo:removed"))[1]["ids"] == [ids[0]]
                await bob.emit("todo:toggle", {"id": "nope"})
                assert (await bob.next_event("error"))[1]["code"] == "unknown_item"
                await bob.emit("todo:add", {"text": "  "})
                assert (await bob.next_event("error"))[1]["code"] == "bad_text"
        # Shutdown hibernates the room; a new server reads the list back.
        async with open_server(load_rooms([TODO]), store=str(tmp_path)) as server:
            async with connect(server.url, "/ws/todo", user_id="cat") as cat:
                _, listed = await cat.next_event("todo:list")
                assert [(t["text"], t["done"]) for t in listed["items"]] == [
                    ("eggs", True),
                    ("bread", False),
                ]
                # Read back from the store, the items are tracked as before: clearing the done
                # ones (a slice assignment) is saved before the reply.
                await cat.emit("todo:clear_done")
                assert (await cat.next_event("todo:removed"))[1]["ids"] == [ids[1]]
                assert await stored_texts(tmp_path) == ["bread"]


async def _add_until_killed(
    url: str, proc: subprocess.Popen[str], run: int
) -> tuple[list[str], list[str], list[str]]:
    """Pipeline ``todo:add`` until the server is SIGKILLed; return (texts listed at connect,
    texts sent, texts the server showed as added)."""
    listed: list[str] = []
    sent: list[str] = []
    shown: list[str] = []

    async def send(ws: trio_websocket.WebSocketConnection) -> None:
        for n in range(300):  # far below the room's MAX_ITEMS over both runs
            text = f"run {run} item {n}"
            await ws.send_message(f'{{"type":"todo:add","data":{{"text":"{text}"}}}}')
            sent.append(text)
            await trio.lowlevel.checkpoint()

    try:
        with trio.fail_after(30):
            async with trio_websocket.open_websocket_url(f"{url}/ws/todo?userId=k") as ws:
                try:
                    first = orjson.loads(await ws.get_message())["data"]  # todo:list
                    listed = [item["text"] for item in first["items"]]
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(send, ws)
                        while True:
                            data = orjson.loads(await ws.get_message())["data"]
                            if data["type"] == "todo:added":
                                shown.append(data["item"]["text"])
                            if len(shown) >= 100 and proc.poll() is None:
                                proc.send_signal(signal.SIGKILL)
                finally:
                    # trio-websocket's client leaks its TCP stream when the peer vanishes.
                    await trio.aclose_forcefully(ws._stream)
    except* (trio_websocket.ConnectionClosed, trio_websocket.HandshakeError):
        pass  # the server died under us, as intended
    return listed, sent, shown


async def _listed(url: str) -> list[str]:
    async with trio_websocket.open_websocket_url(f"{url}/ws/todo?userId=check") as ws:
        data: Any = orjson.loads(await ws.get_message())["data"]
        return [item["text"] for item in data["items"]]


def test_sigkill_under_load_loses_no_appended_item_a_client_was_shown(
    tmp_path: pathlib.Path,
) -> None:
    store = tmp_path / "store"
    for run in range(2):
        with serving(store, str(TODO)) as (proc, url):
            before, sent, shown = trio.run(_add_until_killed, url, proc, run)
            assert proc.wait(timeout=10) == -signal.SIGKILL
        with serving(store, str(TODO)) as (proc, url):
            after = trio.run(_listed, url)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=20) == 0
        # Every item a client was shown was durable before it left the server, and what was
        # saved is what was sent, in order: a prefix of it, after what was there before.
        assert len(shown) >= 100
        assert after[: len(before)] == before
        assert after[len(before) :] == sent[: len(after) - len(before)]
        assert set(shown) <= set(after)
        assert trio.run(stored_texts, store) == after  # and the document is whole, never torn
