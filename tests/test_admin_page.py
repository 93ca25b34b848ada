"""The live inspector (/_verani/admin) in a real browser: Playwright driving Debian's chromium.

A real ``verani serve --api-token`` in a subprocess, real clients (``verani emit``, ``verani
listen``) in others, and the page in chromium. No browser is downloaded: without the chromium
package these tests fail and say how to install it. Playwright's sync API runs in these plain
(sync) tests; it brings its own event loop, apart from Trio's.
"""

from __future__ import annotations

import os
import pathlib
import queue
import subprocess
import threading
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest

from helpers import run, running, serving

CHROMIUM = "/usr/bin/chromium"
INSTALL = "apt-get install -y chromium"
TOKEN = "admin-page-token"
SCRIPT = "<img src=x onerror=alert(1)>"

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"the browser tests need Debian's chromium at {CHROMIUM}; install it with: "
            f"{INSTALL}  (they never download a browser)"
        )
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=8000)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, pathlib.Path]]:
    """One server for the module: its ws:// URL and its store."""
    store = tmp_path_factory.mktemp("admin") / "store"
    with serving(store, "--api-token", TOKEN) as (_, url):
        yield url, store


class Page:
    """A browser page on the inspector, with the dialogs and script errors it saw."""

    def __init__(self, page: Any, base: str) -> None:
        self.page = page
        self.base = base
        self.dialogs: list[str] = []
        self.errors: list[str] = []
        page.on("dialog", self._dialog)
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))

    def _dialog(self, dialog: Any) -> None:
        self.dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.dismiss()

    def login(self, token: str = TOKEN) -> None:
        self.page.goto(f"{self.base}/_verani/admin")
        self.page.fill("#token", token)
        self.page.click("#connect")

    def row(self, key: str) -> Any:
        return self.page.locator(f'#rows tr[data-key="{key}"]')

    def confirm(self) -> None:
        self.page.locator("#confirm").wait_for(state="visible")
        self.page.click("#confirm-yes")


@pytest.fixture
def page(browser: Any, server: tuple[str, pathlib.Path]) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1400, "height": 800})
    try:
        yield Page(context.new_page(), server[0].replace("ws://", "http://"))
    finally:
        context.close()


def increment(url: str, instance: str, user: str = "alice") -> None:
    target = f"{url}/ws/counter/{instance}?userId={urllib.parse.quote(user)}"
    done = run("emit", target, "counter:increment", '{"amount": 1}', "--wait", "0")
    assert done.returncode == 0, done.stderr


def test_lists_rooms_updates_live_and_shows_a_hibernation(
    page: Page, server: tuple[str, pathlib.Path], tmp_path: pathlib.Path
) -> None:
    from playwright.sync_api import expect

    url, store = server
    increment(url, "one")
    increment(url, "two")
    page.login()
    expect(page.page.locator("#link")).to_have_text("live")
    expect(page.row("counter/one")).to_be_visible()
    expect(page.row("counter/two").locator(".status")).to_have_text("awake")
    page.row("counter/one").click()
    count = page.page.locator('#state tr[data-key="count"]')
    expect(count.locator(".stored")).to_have_text("1")
    expect(count.locator(".live")).to_have_text("1")
    # A client increments: the page shows it without a reload.
    increment(url, "one")
    expect(count.locator(".live")).to_have_text("2")
    expect(count.locator(".stored")).to_have_text("2")
    expect(page.page.locator("#stat-commits")).not_to_have_text("\u2013")  # stats came
    # `verani hibernate` in another process: the list and the detail show it.
    done = run("hibernate", "counter/one", "--store", str(store))
    assert done.returncode == 0, done.stderr
    expect(page.row("counter/one").locator(".status")).to_have_text("hibernated")
    expect(count.locator(".live")).to_have_text("(asleep)")
    expect(count.locator(".stored")).to_have_text("2")
    page.page.screenshot(path=tmp_path / "inspector.png", full_page=True)
    assert not page.errors and not page.dialogs


def _lines(proc: subprocess.Popen[str]) -> queue.Queue[str]:
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def _wait_for(lines: queue.Queue[str], text: str) -> str:
    while True:
        line = lines.get(timeout=8)
        if text in line:
            return line


def test_emit_and_disconnect_actions_reach_a_connected_client(
    page: Page, server: tuple[str, pathlib.Path], tmp_path: pathlib.Path
) -> None:
    from playwright.sync_api import expect

    url, _ = server
    with running("listen", f"{url}/ws/counter/three?userId=carol", "--for", "30") as listener:
        lines = _lines(listener)
        _wait_for(lines, "counter:sync")
        page.login()
        page.row("counter/three").click()
        expect(page.page.locator("#sessions tbody tr")).to_have_count(1)
        page.page.fill("#emit-event", "notice")
        # The JSON is checked before anything is sent.
        page.page.fill("#emit-data", "{not json")
        expect(page.page.locator("#emit-check")).to_contain_text("not JSON")
        expect(page.page.locator("#emit-send")).to_be_disabled()
        page.page.fill("#emit-data", '{"text": "hello from the inspector"}')
        page.page.click("#emit-send")
        page.confirm()
        expect(page.page.locator("#action-result")).to_have_text("sent to 1 socket(s)")
        assert "hello from the inspector" in _wait_for(lines, "notice")
        page.page.screenshot(path=tmp_path / "emitted.png", full_page=True)
        # Disconnect the session: the client is closed (verani listen exits with 1).
        page.page.locator("#sessions button.disconnect").click()
        page.confirm()
        expect(page.page.locator("#action-result")).to_have_text("disconnected 1 socket(s)")
        assert listener.wait(timeout=8) == 1
        expect(page.page.locator("#sessions")).to_have_count(0)
    assert not page.errors and not page.dialogs


def test_a_wrong_token_shows_an_error_and_no_data(
    page: Page, server: tuple[str, pathlib.Path]
) -> None:
    from playwright.sync_api import expect

    increment(server[0], "four")
    page.login("not-the-token")
    expect(page.page.locator("#error")).to_contain_text("4401")
    expect(page.page.locator("#main")).to_be_hidden()
    assert page.page.locator("#rows tr").count() == 0
    assert page.page.evaluate("sessionStorage.length") == 0
    assert "token" not in page.page.url
    # The right token then works, and is kept in sessionStorage only.
    page.login()
    expect(page.row("counter/four")).to_be_visible()
    assert page.page.evaluate("sessionStorage.getItem('verani.apiToken')") == TOKEN
    assert page.page.evaluate("localStorage.length") == 0


def test_a_script_in_a_state_value_renders_as_text(
    page: Page, server: tuple[str, pathlib.Path], tmp_path: pathlib.Path
) -> None:
    from playwright.sync_api import expect

    increment(server[0], "five", user=SCRIPT)
    page.login()
    page.row("counter/five").click()
    cell = page.page.locator('#state tr[data-key="last_updated_by"] .stored')
    expect(cell).to_have_text(repr(SCRIPT))
    page.page.screenshot(path=tmp_path / "script-as-text.png", full_page=True)
    assert page.page.locator("main img").count() == 0
    assert not page.dialogs, page.dialogs
    assert not page.errors
