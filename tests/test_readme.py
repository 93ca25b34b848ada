"""README.md's "Testing your rooms", done as a newcomer does it: its `pyproject.toml` block and its
test file, copied as written into a new project beside copies of the rooms, run by pytest in a
subprocess from the project's root and from its `tests/` directory."""

from __future__ import annotations

import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from helpers import ROOMS, ROOT

README = (ROOT / "README.md").read_text()


def block(language: str, first_line: str) -> str:
    """The README's fenced ``language`` block that starts with ``first_line``."""
    for found in re.finditer(rf"```{language}\n(.*?)```", README, re.DOTALL):
        if found.group(1).startswith(first_line):
            return found.group(1)
    raise AssertionError(f"README.md has no {language} block starting {first_line!r}")


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
