"""The real CLI in subprocesses: `verani serve` and `verani hibernate` against it."""

from __future__ import annotations

import os
import pathlib
import re
import shlex
import signal
import subprocess
import time

import attrs
import orjson
import pytest
import trio
import trio.lowlevel
import trio_websocket

from verani import ServerConfig
from verani.store import FileStore

from helpers import ROOMS, ROOT, connect, http_request, run, serving, upgrade_request

COUNTER = str(ROOMS / "counter.py")


async def _count_up(url: str, times: int) -> int:
    async with trio_websocket.open_websocket_url(f"{url}/ws/counter?userId=cli") as ws:
        count = orjson.loads(await ws.get_message())["data"]["count"]  # counter:sync
        for _ in range(times):
            await ws.send_message('{"type":"counter:increment","data":{"amount":1}}')
        for _ in range(times):
            count = orjson.loads(await ws.get_message())["data"]["count"]
        return count


def test_log_level_debug_shows_each_event_handled(tmp_path: pathlib.Path) -> None:
    with serving(tmp_path / "store", "--log-level", "debug") as (proc, url):
        assert trio.run(_count_up, url, 1) == 1
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert re.search(r"handled 'counter:increment' from client \S+ \(user cli\) in", err), err
    assert re.search(r"room 'counter' instance 'default': saved \d+ bytes", err), err


def test_serve_hibernate_and_sigterm(tmp_path: pathlib.Path) -> None:
    store = tmp_path / "store"
    with serving(store) as (proc, url):
        assert trio.run(_count_up, url, 3) == 3
        result = run("hibernate", "counter/default", "--store", str(store))
        assert (result.returncode, result.stdout) == (0, "hibernated counter/default\n"), (
            result.stderr
        )
        doc = orjson.loads(FileStore(store).path_for("counter", "default").read_bytes())
        assert doc["state"]["count"] == 3

        result = run("hibernate", "counter", "--store", str(store))
        assert result.returncode == 0 and "nothing to hibernate" in result.stdout

        result = run("hibernate", "nope", "--store", str(store))
        assert result.returncode == 1
        assert "no room named 'nope' is served (rooms: counter)" in result.stderr

        result = run("hibernate", "counter/ghost", "--store", str(store))
        assert result.returncode == 1 and "no instance named 'ghost'" in result.stderr

        # A second server on the same store is refused, naming the first one's pid.
        second = run("serve", COUNTER, "--port", "0", "--store", str(store), timeout=30)
        assert second.returncode == 2
        assert f"already served by another verani server (pid {proc.pid})" in second.stderr

        assert trio.run(_count_up, url, 2) == 5
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    # SIGTERM flushed the awake room before exiting.
    doc = orjson.loads(FileStore(store).path_for("counter", "default").read_bytes())
    assert doc["state"]["count"] == 5
    assert not (store / "server.json").exists()


def test_hibernate_without_a_server(tmp_path: pathlib.Path) -> None:
    result = run("hibernate", "--all", "--store", str(tmp_path))
    assert result.returncode == 1
    assert f"no verani server is running for store {tmp_path}" in result.stderr


def test_hibernate_usage_errors(tmp_path: pathlib.Path) -> None:
    assert run("hibernate", "--store", str(tmp_path)).returncode == 2
    both = run("hibernate", "counter", "--all", "--store", str(tmp_path))
    assert both.returncode == 2 and "either ROOM[/INSTANCE] or --all" in both.stderr


