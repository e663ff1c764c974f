"""The supervisor against the unexpected: odd files, terminal signals, inherited descriptors."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conftest import Service, base_env, pid_alive, pypnm_command, wait_until

MARKER_APP = "markerpkg.main:app"
O_CLOEXEC = 0o2000000  # as /proc/<pid>/fdinfo prints the descriptor's flags

StartService = Callable[..., Service]


def serve_marker(start_service: StartService, app_dir: Path) -> Service:
    return start_service(
        pypnm_command("--app", MARKER_APP, "--port", "{port}", "--graceful-timeout", "5"),
        cwd=app_dir,
        env=base_env(PYPNM_RELOAD_MIN_INTERVAL="0"),
    )


def supervisor(service: Service) -> dict[str, Any]:
    response = service.get("/supervisor")
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def reload_outcome(service: Service, generation_before: int) -> dict[str, Any]:
    """SIGHUP the master and return the record of the reload that follows."""
    service.signal(signal.SIGHUP)

    def finished() -> dict[str, Any] | None:
        last = supervisor(service)["last_reload"]
        return last if last and last["generation"] > generation_before and last["outcome"] else None

    result: dict[str, Any] = wait_until(finished, timeout=30)
    return result


def test_a_copy_error_fails_the_reload_and_later_reloads_still_run(
    start_service: StartService, marker_app: Path
) -> None:
    service = serve_marker(start_service, marker_app)
    before = supervisor(service)
    dangling = marker_app / "markerpkg" / "gone.py"
    dangling.symlink_to(marker_app / "markerpkg" / "no-such-file.py")

    failed = reload_outcome(service, before["generation"])
    assert failed["outcome"] == "failed"
    assert failed["reason"].startswith(f"cannot copy the code: {dangling}: "), failed["reason"]
    assert "No such file or directory" in failed["reason"]
    assert supervisor(service)["generation"] == before["generation"]  # the old one still serves
    assert service.get("/marker").status_code == 200

    dangling.unlink()
    fixed = reload_outcome(service, failed["generation"])
    assert fixed["outcome"] == "succeeded", fixed  # the reloader survived the failure


def test_sighup_to_the_whole_process_group_reloads_instead_of_killing(
    start_service: StartService, marker_app: Path
) -> None:
    service = serve_marker(start_service, marker_app)
    before = supervisor(service)
    template = before["master"]["template_pid"]
    assert os.getsid(template) != os.getsid(service.proc.pid)  # out of the terminal's reach

    os.killpg(service.proc.pid, signal.SIGHUP)  # what a closing terminal does

    def reloaded() -> dict[str, Any] | None:
        status = supervisor(service)
        last = status["last_reload"]
        done = last and last["generation"] > before["generation"] and last["outcome"] == "succeeded"
        return status if done else None

    after = wait_until(reloaded, timeout=30)
    assert pid_alive(template) and after["master"]["template_pid"] == template
    assert service.get("/marker").status_code == 200


def test_worker_descriptors_are_not_inherited_by_the_apps_children(
    start_service: StartService, marker_app: Path
) -> None:
    service = serve_marker(start_service, marker_app)
    (worker,) = supervisor(service)["workers"]
    fd_dir = Path(f"/proc/{worker['pid']}/fd")
    sockets = [fd for fd in fd_dir.iterdir() if os.readlink(fd).startswith("socket:") and int(fd.name) > 2]
    assert sockets, "a worker holds at least its listener and its channel to the master"
    for fd in sockets:
        flags = int(Path(f"/proc/{worker['pid']}/fdinfo/{fd.name}").read_text().split("flags:")[1].split()[0], 8)
        assert flags & O_CLOEXEC, f"socket fd {fd.name} of worker {worker['pid']} would leak into a child process"
