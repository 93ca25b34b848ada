"""`.ci/run` cleans up after itself: its virtual environment (about 150 MB) is removed on exit."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess

from helpers import ROOT


def test_a_run_removes_its_virtual_environment_on_exit(tmp_path: pathlib.Path) -> None:
    # The real script in a checkout with no project in it: it makes its virtual environment,
    # then fails at `pip install`, so the test ends in seconds instead of a whole CI run.
    checkout = tmp_path / "repo"
    (checkout / ".ci").mkdir(parents=True)
    shutil.copy2(ROOT / ".ci" / "run", checkout / ".ci" / "run")
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {**os.environ, "TMPDIR": str(temp)}  # where mktemp makes the venv's directory
    env.pop("VIRTUAL_ENV", None)
    result = subprocess.run(
        [str(checkout / ".ci" / "run")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "does not appear to be a Python project" in result.stderr, result.stderr
    assert list(temp.iterdir()) == []
