"""verani.client against real servers on 127.0.0.1, on Trio's autojump clock where time matters."""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Any

import pytest
import trio
import trio_websocket

from verani import RoomContext, define_room
from verani.client import NotConnectedError, ReconnectOptions, open_client
from verani.testing import open_test_server

from helpers import ROOMS, free_port

COUNTER = ROOMS / "counter.py"


def recorder_room(seen: list[Any]) -> Any:
    room = define_room(name="rec")

    @room.on("*")
    def record(ctx: RoomContext[Any], data: Any) -> None:
        seen.append((ctx.frame.type if ctx.frame else None, data))
        ctx.emit.emit("ack", {"n": len(seen)})

    return room


class SilentServer:
    """A WebSocket server that reads every frame and answers none (not even ``{"type":
    "ping"}``): a server that stopped answering. Counts connections, records frames."""

    def __init__(self) -> None:
        self.connections = 0
        self.received: list[Any] = []
        self.first_frame = trio.Event()

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        await trio_websocket.serve_websocket(
            self._handler, "127.0.0.1", 0, None, task_status=task_status
        )

    async def _handler(self, request: trio_websocket.WebSocketRequest) -> None:
        self.connections += 1
        ws = await request.accept()
        with contextlib.suppress(trio_websocket.ConnectionClosed):
            while True:  # read (so protocol-level pings work), never answer
                self.received.append(await ws.get_message())
                self.first_frame.set()


async def test_connect_listen_emit_and_states(autojump_clock: Any) -> None:
    async with open_test_server(COUNTER) as server:
        async with open_client(f"{server.url}/ws/counter?userId=py") as client:
            states: list[str] = []
            synced: list[Any] = []
            updates: list[int] = []
            client.on_state_change = states.append
            client.on("counter:sync", synced.append)
            client.once("counter:update", lambda data: updates.append(data["count"]))
            await client.wait_for_connection()
            assert client.is_connected()
            await client.receive("counter:sync")
            client.emit("counter:increment", {"amount": 2})
            client.emit("counter:increment", {"amount": 3})
            first = await client.receive("counter:update")
            second = await client.receive("counter:update")
            assert (first["count"], second["count"]) == (2, 5)
            assert updates == [2]  # once: only the first
            assert synced == [{"type": "counter:sync", "count": 0, "lastUpdatedBy": None}]
        assert states == ["connected", "disconnected"]


async def test_reconnects_after_a_restart_and_flushes_queued_emits_in_order(
    autojump_clock: Any,
) -> None:
    seen: list[Any] = []
    options = ReconnectOptions(initial_delay=1.0)
    async with open_test_server(recorder_room(seen)) as server:
        async with open_client(f"{server.url}/ws/rec", reconnection=options) as client:
            await client.wait_for_connection()
            client.emit("before", 0)
            await client.receive("ack")
            await server.restart()  # same port; the client's socket is closed with 1001
            while client.is_connected():
                await trio.sleep(0.01)
            for i in range(1, 4):
                client.emit("queued", i)  # while disconnected: queued
            assert client.queued == 3
            await client.wait_for_connection()
            for _ in range(3):
                await client.receive("ack")
    assert seen == [("before", 0), ("queued", 1), ("queued", 2), ("queued", 3)]


async def test_a_server_that_stops_answering_pings_makes_the_client_reconnect(
    autojump_clock: Any,
) -> None:
    silent = SilentServer()
    async with trio.open_nursery() as nursery:
        server = await nursery.start(silent.serve)
        url = f"ws://127.0.0.1:{server.port}/ws/x"
        async with open_client(url, ping_interval=5, pong_timeout=5) as client:
            await client.wait_for_connection()
            start = trio.current_time()
            dropped: list[float] = []
            client.on_close = lambda code, reason: dropped.append(trio.current_time())
            while silent.connections < 2:
                await trio.sleep(0.1)
            # Dropped after ping_interval + pong_timeout of silence: not before, not a ping later.
            assert dropped[0] - start == pytest.approx(10, abs=0.01)
        nursery.cancel_scope.cancel()


