"""Production hardening: one cheap client (or one bad network) must not hurt the others.

Each test pins one way it could: outbound memory bounded in bytes, floods of tiny frames,
unfinished messages of empty fragments, dead peers, half-open handshakes, running out of file
descriptors. Real servers on 127.0.0.1, hand-built frames where the protocol is broken on purpose.
"""

from __future__ import annotations

import logging
import pathlib
import resource
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import pytest
import trio
import trio_websocket
from wsproto.events import AcceptConnection, CloseConnection, Pong, TextMessage

from faults import FaultyStore
from verani import RoomContext, ServerConfig, define_room, open_server
from verani.frames import BUDGET_FRAMES, NEED_DATA, PAUSE, FrameReader
from verani.server import CLIENT_LOG_BURST, CLIENT_LOG_RATE
from verani.store import MemoryStore

from helpers import (
    CONTINUATION,
    PING,
    ROOMS,
    TEXT,
    RawSocket,
    connect,
    frame,
    http_request,
    upgrade_request,
    wait_logged,
)

PONG = 0xA
PING_JSON = b'{"type":"ping"}'


def blob_room() -> Any:
    """Sends ``n`` frames of ``size`` characters to the asking socket."""
    room = define_room(name="blob", state={"n": 0}, persisted_keys=["n"])

    @room.on("blob")
    def blob(ctx: RoomContext[Any], data: Any) -> None:
        for _ in range(data["n"]):
            ctx.emit.emit("blob", "x" * data["size"])

    @room.on("saved-blob")
    def saved_blob(ctx: RoomContext[Any], data: Any) -> None:
        # A persisted change: the frame waits in the output gate until the write is durable.
        ctx.actor.room_state.n += 1
        ctx.emit.emit("blob", "x" * data["size"])

    @room.on("echo")
    def echo(ctx: RoomContext[Any], data: Any) -> None:
        ctx.emit.emit("echo", data)

    return room


async def assert_served(url: str) -> None:
    async with connect(url, "/ws/blob") as other:
        await other.emit("echo", "still here")
        assert (await other.next_event("echo"))[1]["data"] == "still here"


# --- outbound memory is bounded in bytes ------------------------------------------------------


async def test_a_slow_reader_is_closed_at_its_byte_budget_with_a_close_frame(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="verani")
    config = ServerConfig(max_outbound_bytes=1 << 20)
    with trio.fail_after(20):
        async with open_server([blob_room()], store=MemoryStore(), config=config) as server:
            async with RawSocket.open(server.port, "/ws/blob") as (client, answer):
                assert isinstance(answer, AcceptConnection)
                client.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                # 40 frames of 100 KB: far under the 1,024-frame limit, 4x the byte budget.
                await client.send_json({"type": "blob", "data": {"n": 40, "size": 100_000}})
                await wait_logged(caplog, "verani", "reads too slowly")
                assert "closing with 1008" in caplog.text
                # Read at last: whole frames (the one being written is finished), then the
                # Close frame — never a stream cut in the middle of a frame.
                received = 0
                while True:
                    event = await client.event()
                    if isinstance(event, CloseConnection):
                        break
                    assert isinstance(event, TextMessage), event
                    received += len(event.data)
                assert event.code == 1008
                assert received <= 1 << 20
            while server._connections:
                await trio.sleep(0.01)
            await assert_served(server.url)


async def test_a_socket_closed_for_slowness_leaves_its_room_at_once() -> None:
    # The write in progress may take up to close_timeout to finish (so the Close frame can
    # follow whole frames), but the room must stop counting the socket right away.
    config = ServerConfig(max_outbound_bytes=4 << 20, close_timeout=30)
    with trio.fail_after(20):
        async with open_server([blob_room()], store=MemoryStore(), config=config) as server:
            async with RawSocket.open(server.port, "/ws/blob") as (client, _):
                client.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                # 1 MB frames, one per turn: the kernel's buffers fill and the writer waits
                # in the middle of a frame while the next ones pass the budget.
                for _ in range(12):
                    await client.send_json({"type": "blob", "data": {"n": 1, "size": 1_000_000}})
                with trio.fail_after(5):
                    while server.supervisor.status()[0].sessions:
                        await trio.sleep(0.01)
                # (Reading the rest through a 4 KiB window would take seconds; the Close frame
                # after whole frames is the slow-reader test's.)
                assert server.stats.connections == 1 and len(server._connections) == 1