def test_serve_startup_errors_exit_2(tmp_path: pathlib.Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def broken(:\n")
    result = run("serve", str(bad), "--store", str(tmp_path / "s"))
    assert result.returncode == 2 and f"{bad}:1: syntax error" in result.stderr
    result = run("serve", str(tmp_path / "missing.py"))
    assert result.returncode == 2 and "does not exist" in result.stderr
    result = run("serve", COUNTER, "--port", "70000")
    assert result.returncode == 2 and "70000" in result.stderr
    result = run("serve", COUNTER, "--idle-timeout", "0")
    assert result.returncode == 2


def test_serve_port_in_use_fails_and_leaves_nothing_behind(tmp_path: pathlib.Path) -> None:
    import socket

    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for store in (tmp_path / "new" / "store", existing):
            result = run("serve", COUNTER, "--port", str(port), "--store", str(store))
            assert (result.returncode, result.stdout, result.stderr) == (
                2,
                "",
                f"verani: error: cannot listen on 127.0.0.1:{port}: Address already in use "
                "(another program listens there, perhaps another verani server: stop it, or "
                "choose another port; port 0 picks a free one)\n",
            )
    # Neither the directories it would have made nor its lock file: only what was there.
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
        "existing",
        "existing/notes.txt",
    ]


@pytest.mark.skipif(os.name != "posix", reason="signals")
def test_sigint_exits_0(tmp_path: pathlib.Path) -> None:
    with serving(tmp_path) as (proc, _url):
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0


async def _increment_until_killed(url: str, proc: subprocess.Popen[str]) -> tuple[int, int]:
    """Pipeline increments until the server is SIGKILLed; return (sent, highest count shown)."""
    sent = shown = 0

    async def send(ws: trio_websocket.WebSocketConnection) -> None:
        nonlocal sent
        while True:
            await ws.send_message('{"type":"counter:increment","data":{"amount":1}}')
            sent += 1
            await trio.lowlevel.checkpoint()

    try:
        async with trio_websocket.open_websocket_url(f"{url}/ws/counter?userId=k") as ws:
            try:
                shown = orjson.loads(await ws.get_message())["data"]["count"]
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(send, ws)
                    while True:
                        frame = orjson.loads(await ws.get_message())
                        shown = max(shown, frame["data"]["count"])
                        if shown >= 150 and proc.poll() is None:
                            proc.send_signal(signal.SIGKILL)
            finally:
                # trio-websocket's client leaks its TCP stream when the peer vanishes.
                await trio.aclose_forcefully(ws._stream)
    except* (trio_websocket.ConnectionClosed, trio_websocket.HandshakeError):
        pass  # the server died under us, as intended
    return sent, shown


def test_sigkill_under_load_loses_nothing_a_client_was_shown(tmp_path: pathlib.Path) -> None:
    store = tmp_path / "store"
    for _ in range(3):
        with serving(store) as (proc, url):
            before = trio.run(_count_up, url, 0)
            sent, shown = trio.run(_increment_until_killed, url, proc)
            assert proc.wait(timeout=10) == -signal.SIGKILL
        with serving(store) as (proc, url):
            after = trio.run(_count_up, url, 0)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=20) == 0
        # Every count a client was shown was durable before it left the server (the output
        # gate), and no increment was counted that was not sent.
        assert shown <= after <= before + sent
        assert shown > before
        json_doc = orjson.loads(FileStore(store).path_for("counter", "default").read_bytes())
        assert json_doc["state"]["count"] == after  # and the document is whole, never torn


def test_durability_option(tmp_path: pathlib.Path) -> None:
    bad = run("serve", COUNTER, "--durability", "sometimes")
    assert bad.returncode == 2 and "'sometimes' is not one of 'fsync', 'os'" in bad.stderr
    with serving(tmp_path, "--durability", "os") as (proc, url):
        assert trio.run(_count_up, url, 4) == 4
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    doc = orjson.loads(FileStore(tmp_path).path_for("counter", "default").read_bytes())
    assert doc["state"]["count"] == 4


