"""The log file (issue 9.3): JSON and text lines, many processes writing one file through rotations, SIGUSR1.

First the pieces with real processes forked here: several writers appending to one small,
fast-rotating file, then every line counted. Then a real supervised service with two
workers under load, its access lines counted across the current file and the backups,
and logrotate's `create` mode replayed: rename the file away, SIGUSR1 to the master, and
every process (master, fork template, workers) must have the new file open and write there;
a reload's zygote too, when the signal comes while it is still importing the app.
"""

from __future__ import annotations

import collections
import io
import json
import logging
import os
import re
import secrets
import signal
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import (
    RELOAD_PATH,
    Service,
    StartService,
    base_env,
    hold_next_import,
    pypnm_command,
    reload_finished,
    run_cli,
    serve_held_import,
    supervisor_status,
    wait_until,
)
from pypnm.logs import LogOutput, setup_logging
from pypnm.supervisor.logfile import LogFile

TEXT_STAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (TRACE|DEBUG|INFO|WARNING|ERROR|CRITICAL) \[")


def log_files(path: Path) -> list[Path]:
    """The current log file and its backups, oldest first."""
    backups = sorted(path.parent.glob(path.name + ".*"), key=lambda p: -int(p.suffix[1:]))
    return [*backups, *([path] if path.exists() else [])]


def all_lines(path: Path, *, settled: bool = True) -> list[str]:
    """Every line of the file and its backups. Once writing has `settled`, fails on a file that
    does not end with a whole line (while it goes on, a read may catch a write half-way)."""
    lines: list[str] = []
    for file in log_files(path):
        data = file.read_bytes()
        if settled:
            assert not data or data.endswith(b"\n"), f"{file.name} ends in the middle of a line: {data[-200:]!r}"
        else:
            data = data[: data.rfind(b"\n") + 1]
        lines += data.decode("utf-8").splitlines()
    return lines


# ----- many processes, one file ------------------------------------------------------------------------


def _writer(path: Path, name: str, count: int, max_bytes: int) -> None:
    file = LogFile(path, max_bytes=max_bytes, backups=1000)
    for number in range(count):
        padding = "x" * (9000 if number % 97 == 0 else number % 50)  # some records longer than a pipe's atomic size
        file.write(f"{name} {number} {padding}\n".encode())


def test_processes_rotating_one_file_lose_and_mix_no_line(tmp_path: Path) -> None:
    path = tmp_path / "many.log"
    writers, count = 4, 2500
    pids = []
    for index in range(writers):
        pid = os.fork()
        if pid == 0:  # the child writes, then leaves without running the test's cleanup
            code = 1
            try:
                _writer(path, f"w{index}", count, max_bytes=16 * 1024)
                code = 0
            finally:
                os._exit(code)
        pids.append(pid)
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0

    files = log_files(path)
    assert len(files) > 20, "the test should rotate many times"
    seen: collections.Counter[tuple[str, int]] = collections.Counter()
    for line in all_lines(path):
        name, number, padding = line.split(" ")
        assert set(padding) <= {"x"} and len(padding) == (9000 if int(number) % 97 == 0 else int(number) % 50), line
        seen[(name, int(number))] += 1
    assert len(seen) == writers * count and set(seen.values()) == {1}


def test_rotation_keeps_only_the_backups_asked_for(tmp_path: Path) -> None:
    path = tmp_path / "few.log"
    file = LogFile(path, max_bytes=100, backups=3)
    for number in range(40):
        file.write(f"line {number:03d} {'y' * 20}\n".encode())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["few.log", "few.log.1", "few.log.2", "few.log.3"]
    newest_first = [path, *(path.with_name(f"few.log.{n}") for n in (1, 2, 3))]
    numbers = [int(line.split()[1]) for p in reversed(newest_first) for line in p.read_text().splitlines()]
    assert numbers == list(range(numbers[0], 40))  # the newest lines, in order, none twice


def test_a_renamed_file_is_followed_at_the_next_line(tmp_path: Path) -> None:
    path = tmp_path / "app.log"
    file = LogFile(path)
    file.write(b"one\n")
    path.rename(tmp_path / "app.log.old")
    file.write(b"two\n")  # no signal: the next line sees another file (here: none) at the path
    assert (tmp_path / "app.log.old").read_text() == "one\n"
    assert path.read_text() == "two\n"


def test_a_new_or_rotated_file_is_not_readable_by_other_users_whatever_the_umask(tmp_path: Path) -> None:
    path = tmp_path / "private.log"
    old_umask = os.umask(0o022)  # the usual umask of a terminal or a plain container
    try:
        file = LogFile(path, max_bytes=100, backups=1)
        for number in range(10):
            file.write(f"line {number:03d} {'z' * 20}\n".encode())
    finally:
        os.umask(old_umask)
    for log in (path, path.with_name("private.log.1")):
        assert oct(log.stat().st_mode & 0o777) == oct(0o640), log


# ----- the formats, through setup_logging ---------------------------------------------------------------


def test_json_lines_carry_the_fields_and_the_traceback(tmp_path: Path, restore_logging: io.StringIO) -> None:
    from pypnm.logs import bind_request_id, set_generation, set_reload_id_source, unbind_request_id

    path = tmp_path / "json.log"
    setup_logging("master", "info", LogOutput("json", path, 0, 1))
    set_generation(7)
    set_reload_id_source(lambda: "r1")
    try:
        logging.getLogger("pypnm.supervisor.master").info("building %s", "generation 8")
        token = bind_request_id("req-1")
        try:
            raise ValueError("boom\x1b[2J")
        except ValueError:
            logging.getLogger("pypnm.access").exception("failed\nsecond line", extra={"client_value": "v"})
        unbind_request_id(token)
        logging.getLogger("uvicorn.error").info("after the request")
    finally:
        set_reload_id_source(None)
        set_generation(None)
    assert restore_logging.getvalue() == ""  # with a log_file, stderr gets nothing
    first, second, third = (json.loads(line) for line in path.read_text().splitlines())
    assert list(first)[:7] == ["time", "level", "logger", "message", "role", "pid", "generation"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["time"])
    assert first | {"time": "-"} == {
        "time": "-",
        "level": "INFO",
        "logger": "pypnm.supervisor.master",
        "message": "building generation 8",
        "role": "master",
        "pid": os.getpid(),
        "generation": 7,
        "reload_id": "r1",
    }
    assert second["message"] == "failed\\nsecond line" and second["level"] == "ERROR"
    assert second["request_id"] == "req-1" and second["client_value"] == "v"
    assert second["exc_info"].startswith("Traceback (most recent call last):\n")
    assert second["exc_info"].endswith("ValueError: boom\\x1b[2J")
    assert "request_id" not in third and third["logger"] == "uvicorn.error"


def test_a_log_file_that_cannot_be_opened_ends_the_start_in_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir" / "pypnm.log"
    result = run_cli("--port", "0", env=base_env(PYPNM_LOG_FILE=str(missing)))
    assert result.returncode == 2
    assert result.stderr == f"pypnm: cannot open log_file {str(missing)!r}: No such file or directory\n"


# ----- a real service --------------------------------------------------------------------------------


def _hammer(base_url: str, ids: list[str]) -> list[int]:
    """GET /health once per id, each on a new connection (so both workers take some); the statuses."""
    with httpx.Client(timeout=10.0, headers={"Connection": "close"}) as client:
        return [client.get(base_url + "/health", headers={"X-Request-ID": i}).status_code for i in ids]


def _load(service: Service, requests: int, threads: int = 8) -> list[str]:
    ids = [f"load-{secrets.token_hex(6)}" for _ in range(requests)]
    results: list[list[int]] = [[] for _ in range(threads)]

    def run(index: int) -> None:
        results[index] = _hammer(service.base_url, ids[index::threads])

    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join(120)
    assert [status for result in results for status in result] == [200] * requests
    return ids


def _access_ids(lines: list[str], log_format: str) -> tuple[collections.Counter[str], set[int]]:
    """request id -> number of access lines, and the pids that wrote them."""
    counts: collections.Counter[str] = collections.Counter()
    pids: set[int] = set()
    for line in lines:
        if log_format == "json":
            record: dict[str, Any] = json.loads(line)  # every line parses
            if record["logger"] == "pypnm.access":
                counts[record["request_id"]] += 1
                pids.add(record["pid"])
        else:
            assert TEXT_STAMP.match(line), line  # every line is a whole record of its own
            found = re.search(r"pid=(\d+) .* pypnm\.access: .* request_id=(\S+)$", line)
            if found:
                counts[found.group(2)] += 1
                pids.add(int(found.group(1)))
    return counts, pids


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_two_workers_under_load_through_rotations_lose_no_line(
    start_service: StartService, tmp_path: Path, log_format: str
) -> None:
    path = tmp_path / "logs" / "pypnm.log"
    path.parent.mkdir()
    env = base_env(PYPNM_LOG_FILE=str(path), PYPNM_LOG_FILE_MAX_BYTES="16384", PYPNM_LOG_FILE_BACKUPS="1000")
    service = start_service(pypnm_command("--port", "{port}", "--workers", "2", "--log-format", log_format), env=env)
    ids = _load(service, 2000)
    workers = {w["pid"] for w in service.status()["workers"]}

    def all_logged() -> bool:
        counts, _ = _access_ids(all_lines(path, settled=False), log_format)
        return all(counts[i] for i in ids)

    wait_until(all_logged, timeout=20.0)
    lines = all_lines(path)
    counts, pids = _access_ids(lines, log_format)
    assert [i for i in ids if counts[i] != 1] == []  # every request's access line, exactly once
    assert pids == workers  # both workers wrote (and nobody else wrote access lines)
    assert len(log_files(path)) >= 8  # it did rotate, many times, under load
    assert "pypnm.access" not in service.output()  # with log_file, stderr gets no log line


def _open_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            inodes.add(os.stat(f"/proc/{pid}/fd/{fd}").st_ino)
        except OSError:
            continue
    return inodes


def test_sigusr1_after_logrotate_moves_every_process_to_the_new_file(
    start_service: StartService, tmp_path: Path
) -> None:
    path = tmp_path / "pypnm.log"
    env = base_env(PYPNM_LOG_FILE=str(path), PYPNM_LOG_FILE_MAX_BYTES="0")
    service = start_service(pypnm_command("--port", "{port}", "--workers", "2", "--log-format", "json"), env=env)
    status = service.status()
    processes = {
        "master": status["master"]["pid"],
        "template": status["master"]["template_pid"],
        **{f"zygote {pid}": pid for pid in status["master"]["zygote_pids"]},
        **{f"worker {w['pid']}": w["pid"] for w in status["workers"]},
    }
    old_inode = path.stat().st_ino
    assert all(old_inode in _open_inodes(pid) for pid in processes.values())

    # logrotate, `create` mode: rename, create an empty file, then the postrotate SIGUSR1 to the master
    moved = tmp_path / "pypnm.log.1"
    path.rename(moved)
    path.touch()
    new_inode = path.stat().st_ino
    service.signal(signal.SIGUSR1)

    def moved_over() -> dict[str, bool]:
        return {
            name: new_inode in (inodes := _open_inodes(pid)) and old_inode not in inodes
            for name, pid in processes.items()
        }

    wait_until(lambda: all(moved_over().values()), timeout=10.0)
    size_moved = moved.stat().st_size

    ids = _load(service, 40, threads=2)
    response = service.get(RELOAD_PATH)
    assert response.status_code == 200
    reload_id = response.headers["x-reload-id"]
    wait_until(
        lambda: (
            (service.status()["last_reload"] or {}).get("id") == reload_id
            and service.status()["last_reload"]["outcome"] == "succeeded"
        ),
        timeout=30.0,
    )
    records = [json.loads(line) for line in path.read_text().splitlines()]
    (reopened,) = [r for r in records if r["message"].startswith("SIGUSR1: ")]
    assert reopened["role"] == "master"
    assert (
        reopened["message"] == f"SIGUSR1: log_file {path} reopened here and in {len(processes) - 1} other process(es)"
    )
    assert {r["request_id"] for r in records if r["logger"] == "pypnm.access"} >= set(ids)
    assert any(r["role"] == "master" and r.get("reload_id") == reload_id for r in records)
    assert moved.stat().st_size == size_moved  # nothing more went to the renamed file
    assert "pypnm: cannot" not in service.output()


def test_sigusr1_reaches_a_zygote_that_is_still_importing(start_service: StartService, tmp_path: Path) -> None:
    # A zygote seldom logs once it has imported: told nothing, it would hold the renamed file open
    # for as long as its generation serves.
    path = tmp_path / "pypnm.log"
    service = serve_held_import(start_service, tmp_path, PYPNM_LOG_FILE=str(path), PYPNM_LOG_FILE_MAX_BYTES="0")
    generation = supervisor_status(service)["generation"]
    zygote = hold_next_import(service, tmp_path)
    old_inode = path.stat().st_ino
    assert old_inode in _open_inodes(zygote)

    path.rename(tmp_path / "pypnm.log.1")
    path.touch()
    new_inode = path.stat().st_ino
    service.signal(signal.SIGUSR1)
    wait_until(lambda: new_inode in (inodes := _open_inodes(zygote)) and old_inode not in inodes, timeout=10.0)

    (tmp_path / "go").touch()
    status = reload_finished(service, generation)
    assert status["last_reload"]["outcome"] == "succeeded"
    assert zygote in status["master"]["zygote_pids"]  # the generation that serves now was imported by it
    assert old_inode not in _open_inodes(zygote)
