"""The log file when the file system says no, in-process: a rotation that cannot rename, a directory
that goes away under the handler, a reopen that cannot open, and SIGUSR1 with no log file at all.

No line may be lost in any of them: it goes to the file as it is, or to stderr after one line
saying why. tests/test_log_file.py covers the file when all goes well, across real processes.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pypnm.supervisor import logfile
from pypnm.supervisor.logfile import LogFile, LogFileHandler, catches, reopen_log_files


def record(message: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord("pypnm.test", logging.INFO, __file__, 1, message, args, None)


def test_a_rotation_that_cannot_rename_is_said_once_and_the_file_keeps_every_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "app.log"
    (tmp_path / "app.log.1").mkdir()  # the backup's name is taken by a directory that is not empty
    (tmp_path / "app.log.1" / "keep").write_text("")
    file = LogFile(path, max_bytes=100, backups=1)
    lines = [f"line {n} ".encode() + b"x" * 60 + b"\n" for n in range(5)]
    for line in lines:
        file.write(line)
    file.close()
    assert path.read_bytes() == b"".join(lines)  # past max_bytes: kept rather than lost
    said = capsys.readouterr().err.splitlines()
    assert said == [
        f"pypnm: cannot rotate log_file {str(path)!r}: Is a directory; this process stops rotating it "
        "until pypnm is restarted (log_file_max_bytes=100)"
    ]


def test_a_directory_gone_sends_lines_to_stderr_after_one_line_why_and_back_when_it_returns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "logs"
    directory.mkdir()
    path = directory / "app.log"
    handler = LogFileHandler(LogFile(path))
    handler.setFormatter(logging.Formatter("%(message)s"))
    try:
        handler.emit(record("first"))
        shutil.rmtree(directory)
        handler.emit(record("second"))
        handler.emit(record("third"))
        assert capsys.readouterr().err.splitlines() == [
            f"pypnm: cannot write log_file {str(path)!r}: No such file or directory; "
            "writing log lines to stderr until it works again",
            "second",
            "third",
        ]
        directory.mkdir()
        handler.emit(record("fourth"))
        assert path.read_text() == "fourth\n" and capsys.readouterr().err == ""
        shutil.rmtree(directory)
        handler.emit(record("fifth"))  # a new run of failures says why again
        assert capsys.readouterr().err.splitlines()[1:] == ["fifth"]
    finally:
        handler.close()


def test_a_record_that_cannot_be_formatted_is_reported_and_not_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logging, "raiseExceptions", True)  # logging's own report of a bad record
    path = tmp_path / "app.log"
    handler = LogFileHandler(LogFile(path))
    try:
        handler.emit(record("%d requests", "many"))
        handler.emit(record("%d requests", 3))
    finally:
        handler.close()
    assert path.read_text() == "3 requests\n"
    error = capsys.readouterr().err
    assert "--- Logging error ---" in error and "TypeError" in error


def test_a_reopen_that_cannot_open_waits_for_the_next_write_to_report_it(tmp_path: Path) -> None:
    directory = tmp_path / "logs"
    directory.mkdir()
    path = directory / "app.log"
    file = LogFile(path)
    try:
        file.open()
        shutil.rmtree(directory)
        file.request_reopen()  # as from a SIGUSR1 handler: it must not raise
        with pytest.raises(FileNotFoundError):
            file.write(b"lost unless reported\n")
        directory.mkdir()
        file.write(b"after\n")
        assert path.read_bytes() == b"after\n"
    finally:
        file.close()


def test_catches_reads_the_signal_mask_and_is_false_for_a_process_that_is_gone() -> None:
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait(10)
    assert not catches(child.pid, signal.SIGUSR1)
    saved = signal.getsignal(signal.SIGUSR1)
    try:
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        assert not catches(os.getpid(), signal.SIGUSR1)
        signal.signal(signal.SIGUSR1, lambda _signum, _frame: None)
        assert catches(os.getpid(), signal.SIGUSR1)
    finally:
        signal.signal(signal.SIGUSR1, saved)


def test_sigusr1_without_a_log_file_reopens_nothing_and_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(logfile, "_active", None)
    asked: list[str] = []

    def others() -> list[int | None]:
        asked.append("others")
        return []

    with caplog.at_level(logging.INFO, logger="pypnm.supervisor.logfile"):
        reopen_log_files(others)
    assert [r.getMessage() for r in caplog.records] == ["SIGUSR1: no log_file is configured; nothing to reopen"]
    assert asked == []  # no signal passed on to the template or the workers
