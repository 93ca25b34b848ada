"""verani.client against a counter server that shares none of verani's code.

tests/interop/websockets_counter_server.py is the seed's counter room written with the
`websockets` library (asyncio) from the wire protocol of DESIGN.md §5. It runs in a subprocess;
these tests drive it with `verani.client.open_client` in real time, kill it and start it again on
the same port, and run examples/counter_client.py against it.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import trio

from verani.client import ReconnectOptions, VeraniClient, open_client

pytest.importorskip(
    "websockets",
    minversion="13.0",
    reason="the interop server needs the `websockets` library (>= 13, pip install websockets)",
)

ROOT = pathlib.Path(__file__).resolve().parent.parent
SERVER = ROOT / "tests" / "interop" / "websockets_counter_server.py"
EXAMPLE = ROOT / "examples" / "counter_client.py"
# Real time: reconnect quickly, and keep on trying while the server restarts (about 20 s).
FAST = ReconnectOptions(initial_delay=0.05, max_delay=0.2, max_attempts=100)


class CounterServer:
    """The websockets counter server in a subprocess; a thread collects its output lines."""

    def __init__(self, *flags: str) -> None:
        self.flags = flags
        self.port = 0
        self.lines: list[str] = []
        self._proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    def url(self, user_id: str) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/counter?userId={user_id}"

    @property
    def connections(self) -> int:
        """Connections the server has accepted, over all its runs."""
        return sum(line.startswith("CONNECTED ") for line in self.lines)

    def start(self) -> None:
        """Start the server (on the port of its last run, if any); return once it listens."""
        assert self._proc is None, "already running"
        proc = subprocess.Popen(
            [sys.executable, str(SERVER), str(self.port), *self.flags],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        listening = threading.Event()
        self._proc = proc
        self._reader = threading.Thread(target=self._read, args=(proc, listening), daemon=True)
        self._reader.start()
        if not listening.wait(30) or proc.poll() is not None:
            self.kill()
            raise AssertionError(f"the server did not start: {self.lines}")

    def _read(self, proc: subprocess.Popen[str], listening: threading.Event) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if line.startswith("LISTENING "):
                self.port = int(line.split()[1])
                listening.set()
        listening.set()  # it exited: start() need not wait any longer

    def kill(self) -> None:
        """SIGKILL the server, wait for it, and close its pipe."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.kill()
        proc.wait(timeout=10)
        assert self._reader is not None
        self._reader.join(timeout=10)  # it reads up to EOF, which the kill brings
        assert proc.stdout is not None
        proc.stdout.close()


@contextmanager
def counter_server(*flags: str) -> Iterator[CounterServer]:
    server = CounterServer(*flags)
    server.start()
    try:
        yield server
    finally:
        server.kill()


async def until(predicate: Callable[[], bool], what: str, timeout: float = 10) -> None:
    """Poll (in real time) until ``predicate()`` holds; fail after ``timeout`` seconds."""
    with trio.move_on_after(timeout):
        while not predicate():
            await trio.sleep(0.01)
        return
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def recorder(client: VeraniClient, *events: str) -> list[tuple[str, dict[str, Any]]]:
    """Every one of ``events`` the client gets from now on, in order, with its data."""
    log: list[tuple[str, dict[str, Any]]] = []
    for event in events:
        client.on(event, lambda data: log.append((data["type"], data)))
    return log


# --- (a) the counter's events, on/once/off ------------------------------------------------------


