"""The supervisor against the unexpected: odd files, terminal signals, inherited descriptors."""

from __future__ import annotations

import os
import pty
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from conftest import (
    StartService,
    base_env,
    free_port,
    launch,
    pid_alive,
    pypnm_command,
    reload_by_sighup,
    serve_marker,
    supervisor_status,
    wait_until,
)

O_CLOEXEC = 0o2000000  # as /proc/<pid>/fdinfo prints the descriptor's flags


def test_a_copy_error_fails_the_reload_and_later_reloads_still_run(
    start_service: StartService, marker_app: Path
) -> None:
    service = serve_marker(start_service, marker_app, graceful_timeout=5)
    before = supervisor_status(service)
    # A file the snapshot cannot copy: a named pipe. (A link to nothing is left out: snapshot.py.)
    pipe = marker_app / "markerpkg" / "pipe.py"
    os.mkfifo(pipe)

    failed = reload_by_sighup(service, before["generation"])["last_reload"]
    assert failed["outcome"] == "failed"
    assert failed["reason"].startswith(f"cannot copy the code: {pipe}: "), failed["reason"]
    assert "not a regular file" in failed["reason"]
    assert supervisor_status(service)["generation"] == before["generation"]  # the old one still serves
    assert service.get("/marker").status_code == 200

    pipe.unlink()
    fixed = reload_by_sighup(service, failed["generation"])["last_reload"]
    assert fixed["outcome"] == "succeeded", fixed  # the reloader survived the failure


def test_sighup_to_the_whole_process_group_reloads_instead_of_killing(
    start_service: StartService, marker_app: Path
) -> None:
    service = serve_marker(start_service, marker_app, graceful_timeout=5)
    before = supervisor_status(service)
    template = before["master"]["template_pid"]
    assert os.getsid(template) != os.getsid(service.proc.pid)  # out of the terminal's reach

    os.killpg(service.proc.pid, signal.SIGHUP)  # what a closing terminal does

    def reloaded() -> dict[str, Any] | None:
        status = supervisor_status(service)
        last = status["last_reload"]
        done = last and last["generation"] > before["generation"] and last["outcome"] == "succeeded"
        return status if done else None

    after = wait_until(reloaded, timeout=30)
    assert pid_alive(template) and after["master"]["template_pid"] == template
    assert service.get("/marker").status_code == 200


TERMINAL_APP = """
import sys

from fastapi import FastAPI

app = FastAPI()


@app.get("/health")
def health() -> dict[str, str]:
    return {"status": "ok"}


@app.get("/line")
def line() -> dict[str, str]:
    return {"line": sys.stdin.readline().strip()}  # what breakpoint() in a handler does: read the terminal
"""
# Makes the terminal on stdin the controlling terminal of this new session, then runs the command.
ACQUIRE_TERMINAL = (
    "import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); os.execv(sys.executable, sys.argv[1:])"
)


def test_a_worker_reads_the_terminal_pypnm_runs_in(tmp_path: Path) -> None:
    """pypnm started at a terminal: a worker that reads it (`breakpoint()` in a handler) gets what is typed.

    The workers' session of their own is why: in the terminal's session, as a process group of their own
    (out of its signals' reach all the same), a worker that reads the terminal is stopped by SIGTTIN.
    """
    (tmp_path / "ttyapp.py").write_text(TERMINAL_APP)
    terminal, its_device = pty.openpty()
    command = pypnm_command("serve", "--port", "{port}", "--app", "ttyapp:app", "--workers", "1")
    service = launch(
        [sys.executable, "-c", ACQUIRE_TERMINAL, *command],
        log=tmp_path / "server.log",
        port=free_port(),
        cwd=tmp_path,
        env=base_env(),
        stdin=its_device,
    )
    os.close(its_device)
    try:
        service.wait_ready()
        with ThreadPoolExecutor(1) as pool:
            asked = pool.submit(service.get, "/line", timeout=20.0)
            os.write(terminal, b"typed at the terminal\n")  # kept by the terminal until the worker reads it
            answer = asked.result(timeout=30)
        assert answer.status_code == 200, service.output()
        assert answer.json() == {"line": "typed at the terminal"}
    finally:
        service.stop()
        os.close(terminal)


def test_worker_descriptors_are_not_inherited_by_the_apps_children(
    start_service: StartService, marker_app: Path
) -> None:
    service = serve_marker(start_service, marker_app, graceful_timeout=5)
    (worker,) = supervisor_status(service)["workers"]
    fd_dir = Path(f"/proc/{worker['pid']}/fd")
    checked = []
    for fd in fd_dir.iterdir():
        try:
            if not os.readlink(fd).startswith("socket:") or int(fd.name) <= 2:
                continue
            info = Path(f"/proc/{worker['pid']}/fdinfo/{fd.name}").read_text()
        except FileNotFoundError:
            continue  # a connection that closed since the listing (e.g. the status request's own)
        flags = int(info.split("flags:")[1].split()[0], 8)
        assert flags & O_CLOEXEC, f"socket fd {fd.name} of worker {worker['pid']} would leak into a child process"
        checked.append(fd.name)
    assert len(checked) >= 2, f"a worker holds at least its listener and its channel to the master: {checked}"
