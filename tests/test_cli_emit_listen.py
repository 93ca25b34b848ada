"""`verani emit` and `verani listen` as a user runs them: real commands in subprocesses, against
a real `verani serve` on a free port."""

from __future__ import annotations

import pathlib
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

import orjson
import pytest

from helpers import run, running, serving

SYNC_ZERO = '{"type":"event","channel":"default","data":{"count":0,"lastUpdatedBy":null,"type":"counter:sync"}}'  # noqa: E501


def read_line(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    return proc.stdout.readline()


def increment(url: str, user: str = "zoe") -> None:
    """Have another user change the count: every socket on the room gets counter:update."""
    sent = run("emit", f"{url}/ws/counter?userId={user}", "counter:increment", "--wait", "0")
    assert sent.returncode == 0, sent.stderr


def test_listen_prints_every_frame_until_its_time_is_up(tmp_path: pathlib.Path) -> None:
    with serving(tmp_path) as (_, url):
        with running("listen", f"{url}/ws/counter?userId=bob", "--for", "3") as listener:
            start = time.monotonic()
            assert read_line(listener) == SYNC_ZERO + "\n"  # on connecting: the room's greeting
            increment(url)
            out, err = listener.communicate(timeout=20)
            elapsed = time.monotonic() - start
    assert (listener.returncode, err) == (0, "")
    assert [orjson.loads(line)["data"] for line in out.splitlines()] == [
        {"type": "counter:update", "count": 1, "updatedBy": "zoe"}
    ]
    assert 2.5 < elapsed < 10  # it stopped because --for was up, not for any other reason


@contextmanager
def watching(store: pathlib.Path, command: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """``verani listen`` (or ``verani emit ... --wait 60``) on the counter room of a new server,
    once the room's greeting has arrived; yields it and the server's URL."""
    with serving(store) as (_, url):
        args = ["counter:get", "--wait", "60"] if command == "emit" else []
        with running(command, f"{url}/ws/counter", *args) as proc:
            assert read_line(proc) == SYNC_ZERO + "\n"
            yield proc, url


@pytest.mark.parametrize("command", ["listen", "emit"])
def test_ctrl_c_stops_quietly_with_exit_130(tmp_path: pathlib.Path, command: str) -> None:
    with watching(tmp_path, command) as (proc, _):
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
    assert (proc.returncode, err) == (130, "")


@pytest.mark.parametrize("command", ["listen", "emit"])
def test_a_closed_output_stops_quietly_with_exit_0(tmp_path: pathlib.Path, command: str) -> None:
    # `verani emit URL EVENT | head -1`, made deterministic: the reader goes away after one line,
    # then the room sends another frame, whose write finds the pipe closed.
    with watching(tmp_path, command) as (proc, url):
        assert proc.stdout is not None
        proc.stdout.close()
        increment(url)
        _, err = proc.communicate(timeout=10)  # well before --wait's 60 s
    assert (proc.returncode, err) == (0, "")


def test_listen_fails_when_the_server_goes_away(tmp_path: pathlib.Path) -> None:
    with serving(tmp_path) as (server, url):
        with running("listen", f"{url}/ws/counter") as listener:
            assert read_line(listener) == SYNC_ZERO + "\n"
            server.send_signal(signal.SIGTERM)
            out, err = listener.communicate(timeout=20)
    assert (listener.returncode, out) == (1, "")
    assert (
        err == "verani: error: the server closed the connection (code 1001: server shutting down)\n"
    )


def test_listen_and_emit_name_the_cause_when_no_server_runs() -> None:
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))  # the port is taken, and nothing listens on it
        port = bound.getsockname()[1]
        url = f"ws://127.0.0.1:{port}/ws/counter"
        for args in (["listen", url], ["emit", url, "x"]):
            result = run(*args)
            assert (result.returncode, result.stdout, result.stderr) == (
                1,
                "",
                f"verani: error: cannot connect to {url}: Error connecting to "
                f"('127.0.0.1', {port}): Connection refused (is a verani server running on "
                f"127.0.0.1:{port}?)\n",
            ), args


def test_listen_usage_errors(tmp_path: pathlib.Path) -> None:
    for args, message in [
        (["http://127.0.0.1:1/ws"], "Invalid value for URL: must start with ws:// or wss://"),
        (
            ["ws://127.0.0.1:1/ws", "--for", "0"],
            "Invalid value for '--for': 0.0 is not in the range x>0.",
        ),
        (
            ["ws://127.0.0.1:1/ws", "--cafile", __file__],
            "Invalid value for --cafile: is for wss:// URLs only",
        ),
    ]:
        result = run("listen", *args)
        assert result.returncode == 2, args
        assert result.stderr.startswith(f"verani: error: {message}\n"), result.stderr