async def _counter_session(server: CounterServer) -> None:
    with trio.fail_after(30):
        async with (
            open_client(server.url("alice")) as alice,
            open_client(server.url("bob")) as bob,
        ):
            syncs: list[dict[str, Any]] = []
            every: list[int] = []
            first: list[int] = []

            def on_update(data: dict[str, Any]) -> None:
                every.append(data["count"])

            alice.on("counter:sync", syncs.append)
            alice.on("counter:update", on_update)
            alice.once("counter:update", lambda data: first.append(data["count"]))
            bobs = recorder(bob, "counter:sync", "counter:update", "counter:reset")
            await alice.wait_for_connection()
            await bob.wait_for_connection()
            # Each connection is sent the current count.
            await until(lambda: len(syncs) == 1 and len(bobs) == 1, "the syncs on connecting")
            assert syncs == [{"type": "counter:sync", "count": 0, "lastUpdatedBy": None}]

            alice.emit("counter:increment", {"amount": 1})
            alice.emit("counter:increment", {})  # the amount defaults to 1
            alice.emit("counter:increment", {"amount": 5})
            await until(lambda: len(every) == 3, "three updates")
            assert every == [1, 2, 7]
            assert first == [1]  # once: the first update only

            # receive() takes events in arrival order, from the start: the three updates the
            # listeners saw are still there for it.
            assert [(await alice.receive("counter:update"))["count"] for _ in range(3)] == [1, 2, 7]
            # off(event, callback) removes that callback; receive() still sees the event.
            alice.off("counter:update", on_update)
            bob.emit("counter:decrement", {"amount": 2})
            update = await alice.receive("counter:update")
            assert update == {"type": "counter:update", "count": 5, "updatedBy": "bob"}
            assert every == [1, 2, 7]

            alice.emit("counter:reset", {})
            assert await alice.receive("counter:reset") == {
                "type": "counter:reset",
                "resetBy": "alice",
            }
            alice.emit("counter:get", {})
            await alice.receive("counter:sync")  # the sync sent on connecting, kept until now
            assert await alice.receive("counter:sync") == {
                "type": "counter:sync",
                "count": 0,
                "lastUpdatedBy": "alice",
            }
            assert syncs[1:] == [{"type": "counter:sync", "count": 0, "lastUpdatedBy": "alice"}]

            # counter:get is answered to the asker only: bob's next sync is his own answer.
            bob.off("counter:update")  # off(event): every callback of the event
            bob.emit("counter:increment", {"amount": 3})
            await alice.receive("counter:update")
            bob.emit("counter:get", {})
            await until(lambda: bobs[-1][0] == "counter:sync", "bob's answer to counter:get")
            assert [(event, data.get("count")) for event, data in bobs] == [
                ("counter:sync", 0),
                ("counter:update", 1),
                ("counter:update", 2),
                ("counter:update", 7),
                ("counter:update", 5),
                ("counter:reset", None),
                ("counter:sync", 3),
            ]


def test_counter_events_on_once_off() -> None:
    with counter_server() as server:
        trio.run(_counter_session, server)
        assert server.connections == 2


# --- (b) reconnection after a restart, with the frames emitted meanwhile -------------------------


async def _restart_session(server: CounterServer) -> list[str]:
    states: list[str] = []
    closes: list[int | None] = []
    with trio.fail_after(60):
        async with open_client(server.url("alice"), reconnection=FAST) as client:
            client.on_state_change = states.append
            client.on_close = lambda code, reason: closes.append(code)
            syncs: list[int] = []
            updates: list[int] = []
            client.on("counter:sync", lambda data: syncs.append(data["count"]))
            client.on("counter:update", lambda data: updates.append(data["count"]))
            await client.wait_for_connection()
            client.emit("counter:increment", {"amount": 5})
            await until(lambda: updates == [5], "the first update")

            await trio.to_thread.run_sync(server.kill)
            # Dropped, and at least one attempt to reconnect has failed.
            await until(lambda: client.reconnect_attempts >= 2, "a failed reconnection attempt")
            assert client.state == "reconnecting"
            client.emit("counter:increment", {"amount": 1})
            client.emit("counter:increment", {"amount": 10})
            client.emit("counter:decrement", {"amount": 100})
            client.emit("counter:get", {})
            assert client.queued == 4

            await trio.to_thread.run_sync(server.start)  # the same port, a fresh count
            await client.wait_for_connection()  # on its own: no reconnect() call
            await until(lambda: len(syncs) == 3, "the answer to counter:get")
            # The sync of the new connection, then the queued frames, in the order emitted.
            assert (syncs, updates) == ([0, 0, -89], [5, 1, 11, -89])
            assert client.queued == 0
            assert client.reconnect_attempts == 0
            assert closes == [1006]  # killed: no closing handshake
    return states


