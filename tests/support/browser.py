"""Debian's Chromium driven by Playwright; Playwright's own browser download is never used."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from playwright.sync_api import Browser, Page, sync_playwright

__all__ = ["CHROMIUM", "chromium", "drop_files", "watch_auth_challenges"]

CHROMIUM = Path("/usr/bin/chromium")
# Headless, offline and quiet: no sandbox (containers run as root), no GPU, no QUIC,
# nothing that phones home (component updates, sync, background networking).
_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
_LAUNCH_TIMEOUT_MS = 30_000


@contextlib.contextmanager
def chromium() -> Iterator[Browser]:
    """Launch Debian's Chromium (``make system-deps`` installs it) and close it afterwards."""
    if not CHROMIUM.exists():
        raise RuntimeError(f"{CHROMIUM} is missing: run `make system-deps` (Debian's chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=_ARGS, headless=True, timeout=_LAUNCH_TIMEOUT_MS
        )
        try:
            yield browser
        finally:
            browser.close()


def watch_auth_challenges(page: Page) -> list[str]:
    """Record the URLs of 401s that would open the browser's own login dialog.

    Headless Chromium never shows that dialog, so it is observed through the DevTools
    protocol (``Fetch.authRequired``) and cancelled; a page that handles a wrong token
    itself leaves the list empty.
    """
    challenged: list[str] = []
    session = page.context.new_cdp_session(page)

    def on_auth(event: dict[str, Any]) -> None:
        challenged.append(event["request"]["url"])
        session.send(
            "Fetch.continueWithAuth",
            {"requestId": event["requestId"], "authChallengeResponse": {"response": "CancelAuth"}},
        )

    def on_paused(event: dict[str, Any]) -> None:
        session.send("Fetch.continueRequest", {"requestId": event["requestId"]})

    session.on("Fetch.authRequired", on_auth)
    session.on("Fetch.requestPaused", on_paused)
    session.send("Fetch.enable", {"handleAuthRequests": True, "patterns": [{"urlPattern": "*"}]})
    return challenged


def drop_files(page: Page, selector: str, paths: list[Path]) -> None:
    """Drag files or folders from the disk onto an element, as a person would.

    ``Input.dispatchDragEvent`` with file names gives the page real entries, so
    ``webkitGetAsEntry()`` and ``readEntries()`` see folders as they do on a desktop.
    """
    box = page.locator(selector).bounding_box()
    if box is None:
        raise AssertionError(f"{selector} is not visible")
    point = {"x": box["x"] + box["width"] / 2, "y": box["y"] + box["height"] / 2}
    data = {"items": [], "files": [str(path) for path in paths], "dragOperationsMask": 1}
    session = page.context.new_cdp_session(page)
    try:
        for kind in ("dragEnter", "dragOver", "drop"):
            session.send("Input.dispatchDragEvent", {"type": kind, **point, "data": data})
    finally:
        session.detach()
