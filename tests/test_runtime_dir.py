"""The master's runtime directory: where it goes, and that nothing is left of it once its processes are gone."""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import (
    Service,
    StartService,
    assert_one_line_error,
    base_env,
    free_port,
    pid_alive,
    run_cli,
    serve_pypnm,
    wait_until,
)


def runtime_dirs(parent: Path) -> list[Path]:
    return sorted(p for p in parent.iterdir() if p.name.startswith("pypnm-"))


def serve(start_service: StartService, **env: str) -> Service:
    return serve_pypnm(start_service, "--workers", "2", **env)


def process_pids(service: Service) -> list[int]:
    """The master's template, zygote and workers (the master is service.proc)."""
    status = service.status()
    pids = [w["pid"] for w in status["workers"]] + [status["master"]["template_pid"], *status["master"]["zygote_pids"]]
    assert len(pids) == 4 and all(pid_alive(pid) for pid in pids)
    return pids


def test_the_last_process_of_a_killed_master_removes_its_directory(start_service: StartService, tmp_path: Path) -> None:
    parent = tmp_path / "run"
    parent.mkdir()
    service = serve(start_service, PYPNM_RUNTIME_DIR=str(parent))
    others = process_pids(service)
    (runtime,) = runtime_dirs(parent)
    assert stat.S_IMODE(runtime.stat().st_mode) == 0o700  # the control socket's access control
    assert (runtime / "control.sock").is_socket() and (runtime / "master.lock").is_file()

    service.signal(signal.SIGKILL)

    wait_until(lambda: not any(pid_alive(pid) for pid in others) and not runtime.exists(), timeout=15)
    assert parent.is_dir() and runtime_dirs(parent) == []
    assert "this was its last process" in service.output()


def test_a_stopped_worker_of_a_killed_master_leaves_too(start_service: StartService, tmp_path: Path) -> None:
    """A stopped worker cannot read that its master is gone: the template wakes it as it leaves, and it goes."""
    service = serve(start_service, PYPNM_RUNTIME_DIR=str(tmp_path))
    others = process_pids(service)
    stopped = service.status()["workers"][0]["pid"]
    os.kill(stopped, signal.SIGSTOP)
    try:
        service.signal(signal.SIGKILL)
        wait_until(lambda: not any(pid_alive(pid) for pid in others) and runtime_dirs(tmp_path) == [], timeout=15)
    finally:
        if pid_alive(stopped):  # the test failed: let it go
            os.kill(stopped, signal.SIGKILL)


@pytest.fixture
def listening_unix_socket(tmp_path: Path) -> Iterator[Callable[[Path], None]]:
    """Make a Unix socket file at a path; listening on it (a live master) or not (a dead one)."""
    held: list[socket.socket] = []

    def make(path: Path, listening: bool = False) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(path))
        if listening:
            sock.listen()
            held.append(sock)
        else:
            sock.close()  # the file stays; connecting to it is refused

    yield make
    for sock in held:
        sock.close()


def test_a_new_master_removes_directories_whose_master_is_gone(
    start_service: StartService, tmp_path: Path, listening_unix_socket: Callable[..., None]
) -> None:
    parent = tmp_path / "run"
    parent.mkdir()
    first = serve(start_service, PYPNM_RUNTIME_DIR=str(parent))
    (abandoned,) = runtime_dirs(parent)
    # Every process of that master at once: nobody is left to clean up.
    others = process_pids(first)
    for pid in [*others, first.proc.pid]:
        os.kill(pid, signal.SIGKILL)
    first.proc.wait(10)
    wait_until(lambda: not any(pid_alive(pid) for pid in others), timeout=10)
    assert abandoned.is_dir() and (abandoned / "master.lock").is_file()

    # Directories of an earlier pypnm (no lock file): one whose socket nobody listens on, one alive.
    old_dead = parent / "pypnm-olddead"
    old_alive = parent / "pypnm-oldalive"
    unrelated = parent / "pypnm-unrelated"  # no lock, no socket: not judged
    for directory in (old_dead, old_alive, unrelated):
        directory.mkdir(mode=0o700)
    listening_unix_socket(old_dead / "control.sock")
    listening_unix_socket(old_alive / "control.sock", listening=True)

    second = serve(start_service, PYPNM_RUNTIME_DIR=str(parent))
    assert not abandoned.exists() and not old_dead.exists()
    assert old_alive.is_dir() and unrelated.is_dir()
    (ours,) = (d for d in runtime_dirs(parent) if d not in (old_alive, unrelated))
    assert f"removed the runtime directory {abandoned}: its master is gone" in second.output()

    # A third master beside a live one leaves the live one's directory alone.
    third = serve(start_service, PYPNM_RUNTIME_DIR=str(parent))
    assert ours.is_dir() and second.status()["generation"] == 1
    assert len(runtime_dirs(parent)) == 4
    third.stop()
    second.stop()
    assert sorted(runtime_dirs(parent)) == sorted([old_alive, unrelated])  # each removed its own


