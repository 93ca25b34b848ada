"""README's persistence walk-through as a newcomer types it: `verani serve`, then in a second
terminal examples/counter_client.py, `verani hibernate`, the client again, `verani inspect` —
each a real command in its own process."""

from __future__ import annotations

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import orjson

from helpers import ROOT, run, serving

EXAMPLE = ROOT / "examples" / "counter_client.py"


def counter_client(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, str(EXAMPLE), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_the_example_client_leaves_the_count_that_survives_hibernation(
    tmp_path: pathlib.Path,
) -> None:
    with serving(tmp_path) as (_, url):
        first = counter_client(f"{url}/ws/counter?userId=alice")
        assert (first.returncode, first.stderr) == (0, "")
        assert first.stdout.splitlines()[0] == "Current count: 0"
        assert "Disconnecting with the count at 3." in first.stdout

        hibernated = run("hibernate", "counter", "--store", str(tmp_path))
        assert hibernated.stdout == "hibernated counter/default\n", hibernated.stderr

        second = counter_client(f"{url}/ws/counter?userId=bob")
        assert (second.returncode, second.stderr) == (0, "")
        assert second.stdout.splitlines()[0] == "Current count: 3 (last updated by alice)"
        assert "Disconnecting with the count at 6." in second.stdout

        shown = orjson.loads(
            run("inspect", "counter/default", "--store", str(tmp_path), "--json").stdout
        )
        assert shown["stored"]["state"] == {"count": 6, "last_updated_by": "bob"}


def test_the_example_client_says_at_once_why_it_cannot_connect() -> None:
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))  # taken, and nothing listens: every attempt is refused
        port = bound.getsockname()[1]
        url = f"ws://127.0.0.1:{port}/ws/counter"
        start = time.monotonic()
        result = counter_client(url, "--wait", "2")
        elapsed = time.monotonic() - start
    refused = f"Error connecting to ('127.0.0.1', {port}): Connection refused"
    lines = result.stderr.splitlines()
    assert (result.returncode, result.stdout) == (1, "")
    # Each failed attempt as it happens (at 0 s and about 1 s), then the end of the wait.
    assert lines[:-1] == [f"counter_client: cannot connect to {url}: {refused}; retrying"] * 2
    assert lines[-1] == (
        f"counter_client: {url}: not connected within 2s (state reconnecting); "
        f"the last attempt failed: {refused}"
    )
    assert elapsed < 10


def test_the_example_client_stops_quietly_when_its_reader_is_gone(tmp_path: pathlib.Path) -> None:
    # `python examples/counter_client.py | head -1`, with `head` gone before the first line.
    read_end, write_end = os.pipe()
    os.close(read_end)
    with serving(tmp_path) as (_, url):
        try:
            result = subprocess.run(
                [sys.executable, str(EXAMPLE), f"{url}/ws/counter"],
                stdout=write_end,
                stderr=subprocess.PIPE,
                text=True,
                timeout=60,
            )
        finally:
            os.close(write_end)
    assert (result.returncode, result.stderr) == (-signal.SIGPIPE, "")
