"""The `log_file`: one file that the master, the fork template and every worker append to.

Design: every process writes its own lines straight to the file; none waits for another.

- **Whole lines, appended.** Each process opens the file with `O_APPEND` and writes each
  record (its line, or its lines when it carries a traceback) with one `write()`. On a
  local file system the kernel appends each such write whole at the end of the file, so
  lines of different processes never mix, and there is no buffer that a crash could lose.
- **Reopen by inode.** Before each write a process compares the file at the path
  (`stat`) with the one it has open (device and inode), as the standard library's
  `WatchedFileHandler` does; when they differ (rotated, renamed away by logrotate, deleted)
  it opens the path anew (creating it). So every process follows a rotation at its next
  line, whoever did it.
- **Any process rotates, none waits.** A process whose line would take the file past
  `log_file_max_bytes` takes a non-blocking `flock` on the file it has open, checks
  that this file is still the one at the path, shifts `<file>.1 … .<n-1>` up by one
  (dropping `.<n>`), renames the file to `<file>.1` and reopens. A process that finds
  the lock taken does not wait: another one is rotating, and it writes its line to the
  file it has (which is about to become `.1`). A line written just before a rename is
  in `.1`, not lost; it would take `log_file_backups` more rotations within one
  `stat`-to-`write` step for it to be dropped.
- **SIGUSR1** (logrotate's `postrotate`) makes the master reopen its file and pass the
  signal on to the fork template, the zygotes (one still importing too) and every worker,
  which reopen theirs too; a process that logs nothing would otherwise keep the renamed
  file open. The master signals
  only processes that catch SIGUSR1 already (`SigCgt` in `/proc/<pid>/status`), so a
  process still starting is never killed by it; it opens the current file anyway.

Why not the master as the single writer (workers sending it their lines over a pipe):
the master is then on every request's path. A master stopped (SIGSTOP, a debugger, a
frozen cgroup) or busy lets the pipes fill, and then serving workers either block on
their next log line or drop lines; its death loses what is in flight. Here a stopped
process holds up nobody: at worst the lock it holds makes others skip a rotation, and
the file grows past its size until a later line rotates it. Why not the master as the
only rotator (with every process appending): it would have to poll the size, so the file
overshoots by a polling period, and a stopped master would stop rotation altogether; with
the lock, whichever process sees the size first rotates, and nobody waits for it.

Why hand-written: `logging.handlers.RotatingFileHandler` is for one process (others keep
writing to the renamed file; two rotating at once shift the backups twice) and writes
through a buffered stream, which may split a long record into several writes.
`WatchedFileHandler` follows renames but never rotates. `concurrent-log-handler` is
multi-process, but every write takes a blocking lock on a shared lock file, without a
time limit: one process stopped while holding it stalls every worker's logging, and so
its serving. This module is those three ideas without the waiting.

Local file systems only: `O_APPEND` is not atomic on NFS.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import sys
import threading
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path

logger = logging.getLogger("pypnm.supervisor.logfile")

_OPEN_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC


class LogFileError(OSError):
    """The log file cannot be opened for appending; the message is one line for the operator."""


class LogFile:
    """The log file as one process writes it: append whole lines, follow renames, rotate by size."""

    def __init__(self, path: Path, max_bytes: int = 0, backups: int = 1) -> None:
        self.path = str(path)
        self.max_bytes = max_bytes
        self.backups = backups
        self._fd: int | None = None
        self._identity: tuple[int, int] | None = None  # (device, inode) of the file we have open
        # A plain Lock, not the handler's RLock: a SIGUSR1 handler interrupting a write in this
        # same thread must see the lock as taken (and leave the reopen to the next write).
        self._lock = threading.Lock()
        self._reopen_wanted = False
        _instances.add(self)

    def open(self) -> None:
        """Open (creating) the file now; LogFileError with the reason when it cannot be."""
        with self._lock:
            try:
                self._reopen()
            except OSError as exc:
                raise LogFileError(f"cannot open log_file {self.path!r}: {exc.strerror or exc}") from None

    def write(self, data: bytes) -> None:
        """Append `data` (whole lines) with one write; raises OSError when the file cannot take it."""
        with self._lock:
            if self._reopen_wanted or self._fd is None:
                self._reopen()
            size = self._follow()
            if self.max_bytes and size and size + len(data) > self.max_bytes:
                self._rotate()
                size = self._follow()
            assert self._fd is not None
            view = memoryview(data)
            while view:  # a regular file takes the whole write unless it is full; then the rest raises
                view = view[os.write(self._fd, view) :]

    def request_reopen(self) -> None:
        """Close the file and open the path anew: now when no write is under way, else at the next write.

        Safe in a signal handler (it never waits for the lock).
        """
        self._reopen_wanted = True
        if self._lock.acquire(blocking=False):
            try:
                self._reopen()
            except OSError:
                pass  # the next write tries again, and reports it
            finally:
                self._lock.release()

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd, self._identity = None, None

    # ----- under self._lock ---------------------------------------------------------------

    def _reopen(self) -> None:
        fd = os.open(self.path, _OPEN_FLAGS, 0o640)  # the audit trail and client addresses: not for every local user
        status = os.fstat(fd)
        if self._fd is not None:
            os.close(self._fd)
        self._fd, self._identity = fd, (status.st_dev, status.st_ino)
        self._reopen_wanted = False

    def _follow(self) -> int:
        """Reopen when the path no longer leads to the file we have open; the size of the file we now have."""
        try:
            status = os.stat(self.path)
        except FileNotFoundError:
            self._reopen()
            return 0
        if (status.st_dev, status.st_ino) != self._identity:
            self._reopen()
            assert self._fd is not None
            return os.fstat(self._fd).st_size
        return status.st_size

    def _rotate(self) -> None:
        """Rename the file to `.1` (shifting the older ones up) unless another process is doing it."""
        assert self._fd is not None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # another process is rotating this very file; our line goes to it, about to be .1
        try:
            status = os.stat(self.path)
            if (status.st_dev, status.st_ino) != self._identity:
                return  # it rotated the file while we waited for our turn; _follow reopens
            # Shift .1 ... .k up by one, k being the last before a gap (or backups - 1): a few renames
            # however many backups are allowed, so the others skip few rotations meanwhile.
            last = 0
            while last < self.backups - 1 and os.path.exists(f"{self.path}.{last + 1}"):
                last += 1
            for number in range(last, 0, -1):
                os.replace(f"{self.path}.{number}", f"{self.path}.{number + 1}")
            os.replace(self.path, f"{self.path}.1")
        except OSError as exc:
            # Say it once, and go on writing to the file as it is: a line in a too-large file beats a
            # lost one, and trying again at every line would cost every line a lock and a rename.
            self.max_bytes, failed_at = 0, self.max_bytes
            sys.stderr.write(
                f"pypnm: cannot rotate log_file {self.path!r}: {exc.strerror or exc}; this process stops "
                f"rotating it until pypnm is restarted (log_file_max_bytes={failed_at})\n"
            )
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _after_fork(self) -> None:
        self._lock = threading.Lock()  # a thread of the parent may have held it at the fork


_instances: weakref.WeakSet[LogFile] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for file in _instances:
        file._after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


def check_can_open(path: Path) -> None:
    """LogFileError when `path` cannot be opened for appending: what `pypnm serve` would stop at.

    For `pypnm check` and a reload that changes `log_file` (which only a restart applies): the
    file is opened as every process opens it (LogFile.open), and removed again if this created
    it, so that a check leaves behind no file it did not find.
    """
    existed = os.path.lexists(path)
    file = LogFile(path)
    file.open()
    identity = file._identity
    file.close()
    if not existed:
        with contextlib.suppress(OSError):
            status = os.lstat(path)
            if (status.st_dev, status.st_ino) == identity:  # still the one this made, not someone else's since
                os.unlink(path)


class LogFileHandler(logging.Handler):
    """A logging handler writing each record as one line (or one block) to a LogFile.

    When the file cannot take a line (disk full, directory gone, no permission), the
    line goes to stderr instead, after one line saying why; nothing is dropped.
    """

    def __init__(self, file: LogFile) -> None:
        super().__init__()
        self.file = file
        self._failing = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = (self.format(record) + "\n").encode("utf-8", "backslashreplace")
        except Exception:
            self.handleError(record)
            return
        try:
            self.file.write(data)
        except OSError as exc:
            if not self._failing:
                self._failing = True
                sys.stderr.write(
                    f"pypnm: cannot write log_file {self.file.path!r}: {exc.strerror or exc}; "
                    "writing log lines to stderr until it works again\n"
                )
            sys.stderr.write(data.decode("utf-8"))
            sys.stderr.flush()
        else:
            self._failing = False

    def close(self) -> None:
        self.file.close()
        super().close()


# The log file of this process, once setup_logging opened one (read by the master's SIGUSR1).
_active: LogFile | None = None


def activate(file: LogFile | None) -> None:
    """Make `file` this process's log file: SIGUSR1 reopens it (in the master: see reopen_log_files)."""
    global _active
    _active = file
    if file is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGUSR1, lambda _signum, _frame: file.request_reopen())


def catches(pid: int, signum: int) -> bool:
    """Whether process `pid` has a handler for `signum` (its SigCgt mask); False when unknown."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


def reopen_log_files(others: Callable[[], Iterable[int | None]]) -> None:
    """The master's SIGUSR1: reopen its log file, and pass the signal to `others()` (template, workers)."""
    if _active is None:
        logger.info("SIGUSR1: no log_file is configured; nothing to reopen")
        return
    _active.request_reopen()
    told = 0
    for pid in others():
        if pid is not None and catches(pid, signal.SIGUSR1):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGUSR1)
                told += 1
    logger.info("SIGUSR1: log_file %s reopened here and in %d other process(es)", _active.path, told)
