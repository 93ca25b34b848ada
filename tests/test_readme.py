"""README.md done as a newcomer does it.

"Testing your rooms": its `pyproject.toml` block and its test file, copied as written into a new
project beside copies of the rooms, run by pytest in a subprocess from the project's root and
from its `tests/` directory. "Example rooms": each command to try a room, run by the shell
against `verani serve rooms/`.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from helpers import ROOMS, ROOT, serving

README = (ROOT / "README.md").read_text()


def block(language: str, first_line: str) -> str:
    """The README's fenced ``language`` block that starts with ``first_line``."""
    for found in re.finditer(rf"```{language}\n(.*?)```", README, re.DOTALL):
        if found.group(1).startswith(first_line):
            return found.group(1)
    raise AssertionError(f"README.md has no {language} block starting {first_line!r}")


def block_after(text: str) -> str:
    """The contents of the first fenced block after ``text`` in the README."""
    found = re.search(rf"{re.escape(text)}.*?```\w*\n(.*?)```", README, re.DOTALL)
    assert found, f"README.md has no block after {text!r}"
    return found.group(1)


@pytest.fixture
def project(tmp_path: pathlib.Path) -> pathlib.Path:
    root = tmp_path / "project"
    (root / "tests").mkdir(parents=True)
    shutil.copytree(ROOMS, root / "rooms")
    (root / "pyproject.toml").write_text(block("toml", "[tool.pytest.ini_options]"))
    test_file = block("python", "# tests/test_my_rooms.py")
    (root / "tests" / "test_my_rooms.py").write_text(test_file)
    # The plugin's fixture finds relative room files the same way.
    (root / "tests" / "conftest.py").write_text(
        "import pytest\n\n@pytest.fixture\ndef verani_rooms():\n    return ['rooms/counter.py']\n"
    )
    (root / "tests" / "test_fixture.py").write_text(
        "async def test_sync(verani_server):\n"
        "    client = await verani_server.connect('/ws/counter', user_id='ann')\n"
        "    assert (await client.receive('counter:sync'))['count'] == 0\n"
    )
    return root


@pytest.mark.parametrize("where", [".", "tests"])
def test_the_readme_test_file_passes_as_written(project: pathlib.Path, where: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        cwd=project / where,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 passed" in result.stdout, result.stdout


#: What each room's command must print: its room's answer, in the order of the README's lines.
ANSWERS = [
    "counter:update",
    "chat:message",
    "presence:update",
    "notify:sent",
    "channels:joined",
    "whoami",
    "poll:closed",
    "rate_limited",
]


def test_each_example_room_command_works_as_written(tmp_path: pathlib.Path) -> None:
    commands = block_after("One command to try each").splitlines()
    assert len(commands) == len(ANSWERS)
    # The commands run as typed in a terminal where the environment is activated.
    env = {**os.environ, "PATH": f"{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}"}
    with serving(tmp_path, rooms=ROOMS) as (_, url):

        def start(command: str) -> subprocess.Popen[str]:
            return subprocess.Popen(
                ["bash", "-c", command.replace("ws://127.0.0.1:8787", url)],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )

        # Each in its own room, so they may run at once, as from several terminals; all but the
        # last, whose twenty clients must reach the room faster than its bucket refills.
        started = [start(command) for command in commands[:-1]]
        results = [(proc, *proc.communicate(timeout=60)) for proc in started]
        last = start(commands[-1])
        results.append((last, *last.communicate(timeout=60)))
    for command, answer, (proc, out, err) in zip(commands, ANSWERS, results, strict=True):
        assert proc.returncode == 0, (command, err)
        assert f'"type":"{answer}"' in out, (command, out)
