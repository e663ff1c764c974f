"""Shared test helpers: real servers as subprocesses on 127.0.0.1, stopped by their PID.

Every wait here is a bounded loop (count and time); nothing is killed by name.
"""

from __future__ import annotations

import os
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
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        # Whatever the test did, leave no process of this group behind.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
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
