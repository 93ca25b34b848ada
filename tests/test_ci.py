"""`.ci/run` cleans up after itself: its virtual environment (about 150 MB) is removed on exit."""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import subprocess
import time

import pytest

from helpers import ROOT


@pytest.fixture
def checkout(tmp_path: pathlib.Path) -> pathlib.Path:
    """A checkout with the real `.ci/run` and no project in it, so the run fails at `pip install`,
    after it made its virtual environment."""
    (tmp_path / "repo" / ".ci").mkdir(parents=True)
    shutil.copy2(ROOT / ".ci" / "run", tmp_path / "repo" / ".ci" / "run")
    (tmp_path / "tmp").mkdir()
    return tmp_path / "repo"


def ci_run(checkout: pathlib.Path) -> subprocess.Popen[str]:
    env = {**os.environ, "TMPDIR": str(checkout.parent / "tmp")}  # where mktemp puts the venv
    env.pop("VIRTUAL_ENV", None)
    return subprocess.Popen(
        [str(checkout / ".ci" / "run")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_a_failed_run_removes_its_virtual_environment(checkout: pathlib.Path) -> None:
    proc = ci_run(checkout)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, out  # pip found no project to install
    assert list((checkout.parent / "tmp").iterdir()) == []


def test_a_terminated_run_removes_its_virtual_environment(checkout: pathlib.Path) -> None:
    proc = ci_run(checkout)
    tmp = checkout.parent / "tmp"
    deadline = time.monotonic() + 60
    while not list(tmp.glob("*/venv/bin")):  # stopped while it builds the venv
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    # As a CI runner or `timeout` stops a job: SIGTERM to the script alone, which lets the
    # command in progress finish, then exits through its EXIT trap.
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    assert list(tmp.iterdir()) == []