async def test_log_lines_caused_by_clients_are_rate_limited(
    mock_clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # A client that breaks the protocol and reconnects in a loop must not fill the disk. The
    # clock stands still (real sockets, mock time), so the limit is exact.
    caplog.set_level(logging.INFO, logger="verani")
    async with open_server([blob_room()], store=MemoryStore()) as server:
        for _ in range(CLIENT_LOG_BURST + 50):
            async with RawSocket.open(server.port, "/ws/blob") as (client, _):
                await client.send(frame(0x3))  # a reserved opcode: 1002
                assert await client.close_code() == 1002
        mock_clock.jump(1 / CLIENT_LOG_RATE)
        async with RawSocket.open(server.port, "/ws/blob") as (client, _):
            await client.send(frame(0x3))
            assert await client.close_code() == 1002
        await wait_logged(caplog, "verani", "50 log lines about clients left out")
    violations = [r for r in caplog.records if "broke the WebSocket protocol" in r.message]
    assert len(violations) == CLIENT_LOG_BURST + 1
    assert server.stats.frames_dropped == CLIENT_LOG_BURST + 51  # counted, every one


async def test_frames_held_by_the_output_gate_count_toward_the_byte_budget(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="verani")
    store = FaultyStore(tmp_path, durability="os")
    config = ServerConfig(max_outbound_bytes=1 << 20)
    with trio.fail_after(20):
        async with open_server([blob_room()], store=store, config=config) as server:
            async with connect(server.url, "/ws/blob") as client:
                store.hold_saves = True
                # Each turn changes persisted state, so its 200 KB frame waits for a write
                # that does not finish: six of them are over the budget of this socket.
                for _ in range(6):
                    await client.emit("saved-blob", {"size": 200_000})
                await wait_logged(caplog, "verani", "reads too slowly")
                with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                    await client.recv()
                assert closed.value.reason.code == 1008
            store.release_saves()
            await assert_served(server.url)


# --- the reader is fair and bounded -----------------------------------------------------------


def test_the_reader_pauses_after_its_budget_of_frames() -> None:
    pongs = b"".join(frame(PONG) for _ in range(10_000))
    reader = FrameReader(max_message_size=1000, max_control_per_second=1e9, data=pongs)
    parsed = 0
    while (event := reader.next_event()) is not NEED_DATA:
        assert event is PAUSE
        parsed += 1
    # One pause per budget: never more than BUDGET_FRAMES frames without yielding.
    assert parsed == 10_000 // BUDGET_FRAMES


async def test_a_flood_of_tiny_frames_yields_to_the_scheduler() -> None:
    # 10,000 unsolicited pongs arrive in one read; the reader must not parse them all in one
    # step of its task (that held every other socket for ~280 ms).
    steps: dict[trio.lowlevel.Task, int] = {}

    class CountSteps(trio.abc.Instrument):
        def after_task_step(self, task: trio.lowlevel.Task) -> None:
            steps[task] = steps.get(task, 0) + 1

    config = ServerConfig(max_control_frames=1e9)  # the rate cap is tested on its own
    flood = b"".join(frame(PONG) for _ in range(10_000)) + frame(TEXT, PING_JSON)
    assert len(flood) < 64 * 1024  # one read
    with trio.fail_after(20):
        async with open_server([blob_room()], store=MemoryStore(), config=config) as server:
            async with RawSocket.open(server.port, "/ws/blob") as (client, _):
                instrument = CountSteps()
                trio.lowlevel.add_instrument(instrument)
                try:
                    await client.send(flood)
                    assert (await client.next_json())["type"] == "pong"
                finally:
                    trio.lowlevel.remove_instrument(instrument)
    readers = [n for task, n in steps.items() if task.name.endswith("_handle_stream")]
    assert readers and max(readers) >= 10_000 // BUDGET_FRAMES


async def test_a_burst_of_control_frames_is_closed_with_1008(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="verani")
    config = ServerConfig(max_control_frames=50)
    with trio.fail_after(10):
        async with open_server([blob_room()], store=MemoryStore(), config=config) as server:
            async with RawSocket.open(server.port, "/ws/blob") as (client, _):
                await client.send(*[frame(PONG)] * 200)
                assert await client.close_code() == 1008
            await wait_logged(caplog, "verani", "over 50 control frames per second")
            # Within the rate, pings are answered and nothing is closed.
            async with RawSocket.open(server.port, "/ws/blob") as (client, _):
                for _ in range(3):
                    await client.send(frame(PING, b"hi"))
                    event = await client.event()
                    assert isinstance(event, Pong) and event.payload == b"hi"
            await assert_served(server.url)


async def test_an_unfinished_message_of_empty_fragments_is_closed_with_1008(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="verani")
    config = ServerConfig(max_fragments=100)
    empty = frame(CONTINUATION, b"", fin=False)
    with trio.fail_after(10):
        async with open_server([blob_room()], store=MemoryStore(), config=config) as server:
            async with RawSocket.open(server.port, "/ws/blob") as (client, _):
                await client.send(frame(TEXT, b"", fin=False), *[empty] * 5000)
                assert await client.close_code() == 1008
            await wait_logged(caplog, "verani", "a message in over 100 fragments")
            # A message in exactly max_fragments frames is fine.
            async with RawSocket.open(server.port, "/ws/blob") as (client, _):
                text = b'{"type":"echo","data":"' + b"y" * 98 + b'"}'
                await client.send(
                    frame(TEXT, text[:1], fin=False),
                    *[frame(CONTINUATION, text[i : i + 1], fin=False) for i in range(1, 99)],
                    frame(CONTINUATION, text[99:]),
                )
                assert (await client.next_json())["data"]["data"] == "y" * 98


# --- dead peers are dropped -------------------------------------------------------------------


def presence_room() -> Any:
    room = define_room(name="presence", state={"left": []}, persisted_keys=["left"])

    @room.on_disconnect
    def gone(ctx: RoomContext[Any]) -> None:
        ctx.actor.room_state.left = [*ctx.actor.room_state.left, ctx.meta.user_id]
        ctx.actor.emit.emit("left", {"users": ctx.actor.get_connected_user_ids()})

    return room


async def test_a_silent_peer_is_pinged_then_closed_with_1011_and_leaves_its_room(
    autojump_clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="verani")
    config = ServerConfig(ping_interval=20, ping_timeout=10)
    store = MemoryStore()
    async with open_server([presence_room()], store=store, config=config, idle_timeout=5) as server:
        # A raw socket answers nothing by itself: a frozen process, a dead network.
        async with RawSocket.open(server.port, "/ws/presence?userId=ghost") as (ghost, _):
            async with connect(server.url, "/ws/presence", user_id="alive") as alive:
                start = trio.current_time()
                # The room hibernates with both sockets open (5 s idle), long before the ping.
                await trio.sleep(1)
                while server.supervisor.status()[0].awake:
                    await trio.sleep(1)
                _, left = await alive.next_event("left")
                # trio-websocket answers pings by itself: only the ghost was dropped, after
                # 20 s of silence and 10 s without an answer (checked every 2.5 s).
                assert left["users"] == ["alive"]
                assert 30 <= trio.current_time() - start <= 33
            assert await ghost.close_code() == 1011
        assert server.stats.ping_timeouts == 1
        assert "answered no ping; closing with 1011" in caplog.text
    stored = await store.load("presence", "default")
    assert stored is not None and stored.state["left"] == ["ghost", "alive"]


async def test_a_peer_that_answers_pings_stays_however_quiet(autojump_clock: Any) -> None:
    config = ServerConfig(ping_interval=5, ping_timeout=5)
    async with open_server([presence_room()], store=MemoryStore(), config=config) as server:
        async with RawSocket.open(server.port, "/ws/presence") as (quiet, _):
            for _ in range(10):  # 10 pings over ~60 s, each answered with a Pong
                event = await quiet.event()
                assert event.__class__.__name__ == "Ping", event
                await quiet.send(frame(PONG, event.payload))  # type: ignore[attr-defined]
            assert len(server._connections) == 1
        assert server.stats.ping_timeouts == 0


async def test_ping_interval_zero_sends_no_pings(autojump_clock: Any) -> None:
    config = ServerConfig(ping_interval=0)
    async with open_server([presence_room()], store=MemoryStore(), config=config) as server:
        async with RawSocket.open(server.port, "/ws/presence") as (quiet, _):
            with trio.move_on_after(3600) as waited:
                await quiet.event()
            assert waited.cancelled_caught  # an hour of silence: no Ping, no close
            assert len(server._connections) == 1


# --- handshakes count from accept -------------------------------------------------------------


async def test_half_open_handshakes_yield_their_places_to_new_sockets() -> None:
    config = ServerConfig(max_connections=3, max_handshakes=2)
    with trio.fail_after(10):
        async with open_server([blob_room()], store=MemoryStore(), config=config) as server:
            # Ten sockets that never send a request: at most two are kept waiting, the others
            # are dropped at once (not after the 10 s handshake timeout).
            idle = [await trio.open_tcp_stream("127.0.0.1", server.port) for _ in range(10)]
            dropped = 0
            for stream in idle[:8]:
                with trio.move_on_after(5):
                    dropped += await stream.receive_some(1) == b""
            assert dropped == 8
            assert len(server._handshakes) <= 2
            # Real clients get in past the silent ones, up to max_connections...
            async with connect(server.url, "/ws/blob"), connect(server.url, "/ws/blob"):
                async with connect(server.url, "/ws/blob") as third:
                    await third.emit("echo", 3)
                    assert (await third.next_event("echo"))[1]["data"] == 3
                    # ...and then the server is full: the next one is told so.
                    status, headers, _ = await http_request(
                        server.port, upgrade_request("/ws/blob")
                    )
                    assert (status, headers["retry-after"]) == (503, "5")
            assert server.stats.handshakes_dropped >= 8
            for stream in idle:
                await stream.aclose()


@contextmanager
def serving(
    room_file: str, *args: str, fd_limit: int | None = None
) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """``verani serve ROOM_FILE`` in a child process (with a file descriptor limit if given);
    yields the process and its port."""

    def lower_limit() -> None:
        if fd_limit is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (fd_limit, fd_limit))

    command = [sys.executable, "-m", "verani", "serve", str(ROOMS / room_file), "--port", "0"]
    proc = subprocess.Popen(
        [*command, "--durability", "os", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lower_limit,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "serving on" in line, (line, proc.stderr.read() if proc.stderr else "")
        yield proc, int(line.split("ws://127.0.0.1:")[1].split()[0])
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


def rss_mib(pid: int) -> float:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_memory_of_slow_readers_returns_once_they_are_gone(tmp_path: Any) -> None:
    # Four sockets that never read while 1 MB notifications pile up for them: each is closed
    # at its 4 MiB budget, and once they are gone the server's RSS is back where it started
    # (glibc used to keep its heap at the high-water mark: +16 MiB here).
    with serving("notifications.py", "--store", str(tmp_path / "store")) as (proc, port):
        url = f"ws://127.0.0.1:{port}"

        async def scenario() -> float:
            async with connect(url, "/ws/notifications", user_id="sender") as sender:
                await sender.next_event("notifications:unread")
                before = rss_mib(proc.pid)
                victims = []
                for _ in range(4):
                    stream = await trio.open_tcp_stream("127.0.0.1", port)
                    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                    await stream.send_all(upgrade_request("/ws/notifications?userId=victim"))
                    victims.append(stream)
                await trio.sleep(0.2)
                body = "x" * 1_000_000
                for _ in range(30):
                    await sender.emit("notify", {"to": "victim", "title": "t", "body": body})
                    await sender.next_event("notify:sent")
                for stream in victims:
                    await stream.aclose()
                await trio.sleep(1)
                return rss_mib(proc.pid) - before

        grown = trio.run(scenario)
        proc.terminate()
        _, err = proc.communicate(timeout=15)
    assert err.count("reads too slowly") == 4
    assert grown < 8, f"RSS grew by {grown:.1f} MiB and stayed"


async def _legit_increment(port: int) -> int:
    async with connect(f"ws://127.0.0.1:{port}", "/ws/counter") as client:
        await client.next_event("counter:sync")
        await client.emit("counter:increment", {"amount": 1})
        await client.next_event("counter:update")
        return 1


def test_three_hundred_half_open_sockets_do_not_lock_out_real_clients(tmp_path: Any) -> None:
    # The reproduction of the report: fd limit 256, --max-connections 20, 300 sockets that
    # connect and say nothing; five real clients must get in within 3 s.
    with (
        serving(
            "counter.py",
            "--max-connections",
            "20",
            "--store",
            str(tmp_path / "store"),
            fd_limit=256,
        ) as (_, port),
        ExitStack() as stack,
    ):
        for _ in range(300):
            stack.enter_context(socket.create_connection(("127.0.0.1", port)))

        async def five_clients() -> int:
            done = 0
            with trio.fail_after(3):
                for _ in range(5):
                    done += await _legit_increment(port)
            return done

        assert trio.run(five_clients) == 5


def test_out_of_file_descriptors_the_listener_backs_off_and_open_sockets_are_served(
    tmp_path: Any,
) -> None:
    with serving(
        "counter.py", "--store", str(tmp_path / "store"), "--handshake-timeout", "1", fd_limit=40
    ) as (proc, port):

        async def scenario() -> None:
            with trio.fail_after(20):
                async with connect(f"ws://127.0.0.1:{port}", "/ws/counter") as first:
                    await first.next_event("counter:sync")
                    # Far more sockets than descriptors: accept fails with EMFILE.
                    extra = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(60)]
                    await trio.sleep(0.5)
                    # The socket already open is served meanwhile.
                    await first.emit("counter:increment", {"amount": 1})
                    assert (await first.next_event("counter:update"))[1]["count"] == 1
                    for stream in extra:
                        await stream.aclose()
                # Descriptors free again: new clients get in.
                await trio.sleep(0.5)
                assert await _legit_increment(port) == 1

        trio.run(scenario)
        proc.terminate()
        _, err = proc.communicate(timeout=15)
    assert "cannot accept connections" in err
    assert err.count("cannot accept connections") < 30  # backed off, not spinning


# A request sent in pieces is not "half-open": it finishes within the handshake timeout.
async def test_a_slow_but_complete_handshake_is_accepted() -> None:
    config = ServerConfig(max_handshakes=4)
    async with open_server([blob_room()], store=MemoryStore(), config=config) as server:
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with stream:
            request = upgrade_request("/ws/blob")
            for i in range(0, len(request), 20):
                await stream.send_all(request[i : i + 20])
                await trio.sleep(0.01)
            assert (await stream.receive_some(4096)).startswith(b"HTTP/1.1 101 ")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("ping_timeout", 0),  # a check every 0 seconds would spin a core
        ("max_fragments", 0),
        ("max_handshakes", 0),
        ("max_outbound_bytes", 0),
        ("max_control_frames", 0),
        ("ping_interval", -1),
        ("send_timeout", 0),
    ],
)
def test_a_limit_that_cannot_work_is_refused_naming_the_field(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"'{field}' must be"):
        ServerConfig(**{field: value})
    assert ServerConfig(ping_interval=0).ping_interval == 0  # 0: no pings, allowed
