"""Headless Chromium for the browser tests, with every host but 127.0.0.1 unresolvable.

Chromium is the Debian package `chromium`; `.ci/run` installs it when it is missing.
Without it a browser test is skipped locally (saying so), but fails under CI (`CI=true`),
so that a green CI run always includes the browser tests.

Two ways to drive it, both bounded in time:
- `render`: one run with `--dump-dom` (the DOM after the page's scripts ran, within a
  virtual-time budget), `--screenshot` and a NetLog of every request the browser made;
- `DevTools`: a page under the DevTools protocol (over its WebSocket, with the
  `websockets` client that uvicorn[standard] brings), to click through a page with
  JavaScript and read the result.
The browser is started in its own process group and stopped by that group's id.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.sync.client import ClientConnection, connect

from conftest import wait_until

# Every name resolves to nothing except 127.0.0.1: a page that reaches for the internet fails
# visibly instead of quietly working on a connected machine. Autofill's server queries are the
# one browser feature that would otherwise send requests on the page's behalf.
BASE_FLAGS = (
    "--headless",
    "--no-sandbox",  # CI runs as root
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-features=AutofillServerCommunication",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    "--window-size=1280,2000",
)
RUN_TIMEOUT = 60.0


def chromium() -> str:
    """The Chromium binary; skips the test without one, or fails it under CI."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    reason = "headless Chromium is needed for this browser test: apt-get install -y chromium (.ci/run does)"
    if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
        pytest.fail(f"{reason}; CI must run the browser tests, not skip them")
    pytest.skip(reason)


@dataclass
class Rendering:
    dom: str  # the document after its scripts ran
    screenshot: Path
    requests: list[str]  # every URL the page asked for, in order (from the NetLog)


def render(url: str, out_dir: Path, name: str, budget_ms: int = 10_000) -> Rendering:
    """Open `url` once in a fresh profile: DOM, screenshot (`<name>.png`) and the page's requests."""
    binary = chromium()
    profile = out_dir / f"{name}-profile"
    screenshot = out_dir / f"{name}.png"
    netlog = out_dir / f"{name}-netlog.json"
    command = [
        binary,
        *BASE_FLAGS,
        f"--user-data-dir={profile}",
        f"--log-net-log={netlog}",
        f"--virtual-time-budget={budget_ms}",
        "--dump-dom",
        f"--screenshot={screenshot}",
        url,
    ]
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        dom, errors = proc.communicate(timeout=RUN_TIMEOUT)
    finally:
        _stop(proc)
    assert proc.returncode == 0, f"chromium exited with {proc.returncode}:\n{errors[-3000:]}"
    return Rendering(dom=dom, screenshot=screenshot, requests=page_requests(netlog, url))


def page_requests(netlog: Path, page_url: str) -> list[str]:
    """URLs of the requests made on behalf of the page at `page_url`, from a Chromium NetLog.

    The browser's own background requests (update checks and the like) are told apart by
    their network isolation key: a page's requests carry its site as the top-frame site.
    Requests the page's Content-Security-Policy blocked never reach the network stack.
    """
    log = json.loads(netlog.read_text())
    start_job = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    scheme, _, rest = page_url.partition("://")
    site = f"{scheme}://{rest.split('/')[0].rsplit(':', 1)[0]}"
    urls = []
    for event in log["events"]:
        params = event.get("params") or {}
        top_frame_site = str(params.get("network_isolation_key", "")).split(" ")[0]
        if event["type"] == start_job and "url" in params and top_frame_site == site:
            urls.append(str(params["url"]))
    return urls


def is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class DevTools:
    """One page of a headless Chromium, driven over the DevTools protocol."""

    def __init__(self, socket: ClientConnection) -> None:
        self.socket = socket
        self.last_id = 0
        self.events: list[dict[str, Any]] = []  # arrived while waiting for something else

    def _receive(self, wanted: Callable[[dict[str, Any]], bool], what: str, timeout: float) -> dict[str, Any]:
        for index, event in enumerate(self.events):
            if wanted(event):
                return self.events.pop(index)
        deadline = time.monotonic() + timeout
        for _ in range(100_000):  # bounded in count and time
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            message: dict[str, Any] = json.loads(self.socket.recv(timeout=remaining))
            if wanted(message):
                return message
            if "method" in message:
                self.events.append(message)
        raise AssertionError(f"no {what} within {timeout}s")

    def call(self, method: str, timeout: float = 30.0, **params: Any) -> dict[str, Any]:
        self.last_id += 1
        call_id = self.last_id
        self.socket.send(json.dumps({"id": call_id, "method": method, "params": params}))
        message = self._receive(lambda m: m.get("id") == call_id, f"answer to {method}", timeout)
        if "error" in message:
            raise AssertionError(f"{method} failed: {message['error']}")
        result: dict[str, Any] = message["result"]
        return result

    def open(self, url: str, timeout: float = 30.0) -> None:
        """Navigate to `url` and wait for its load event (its scripts have run)."""
        self.call("Page.enable")
        self.call("Page.navigate", timeout, url=url)
        self._receive(lambda m: m.get("method") == "Page.loadEventFired", f"load event of {url}", timeout)

    def evaluate(self, expression: str, timeout: float = 30.0) -> Any:
        """Run JavaScript in the page (awaiting a promise) and return its JSON value; a thrown error fails."""
        answer = self.call("Runtime.evaluate", timeout, expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in answer:
            raise AssertionError(f"page script failed: {answer['exceptionDetails']}")
        return answer["result"].get("value")


@contextlib.contextmanager
def devtools(url: str, profile: Path, timeout: float = 20.0) -> Iterator[DevTools]:
    """A headless Chromium that has loaded `url`, and its page under the DevTools protocol."""
    binary = chromium()
    proc = subprocess.Popen(
        [binary, *BASE_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        port_file = profile / "DevToolsActivePort"  # Chromium writes its port here once it listens

        def port_written() -> bool:
            assert proc.poll() is None, f"chromium exited with {proc.returncode}"
            return port_file.is_file() and bool(port_file.read_text().strip())

        wait_until(port_written, timeout)
        port = int(port_file.read_text().split()[0])
        pages = [t for t in httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=5).json() if t["type"] == "page"]
        assert pages, "chromium has no page"
        with connect(pages[0]["webSocketDebuggerUrl"], max_size=None, open_timeout=timeout) as socket:
            page = DevTools(socket)
            page.open(url, timeout)
            yield page
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen[Any]) -> None:
    """End a browser and every process it started (its own process group), by the group's id."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # helpers left behind, or a browser that did not stop
    if proc.poll() is None:
        proc.wait(5)