def test_inspect_without_and_with_a_server_and_emit(tmp_path: pathlib.Path) -> None:
    store = tmp_path / "store"
    empty = run("inspect", "--store", str(store))
    assert empty.returncode == 0 and "nothing stored" in empty.stdout
    with serving(store) as (proc, url):
        sent = run(
            "emit",
            f"{url}/ws/counter?userId=zoe",
            "counter:increment",
            '{"amount": 3}',
            "--wait",
            "0.5",
        )
        assert sent.returncode == 0, sent.stderr
        frames = [orjson.loads(line) for line in sent.stdout.splitlines()]
        assert [f["data"]["type"] for f in frames] == ["counter:sync", "counter:update"]
        assert frames[1]["data"]["count"] == 3

        listing = run("inspect", "--store", str(store))
        assert listing.returncode == 0
        assert re.search(r"counter/default\s+awake\s+\d+\s+\S+\s+0", listing.stdout), listing.stdout
        detail = run("inspect", "counter/default", "--store", str(store))
        assert "(awake, 0 session(s), hibernates in" in detail.stdout
        assert "  count: 3\n  last_updated_by: 'zoe'" in detail.stdout

        as_json = orjson.loads(
            run("inspect", "counter/default", "--store", str(store), "--json").stdout
        )
        assert as_json["status"] == "awake"
        assert as_json["stored"]["state"] == {"count": 3, "last_updated_by": "zoe"}
        assert as_json["live"]["ephemeral"] == {} and as_json["live"]["sessions"] == []
        assert run("hibernate", "--all", "--store", str(store)).returncode == 0
        listing = orjson.loads(run("inspect", "counter", "--store", str(store), "--json").stdout)
        assert [(r["instance"], r["status"]) for r in listing["instances"]] == [
            ("default", "hibernated")
        ]

        missing = run("inspect", "counter/ghost", "--store", str(store))
        assert missing.returncode == 1 and "has no instance 'ghost'" in missing.stderr
        unknown = run("inspect", "nope/x", "--store", str(store))
        assert unknown.returncode == 1 and "no room named 'nope' is served" in unknown.stderr
        refused = run("emit", f"{url}/ws/nowhere", "x")
        assert (
            refused.returncode == 1
            and "HTTP 404 no room is served at /ws/nowhere" in refused.stderr
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    # No server: the store alone, never written to.
    before = {p: p.stat().st_mtime_ns for p in store.rglob("*.json")}
    offline = orjson.loads(
        run("inspect", "counter/default", "--store", str(store), "--json").stdout
    )
    assert (offline["status"], offline["live"]) == ("stored", None)
    assert offline["stored"]["state"]["count"] == 3
    assert {p: p.stat().st_mtime_ns for p in store.rglob("*.json")} == before


def test_inspect_says_stored_not_served_for_a_room_the_running_server_does_not_serve(
    tmp_path: pathlib.Path,
) -> None:
    # Left by an earlier `verani serve rooms/`; this server serves only the counter room.
    trio.run(FileStore(tmp_path).save, "chat", "default", {"history": []})
    with serving(tmp_path) as (proc, _):
        listing = run("inspect", "--store", str(tmp_path))
        assert re.search(
            r"chat/default\s+stored \(not served\)\s+\d+\s+\S+\s+-\n", listing.stdout
        ), listing.stdout
        detail = run("inspect", "chat/default", "--store", str(tmp_path))
        assert detail.stdout.startswith(
            "chat/default  (stored, its room is not served by the running server)\n"
        ), detail.stdout
        rows = orjson.loads(run("inspect", "--store", str(tmp_path), "--json").stdout)
        assert [(r["room"], r["status"], r["served"]) for r in rows["instances"]] == [
            ("chat", "stored", False)
        ]
        shown = orjson.loads(
            run("inspect", "chat/default", "--store", str(tmp_path), "--json").stdout
        )
        assert (shown["status"], shown["served"], shown["live"]) == ("stored", False, None)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    rows = orjson.loads(run("inspect", "--store", str(tmp_path), "--json").stdout)
    assert [(r["status"], r["served"]) for r in rows["instances"]] == [("stored", None)]


def test_inspect_shows_special_types_readably_and_never_moves_a_corrupt_file(
    tmp_path: pathlib.Path,
) -> None:
    store = FileStore(tmp_path)
    doc = {
        "format": "verani.room",
        "version": 2,
        "room": "shop",
        "instance": "x",
        "saved_at": "2026-01-01T00:00:00+00:00",
        "storage": {},
        "state": {
            "when": {"$t": "datetime", "v": "2026-01-02T03:04:05+00:00"},
            "tags": {"$t": "set", "v": ["b", "a"]},
            "by_id": {"$t": "map", "v": [[1, "one"]]},
            "pat": {"$t": "regexp", "v": "ab+", "flags": 2},
        },
    }
    path = store.path_for("shop", "x")
    path.parent.mkdir(parents=True)
    path.write_bytes(orjson.dumps(doc))
    shown = run("inspect", "shop/x", "--store", str(tmp_path))
    assert shown.returncode == 0, shown.stderr
    for line in (
        "when: 2026-01-02T03:04:05+00:00",
        "tags: set{'a', 'b'}",
        "by_id: Map{1 => 'one'}",
        "pat: /ab+/i",
    ):
        assert f"  {line}\n" in shown.stdout
    bad = store.path_for("shop", "broken")
    bad.write_bytes(b"{nope")
    listing = run("inspect", "shop", "--store", str(tmp_path))
    assert re.search(r"shop/broken\s+stored \(unreadable\)", listing.stdout), listing.stdout
    detail = run("inspect", "shop/broken", "--store", str(tmp_path))
    assert "stored document unreadable" in detail.stdout
    assert bad.read_bytes() == b"{nope"  # inspect never moves or rewrites anything


def test_argument_errors_with_click_runner(tmp_path: pathlib.Path) -> None:
    from click.testing import CliRunner

    from verani.cli import main

    runner = CliRunner()
    result = runner.invoke(main, ["emit", "http://x/ws", "e"])
    assert result.exit_code == 2 and "must start with ws:// or wss://" in result.output
    result = runner.invoke(main, ["emit", "ws://127.0.0.1:9/ws", "e", "{bad"])
    assert result.exit_code == 2 and "not JSON" in result.output
    result = runner.invoke(main, ["inspect", "/x", "--store", str(tmp_path)])
    assert result.exit_code == 2 and "names no room" in result.output
    result = runner.invoke(main, ["serve"])
    assert result.exit_code == 2 and "Missing argument 'FILE_OR_DIR...'" in result.output
    result = runner.invoke(main, ["serve", COUNTER, "--log-format", "xml"])
    assert result.exit_code == 2
    for command in ("serve", "inspect", "hibernate", "emit", "listen"):
        help_text = runner.invoke(main, [command, "--help"]).output
        assert "Example:" in help_text, command


def test_usage_errors_are_verani_errors_then_the_usage_line_exit_2(tmp_path: pathlib.Path) -> None:
    # The real command: click's own format would be "Usage: ...", a blank line, "Error: ...".
    cases = {
        ("emit", "http://x/ws", "e"): (
            "Invalid value for URL: must start with ws:// or wss://",
            "verani emit [OPTIONS] URL EVENT [JSON]",
        ),
        ("serve",): ("Missing argument 'FILE_OR_DIR...'.", "verani serve [OPTIONS] FILE_OR_DIR..."),
        ("hibernate", "--store", str(tmp_path)): (
            "give either ROOM[/INSTANCE] or --all",
            "verani hibernate [OPTIONS] [ROOM[/INSTANCE]]",
        ),
        ("inspect", "--bogus"): (
            "No such option '--bogus'.",
            "verani inspect [OPTIONS] [ROOM[/INSTANCE]]",
        ),
        ("bogus",): ("No such command 'bogus'.", "verani [OPTIONS] COMMAND [ARGS]..."),
    }
    for args, (message, usage) in cases.items():
        result = run(*args)
        usage = usage.replace("verani", "python -m verani")  # how run() starts it
        command = usage.split(" [")[0]
        assert (result.returncode, result.stdout, result.stderr) == (
            2,
            "",
            f"verani: error: {message}\nUsage: {usage}\nTry '{command} -h' for help.\n",
        ), args


def test_cli_md_usage_error_sample_is_what_the_command_prints() -> None:
    sample = re.search(r"```\n\$ verani (.*?)\n(.*?)```", (ROOT / "cli.md").read_text(), re.DOTALL)
    assert sample, "cli.md lost its usage error sample"
    result = run(*shlex.split(sample.group(1)))
    assert result.returncode == 2
    # run() starts the command as `python -m verani`, and click names it so in the usage line.
    assert result.stderr.replace("python -m verani", "verani") == sample.group(2)


def test_serve_options_for_limits_are_one_table_of_server_config_fields() -> None:
    from verani.cli import CONFIG_OPTIONS, config_from_options, serve

    defaults = ServerConfig()
    params = {param.name: param for param in serve.params}
    for option in CONFIG_OPTIONS:
        param = params[option.field]
        assert param.opts == [option.flag], option
        assert param.default == getattr(defaults, option.field), option
    # Every option reaches its field: give each a value that is not its default.
    args, expected = [COUNTER], {}
    for option in CONFIG_OPTIONS:
        default = getattr(defaults, option.field)
        value = "[a-z]+" if default is None else str(default + 1)
        args += [option.flag, value]
        if default is not None:
            expected[option.field] = type(default)(value)
        else:  # text, or a regular expression when a callback turns it into one
            expected[option.field] = re.compile(value) if option.callback else value
    with serve.make_context("serve", args) as ctx:
        config = config_from_options(ctx.params)
    assert config == attrs.evolve(defaults, **expected)
    assert all(getattr(config, name) != getattr(defaults, name) for name in expected)


def test_errors_are_shown_as_verani_errors_with_their_exit_status(tmp_path: pathlib.Path) -> None:
    from click.testing import CliRunner

    from verani.cli import main

    runner = CliRunner()
    missing = runner.invoke(main, ["serve", str(tmp_path / "nope.py")])
    assert (missing.exit_code, missing.output) == (
        2,
        f"verani: error: room file {tmp_path / 'nope.py'} does not exist\n",
    )
    ghost = runner.invoke(main, ["inspect", "counter/ghost", "--store", str(tmp_path)])
    assert (ghost.exit_code, ghost.output) == (
        1,
        "verani: error: room 'counter' has no instance 'ghost' (nothing stored, not live)\n",
    )


def test_serve_json_logs_and_unusable_store(tmp_path: pathlib.Path) -> None:
    with serving(tmp_path / "s", "--log-format", "json", "--log-level", "debug") as (proc, url):
        trio.run(_count_up, url, 1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    records = [orjson.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert records and all({"time", "level", "logger", "message"} <= set(r) for r in records)
    assert any(r["message"].startswith("room counter/default: hibernated") for r in records)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = run("serve", COUNTER, "--port", "0", "--store", str(blocker / "store"))
    assert result.returncode == 2 and "cannot use store directory" in result.stderr


def test_serve_limit_options(tmp_path: pathlib.Path) -> None:
    limits = (
        "--max-connections",
        "1",
        "--max-frame-size",
        "200",
        "--outbound-queue",
        "16",
        "--handshake-timeout",
        "2",
        "--max-awake-rooms",
        "5",
        "--max-connections-per-room",
        "1",
        "--max-instance-name",
        "8",
        "--instance-pattern",
        "[a-z0-9-]+",
    )
    with serving(tmp_path, *limits) as (proc, url):
        assert trio.run(_count_up, url, 1) == 1
        port = int(url.rsplit(":", 1)[1])

        async def upgrade_status(instance: str) -> tuple[int, bytes]:
            status, _, body = await http_request(port, upgrade_request(f"/ws/counter/{instance}"))
            return status, body

        assert trio.run(upgrade_status, "abcdefghi") == (
            400,
            b"bad room instance name: the instance name is longer than 8 characters\n",
        )
        assert trio.run(upgrade_status, "Shout") == (
            400,
            b"bad room instance name: the instance name does not match '[a-z0-9-]+'\n",
        )

        # The connection above may still be closing on the server: wait until it is gone.
        for _ in range(100):
            listing = orjson.loads(run("inspect", "--store", str(tmp_path), "--json").stdout)
            if all(row["sessions"] == 0 for row in listing["instances"]):
                break
            time.sleep(0.05)

        async def two_at_once() -> int:
            async with trio_websocket.open_websocket_url(f"{url}/ws/counter"):
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                async with stream:
                    await stream.send_all(
                        b"GET /ws/counter HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                        b"Sec-WebSocket-Version: 13\r\n\r\n"
                    )
                    head = await stream.receive_some(4096)
            return int(head.split()[1])

        assert trio.run(two_at_once) == 503
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    bad = run("serve", COUNTER, "--max-connections", "0")
    assert bad.returncode == 2 and "--max-connections" in bad.stderr
    bad = run("serve", COUNTER, "--instance-pattern", "[a-z")
    assert bad.returncode == 2
    assert "--instance-pattern" in bad.stderr and "is not a regular expression" in bad.stderr


def test_sigterm_with_a_room_that_cannot_be_saved_exits_1_and_names_it(
    tmp_path: pathlib.Path,
) -> None:
    store = tmp_path / "store"
    path = FileStore(store).path_for("counter", "default")

    async def increment_into_a_broken_store(url: str, proc: subprocess.Popen[str]) -> None:
        async with connect(url, "/ws/counter") as client:
            await client.next_event("counter:sync")
            # The store breaks under the running room: its document's place is now a
            # directory, so no checkpoint can replace it (commits still go to the journal).
            path.parent.mkdir(parents=True, exist_ok=True)
            path.mkdir()
            (path / "keep").write_text("x")
            for count in (1, 2):
                await client.emit("counter:increment", {"amount": 1})
                assert (await client.next_event("counter:update"))[1]["count"] == count
            proc.send_signal(signal.SIGTERM)
            with pytest.raises(trio_websocket.ConnectionClosed):
                await client.next_event("counter:update")

    with serving(store) as (proc, url):
        trio.run(increment_into_a_broken_store, url, proc)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    assert "stopped with 1 room(s) not saved: counter/default:" in err
    assert "saved in the store's journal" in err
    # Repaired, the store gives back everything a client was shown: the journal is applied.
    (path / "keep").unlink()
    path.rmdir()
    with serving(store) as (proc, url):
        assert trio.run(_count_up, url, 0) == 2
    assert orjson.loads(path.read_bytes())["state"]["count"] == 2


def test_inspect_says_where_a_state_only_in_the_journal_is(tmp_path: pathlib.Path) -> None:
    from verani.store.base import Changes

    async def commit() -> None:
        store = FileStore(tmp_path, durability="os")
        try:
            await store.commit("counter", "j", Changes(state={"count": 7}))
        finally:
            await store.aclose()

    trio.run(commit)
    assert not FileStore(tmp_path).path_for("counter", "j").exists()  # no checkpoint yet
    shown = run("inspect", "counter/j", "--store", str(tmp_path))
    assert shown.returncode == 0, shown.stderr
    assert "stored: in the journal (the document" in shown.stdout
    assert "count: 7" in shown.stdout