async def test_giving_up_after_max_attempts(autojump_clock: Any) -> None:
    states: list[str] = []
    url = f"ws://127.0.0.1:{free_port()}/ws/counter"
    options = ReconnectOptions(max_attempts=3, initial_delay=1, multiplier=2, jitter=0)
    async with open_client(url, reconnection=options) as client:
        client.on_state_change = states.append
        start = trio.current_time()
        with pytest.raises(
            NotConnectedError,
            match=r"gave up after 3 reconnection attempts; the last attempt failed: "
            r"Error connecting to \('127\.0\.0\.1', \d+\): Connection refused$",
        ):
            await client.wait_for_connection()
        assert client.state == "error"
        # Backoff: 1 + 2 + 4 seconds between the four attempts.
        assert trio.current_time() - start == pytest.approx(7, abs=0.5)
    assert states[-3:] == ["reconnecting", "error", "disconnected"]


async def test_waiting_for_a_connection_says_why_the_attempts_fail(autojump_clock: Any) -> None:
    # A stopped server: the client retries (1 s, 1.5 s, ...) and the wait ends naming the cause.
    port = free_port()
    options = ReconnectOptions(jitter=0)
    async with open_client(f"ws://127.0.0.1:{port}/ws/counter", reconnection=options) as client:
        errors: list[BaseException] = []
        client.on_error = errors.append
        with pytest.raises(NotConnectedError) as waited:
            await client.wait_for_connection(timeout=3)
        assert str(waited.value) == (
            f"ws://127.0.0.1:{port}/ws/counter: not connected within 3s (state reconnecting); "
            f"the last attempt failed: Error connecting to ('127.0.0.1', {port}): "
            "Connection refused"
        )
        # Each failure was reported as it happened, not only at the end of the wait.
        assert len(errors) == 3  # at 0 s, 1 s and 2.5 s


async def test_queue_overflow_drops_the_oldest(autojump_clock: Any) -> None:
    seen: list[Any] = []
    async with open_test_server(recorder_room(seen)) as server:
        async with open_client(f"{server.url}/ws/rec", max_queue_size=3) as client:
            await client.wait_for_connection()
            client.disconnect()
            for i in range(6):
                client.emit("e", i)
            assert client.queued == 3
            client.reconnect()
            await client.wait_for_connection()
            for _ in range(3):
                await client.receive("ack")
    assert seen == [("e", 3), ("e", 4), ("e", 5)]


async def test_disconnect_stays_disconnected_until_reconnect(autojump_clock: Any) -> None:
    async with open_test_server(COUNTER) as server:
        async with open_client(f"{server.url}/ws/counter") as client:
            await client.wait_for_connection()
            client.disconnect()
            assert client.state == "disconnected"
            with pytest.raises(NotConnectedError, match="disconnected"):
                await client.wait_for_connection()
            await trio.sleep(120)
            assert client.state == "disconnected"
            assert await server.room("counter").get_session_count() == 0
            client.reconnect()
            await client.wait_for_connection()
            assert await server.room("counter").get_session_count() == 1