def test_reconnects_after_a_restart_and_sends_what_was_emitted_meanwhile_in_order() -> None:
    with counter_server() as server:
        states = trio.run(_restart_session, server)
        assert server.connections == 2
    assert states == ["connected", "disconnected", "reconnecting", "connected", "disconnected"]


# --- (c) keepalive: {"type": "ping"} every ping_interval, dropped without a pong -----------------

PING_INTERVAL = 0.2


async def _keepalive_session(server: CounterServer, pong_timeout: float, pong: bool) -> list[float]:
    """Returns how long each connection lasted, in seconds."""
    opened: list[float] = []
    lifetimes: list[float] = []

    def on_state_change(state: str) -> None:
        if state == "connected":
            opened.append(trio.current_time())
        elif state == "disconnected" and len(opened) > len(lifetimes):
            lifetimes.append(trio.current_time() - opened[-1])

    with trio.fail_after(30):
        async with open_client(
            server.url("alice"),
            reconnection=FAST,
            ping_interval=PING_INTERVAL,
            pong_timeout=pong_timeout,
        ) as client:
            client.on_state_change = on_state_change
            await client.wait_for_connection()
            if pong:
                # Long enough to be dropped twice over, were the pongs not counted.
                await trio.sleep(2 * (PING_INTERVAL + pong_timeout))
                assert client.is_connected() and server.connections == 1
                client.emit("counter:increment", {"amount": 1})
                assert (await client.receive("counter:update"))["count"] == 1
            else:
                await until(lambda: server.connections >= 3, "two reconnections")
    return lifetimes


@pytest.mark.parametrize("pong", [True, False], ids=["answered", "unanswered"])
def test_keepalive_drops_and_reconnects_without_pongs(
    pong: bool, caplog: pytest.LogCaptureFixture
) -> None:
    # Answered: a generous pong timeout, so that a slow machine does not drop the connection.
    pong_timeout = 1.0 if pong else 0.2
    with counter_server(*([] if pong else ["--no-pong"])) as server:
        lifetimes = trio.run(_keepalive_session, server, pong_timeout, pong)
    if pong:
        assert server.connections == 1 and len(lifetimes) == 1  # closed at the end only
        assert "no pong" not in caplog.text
    else:
        assert server.connections >= 3 and len(lifetimes) >= 2
        # Dropped after ping_interval + pong_timeout without a pong, not before.
        assert min(lifetimes[:2]) >= PING_INTERVAL + pong_timeout - 0.05, lifetimes
        assert "no pong for" in caplog.text


# --- (d) the example -----------------------------------------------------------------------------


def test_example_counter_client_runs_the_seeds_sequence() -> None:
    with counter_server() as server:
        runs = [
            subprocess.run(
                [sys.executable, str(EXAMPLE), server.url("alice")],
                capture_output=True,
                text=True,
                timeout=60,
                cwd=ROOT,
            )
            for _ in range(2)
        ]
        assert "CONNECTED alice" in server.lines
    for result in runs:
        assert (result.returncode, result.stderr) == (0, "")
    first, second = (result.stdout.splitlines() for result in runs)
    assert first[:4] == [
        "Current count: 0",
        "Count updated to 1 by alice",
        "Count updated to 2 by alice",
        "Count updated to 3 by alice",
    ]
    assert first[4].startswith("Disconnecting with the count at 3.")
    # The example leaves the count alone: the next run starts where this one ended.
    assert second[0] == "Current count: 3 (last updated by alice)"
    assert second[-1].startswith("Disconnecting with the count at 6.")
