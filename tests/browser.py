"""Headless Chromium for the tests that look at a page as a person would (Debian's `chromium`
package; .ci/run installs it). Nothing here is imported by the package."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--enable-logging=stderr", "--v=0")


def chromium() -> str:
    """The browser's path, or the test skips saying how to get one."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("no headless browser here: `apt-get install chromium` (Debian) to render HTML pages")
    return path


def render(page: Path, *, screenshot: Path | None = None, width: int = 1280, height: int = 2400) -> tuple[str, str]:
    """(DOM after load, browser log) of `page`; with `screenshot`, also a PNG of it."""
    browser = chromium()
    with tempfile.TemporaryDirectory() as profile:
        base = [browser, *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"]
        dom = subprocess.run([*base, "--dump-dom", page.resolve().as_uri()], capture_output=True, text=True,
                             timeout=120)
        if screenshot is not None:
            subprocess.run([*base, f"--screenshot={screenshot}", page.resolve().as_uri()], capture_output=True,
                           text=True, timeout=120)
    return dom.stdout, dom.stderr


def console_errors(log: str) -> list[str]:
    """The page's console errors and failed loads in Chromium's log (the browser's own noise,
    e.g. about D-Bus in a container, is not the page's)."""
    return [line for line in log.splitlines()
            if ("CONSOLE" in line and ("error" in line.lower() or "Uncaught" in line))
            or "net::ERR_" in line]