async def test_callbacks_that_raise_are_logged_and_the_client_goes_on(
    autojump_clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(data: Any) -> None:
        raise RuntimeError("listener bug")

    async with open_test_server(COUNTER) as server:
        async with open_client(f"{server.url}/ws/counter") as client:
            client.on("counter:sync", broken)
            client.on_open = lambda: 1 / 0
            await client.wait_for_connection()
            await client.receive("counter:sync")
            client.emit("counter:increment")
            assert (await client.receive("counter:update"))["count"] == 1
    assert "listener of 'counter:sync' callback raised RuntimeError: listener bug" in caplog.text
    assert "on_open callback raised ZeroDivisionError" in caplog.text


async def test_a_handshake_that_never_completes_times_out(autojump_clock: Any) -> None:
    async def mute(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()  # accepts TCP, never answers the upgrade

    async with trio.open_nursery() as nursery:
        (listener,) = await nursery.start(
            functools.partial(trio.serve_tcp, mute, 0, host="127.0.0.1")
        )
        url = f"ws://127.0.0.1:{listener.socket.getsockname()[1]}/ws/x"
        async with open_client(url, connection_timeout=2) as client:
            errors: list[BaseException] = []
            client.on_error = errors.append
            with pytest.raises(NotConnectedError, match="not connected within 4s"):
                await client.wait_for_connection()
            assert errors and "cannot connect" in str(errors[0])
        nursery.cancel_scope.cancel()


def test_bad_urls_are_refused() -> None:
    async def main() -> None:
        async with open_client("http://example/ws"):
            pass  # pragma: no cover - never entered

    with pytest.raises(ValueError, match="client URL must be ws://"):
        trio.run(main)


async def test_refused_handshakes_are_reported_and_retried(
    autojump_clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with open_test_server(COUNTER) as server:
        options = ReconnectOptions(max_attempts=1, jitter=0)
        async with open_client(f"{server.url}/ws/nowhere", reconnection=options) as client:
            errors: list[BaseException] = []
            client.on_error = errors.append
            with pytest.raises(NotConnectedError, match="gave up"):
                await client.wait_for_connection()
            assert len(errors) == 2
            assert "HTTP 404 no room is served at /ws/nowhere" in str(errors[0])


async def test_receive_gets_events_that_arrived_before_it_was_called(autojump_clock: Any) -> None:
    async with open_test_server(COUNTER) as server:
        async with open_client(f"{server.url}/ws/counter") as client:
            await client.wait_for_connection()
            await trio.sleep(1)  # the sync sent on connecting has long arrived
            assert (await client.receive("counter:sync"))["count"] == 0
            client.emit("counter:increment")
            client.emit("counter:increment")
            await trio.sleep(1)
            assert [(await client.receive())["count"] for _ in range(2)] == [1, 2]


async def test_errors_in_the_block_come_out_as_themselves(autojump_clock: Any) -> None:
    url = f"ws://127.0.0.1:{free_port()}/ws/x"
    with pytest.raises(NotConnectedError, match=r"not connected within 0\.2s"):
        async with open_client(url, connection_timeout=0.1) as client:
            await client.wait_for_connection()
    with pytest.raises(KeyError):
        async with open_test_server(COUNTER):
            raise KeyError("mine")


async def test_max_attempts_zero_retries_forever(autojump_clock: Any) -> None:
    states: list[str] = []
    url = f"ws://127.0.0.1:{free_port()}/ws/counter"
    options = ReconnectOptions(max_attempts=0, initial_delay=0.1, max_delay=1, jitter=0)
    async with open_client(url, reconnection=options) as client:
        client.on_state_change = states.append
        with trio.fail_after(60):
            while client.reconnect_attempts <= 10:
                await trio.sleep(0.05)
        assert client.state == "reconnecting"
    assert "error" not in states


async def test_ping_interval_zero_sends_no_pings_and_never_drops_a_silent_server(
    autojump_clock: Any,
) -> None:
    silent = SilentServer()
    async with trio.open_nursery() as nursery:
        server = await nursery.start(silent.serve)
        url = f"ws://127.0.0.1:{server.port}/ws/x"
        async with open_client(url, ping_interval=0, pong_timeout=5) as client:
            await client.wait_for_connection()
            # A keepalive with interval 0 would ping without pause, and the autojump clock
            # would never move: wake on the first frame, not by polling.
            with trio.move_on_after(600):
                await silent.first_frame.wait()
            assert silent.received == []
            assert client.is_connected() and silent.connections == 1
        nursery.cancel_scope.cancel()

    async with open_test_server(COUNTER) as verani_server:
        async with open_client(f"{verani_server.url}/ws/counter", ping_interval=0) as client:
            closes: list[int | None] = []
            client.on_close = lambda code, reason: closes.append(code)
            await client.wait_for_connection()
            await trio.sleep(600)
            assert client.is_connected() and closes == []
            client.emit("counter:increment")
            assert (await client.receive("counter:update"))["count"] == 1


async def test_reconnect_and_disconnect_report_the_close_they_make(autojump_clock: Any) -> None:
    # The session's cleanup (on_close, the state) runs even though reconnect() and disconnect()
    # cancel the session to end it.
    closes: list[tuple[int | None, str | None]] = []
    async with open_test_server(COUNTER) as server:
        async with open_client(f"{server.url}/ws/counter") as client:
            client.on_close = lambda code, reason: closes.append((code, reason))
            await client.wait_for_connection()
            client.reconnect()
            await trio.sleep(1)  # the old connection ends, a new one opens
            await client.wait_for_connection()
            assert len(closes) == 1 and await server.room("counter").get_session_count() == 1
            client.disconnect()
            await trio.sleep(1)
            assert len(closes) == 2 and client.state == "disconnected"
