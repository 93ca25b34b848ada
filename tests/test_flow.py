"""One socket's flow control (verani/flow.py) on its own: no sockets, no room."""

from __future__ import annotations

import trio
import trio.testing

from verani.flow import Credit


def credit(frames: int = 4, size: int = 100, in_flight: int = 3) -> Credit:
    return Credit(max_frames=frames, max_bytes=size, max_in_flight=in_flight)


def test_queued_frames_are_refused_past_the_frame_allowance_until_written() -> None:
    c = credit(frames=2)
    assert c.queue(1) and c.queue(1)
    assert not c.queue(1)
    assert (c.frames, c.bytes) == (2, 2)  # a refused frame is not counted
    c.sent(2, 2)
    assert c.queue(1)


def test_held_bytes_count_toward_the_byte_allowance_of_queued_frames() -> None:
    c = credit(size=10)
    c.hold(6)
    assert not c.over_bytes
    assert not c.queue(5)  # 6 held + 5 > 10
    assert c.queue(4)
    c.hold(1)
    assert c.over_bytes


def test_held_frames_pause_the_room_past_half_the_allowance_and_never_refuse_a_frame() -> None:
    c = credit(frames=4)
    assert [c.hold(1) for _ in range(4)] == [False, False, True, False]
    assert c.queue(1)  # held frames wait on the store: they do not use the queue's frames
    assert [c.unhold(1) for _ in range(4)] == [False, True, False, False]
    c.hold(1)
    c.drop_held()
    assert (c.held_frames, c.held_bytes) == (0, 0)


def test_a_release_of_a_full_held_share_fits_in_the_queue_of_a_reader() -> None:
    # Why the share is half: the room pauses once held frames pass it, so at most share + 1
    # (one turn, one frame each) are released at once, onto a queue that was empty.
    c = credit(frames=1024, size=1 << 20)
    held = 0
    while not c.hold(10):
        held += 1
    for _ in range(held + 1):
        c.unhold(10)
        assert c.queue(10)


def test_dropping_the_queue_frees_its_frames_and_bytes() -> None:
    c = credit(frames=2)
    c.queue(7)
    c.queue(7)
    c.drop_queued()
    assert (c.frames, c.bytes) == (0, 0) and c.queue(1)


async def test_the_reader_waits_while_messages_and_unsent_frames_fill_its_slots() -> None:
    c = credit(in_flight=3)
    c.take_message()
    c.take_message()
    c.queue(1)
    order: list[str] = []

    async def reader() -> None:
        await c.wait_to_read()
        order.append("read")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        assert order == []  # 2 messages + 1 frame = 3 slots
        c.message_done()
        await trio.testing.wait_all_tasks_blocked()
        assert order == ["read"]

    c.take_message()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        assert order == ["read"]
        c.sent(1, 1)  # a written frame frees a slot too
        await trio.testing.wait_all_tasks_blocked()
        assert order == ["read", "read"]
