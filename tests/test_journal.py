"""The file store's write-ahead journal: records, group commit, checkpoints, recovery, crashes."""

from __future__ import annotations

import contextlib
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import tempfile
from typing import Any

import orjson
import pytest
import trio
import trio.lowlevel
import trio_websocket
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from verani import ControlError, open_server
from verani.control import control_request
from verani.store import FileStore
from verani.store.base import Changes
from verani.store.journal import CHECKPOINT_BYTES, encode_record, read_segment

from helpers import ROOMS, connect, logged

VERANI = [sys.executable, "-m", "verani"]


def segments(store: FileStore) -> list[pathlib.Path]:
    return sorted((store.directory / "journal").glob("*.wal"))


def crashed(store: FileStore) -> None:
    """The process died: the OS closes its files (and nothing else happens)."""
    store._journal.close()


def journal_bytes(store: FileStore) -> int:
    return sum(p.stat().st_size for p in segments(store))


# --- records ---------------------------------------------------------------------------------


def test_a_record_reads_back_and_a_cut_anywhere_keeps_only_whole_records() -> None:
    first = encode_record("chat", "lobby", 1, Changes({"n": 1}, {"k": [1, 2]}, ["gone"]))
    second = encode_record("chat", "lobby", 2, Changes({"n": 2}))
    data = first + second
    records, stopped, _ = read_segment(data)
    assert stopped is None
    assert [(r.seq, dict(r.changes.state)) for r in records] == [(1, {"n": 1}), (2, {"n": 2})]
    assert (dict(records[0].changes.storage_put), list(records[0].changes.storage_delete)) == (
        {"k": [1, 2]},
        ["gone"],
    )
    for cut in range(len(data)):
        kept, stopped, why = read_segment(data[:cut])
        whole = 0 if cut < len(first) else 1
        assert len(kept) == whole
        assert stopped == (None if cut in (0, len(first)) else whole * len(first))
        assert stopped is None or "torn" in why


def test_a_flipped_bit_ends_the_segment_at_that_record() -> None:
    first = encode_record("chat", "lobby", 1, Changes({"n": 1}))
    second = encode_record("chat", "lobby", 2, Changes({"n": 2}))
    third = encode_record("chat", "lobby", 3, Changes({"n": 3}))
    data = bytearray(first + second + third)
    data[len(first) + 12] ^= 0x04  # inside the second record's payload
    records, stopped, why = read_segment(bytes(data))
    assert [r.seq for r in records] == [1] and stopped == len(first)
    assert "checksum" in why


# --- the store -------------------------------------------------------------------------------


async def test_commits_of_many_rooms_share_writes_and_only_changes_are_written(
    tmp_path: pathlib.Path,
) -> None:
    store = FileStore(tmp_path)
    big = {"blob": "x" * 100_000}
    for i in range(20):
        await store.save("room", f"r{i}", big)  # a large document each
    before = journal_bytes(store)

    async def commit(i: int) -> None:
        await store.commit("room", f"r{i}", Changes({"count": i}))

    async with trio.open_nursery() as nursery:
        for i in range(20):
            nursery.start_soon(commit, i)
    # One write carried several rooms' commits (group commit), and each record holds only the
    # small change, not its room's 100 KB document.
    assert store._journal.writes < 20
    assert journal_bytes(store) - before < 20 * 200
    found = await store.peek("room", "r7")
    assert found is not None and found[0].state == {**big, "count": 7}
    await store.aclose()


async def test_a_checkpoint_removes_the_segments_it_covers(tmp_path: pathlib.Path) -> None:
    store = FileStore(tmp_path)
    await store.commit("room", "a", Changes({"n": 1}))
    assert store.checkpoint_due("room", "a", at_rest=True)
    assert not store.checkpoint_due("room", "a")  # awake: one small record is not enough
    await store.commit("room", "a", Changes({"blob": "y" * CHECKPOINT_BYTES}))
    assert store.checkpoint_due("room", "a")
    await store.checkpoint("room", "a", {"n": 1, "blob": "y" * CHECKPOINT_BYTES})
    assert not store.checkpoint_due("room", "a", at_rest=True)
    doc = orjson.loads(store.path_for("room", "a").read_bytes())
    assert doc["seq"] == 2 and doc["state"]["n"] == 1
    await store.aclose()
    assert segments(store) == []  # everything is in the documents


