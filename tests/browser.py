"""
A real headless Chromium for the console's browser tests, driven by
Playwright's Python API.

The browser is Debian's ``chromium`` (``apt-get install chromium``), never
one Playwright downloads: ``playwright install`` is not used.  Without
Chromium or the ``playwright`` package the browser tests are skipped,
except under CI (``CI`` set), where that is a failure rather than a silent
gap.  Screenshots go to the test's directory, and also to the directory
``OPROXY_SCREENSHOTS`` names (``docs/images`` refreshes the documentation's).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM_PATHS = ("/usr/bin/chromium", "/usr/bin/chromium-browser")

#: What the browser is started with: headless, and nothing that calls home.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str | None:
    for path in (os.environ.get("OPROXY_CHROMIUM"), *CHROMIUM_PATHS):
        if path and os.access(path, os.X_OK):
            return path
    return shutil.which("chromium")


def missing(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason}, and CI needs the browser tests to run")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Chromium, for the module's tests."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("playwright is not installed (pip install playwright)")
    executable = chromium_path()
    if executable is None:
        missing("chromium is not installed (apt-get install chromium)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


class Screenshots:
    """Where the tests' screenshots go."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        published = os.environ.get("OPROXY_SCREENSHOTS")
        self.published = Path(published) if published else None

    def take(self, page: Any, name: str, *, full_page: bool = True) -> Path:
        path = self.directory / f"{name}.png"
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=str(path), full_page=full_page, animations="disabled")
        if self.published is not None:
            self.published.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, self.published / path.name)
        return path
