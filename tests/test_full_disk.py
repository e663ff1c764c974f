"""A full file system under the runtime directory: starts and compactions refused in words, never a SIGBUS.

prometheus-client's value files are sparse and memory-mapped (pypnm.metrics): on a full file
system a write into a page that has no block yet kills the writer by SIGBUS. A small tmpfs stands
for the full disk here; mounting one needs root (CAP_SYS_ADMIN), and without it those tests skip.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import StartService, pid_alive, serve_pypnm, wait_until
from pypnm import metrics

SIZE = 8 * 1024 * 1024
NO_ROOM = "cannot reserve room for its metrics in"


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of SIZE bytes, unmounted after the test."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={SIZE},mode=0700", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (it needs CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "--lazy", str(mount)], check=False)  # lazy: a process of a failed test may hold it


def fill(directory: Path) -> None:
    """Write into `directory` until its file system has no block left (bounded by its size)."""
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for chunk in (65536, 4096, 512):
            for _ in range(SIZE // chunk + 1):
                try:
                    os.write(fd, b"\0" * chunk)
                except OSError:
                    break
    finally:
        os.close(fd)


def test_a_full_runtime_directory_fails_reloads_and_respawns_in_words_and_the_service_lives(
    start_service: StartService, small_fs: Path
) -> None:
    service = serve_pypnm(
        start_service, "--workers", "2", PYPNM_RUNTIME_DIR=str(small_fs), PYPNM_RELOAD_MIN_INTERVAL="0"
    )
    serving = {worker["pid"] for worker in service.status()["workers"]}
    fill(small_fs)

    for path in ("/health", "/ready", "/metrics", "/pypnm/system/webService/status", "/nothing-here"):
        assert service.get(path).status_code in (200, 404)  # new label values: written into reserved room
    failed = service.wait_reload(service.trigger_reload())
    assert failed["outcome"] == "failed" and "No space left on device" in failed["reason"], failed

    killed = sorted(serving)[0]
    os.kill(killed, signal.SIGKILL)
    wait_until(lambda: NO_ROOM in service.output() and "cannot respawn a worker of generation 1" in service.output())
    assert service.proc.poll() is None and service.get("/health").status_code == 200  # the other worker serves
    assert all(pid_alive(pid) for pid in serving - {killed})

    (small_fs / "filler").unlink()  # room again: the next respawn attempt comes up
    wait_until(lambda: len(service.status()["workers"]) == 2, timeout=30)
    assert service.wait_reload(service.trigger_reload())["outcome"] == "succeeded"
    output = service.output()
    assert "SIGBUS" not in output and "Traceback" not in output
    assert service.stop() == 0


def test_compaction_on_a_full_file_system_is_an_error_not_a_crash(small_fs: Path) -> None:
    """Run in a process of its own: before the room was reserved, SIGBUS killed whoever compacted."""
    directory = small_fs / "metrics"
    directory.mkdir()
    (directory / "metrics.lock").touch()
    writer = subprocess.run(
        [sys.executable, "-c", WRITE_COUNTER, str(directory)], capture_output=True, text=True, check=False
    )
    assert writer.returncode == 0, writer.stderr
    fill(small_fs)

    compacting = subprocess.run(
        [sys.executable, "-c", COMPACT, str(directory)], capture_output=True, text=True, check=False
    )

    assert compacting.returncode == 0, f"killed by signal {-compacting.returncode}: {compacting.stderr}"
    assert "OSError" in compacting.stdout and "No space left on device" in compacting.stdout
    assert not list(directory.glob("*_archive.db"))  # nothing half-written taken for an archive


@pytest.mark.parametrize(("routes", "counter", "histogram"), [(4, 64, 64), (20, 64, 128), (400, 448, 1024)])
def test_a_worker_reserves_room_by_its_routes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, routes: int, counter: int, histogram: int
) -> None:
    """Blocks of its own (not a sparse file), sized by the (method, path) pairs its request metrics are labelled by."""
    monkeypatch.setenv(metrics.MULTIPROC_ENV, str(tmp_path))
    assert metrics.reserve_worker_files(routes) is None
    expected = {"counter": counter, "histogram": histogram, "gauge_livesum": 64}
    for kind, kib in expected.items():
        info = (tmp_path / f"{kind}_{os.getpid()}.db").stat()
        assert info.st_size == kib * 1024 and info.st_blocks * 512 >= info.st_size, (kind, info)


# A process that counts something in the directory, then exits: its file is a dead process's, to fold.
WRITE_COUNTER = """
import os, sys
os.environ["PROMETHEUS_MULTIPROC_DIR"] = sys.argv[1]
from prometheus_client import Counter
counter = Counter("pypnm_test_things", "things", ["kind"], registry=None)
for kind in range(200):
    counter.labels(str(kind)).inc()
"""

COMPACT = """
import sys
from pathlib import Path
from pypnm.supervisor.metrics import compact
try:
    compact(Path(sys.argv[1]))
except OSError as exc:
    print(f"OSError: {exc}")
else:
    print("compacted")
"""
