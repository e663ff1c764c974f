"""The master's private runtime directory (control socket, snapshots), and who removes it.

The directory is `<parent>/pypnm-XXXXXXXX/`, mode 0700 (the control socket's access
control). The parent is the `runtime_dir` setting, else `$RUNTIME_DIRECTORY` (set by
systemd's `RuntimeDirectory=`; its first entry), else the temporary directory. pypnm
only ever removes its own `pypnm-*` directories, never the parent.

Whether a directory's master is still there is decided by a lock, not by a pid (a pid
can be reused by an unrelated process): the master holds an exclusive `flock` on
`master.lock` inside it. The fork template receives that same open file and every
worker inherits it by fork, so the lock is held as long as *any* process of that master
is alive, and the kernel drops it when the last one exits, however it exits. So:

- a master that stops normally removes its directory itself;
- each process of a master that died (the template on end-of-file, an orphaned worker
  after its grace period) closes its copy when it leaves and tries to take the lock on
  a file of its own: only the last one out succeeds, and it removes the directory;
- a new master removes every `pypnm-*` directory of its own user in the same parent
  whose lock it can take: whatever `kill -9` hit and nobody was left to clean up.
  Directories of earlier pypnm versions have no lock file; they count as abandoned when
  their control socket refuses connections (nobody listens on it any more).

Whoever removes a directory holds its lock meanwhile and deletes the lock file last, so a
removal cut short (the process killed half-way) is finished by the next sweep.

The master also holds a shared `flock` on the directory itself, for as long as it has it:
`systemd-tmpfiles`, which ages out old files in the temporary directory (ten days by default,
by their timestamps, which a long-lived service's control socket and snapshots do not move),
skips a directory that someone holds such a lock on. Without it, a service started with the
default parent would lose its control socket and snapshots after some days and be left unable
to reload or respawn a worker.

Hand-written because `tempfile` knows nothing of an owner's life, and the lock has to
travel through the fork template into the workers.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

from pypnm.supervisor.timeouts import CONTROL_PROBE

logger = logging.getLogger("pypnm.supervisor.runtime")

PREFIX = "pypnm-"
LOCK_FILE = "master.lock"
CONTROL_SOCKET = "control.sock"
PIN_TRIES = 100  # 5 s of 50 ms waits for a cleanup that holds the new directory's lock as it looks in
SYSTEMD_ENV = "RUNTIME_DIRECTORY"
SETTING_ENV = "PYPNM_RUNTIME_DIR"

# In the fork template and the workers it forks: the inherited lock (descriptor, directory).
_held: tuple[int, Path] | None = None
# A worker may leave from two threads (its master channel's reader and its main thread).
_leaving = threading.Lock()


class RuntimeDirError(Exception):
    """The runtime directory cannot be made; the message is one line for the operator."""


def choose_parent(setting: Path | None) -> tuple[Path, str]:
    """The parent directory to use, and how to name it in a message."""
    if setting is not None:
        return setting, f"runtime_dir {str(setting)!r} ({SETTING_ENV})"
    systemd = os.environ.get(SYSTEMD_ENV, "").split(":")[0]
    if systemd:
        return Path(systemd), f"{SYSTEMD_ENV} {systemd!r}"
    temp = tempfile.gettempdir()
    return Path(temp), f"the temporary directory {temp!r} (set runtime_dir to choose another)"


class RuntimeDir:
    """A directory this process created and holds the lock of, until `remove`."""

    def __init__(self, path: Path, lock_fd: int, pin_fd: int | None) -> None:
        self.path = path
        self.lock_fd = lock_fd
        self.pin_fd = pin_fd  # the directory, shared-locked (see the module docstring, systemd-tmpfiles)

    @classmethod
    def create(cls, setting: Path | None) -> RuntimeDir:
        """Remove abandoned directories in the parent, then make ours; RuntimeDirError if it cannot be made."""
        parent, named = choose_parent(setting)
        for stale in sweep(parent):
            logger.info("removed the runtime directory %s: its master is gone", stale)
        try:
            path = Path(tempfile.mkdtemp(prefix=PREFIX, dir=parent))
        except OSError as exc:
            raise RuntimeDirError(f"cannot create the runtime directory in {named}: {_why(exc)}") from None
        try:
            lock_fd = _take_new_lock(path)
        except OSError as exc:
            shutil.rmtree(path, ignore_errors=True)
            raise RuntimeDirError(f"cannot create the runtime directory in {named}: {_why(exc)}") from None
        return cls(path, lock_fd, _pin(path))

    def remove(self) -> None:
        _remove_lock_last(self.path)
        for fd in (self.lock_fd, self.pin_fd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)


def _why(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _pin(directory: Path) -> int | None:
    """The directory opened and shared-locked, so that systemd-tmpfiles' age-based cleanup passes it by.

    The cleanup holds its own lock only while it looks into the directory: waited for, a little.
    Without the lock pypnm runs all the same, and says what it risks.
    """
    reason = "it stays locked"
    fd: int | None = None
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        for _ in range(PIN_TRIES):
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                time.sleep(0.05)
    except OSError as exc:
        reason = _why(exc)
    if fd is not None:
        os.close(fd)
    logger.warning("cannot hold the runtime directory %s against age-based cleanup: %s", directory, reason)
    return None


def _take_new_lock(directory: Path) -> int:
    """Create `master.lock` already locked: under another name first, so no sweeper sees it unlocked."""
    pending = directory / f"{LOCK_FILE}.new"
    fd = os.open(pending, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, f"{os.getpid()}\n".encode())  # for people looking; liveness is the lock
        os.rename(pending, directory / LOCK_FILE)
    except OSError:
        os.close(fd)
        raise
    return fd


def sweep(parent: Path) -> list[Path]:
    """Remove this user's `pypnm-*` directories in `parent` whose master is gone; returns them."""
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return []  # creating ours will say what is wrong with the parent
    removed = []
    for entry in entries:
        if not entry.name.startswith(PREFIX):
            continue
        try:
            if not entry.is_dir(follow_symlinks=False) or entry.stat(follow_symlinks=False).st_uid != os.getuid():
                continue
        except OSError:
            continue
        directory = Path(entry.path)
        # No lock file yet: a master still creating its directory has no control socket either.
        locked = (directory / LOCK_FILE).exists()
        if _remove_if_unlocked(directory) if locked else _remove_if_nobody_listens(directory):
            removed.append(directory)
    return removed


