"""ctx.actor.room_state is typed by the room's state class: mypy flags unknown keys."""

from __future__ import annotations

import pathlib
import re

import pytest

api = pytest.importorskip("mypy.api", reason="mypy is part of the test extra")

CASES = pathlib.Path(__file__).parent / "typing_cases"


def test_mypy_flags_unknown_state_attributes() -> None:
    case = CASES / "room_state_typos.py"
    stdout, stderr, status = api.run(
        ["--strict", "--no-error-summary", "--cache-dir=/dev/null", str(case)]
    )
    assert status == 1, stdout + stderr
    found = {
        (int(m.group(1)), m.group(2), m.group(3))
        for m in re.finditer(r":(\d+): (error|note): (.*)", stdout)
    }
    lines = case.read_text().splitlines()
    expected = {
        (n, kind, text)
        for n, line in enumerate(lines, 1)
        if (m := re.search(r"# ([EN]): (.*)$", line))
        for kind, text in [("error" if m.group(1) == "E" else "note", m.group(2))]
    }
    for n, kind, text in expected:
        assert any(line == n and k == kind and text in message for line, k, message in found), (
            n,
            kind,
            text,
            stdout,
        )
    # No other errors: the correctly typed lines type-check.
    errors = {line for line, kind, _ in found if kind == "error"}
    assert errors == {n for n, kind, _ in expected if kind == "error"}, stdout
