"""Headless Chromium for tests, through Playwright for Python.

Needs Playwright (its browser downloads are not used) and Debian's ``chromium`` at
``/usr/bin/chromium`` (or ``MEISA_CHROMIUM``). When either is missing the test skips,
except under CI (``CI`` set), where it fails.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Browser

CHROMIUM = os.environ.get("MEISA_CHROMIUM", "/usr/bin/chromium")
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


def _missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright for Python is not installed (pip install playwright)"
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        return f"no Chromium at {CHROMIUM} (apt-get install chromium, or set MEISA_CHROMIUM)"
    return None


@contextmanager
def chromium(*extra_args: str) -> Iterator[Browser]:
    """A headless Chromium (with ``extra_args`` on its command line), closed on exit;
    skips the test (fails it under CI) without one."""
    reason = _missing()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"the browser test cannot run under CI: {reason}")
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=[*CHROMIUM_ARGS, *extra_args]
        )
        try:
            yield browser
        finally:
            browser.close()


def save_screenshot(data: bytes, name: str) -> None:
    """Also write a screenshot to ``$MEISA_SCREENSHOT_DIR/<name>`` when that is set."""
    target = os.environ.get("MEISA_SCREENSHOT_DIR")
    if target:
        os.makedirs(target, exist_ok=True)
        with open(os.path.join(target, name), "wb") as file:
            file.write(data)
