"""A real, throwaway ``redis-server`` for tests: on a free 127.0.0.1 port, in its own directory,
with every write on disk before Redis answers (``appendfsync always``), so a test can stop it
and start it again on the same port and find everything it wrote."""

from __future__ import annotations

import pathlib
import shutil
import socket
import subprocess
import time

import pytest


def _free_port() -> int:
    # Not helpers.free_port: tests/bench/cluster.py imports this module as tests.redis_server,
    # where the tests' own modules are not importable by their bare names.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """One ``redis-server`` process; :meth:`stop` and :meth:`start` keep its port and data."""

    def __init__(self, directory: pathlib.Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed: apt-get install redis-server")
        self.binary = binary
        self.directory = directory
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._process: subprocess.Popen[bytes] | None = None
        self._log = directory / "redis.log"

    def start(self) -> None:
        """Start the server (again) and wait until it answers PING."""
        assert self._process is None, "already running"
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--daemonize", "no",
            "--logfile", str(self._log),
        ]  # fmt: skip
        self._process = subprocess.Popen(args, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                log = self._log.read_text() if self._log.exists() else ""
                pytest.fail(f"redis-server exited with {self._process.returncode}:\n{log}")
            if self.ping():
                return
            time.sleep(0.01)
        self.stop()
        pytest.fail(f"redis-server on port {self.port} did not answer PING within 10 s")

    def ping(self) -> bool:
        """Whether the server answers PING now."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        """Stop the server (SIGTERM: with ``appendfsync always`` nothing acknowledged is lost)."""
        process, self._process = self._process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
