"""Group commit and the output gate (verani/gate.py) on their own: no sockets, no store."""

from __future__ import annotations

from typing import Any

import trio
import trio.testing

from verani.errors import StoreError
from verani.flow import Credit
from verani.gate import GroupCommit, OutputGate
from verani.sessions import ConnectionMeta, Session


class Sink:
    """A socket as the gate sees it: records frames, and whether it was closed as too slow."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.over = False

    def send_frame(self, frame: bytes) -> None:
        self.frames.append(frame)

    def close(self, code: int, reason: str) -> None:
        raise AssertionError("the gate never closes a socket itself")

    def over_budget(self) -> None:
        self.over = True


def session(name: str, budget: int = 1 << 20, frames: int = 20) -> tuple[Session, Sink]:
    sink = Sink()
    credit = Credit(max_frames=frames, max_bytes=budget, max_in_flight=64)
    return Session(ConnectionMeta(user_id=name, client_id=name), sink, credit), sink


def test_frames_pass_at_once_when_nothing_is_held_and_nothing_is_unwritten() -> None:
    released: list[Any] = []
    gate = OutputGate(released=released.append)
    alice, sink = session("alice")
    gate.settle([([alice], b"a")], "turn 1", seq=3, durable=3)
    assert sink.frames == [b"a"] and released == ["turn 1"] and len(gate) == 0


def test_held_frames_leave_in_order_once_their_write_is_durable() -> None:
    released: list[Any] = []
    gate = OutputGate(released=released.append)
    alice, sink = session("alice")
    gate.settle([([alice], b"1")], "t1", seq=1, durable=0)
    # A turn that changed nothing still waits behind the held one: no overtaking.
    gate.settle([([alice], b"2")], "t2", seq=1, durable=0)
    gate.settle([([alice], b"3")], "t3", seq=2, durable=0)
    assert sink.frames == [] and (alice.credit.held_frames, alice.credit.held_bytes) == (3, 3)
    gate.release(1)
    assert sink.frames == [b"1", b"2"] and released == ["t1", "t2"]
    gate.release(2)
    assert sink.frames == [b"1", b"2", b"3"] and released == ["t1", "t2", "t3"]
    assert (alice.credit.held_frames, alice.credit.held_bytes, len(gate)) == (0, 0, 0)


def test_the_gate_is_full_past_the_held_share_of_one_socket() -> None:
    gate = OutputGate(released=lambda event: None)
    alice, _ = session("alice", frames=4)  # held frames may use 2 of its 4
    bob, _ = session("bob", frames=4)
    for seq in (1, 2):
        gate.settle([([alice, bob], b"x")], None, seq=seq, durable=0)
    assert not gate.full
    gate.settle([([alice], b"x")], None, seq=3, durable=0)
    assert gate.full  # alice has 3 held, over 2
    gate.release(1)
    assert not gate.full  # back to 2


def test_held_bytes_past_the_budget_make_the_socket_over_budget() -> None:
    gate = OutputGate(released=lambda event: None)
    alice, sink = session("alice", budget=10)
    assert alice.credit.queue(4)  # already queued on the socket
    gate.settle([([alice], b"123456")], None, seq=1, durable=0)
    assert not sink.over  # 4 + 6 = 10
    gate.settle([([alice], b"7")], None, seq=1, durable=0)
    assert sink.over


def test_abandon_drops_held_frames_and_returns_their_events() -> None:
    gate = OutputGate(released=lambda event: None)
    alice, sink = session("alice", frames=2)
    gate.settle([([alice], b"a")], "t1", seq=1, durable=0)
    gate.settle([([alice], b"b")], "t2", seq=2, durable=0)
    assert gate.full
    assert gate.abandon() == ["t1", "t2"]
    assert not gate.full and len(gate) == 0 and sink.frames == []
    assert (alice.credit.held_frames, alice.credit.held_bytes) == (0, 0)


# --- group commit ------------------------------------------------------------------------------


class Disk:
    """A save that can be held at a gate or made to fail, counting the writes that landed."""

    def __init__(self) -> None:
        self.writes = 0
        self.failures_left = 0
        self.gate: trio.Event | None = None

    async def save(self) -> None:
        if self.gate is not None:
            await self.gate.wait()
        if self.failures_left:
            self.failures_left -= 1
            raise StoreError("disk full")
        self.writes += 1


def group_commit(disk: Disk) -> tuple[GroupCommit, list[int], list[tuple[str, bool]]]:
    """A GroupCommit writing to ``disk``, with the writes it saw durable and the failures it
    reported."""
    durable: list[int] = []
    failed: list[tuple[str, bool]] = []

    async def report(error: StoreError, first: bool) -> None:
        failed.append((str(error), first))

    return (
        GroupCommit(where="t", save=disk.save, durable=durable.append, failed=report),
        durable,
        failed,
    )


async def test_changes_made_during_a_write_go_out_together_in_the_next() -> None:
    disk = Disk()
    commit, durable, failed = group_commit(disk)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(commit.run)
        disk.gate = trio.Event()
        commit.changed()
        await trio.testing.wait_all_tasks_blocked()  # write 1 is on its way
        for _ in range(10):
            commit.changed()  # these wait for it, then go out as one
        assert commit.pending
        disk.gate.set()
        assert await commit.wait_durable()
        assert (disk.writes, durable, commit.pending) == (2, [1, 11], False)
        assert failed == []
        nursery.cancel_scope.cancel()


async def test_a_failed_write_is_retried_and_reported_once_per_run(
    autojump_clock: Any,
) -> None:
    disk = Disk()
    commit, durable, failed = group_commit(disk)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(commit.run)
        disk.failures_left = 3
        commit.changed()
        assert not await commit.wait_durable()  # the first failure ends this wait
        while commit.pending:
            await commit.wait_progress()
        assert (disk.writes, durable) == (1, [1])
        assert failed == [("disk full", True), ("disk full", False), ("disk full", False)]
        nursery.cancel_scope.cancel()
