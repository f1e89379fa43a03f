"""Headless Chromium for the tests that look at pages as a person does (the report, the web
console): Debian's chromium driven by Playwright, never a downloaded browser."""
from __future__ import annotations

import os
import shutil

import pytest


def chromium_binary() -> str:
    """Debian's chromium itself (not its wrapper script), which Playwright drives."""
    for path in ("/usr/lib/chromium/chromium", shutil.which("chromium") or ""):
        if path and os.access(path, os.X_OK):
            return path
    pytest.skip("Debian's chromium is not installed (apt-get install chromium; make test-deps)")


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (the dev extra) is not installed")
    path = chromium_binary()
    with sync_api.sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=path, headless=True,
                                              args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        yield instance
        instance.close()