def test_runtime_directory_and_runtime_dir_setting(start_service: StartService, tmp_path: Path) -> None:
    systemd = tmp_path / "systemd-run"  # what systemd's RuntimeDirectory= creates and owns
    systemd.mkdir()
    service = serve(start_service, RUNTIME_DIRECTORY=f"{systemd}:{tmp_path / 'second-entry'}")
    (runtime,) = runtime_dirs(systemd)
    assert stat.S_IMODE(runtime.stat().st_mode) == 0o700
    assert service.stop() == 0
    assert systemd.is_dir() and list(systemd.iterdir()) == []  # ours is gone, systemd's stays

    chosen = tmp_path / "chosen"
    chosen.mkdir()
    service = serve(start_service, RUNTIME_DIRECTORY=str(systemd), PYPNM_RUNTIME_DIR=str(chosen))
    assert len(runtime_dirs(chosen)) == 1 and list(systemd.iterdir()) == []  # the setting wins
    assert service.stop() == 0
    assert list(chosen.iterdir()) == []


def test_the_master_holds_its_directory_against_age_based_cleanup(start_service: StartService, tmp_path: Path) -> None:
    """systemd-tmpfiles skips a directory it cannot lock exclusively: it must not be able to while the master serves."""
    service = serve(start_service, PYPNM_RUNTIME_DIR=str(tmp_path))
    (runtime,) = runtime_dirs(tmp_path)
    fd = os.open(runtime, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what the cleanup tries before it removes anything
        assert service.stop() == 0
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the master is gone, and its hold with it
    finally:
        os.close(fd)
    assert runtime_dirs(tmp_path) == []


@pytest.mark.parametrize("variable", ["PYPNM_RUNTIME_DIR", "RUNTIME_DIRECTORY"])
@pytest.mark.parametrize("problem", ["under-a-file", "missing"])
def test_an_unusable_runtime_directory_is_one_line_and_exit_2(tmp_path: Path, variable: str, problem: str) -> None:
    # Root ignores permission bits, so use failures that hold for root too.
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    parent = blocker / "run" if problem == "under-a-file" else tmp_path / "no-such-dir"
    env = base_env(**{variable: str(parent)})
    why = "Not a directory" if problem == "under-a-file" else "No such file or directory"
    for args in (["--port", str(free_port())], ["check"]):
        result = run_cli(*args, env=env, cwd=tmp_path, timeout=30)
        line = assert_one_line_error(result, 2, str(parent), variable, why)
        assert "cannot create the runtime directory" in line
        assert not parent.exists()  # a missing parent is reported, not created


def test_a_runtime_directory_that_refuses_a_snapshot_fails_that_reload_in_one_line(
    start_service: StartService, tmp_path: Path
) -> None:
    parent = tmp_path / "run"
    parent.mkdir()
    service = serve(start_service, PYPNM_RUNTIME_DIR=str(parent), PYPNM_RELOAD_MIN_INTERVAL="0")
    (runtime,) = runtime_dirs(parent)
    blocked = runtime / "gen-2"  # where the next generation's snapshot goes: a file in the way
    blocked.write_text("")

    def reload() -> dict[str, Any]:
        return service.wait_reload(service.trigger_reload())

    failed = reload()
    assert failed["outcome"] == "failed"
    assert failed["reason"] == f"cannot write the snapshot in the runtime directory: {blocked}: File exists"
    assert "Traceback" not in service.output()
    assert reload()["outcome"] == "succeeded"  # the next generation number is free
