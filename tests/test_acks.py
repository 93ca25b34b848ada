"""Acknowledgements over real sockets: a client frame with an ``"id"`` is answered with an ack
frame carrying the handler's return value or an error, after the turn's write is durable and in
order with the turn's other frames; frames without an id behave as before.

The raw client (tests/helpers.py) writes frames by hand, so the wire shapes are checked as the
protocol states them (README "Wire protocol", DESIGN.md §9), not through verani's own client.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import trio

from faults import FaultyStore
from verani import ClientError, RoomContext, define_room, open_server
from verani.client import open_client
from verani.errors import AckError
from verani.store import MemoryStore
from verani.testing import open_test_server

from helpers import connect


def ledger_room(errors: list[BaseException] | None = None) -> Any:
    """A room whose handlers answer: ``add`` returns the new total (and emits ``added``)."""
    room = define_room(
        name="ledger",
        state={"total": 0, "blob": None},
        persisted_keys=["total", "blob"],
        on_error=lambda error, ctx: (errors if errors is not None else []).append(error),
    )

    @room.on("add")
    def add(ctx: RoomContext[Any], data: Any) -> int:
        ctx.actor.room_state.total += data["n"]
        ctx.emit.emit("added", {"total": ctx.actor.room_state.total})
        total: int = ctx.actor.room_state.total
        return total

    @room.on("peek")
    async def peek(ctx: RoomContext[Any], data: Any) -> Any:
        await trio.lowlevel.checkpoint()  # an async handler answers as well
        return {"total": ctx.actor.room_state.total, "echo": data}

    @room.on("nothing")
    def nothing(ctx: RoomContext[Any], data: Any) -> None:
        return None

    @room.on("boom")
    def boom(ctx: RoomContext[Any], data: Any) -> None:
        raise RuntimeError("secret internals /etc/passwd")

    @room.on("refuse")
    def refuse(ctx: RoomContext[Any], data: Any) -> None:
        raise ClientError("amount must be positive", code="bad_amount")

    @room.on("unsendable")
    def unsendable(ctx: RoomContext[Any], data: Any) -> Any:
        return {"fn": print}

    @room.on("unsaveable")
    def unsaveable(ctx: RoomContext[Any], data: Any) -> str:
        ctx.actor.room_state.blob = print  # not persistable
        return "done"

    @room.on("two")
    def first(ctx: RoomContext[Any], data: Any) -> None:
        return None

    @room.on("two")
    def second(ctx: RoomContext[Any], data: Any) -> str:
        return "second"

    @room.on("two")
    def third(ctx: RoomContext[Any], data: Any) -> str:
        return "third"

    return room


async def test_ack_carries_the_return_value_after_the_turns_frames() -> None:
    with trio.fail_after(10):
        async with open_server([ledger_room()], store=MemoryStore()) as server:
            async with connect(server.url, "/ws/ledger") as client:
                await client.send({"type": "add", "data": {"n": 2}, "id": 7})
                # The frame the handler emitted, then the answer: in the order of the turn.
                first = await client.recv()
                assert first["type"] == "event" and first["data"]["type"] == "added"
                assert await client.recv() == {"type": "ack", "id": 7, "data": 2}
                await client.send({"type": "peek", "data": [1, "x"], "id": "req-1"})
                assert await client.recv() == {
                    "type": "ack",
                    "id": "req-1",
                    "data": {"total": 2, "echo": [1, "x"]},
                }
                await client.send({"type": "nothing", "id": 0})
                assert await client.recv() == {"type": "ack", "id": 0, "data": None}
                # null counts as no id: no answer, as for a frame without one.
                await client.send({"type": "nothing", "id": None})
                await client.send({"type": "add", "data": {"n": 1}, "id": -5})
                await client.next_event("added")
                assert await client.recv() == {"type": "ack", "id": -5, "data": 3}


async def test_several_handlers_answer_with_the_first_result_that_is_not_none() -> None:
    with trio.fail_after(10):
        async with open_server([ledger_room()], store=MemoryStore()) as server:
            async with connect(server.url, "/ws/ledger") as client:
                await client.send({"type": "two", "id": 1})
                assert await client.recv() == {"type": "ack", "id": 1, "data": "second"}


async def test_pipelined_calls_are_answered_in_order() -> None:
    with trio.fail_after(10):
        async with open_server([ledger_room()], store=MemoryStore()) as server:
            async with connect(server.url, "/ws/ledger") as client:
                for i in range(1, 21):
                    await client.send({"type": "add", "data": {"n": 1}, "id": i})
                acks = []
                while len(acks) < 20:
                    frame = await client.recv()
                    if frame["type"] == "ack":
                        acks.append((frame["id"], frame["data"]))
                assert acks == [(i, i) for i in range(1, 21)]


async def test_ack_waits_until_the_turns_write_is_durable(tmp_path: Any) -> None:
    store = FaultyStore(tmp_path, hold_saves=True)
    with trio.fail_after(10):
        async with open_server([ledger_room()], store=store) as server:
            async with connect(server.url, "/ws/ledger") as client:
                await client.send({"type": "add", "data": {"n": 5}, "id": 1})
                await store.save_reached.wait()  # the turn's write is held
                with trio.move_on_after(0.3):
                    await client.recv()
                    pytest.fail("a frame (the ack or the event) left before the write was durable")
                assert await store.peek("ledger", "default") is None
                store.release_saves()
                assert (await client.recv())["data"]["type"] == "added"
                assert await client.recv() == {"type": "ack", "id": 1, "data": 5}
                found = await store.peek("ledger", "default")
                assert found is not None and found[0].state["total"] == 5


async def test_errors_are_answered_in_the_ack_without_internals(
    caplog: pytest.LogCaptureFixture,
) -> None:
    errors: list[BaseException] = []
    with trio.fail_after(10):
        async with open_server([ledger_room(errors)], store=MemoryStore()) as server:
            async with connect(server.url, "/ws/ledger") as client:
                await client.send({"type": "boom", "id": 1})
                answer = await client.recv()
                assert answer == {
                    "type": "ack",
                    "id": 1,
                    "error": {
                        "code": "handler_error",
                        "message": "the room could not handle 'boom'; the error is in the "
                        "server's log",
                    },
                }
                assert "passwd" not in str(answer)
                assert [type(e) for e in errors] == [RuntimeError]  # on_error, as without an id
                assert "secret internals" in caplog.text

                await client.send({"type": "refuse", "id": 2})
                assert await client.recv() == {
                    "type": "ack",
                    "id": 2,
                    "error": {"code": "bad_amount", "message": "amount must be positive"},
                }

                await client.send({"type": "nope", "id": 3})
                assert await client.recv() == {
                    "type": "ack",
                    "id": 3,
                    "error": {
                        "code": "unknown_event",
                        "message": "this room has no handler for 'nope'",
                    },
                }

                await client.send({"type": "unsendable", "id": 4})
                answer = await client.recv()
                assert answer["id"] == 4 and answer["error"]["code"] == "handler_error"
                assert "JSON" in answer["error"]["message"]

                await client.send({"type": "unsaveable", "id": 5})
                answer = await client.recv()
                assert answer["id"] == 5 and answer["error"] == {
                    "code": "persist_error",
                    "message": "the room could not save 'blob'; its previous value is kept",
                }
                # Every answer was the ack alone: no verani:error event came with them.
                await client.send({"type": "nothing", "id": 6})
                assert await client.recv() == {"type": "ack", "id": 6, "data": None}


async def test_frames_without_an_id_are_answered_as_before() -> None:
    with trio.fail_after(10):
        async with open_server([ledger_room()], store=MemoryStore()) as server:
            async with connect(server.url, "/ws/ledger") as client:
                await client.send({"type": "add", "data": {"n": 1}})
                assert (await client.recv())["data"] == {"type": "added", "total": 1}
                await client.send({"type": "boom"})
                assert (await client.recv())["data"] == {
                    "type": "verani:error",
                    "code": "handler_error",
                    "event": "boom",
                    "message": "the room could not handle 'boom'; the error is in the server's log",
                }
                await client.send({"type": "refuse"})
                assert (await client.recv())["data"]["code"] == "bad_amount"
                await client.send({"type": "nope"})
                assert (await client.recv())["data"]["code"] == "unknown_event"
                await client.send({"type": "add", "data": {"n": 1}})
                # Only the event: no ack frame followed the id-less ones.
                assert (await client.recv())["data"] == {"type": "added", "total": 2}


@pytest.mark.parametrize(
    ("bad_id", "why"),
    [
        (1.5, "not a number with a fraction"),
        (True, "not a boolean"),
        ([1], "not a list"),
        ({"a": 1}, "not a object"),
        ("x" * 65, "65 characters; at most 64"),
    ],
)
async def test_an_invalid_id_refuses_the_frame(bad_id: Any, why: str) -> None:
    with trio.fail_after(10):
        async with open_server([ledger_room()], store=MemoryStore()) as server:
            async with connect(server.url, "/ws/ledger") as client:
                await client.send({"type": "add", "data": {"n": 1}, "id": bad_id})
                data = (await client.recv())["data"]
                assert data["type"] == "verani:error" and data["code"] == "bad_frame"
                assert data["message"].startswith('frame "id"') and why in data["message"]
                # Nothing was handled: the next add starts from zero.
                await client.send({"type": "add", "data": {"n": 1}, "id": "x" * 64})
                assert (await client.next_event("added"))[1]["total"] == 1
                assert await client.recv() == {"type": "ack", "id": "x" * 64, "data": 1}


async def test_test_client_call(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    with trio.fail_after(10):
        async with open_test_server(ledger_room()) as server:
            client = await server.connect("/ws/ledger")
            assert await client.call("add", {"n": 4}) == 4
            with pytest.raises(AckError) as caught:
                await client.call("refuse")
            assert caught.value.code == "bad_amount"
            assert str(caught.value) == "amount must be positive"
            # The event the first call's turn emitted was kept for receive().
            assert (await client.receive("added"))["total"] == 4


# --- the Python client ------------------------------------------------------------------------


def waiting_room(release: trio.Event, started: trio.Event | None = None) -> Any:
    """The ledger room with ``wait``: a handler that sets ``started`` and answers once
    ``release`` is set."""
    room = ledger_room()

    @room.on("wait")
    async def wait(ctx: RoomContext[Any], data: Any) -> str:
        if started is not None:
            started.set()
        await release.wait()
        return "released"

    return room


async def test_client_call_returns_the_answer_or_raises_ack_error() -> None:
    with trio.fail_after(10):
        async with open_test_server(ledger_room()) as server:
            async with open_client(f"{server.url}/ws/ledger") as client:
                await client.wait_for_connection()
                assert await client.call("add", {"n": 3}) == 3
                assert await client.call("peek", "hi") == {"total": 3, "echo": "hi"}
                assert (await client.receive("added"))["total"] == 3  # events still arrive
                with pytest.raises(AckError) as caught:
                    await client.call("refuse")
                assert (caught.value.code, str(caught.value)) == (
                    "bad_amount",
                    "amount must be positive",
                )
                with pytest.raises(AckError) as caught:
                    await client.call("nope")
                assert caught.value.code == "unknown_event"
                # Concurrent calls each get their own answer.
                results: dict[int, Any] = {}
                async with trio.open_nursery() as nursery:
                    for i in range(10):

                        async def one(i: int = i) -> None:
                            results[i] = await client.call("peek", i)

                        nursery.start_soon(one)
                assert {i: r["echo"] for i, r in results.items()} == {i: i for i in range(10)}


async def test_client_call_times_out(autojump_clock: Any) -> None:
    release = trio.Event()
    async with open_test_server(waiting_room(release)) as server:
        async with open_client(f"{server.url}/ws/ledger") as client:
            await client.wait_for_connection()
            started = trio.current_time()
            with pytest.raises(trio.TooSlowError):
                await client.call("wait", timeout=5)
            assert trio.current_time() - started == pytest.approx(5, abs=0.5)
            release.set()
            # The late answer to the timed-out call is passed over; the next call is answered.
            assert await client.call("add", {"n": 1}) == 1


async def test_client_call_made_offline_waits_in_the_queue(autojump_clock: Any) -> None:
    async with open_test_server(ledger_room()) as server:
        async with open_client(f"{server.url}/ws/ledger") as client:
            await client.wait_for_connection()
            client.disconnect()
            answers: list[Any] = []
            async with trio.open_nursery() as nursery:

                async def call() -> None:
                    answers.append(await client.call("add", {"n": 2}, timeout=60))

                nursery.start_soon(call)
                await trio.sleep(3)  # offline for a while: the call waits, unsent
                assert client.queued == 1 and not answers
                client.reconnect()
            assert answers == [2]
            assert (await server.state("ledger"))["total"] == 2


async def test_client_call_fails_when_its_connection_drops(autojump_clock: Any) -> None:
    release, started = trio.Event(), trio.Event()
    async with open_test_server(waiting_room(release, started)) as server:
        async with open_client(f"{server.url}/ws/ledger") as client:
            await client.wait_for_connection()
            async with trio.open_nursery() as nursery:

                async def drop_soon() -> None:
                    await started.wait()  # the call was sent and is being handled
                    client.reconnect()  # drops the connection, connects anew

                nursery.start_soon(drop_soon)
                with pytest.raises(AckError) as caught:
                    await client.call("wait", timeout=30)
                assert caught.value.code == "connection_lost"
            release.set()
            await client.wait_for_connection()
            assert await client.call("add", {"n": 1}) == 1