async def test_recovery_applies_the_journal_and_drops_a_torn_tail_with_a_warning(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = FileStore(tmp_path)
    await store.save("room", "a", {"n": 0, "keep": True}, {"s": 1})
    await store.commit("room", "a", Changes({"n": 1}, {"t": 2}, ["s"]))
    await store.commit("room", "b", Changes({"n": 5}))
    await store.commit("room", "a", Changes({"n": 2}))
    # A crash: no aclose, no checkpoint; then the last record is torn.
    crashed(store)
    (segment,) = segments(store)
    size = segment.stat().st_size
    with segment.open("r+b") as f:
        f.truncate(size - 3)
    # Read before recovery (as `verani inspect` does with no server), then recovered.
    reader = FileStore(tmp_path)
    found = await reader.peek("room", "a")
    assert found is not None and found[0].state == {"n": 1, "keep": True}
    restarted = FileStore(tmp_path)
    await restarted.recover()
    assert logged(caplog, "verani.store", rf"journal segment {segment}: dropped \d+ bytes from")
    doc_a = orjson.loads(restarted.path_for("room", "a").read_bytes())
    assert (doc_a["state"], doc_a["storage"], doc_a["seq"]) == ({"n": 1, "keep": True}, {"t": 2}, 1)
    assert orjson.loads(restarted.path_for("room", "b").read_bytes())["state"] == {"n": 5}
    assert segments(restarted) == []
    # Numbering goes on from the document: a new commit is not mistaken for an old one.
    await restarted.commit("room", "a", Changes({"n": 3}))
    again = FileStore(tmp_path)
    await again.recover()
    assert (await again.load("room", "a")).state["n"] == 3  # type: ignore[union-attr]
    crashed(restarted)


async def test_delete_also_forgets_what_the_journal_holds(tmp_path: pathlib.Path) -> None:
    store = FileStore(tmp_path)
    await store.commit("room", "a", Changes({"n": 1}))
    assert await store.delete("room", "a") is True
    crashed(store)
    restarted = FileStore(tmp_path)
    await restarted.recover()
    assert await restarted.load("room", "a") is None
    assert await restarted.list_instances() == []


class JournalMachine(RuleBasedStateMachine):
    """Commits, checkpoints and crashes (a cut at any byte of the journal's last segment) against
    a model: after every restart the store holds exactly what was durable — each checkpointed
    document, and the commits wholly written before the cut."""

    def __init__(self) -> None:
        super().__init__()
        self.directory = pathlib.Path(tempfile.mkdtemp(prefix="journal-machine-"))
        #: What the store holds now, per instance.
        self.model: dict[str, dict[str, int]] = {}
        #: The model at the last restart, and what happened since, in order.
        self.base: dict[str, dict[str, int]] = {}
        self.events: list[tuple[str, str, dict[str, int], pathlib.Path | None, int]] = []

    @initialize()
    def start(self) -> None:
        self.store = FileStore(self.directory, durability="os")
        trio.run(self.store.recover)

    @rule(
        instance=st.sampled_from(["a", "b", "c"]),
        changes=st.dictionaries(st.sampled_from(["x", "y", "z"]), st.integers(-5, 5), min_size=1),
    )
    def commit(self, instance: str, changes: dict[str, int]) -> None:
        trio.run(self.store.commit, "room", instance, Changes(changes))
        self.model.setdefault(instance, {}).update(changes)
        last = segments(self.store)[-1]
        self.events.append(("commit", instance, changes, last, last.stat().st_size))

    @rule(instance=st.sampled_from(["a", "b", "c"]))
    def checkpoint(self, instance: str) -> None:
        if instance in self.model:
            state = dict(self.model[instance])
            trio.run(self.store.checkpoint, "room", instance, state)
            self.events.append(("checkpoint", instance, state, None, 0))

    @rule(cut=st.floats(0, 1))
    def crash(self, cut: float) -> None:
        files = segments(self.store)
        last, at = None, 0
        if files:
            last = files[-1]
            at = int(last.stat().st_size * cut)
            with last.open("r+b") as f:
                f.truncate(at)
        durable = {k: dict(v) for k, v in self.base.items()}
        for kind, instance, values, path, end in self.events:
            if kind == "checkpoint":
                durable[instance] = dict(values)  # the document holds it, whatever the journal
            elif path != last or end <= at:
                durable.setdefault(instance, {}).update(values)
        self.model = durable
        self.base = {k: dict(v) for k, v in durable.items()}
        self.events = []
        crashed(self.store)
        self.store = FileStore(self.directory, durability="os")
        trio.run(self.store.recover)
        assert segments(self.store) == []

    @invariant()
    def store_matches_model(self) -> None:
        for instance, state in self.model.items():
            found = trio.run(self.store.peek, "room", instance)
            assert found is not None and found[0].state == state, (instance, state)

    def teardown(self) -> None:
        crashed(self.store)
        shutil.rmtree(self.directory, ignore_errors=True)


JournalMachine.TestCase.settings = settings(
    max_examples=30,
    stateful_step_count=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_the_journal_against_a_model_with_crashes_at_any_byte = JournalMachine.TestCase


# --- the real server, killed -----------------------------------------------------------------


async def _load_rooms_until_killed(
    url: str, proc: subprocess.Popen[str], rooms: list[str], kill_at: int, store: pathlib.Path
) -> dict[str, tuple[int, int, int]]:
    """Each room's client pipelines increments until the server is SIGKILLed once ``kill_at``
    updates were shown in all; per room: (count before, increments sent, highest shown).
    Meanwhile rooms are told to hibernate over and over, so the kill may also come during a
    checkpoint or a segment's removal, not only during an append."""
    result: dict[str, list[int]] = {room: [0, 0, 0] for room in rooms}
    total = 0

    async def client(room: str) -> None:
        nonlocal total
        mine = result[room]
        try:
            ws = await trio_websocket.connect_websocket_url(
                nursery, f"{url}/ws/counter/{room}?userId=k", message_queue_size=64
            )
        except trio_websocket.HandshakeError:
            return  # the server died before this client got in
        try:
            mine[0] = mine[2] = orjson.loads(await ws.get_message())["data"]["count"]

            async def send() -> None:
                while True:
                    await ws.send_message('{"type":"counter:increment","data":{"amount":1}}')
                    mine[1] += 1
                    await trio.lowlevel.checkpoint()

            async with trio.open_nursery() as inner:
                inner.start_soon(send)
                while True:
                    count = orjson.loads(await ws.get_message())["data"]["count"]
                    mine[2] = max(mine[2], count)
                    total += 1
                    if total >= kill_at and proc.poll() is None:
                        proc.send_signal(signal.SIGKILL)
        except* trio_websocket.ConnectionClosed:
            pass  # the server died under us, as intended
        finally:
            # trio-websocket's client leaks its TCP stream when the peer vanishes.
            await trio.aclose_forcefully(ws._stream)

    async def hibernate_again_and_again() -> None:
        with contextlib.suppress(ControlError):  # until the server is gone
            while proc.poll() is None:
                room = rng.choice(rooms)
                request = {"op": "hibernate", "room": "counter", "instance": room}
                await control_request(store, request)
                await trio.sleep(rng.uniform(0, 0.02))

    rng = random.Random(kill_at)
    async with trio.open_nursery() as nursery:
        for room in rooms:
            nursery.start_soon(client, room)
        nursery.start_soon(hibernate_again_and_again)
    return {room: (v[0], v[1], v[2]) for room, v in result.items()}


def test_sigkill_under_multi_room_load_loses_nothing_any_client_was_shown(
    tmp_path: pathlib.Path,
) -> None:
    store = tmp_path / "store"
    rooms = [f"r{i}" for i in range(8)]
    rng = random.Random(15)
    for _ in range(3):
        proc = subprocess.Popen(
            [*VERANI, "serve", str(ROOMS / "counter.py"), "--port", "0", "--store", str(store)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None
            url = proc.stdout.readline().split("serving on ")[1].split()[0]
            seen = trio.run(
                _load_rooms_until_killed, url, proc, rooms, rng.randrange(50, 600), store
            )
            assert proc.wait(timeout=10) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=10)
        # Before any restart, `verani inspect` (no server) shows the journal applied.
        shown = subprocess.run(
            [*VERANI, "inspect", "counter/r0", "--store", str(store), "--json"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert shown.returncode == 0, shown.stderr
        inspected = orjson.loads(shown.stdout)
        # Restarted: recovery applies the journal; every document is whole.
        restarted = FileStore(store)
        trio.run(restarted.recover)
        assert sum(shown - before for before, _, shown in seen.values()) > 0
        for room, (before, sent, shown) in seen.items():
            if sent == 0:
                continue  # this client never got in before the kill
            doc = orjson.loads(restarted.path_for("counter", room).read_bytes())
            assert shown <= doc["state"]["count"] <= before + sent, (room, before, sent, shown)
            if room == "r0":
                assert inspected["stored"]["state"]["count"] == doc["state"]["count"], inspected
        assert segments(restarted) == []


async def test_numbering_never_goes_back_while_old_records_remain(tmp_path: pathlib.Path) -> None:
    # Room b keeps the segment alive; room a is checkpointed (and forgotten by the index), then
    # changes again: after a crash its old records must not be applied over the new state.
    store = FileStore(tmp_path)
    await store.commit("room", "b", Changes({"n": 1}))
    await store.commit("room", "a", Changes({"v": "old"}))
    await store.checkpoint("room", "a", {"v": "old"})
    await store.commit("room", "a", Changes({"v": "new"}))
    await store.checkpoint("room", "a", {"v": "new"})
    await store.save("room", "a", {"v": "newest"})
    crashed(store)
    assert segments(store)  # b's record keeps the segment, with a's old records in it
    restarted = FileStore(tmp_path)
    await restarted.recover()
    assert (await restarted.load("room", "a")).state == {"v": "newest"}  # type: ignore[union-attr]
    assert (await restarted.load("room", "b")).state == {"n": 1}  # type: ignore[union-attr]
    crashed(restarted)


async def test_hibernated_rooms_leave_nothing_in_the_journal_index(
    tmp_path: pathlib.Path, counter_rooms: list[Any]
) -> None:
    store = FileStore(tmp_path)
    with trio.fail_after(20):
        async with open_server(counter_rooms, store=store) as server:
            for i in range(5):
                async with connect(server.url, f"/ws/counter/r{i}") as client:
                    await client.next_event("counter:sync")
                    if i % 2:  # some change something, some only look
                        await client.emit("counter:increment", {"amount": 1})
                        await client.next_event("counter:update")
            while any(s.sessions for s in server.supervisor.status()):
                await trio.sleep(0.01)
            await server.hibernate("counter")
            # Per-instance numbering is kept only while a room is awake or has commits waiting.
            assert store._journal._seq == {} and store._journal._since == {}
