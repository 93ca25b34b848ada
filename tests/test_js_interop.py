"""A browser-style JavaScript client against the real server, unchanged.

`verani serve rooms/counter.py` runs in a subprocess; tests/js/counter_client.mjs (Node's built-in
WebSocket, written from the wire protocol the way Verani's VeraniClient behaves) drives two users
through the counter and the keepalive, and checks every event itself. Here we check its summary and,
after SIGTERM, the state the server saved.
"""

from __future__ import annotations

import json
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import threading

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
COUNTER = str(ROOT / "rooms" / "counter.py")
CLIENT = str(ROOT / "tests" / "js" / "counter_client.mjs")
NODE = shutil.which("node")
NODE_WS = [NODE or "node", "--experimental-websocket"]


def _node_websocket_problem() -> str | None:
    """Why this machine's Node cannot run the client, or None when it can."""
    if NODE is None:
        return "node is not on PATH (the JavaScript interop test needs Node.js >= 20)"
    probe = subprocess.run(
        [*NODE_WS, "-e", "process.exit(typeof WebSocket === 'function' ? 0 : 3)"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if probe.returncode != 0:
        version = subprocess.run(
            [NODE, "--version"], capture_output=True, text=True, timeout=30
        ).stdout.strip()
        return f"node {version} has no built-in WebSocket (needs Node.js >= 20)"
    return None


def test_js_client_against_served_counter(tmp_path: pathlib.Path) -> None:
    problem = _node_websocket_problem()
    if problem is not None:
        pytest.skip(problem)
    server = subprocess.Popen(
        [sys.executable, "-m", "verani", "serve", COUNTER, "--port", "0", "--store", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    # Should the server hang before printing its URL, readline() returns "" once this kills it.
    watchdog = threading.Timer(30, server.kill)
    watchdog.start()
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        watchdog.cancel()
        match = re.search(r"serving on (ws://\S+)", line)
        assert match, line
        client = subprocess.run(
            [*NODE_WS, CLIENT, match.group(1)],
            capture_output=True,
            text=True,
            timeout=40,
            cwd=ROOT,
        )
        assert client.returncode == 0, client.stderr
        lines = client.stdout.splitlines()
        assert len(lines) == 1, client.stdout
        summary = json.loads(lines[0])

        server.send_signal(signal.SIGTERM)
        out, err = server.communicate(timeout=20)
        assert server.returncode == 0, err
    finally:
        watchdog.cancel()
        if server.poll() is None:
            server.kill()
        server.communicate(timeout=10)  # also closes the pipes

    assert summary["ok"] is True
    alice, bob = summary["events"]["alice"], summary["events"]["bob"]
    updates = [e for e in alice if e["type"] == "counter:update"]
    assert [(e["count"], e["updatedBy"]) for e in updates] == [
        (1, "alice"),
        (2, "alice"),
        (3, "alice"),
        (1, "bob"),
    ]
    assert alice == [
        {"type": "counter:sync", "count": 0, "lastUpdatedBy": None},
        *updates,
        {"type": "counter:reset", "resetBy": "alice"},
    ]
    # bob saw the same broadcasts, and alone the answer to his counter:get.
    assert bob == [*alice, {"type": "counter:sync", "count": 0, "lastUpdatedBy": "alice"}]
    assert summary["final"] == {"count": 0, "lastUpdatedBy": "alice"}
    assert summary["pings"] >= 8 and summary["pongs"] == summary["pings"]
    assert summary["closeCodes"] == {"alice": 1000, "bob": 1000}

    # Nothing the client sent was refused or crashed a handler; SIGTERM saved the room.
    assert "WARNING" not in err and "ERROR" not in err and "Traceback" not in err, err
    assert "SIGTERM: saving every room and stopping" in out
    document = json.loads((tmp_path / "rooms" / "counter" / "default.json").read_text())
    assert document["state"] == {"count": 0, "last_updated_by": "alice"}


def test_a_quiet_js_client_answers_the_servers_pings(tmp_path: pathlib.Path) -> None:
    # The server pings a socket quiet for 0.25 s and closes it (1011) if nothing comes back
    # within 0.5 s; Node's WebSocket, like a browser's, answers Pings by itself, so a client
    # that says nothing for 3 s is still there.
    problem = _node_websocket_problem()
    assert problem is None, problem
    args = ["--ping-interval", "0.25", "--ping-timeout", "0.5", "--store", str(tmp_path)]
    server = subprocess.Popen(
        [sys.executable, "-m", "verani", "serve", COUNTER, "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert server.stdout is not None
        match = re.search(r"serving on (ws://\S+)", server.stdout.readline())
        assert match
        client = subprocess.run(
            [*NODE_WS, str(ROOT / "tests" / "js" / "quiet_client.mjs"), match.group(1), "3000"],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=ROOT,
        )
        assert client.returncode == 0, client.stderr
        assert json.loads(client.stdout) == {"ok": True, "count": 1}
        server.send_signal(signal.SIGTERM)
        _, err = server.communicate(timeout=20)
    finally:
        if server.poll() is None:
            server.kill()
        server.communicate(timeout=10)
    assert "answered no ping" not in err, err
