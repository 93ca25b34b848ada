"""Sessions and emit targeting as pure bookkeeping: no sockets, no room, no trio."""

from __future__ import annotations

import pytest

from verani.flow import Credit
from verani.sessions import ConnectionMeta, FrameSink, Session, Sessions, send_to


class RecordingSink:
    """A FrameSink that keeps what it is given, in order."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.closed: list[tuple[int, str]] = []
        self.over = 0

    def send_frame(self, frame: bytes) -> None:
        self.frames.append(frame)

    def close(self, code: int, reason: str) -> None:
        self.closed.append((code, reason))

    def over_budget(self) -> None:
        self.over += 1


def session(client_id: str, user_id: str = "ann", channels: list[str] | None = None) -> Session:
    meta = ConnectionMeta(user_id=user_id, client_id=client_id)
    if channels is not None:
        meta.channels = channels
    sink: FrameSink = RecordingSink()
    credit = Credit(max_frames=8, max_bytes=1024, max_in_flight=8)
    return Session(meta=meta, sink=sink, credit=credit)


def frames(s: Session) -> list[bytes]:
    assert isinstance(s.sink, RecordingSink)
    return s.sink.frames


def test_a_new_session_listens_on_the_default_channel() -> None:
    s = session("c1")
    assert s.meta.channels == ["default"]
    assert s.first_channel == "default"
    assert (s.credit.held_frames, s.credit.frames, s.credit.in_flight) == (0, 0, 0)


def test_first_channel_is_the_first_listed_or_default_when_none() -> None:
    assert session("c1", channels=["news", "chat"]).first_channel == "news"
    assert session("c2", channels=[]).first_channel == "default"


def test_add_and_remove() -> None:
    sessions = Sessions()
    a, b = session("a"), session("b")
    sessions.add(a)
    sessions.add(b)
    assert len(sessions) == 2
    assert list(sessions) == [a, b]
    assert a in sessions and sessions.has_client("a")
    assert sessions.remove(a) is True
    assert sessions.remove(a) is False  # already gone
    assert a not in sessions and not sessions.has_client("a")
    assert list(sessions) == [b]


def test_a_client_id_connects_once_per_instance() -> None:
    sessions = Sessions()
    first = session("same")
    sessions.add(first)
    with pytest.raises(ValueError, match="client id 'same' is already connected"):
        sessions.add(session("same", user_id="bob"))
    assert list(sessions) == [first]


def test_removing_a_stale_session_keeps_the_one_holding_its_client_id() -> None:
    sessions = Sessions()
    old, new = session("c"), session("c")
    sessions.add(old)
    sessions.remove(old)
    sessions.add(new)
    assert sessions.remove(old) is False
    assert old not in sessions
    assert new in sessions
    assert "not a session" not in sessions


def test_iteration_is_a_snapshot_so_removing_while_iterating_is_safe() -> None:
    sessions = Sessions()
    for name in "abc":
        sessions.add(session(name))
    for s in sessions:
        sessions.remove(s)
    assert len(sessions) == 0


def test_in_channel_keeps_connection_order_and_honours_exclude() -> None:
    sessions = Sessions()
    a = session("a", channels=["default", "news"])
    b = session("b", channels=["news"])
    c = session("c")
    for s in (a, b, c):
        sessions.add(s)
    assert sessions.in_channel("news") == [a, b]
    assert sessions.in_channel("default") == [a, c]
    assert sessions.in_channel("news", exclude=a) == [b]
    assert sessions.in_channel("nobody") == []


def test_of_user_finds_every_device_of_one_user() -> None:
    sessions = Sessions()
    phone, bob, laptop = session("p", "ann"), session("b", "bob"), session("l", "ann")
    for s in (phone, bob, laptop):
        sessions.add(s)
    assert sessions.of_user("ann") == [phone, laptop]
    assert sessions.of_user("bob") == [bob]
    assert sessions.of_user("carol") == []


def test_user_ids_are_unique_in_first_connection_order() -> None:
    sessions = Sessions()
    for client_id, user_id in [("1", "zoe"), ("2", "ann"), ("3", "zoe"), ("4", "bob")]:
        sessions.add(session(client_id, user_id))
    assert sessions.user_ids() == ["zoe", "ann", "bob"]
    sessions.remove(next(iter(sessions)))  # zoe stays, now from her second socket
    assert sessions.user_ids() == ["ann", "zoe", "bob"]


def test_send_to_queues_the_same_frame_on_each_session_and_counts_them() -> None:
    a, b, c = session("a"), session("b"), session("c")
    assert send_to([a, b], b"one") == 2
    assert send_to([b, c], b"two") == 2
    assert send_to([], b"none") == 0
    assert frames(a) == [b"one"]
    assert frames(b) == [b"one", b"two"]
    assert frames(c) == [b"two"]


def test_send_to_takes_any_iterable_once() -> None:
    sessions = Sessions()
    for name in "ab":
        sessions.add(session(name, channels=["x"]))
    assert send_to((s for s in sessions if "x" in s.meta.channels), b"f") == 2
    assert [frames(s) for s in sessions] == [[b"f"], [b"f"]]
