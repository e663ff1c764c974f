"""The supervisor against the unexpected: odd files, terminal signals, inherited descriptors."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

from conftest import StartService, pid_alive, reload_by_sighup, serve_marker, supervisor_status, wait_until

O_CLOEXEC = 0o2000000  # as /proc/<pid>/fdinfo prints the descriptor's flags


def test_a_copy_error_fails_the_reload_and_later_reloads_still_run(
    start_service: StartService, marker_app: Path
) -> None:
    service = serve_marker(start_service, marker_app, graceful_timeout=5)
    before = supervisor_status(service)
    dangling = marker_app / "markerpkg" / "gone.py"
    dangling.symlink_to(marker_app / "markerpkg" / "no-such-file.py")

    failed = reload_by_sighup(service, before["generation"])["last_reload"]
    assert failed["outcome"] == "failed"
    assert failed["reason"].startswith(f"cannot copy the code: {dangling}: "), failed["reason"]
    assert "No such file or directory" in failed["reason"]
    assert supervisor_status(service)["generation"] == before["generation"]  # the old one still serves
    assert service.get("/marker").status_code == 200

    dangling.unlink()
    fixed = reload_by_sighup(service, failed["generation"])["last_reload"]
    assert fixed["outcome"] == "succeeded", fixed  # the reloader survived the failure


def test_sighup_to_the_whole_process_group_reloads_instead_of_killing(
    start_service: StartService, marker_app: Path
) -> None:
    service = serve_marker(start_service, marker_app, graceful_timeout=5)
    before = supervisor_status(service)
    template = before["master"]["template_pid"]
    assert os.getpgid(template) != os.getpgid(service.proc.pid)  # out of the terminal's reach

    os.killpg(service.proc.pid, signal.SIGHUP)  # what a closing terminal does

    def reloaded() -> dict[str, Any] | None:
        status = supervisor_status(service)
        last = status["last_reload"]
        done = last and last["generation"] > before["generation"] and last["outcome"] == "succeeded"
        return status if done else None

    after = wait_until(reloaded, timeout=30)
    assert pid_alive(template) and after["master"]["template_pid"] == template
    assert service.get("/marker").status_code == 200


def test_worker_descriptors_are_not_inherited_by_the_apps_children(
    start_service: StartService, marker_app: Path
) -> None:
    service = serve_marker(start_service, marker_app, graceful_timeout=5)
    (worker,) = supervisor_status(service)["workers"]
    fd_dir = Path(f"/proc/{worker['pid']}/fd")
    sockets = [fd for fd in fd_dir.iterdir() if os.readlink(fd).startswith("socket:") and int(fd.name) > 2]
    checked = []
    for fd in sockets:
        try:
            info = Path(f"/proc/{worker['pid']}/fdinfo/{fd.name}").read_text()
        except FileNotFoundError:
            continue  # a connection that closed since the listing (e.g. the status request's own)
        flags = int(info.split("flags:")[1].split()[0], 8)
        assert flags & O_CLOEXEC, f"socket fd {fd.name} of worker {worker['pid']} would leak into a child process"
        checked.append(fd.name)
    assert len(checked) >= 2, f"a worker holds at least its listener and its channel to the master: {checked}"
