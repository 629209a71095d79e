"""Debian's headless Chromium driven over the DevTools protocol: open pages, wait for text, take screenshots.

Plain Python, no pytest. One browser process serves every page of a test (a page load costs about a second,
a fresh ``chromium --dump-dom`` about six). The DevTools socket binds loopback only, on a port Chromium picks
itself and writes to ``<profile>/DevToolsActivePort``; the profile is a private temporary folder. The
websocket client is ``websockets``, which dagster-webserver already brings (``uvicorn[standard]``).

    with HeadlessChromium() as browser:
        browser.open("http://127.0.0.1:3000/assets")
        text = browser.wait_for_text(["csv_person"])
        browser.screenshot(Path("assets.png"))
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from websockets.exceptions import WebSocketException
from websockets.sync.client import ClientConnection, connect

CHROMIUM = Path("/usr/bin/chromium")
# INFRA.md: what headless Chromium needs in a container without a desktop session
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
)


class BrowserError(RuntimeError):
    """The browser could not start, or a page never showed what was expected (the message says what it showed)."""


class HeadlessChromium:
    """One headless Chromium with one page, driven over the DevTools protocol."""

    def __init__(self, executable: Path = CHROMIUM, window: tuple[int, int] = (1600, 1000)):
        self.executable = executable
        self.window = window
        self.process: subprocess.Popen[bytes] | None = None
        self.profile: Path | None = None
        self._socket: ClientConnection | None = None
        self._stack = contextlib.ExitStack()
        self._next_id = 0

    # ------------------------------------------------------------------------------------------ lifecycle
    def start(self, timeout: float = 30.0) -> HeadlessChromium:
        """Start the browser and connect to its page; raises ``BrowserError`` with its log when it cannot."""
        if not self.executable.exists():
            raise BrowserError(f"{self.executable} is missing; install Debian's package: apt-get install -y chromium")
        self.profile = Path(tempfile.mkdtemp(prefix="dativo-chromium-"))
        log = (self.profile / "chromium.log").open("wb")
        self.process = subprocess.Popen(
            [
                str(self.executable),
                *CHROMIUM_FLAGS,
                f"--user-data-dir={self.profile}",
                f"--window-size={self.window[0]},{self.window[1]}",
                "about:blank",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() ends the renderers and helpers too
        )
        log.close()
        try:
            self._connect(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _connect(self, timeout: float) -> None:
        assert self.process is not None and self.profile is not None
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.process.poll() is not None or time.monotonic() > deadline:
                tail = (self.profile / "chromium.log").read_text(errors="replace")[-2000:]
                raise BrowserError(f"chromium did not open its DevTools port within {timeout:.0f} s:\n{tail}")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as response:  # noqa: S310
            targets = json.load(response)
        page = next(t for t in targets if t.get("type") == "page")
        self._socket = self._stack.enter_context(connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=10))
        self.send("Page.enable")
        self.send("Runtime.enable")
        # the viewport itself, not the window (which includes the headless shell's frame)
        width, height = self.window
        self.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def stop(self) -> None:
        """Close the connection, end the browser's process group and remove its profile."""
        self._socket = None
        with contextlib.suppress(OSError, WebSocketException):
            self._stack.close()
        proc, self.process = self.process, None
        if proc is not None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, sig)
                try:
                    proc.wait(timeout=5)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if self.profile is not None:
            shutil.rmtree(self.profile, ignore_errors=True)
            self.profile = None

    def __enter__(self) -> HeadlessChromium:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------------------------------ protocol
    def send(self, method: str, timeout: float = 30.0, **params: Any) -> dict[str, Any]:
        """Call one DevTools method and return its result (events that arrive meanwhile are dropped)."""
        if self._socket is None:
            raise BrowserError("the browser is not started")
        self._next_id += 1
        message_id = self._next_id
        self._socket.send(json.dumps({"id": message_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrowserError(f"no answer to {method} within {timeout:.0f} s")
            reply = json.loads(self._socket.recv(timeout=remaining))
            if reply.get("id") != message_id:
                continue
            if "error" in reply:
                raise BrowserError(f"{method} failed: {reply['error']}")
            return reply.get("result", {})

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (awaited when it is a promise)."""
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression!r} raised: {result['exceptionDetails'].get('text')}")
        return result.get("result", {}).get("value")

    # ------------------------------------------------------------------------------------------ pages
    def open(self, url: str, timeout: float = 30.0) -> None:
        """Navigate and wait until the document has loaded (the app may still be fetching data)."""
        result = self.send("Page.navigate", url=url)
        if result.get("errorText"):
            raise BrowserError(f"cannot open {url}: {result['errorText']}")
        deadline = time.monotonic() + timeout
        while self.evaluate("document.readyState") != "complete":
            if time.monotonic() > deadline:
                raise BrowserError(f"{url} did not finish loading within {timeout:.0f} s")
            time.sleep(0.1)

    def text(self) -> str:
        """The page's visible text, one line per block or table cell, without blank lines or edge spaces."""
        raw = str(self.evaluate("document.body ? document.body.innerText : ''") or "")
        return "\n".join(line.strip() for line in re.split(r"[\t\n]", raw) if line.strip())

    def wait_for_text(
        self, needles: Iterable[str], until: Callable[[str], bool] | None = None, timeout: float = 30.0
    ) -> str:
        """Wait until the visible text holds every needle (and ``until(text)`` is true); returns the text.

        Raises naming what was missing and showing what the page showed instead.
        """
        wanted = list(needles)
        deadline = time.monotonic() + timeout
        while True:
            text = self.text()
            missing = [n for n in wanted if n not in text]
            if not missing and (until is None or until(text)):
                return text
            if time.monotonic() > deadline:
                url = self.evaluate("location.href")
                what = missing or ["a text for which until() holds"]
                raise BrowserError(f"{url} never showed {what} within {timeout:.0f} s; it showed:\n{text[:4000]}")
            time.sleep(0.25)

    def wait_until(self, condition: str, timeout: float = 30.0) -> None:
        """Wait until the JavaScript expression ``condition`` is true in the page."""
        deadline = time.monotonic() + timeout
        while not self.evaluate(f"Boolean({condition})"):
            if time.monotonic() > deadline:
                raise BrowserError(f"{condition!r} never became true on {self.evaluate('location.href')}")
            time.sleep(0.25)

    def click(self, selector: str, times: int = 1, pause: float = 0.3) -> None:
        """Click the first element matching the CSS ``selector`` (or its enclosing button) ``times`` times."""
        for _ in range(times):
            clicked = self.evaluate(
                f"""(() => {{
                    const el = document.querySelector({json.dumps(selector)});
                    if (!el) return false;
                    (el.closest('button') || el).click();
                    return true;
                }})()"""
            )
            if not clicked:
                raise BrowserError(f"nothing matches {selector!r} on {self.evaluate('location.href')}")
            time.sleep(pause)

    def screenshot(self, path: Path) -> Path:
        """Save the visible part of the page as PNG."""
        data = self.send("Page.captureScreenshot", format="png")["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path


__all__ = ["CHROMIUM", "BrowserError", "HeadlessChromium"]