def _remove_if_unlocked(directory: Path) -> bool:
    """Remove `directory` if no process holds its lock; the lock is held while removing."""
    try:
        fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False  # not there (yet, or any more): not ours to judge
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return False  # a process of that master is alive
    try:
        _remove_lock_last(directory)
    finally:
        os.close(fd)
    return not directory.exists()


def _remove_lock_last(directory: Path) -> None:
    """Remove the directory with its lock file last, so an interrupted removal is finished by the next sweep."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory):
            if entry.name == LOCK_FILE:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
    with contextlib.suppress(OSError):
        os.unlink(directory / LOCK_FILE)
    with contextlib.suppress(OSError):
        os.rmdir(directory)


def _remove_if_nobody_listens(directory: Path) -> bool:
    """A directory of an earlier version (no lock file) is abandoned when its control socket refuses connections."""
    control = directory / CONTROL_SOCKET
    if not control.is_socket():
        return False  # being created, or not a master's directory: leave it
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(CONTROL_PROBE)
        try:
            probe.connect(str(control))
        except OSError as exc:
            if exc.errno != errno.ECONNREFUSED:
                return False
        else:
            return False
    shutil.rmtree(directory, ignore_errors=True)
    return not directory.exists()


# ----- in the fork template and its workers -------------------------------------------------


def adopt(lock_fd: int, directory: Path) -> None:
    """Hold the master's lock from here on (the template, at start); workers inherit it by fork.

    Close-on-exec, so programs the app runs never hold it (forked-only children still do).
    """
    global _held
    os.set_inheritable(lock_fd, False)
    _held = (lock_fd, directory)


def leave() -> None:
    """Drop this process's hold on the lock as it exits; if it was the last, remove the directory.

    While the master lives it holds the lock, so this removes nothing: safe on every exit path.
    """
    global _held
    with _leaving:  # held throughout: a second caller must not exit the process half-way through a removal
        if _held is None:
            return
        lock_fd, directory = _held
        _held = None
        with contextlib.suppress(OSError):
            os.close(lock_fd)
        if _remove_if_unlocked(directory):
            logger.info("removed the runtime directory %s: the master is gone and this was its last process", directory)
