"""Shared test helpers: real servers as subprocesses on 127.0.0.1, stopped by their PID.

Every wait here is a bounded loop (count and time); nothing is killed by name.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
STATUS_PATH = "/pypnm/system/webService/status"
RELOAD_PATH = "/pypnm/system/webService/reload"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05) -> Any:
    """Call `predicate` until it returns something truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    attempts = int(timeout / interval) + 1
    last: Any = None
    for _ in range(attempts):
        try:
            last = predicate()
        except (httpx.HTTPError, OSError) as exc:
            last = exc
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            break
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s (last: {last!r})")


class Service:
    """A pypnm (or uvicorn) process started by a test."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.proc = proc
        self.port = port
        self.log = log
        self.base_url = f"http://127.0.0.1:{port}"

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        kwargs.setdefault("timeout", 10.0)
        return httpx.get(self.base_url + path, **kwargs)

    def status(self) -> dict[str, Any]:
        response = self.get(STATUS_PATH)
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()
        return result

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 30.0, path: str = "/health") -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            return self.get(path, timeout=1.0).status_code == 200

        wait_until(ready, timeout)

    def signal(self, signum: int) -> None:
        os.kill(self.proc.pid, signum)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM by PID, then SIGKILL of its process group if it does not leave in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        # Whatever the test did, leave no process of this group behind.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.returncode


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYPNM_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def pypnm_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "pypnm", *args]


@pytest.fixture
def start_service(tmp_path: Path) -> Iterator[Callable[..., Service]]:
    """Start a server command with a free port; every one started is stopped after the test.

    `command` may contain "{port}", replaced by the chosen port. Output goes to a log
    file in tmp_path (read it with `service.output()`).
    """
    started: list[Service] = []

    def start(
        command: list[str],
        *,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
        wait: bool = True,
        ready_path: str = "/health",
        timeout: float = 30.0,
        port: int | None = None,
    ) -> Service:
        port = port or free_port()
        log = tmp_path / f"server-{len(started)}.log"
        proc = subprocess.Popen(
            [part.replace("{port}", str(port)) for part in command],
            cwd=cwd or tmp_path,
            env=env or base_env(),
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        service = Service(proc, port, log)
        started.append(service)
        if wait:
            service.wait_ready(timeout, ready_path)
        return service

    yield start
    for service in started:
        service.stop()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); its state letter says it is gone.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def raw_http(port: int, request_line: bytes, header_lines: list[bytes]) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request written byte for byte to 127.0.0.1 (any header, any byte): status, headers, body."""
    request = b"".join([request_line, b"\r\n", *(line + b"\r\n" for line in header_lines),
                        b"Connection: close\r\n\r\n"])
    chunks: list[bytes] = []
    with socket.create_connection(("127.0.0.1", port), timeout=10.0) as sock:
        sock.sendall(request)
        deadline = time.monotonic() + 10.0
        for _ in range(1000):
            chunk = sock.recv(65536)
            if not chunk or time.monotonic() > deadline:
                break
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    return int(status_line.split(" ", 2)[1]), headers, body


# ----- copies of the code under test (added for the reload and supervisor tests) --------------

APPS = Path(__file__).resolve().parent / "apps"
_IGNORE_BUILD = shutil.ignore_patterns("__pycache__", "*.pyc")


def copy_package(source: Path, parent: Path) -> Path:
    """Copy a package directory (no bytecode) into `parent`; returns the copy."""
    parent.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copytree(source, parent / source.name, ignore=_IGNORE_BUILD))


@pytest.fixture
def pypnm_copy(tmp_path: Path) -> Path:
    """A private copy of `src/pypnm`: returns the directory to put on PYTHONPATH (it holds `pypnm/`).

    Tests edit and touch the copy, never the repository's files.
    """
    root = tmp_path / "pypnm-copy"
    copy_package(SRC / "pypnm", root)
    return root


@pytest.fixture
def marker_app(tmp_path: Path) -> Path:
    """A copy of `tests/apps/markerpkg` in its own directory: run `--app markerpkg.main:app` from it."""
    root = tmp_path / "marker-app"
    copy_package(APPS / "markerpkg", root)
    return root


def rewrite(path: Path, old: str, new: str) -> None:
    """Replace `old` (which must be there) with `new` in a file; bumps the mtime forward."""
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    before = path.stat().st_mtime_ns
    path.write_text(text.replace(old, new, 1))
    if path.stat().st_mtime_ns <= before:  # coarse clocks: make the change visible to mtime checks
        os.utime(path, ns=(before + 1_000_000, before + 1_000_000))


def set_marker(app_dir: Path, marker: str) -> None:
    path = app_dir / "markerpkg" / "marker.py"
    text = path.read_text()
    start = text.index('MARKER = "')
    end = text.index('"', start + len('MARKER = "'))
    path.write_text(text[:start] + f'MARKER = "{marker}"' + text[end + 1 :])


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
            timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """`python -m pypnm ARGS` to completion, output captured as text."""
    return subprocess.run(
        pypnm_command(*args), env=env or base_env(), cwd=cwd, capture_output=True, text=True,
        timeout=timeout, stdin=subprocess.DEVNULL,
    )
