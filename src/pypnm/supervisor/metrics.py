"""The master's side of the metrics: the multiprocess directory, the master's own counters, compaction.

`MasterMetrics.start` makes `metrics/` in the master's runtime directory (so it is private,
and removed with it) and sets `PROMETHEUS_MULTIPROC_DIR` in the master's environment before
the fork template starts: the template and every worker it forks inherit it, so
prometheus-client is in multiprocess mode wherever it is imported, the template's preload
included. The master imports prometheus-client only here, after setting it, and writes its
own families there: reloads by outcome, reload durations (from the trigger to the new
generation serving) and worker restarts by reason. Which generation serves and what state each
worker is in are not written to files: the worker answering a scrape reads them from the
master's status (pypnm.api.metrics), so they are exact at scrape time and a gauge series of a
code version that no longer serves cannot linger (multiprocess mode cannot remove a label set).

Every exited worker's live gauge files are dropped at once (`worker_gone`, prometheus-client's
`mark_process_dead`). Its counter and histogram files must stay, or the totals would go back;
but prometheus-client has no compaction, and a scrape reads every file, so without it the
directory and the scrape time grow with every worker ever started (two files per worker, of
the room it reserved as it started: pypnm.metrics, and the README). `compact` folds the files
of dead processes into one archive per type. Hand-written, because no maintained library does it (the
prometheus-client maintainers leave it to applications; talisker and skypilot wrote their own
the same way): the merge is per key of prometheus-client's own file format, read and written
with its `MmapedDict`, and it keeps what a scrape would have shown: a sum for counters,
histograms and `sum` gauges, the least and the greatest value for `min` and `max` gauges, the
latest for `mostrecent` ones (their archives are `gauge_<mode>_archive.db`; a scrape drops
their pid label anyway). An app's gauge in prometheus-client's default mode, `all`, is a series
per process, dead ones included: with processes replaced at every reload that would grow
without bound, so a dead process's `all` file is deleted, as its `live*` files are. The new
archive is built beside the old one, then swapped in
and the folded files removed under the exclusive lock that every scrape takes shared
(pypnm.metrics.reading), so a scrape sees either the old files or the new archive, never both
or neither. A pid counts as dead only when no process has it; a pid reused by then keeps its
file until that process is gone too (a new worker that gets the pid appends to the same file,
which is as correct).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import mmap
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from pypnm.metrics import (
    ARCHIVE,
    DIRECTORY,
    FILE_HEADER,
    LOCK_FILE,
    MULTIPROC_ENV,
    RELOAD_BUCKETS,
    RELOAD_DURATION,
    RELOAD_OUTCOMES,
    RELOADS,
    RESERVED,
    RESTART_REASONS,
    WORKER_RESTARTS,
    directory,
    reserve,
    round_up,
)

if TYPE_CHECKING:
    from prometheus_client import Counter, Histogram

    from pypnm.supervisor.reloads import ReloadRecord

logger = logging.getLogger("pypnm.supervisor.metrics")

# How often the master looks for files of dead processes to fold into the archives.
COMPACT_INTERVAL = 2.0
# How long compaction waits for scrapes to release the lock before it tries again next time.
LOCK_WAIT = 1.0

# The files a process writes: `counter_<pid>.db`, `histogram_<pid>.db`, `gauge_<mode>_<pid>.db`.
_SUMMED_FILE = re.compile(r"(?P<type>counter|histogram|summary)_(?P<pid>\d+)\.db")
_GAUGE_FILE = re.compile(r"gauge_(?P<mode>[a-z]+)_(?P<pid>\d+)\.db")
# Gauge modes whose dead processes' values still count, and so are folded: how each one merges.
_FOLDED_GAUGES = {"sum": "sum", "min": "min", "max": "max", "mostrecent": "latest"}
Fold = tuple[float, float]  # a value and its timestamp (prometheus-client's, for `mostrecent`)


class MasterMetrics:
    """The multiprocess directory and the families the master writes."""

    def __init__(self, path: Path, reloads: Counter, reload_duration: Histogram, restarts: Counter) -> None:
        self.path = path
        self.reloads = reloads
        self.reload_duration = reload_duration
        self.restarts = restarts

    @classmethod
    def start(cls, runtime_dir: Path) -> MasterMetrics:
        """Make the directory, name it in the environment, and only then import prometheus-client."""
        path = runtime_dir / DIRECTORY
        path.mkdir(mode=0o700)
        (path / LOCK_FILE).touch(mode=0o600)
        os.environ[MULTIPROC_ENV] = str(path)  # before the fork template starts: it and its workers inherit it
        from prometheus_client import Counter, Histogram

        # registry=None: nothing in the master exposes them; a worker's scrape reads the files.
        reloads = Counter(
            RELOADS, "Reloads, by outcome (the start of the service is not counted)", ["outcome"], registry=None
        )
        reload_duration = Histogram(
            RELOAD_DURATION,
            "Seconds from a reload's trigger to its new generation serving (succeeded reloads)",
            buckets=RELOAD_BUCKETS,
            registry=None,
        )
        restarts = Counter(WORKER_RESTARTS, "Workers replaced by the master, by reason", ["reason"], registry=None)
        for outcome in RELOAD_OUTCOMES:
            reloads.labels(outcome)
        for reason in RESTART_REASONS:
            restarts.labels(reason)
        logger.debug("metrics directory %s", path)
        return cls(path, reloads, reload_duration, restarts)

    def reload_finished(self, record: ReloadRecord) -> None:
        """Count a reload's outcome, and time it from its first trigger when it succeeded."""
        if record.source == "start" or record.outcome not in RELOAD_OUTCOMES:
            return
        self.reloads.labels(record.outcome).inc()
        if record.outcome == "succeeded":
            self.reload_duration.observe(max(record.since_requested(), 0.0))

    def worker_restarted(self, reason: str) -> None:
        self.restarts.labels(reason).inc()

    async def maintain(self) -> None:
        """Fold the files of dead processes into the archives now and then, until cancelled.

        A round that fails (a file that cannot be read, say) leaves the files as they were: the
        totals stay right and only the directory grows. It is logged once, until the problem changes.
        """
        problem = ""
        while True:
            await asyncio.sleep(COMPACT_INTERVAL)
            try:
                folded = await asyncio.to_thread(compact, self.path)
            except Exception as exc:  # whatever it is, the next round may not meet it: keep the loop
                if f"{exc}" != problem:
                    logger.warning("metrics: cannot compact %s: %s: %s", self.path, type(exc).__name__, exc)
                problem = f"{exc}"
                continue
            problem = ""
            if folded:
                logger.debug("metrics: folded %d file(s) of dead processes into the archives", folded)


def worker_gone(pid: int) -> None:
    """Drop a gone worker's live gauges now (its counters stay, for `compact` to fold)."""
    path = directory()
    if path is not None:
        from prometheus_client.multiprocess import mark_process_dead

        mark_process_dead(pid, str(path))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process has that pid now
    return True


def compact(path: Path) -> int:
    """Fold the files of dead processes into `<kind>_archive.db` (or delete them); returns how many.

    Safe against concurrent scrapes (see the module doc). When the lock cannot be had within
    LOCK_WAIT, or a pid comes back to life meanwhile, nothing changes and the next call retries.
    """
    from prometheus_client.mmap_dict import MmapedDict
    from prometheus_client.multiprocess import mark_process_dead

    dead: dict[str, list[Path]] = {}  # kind (`counter`, `gauge_max`, ...) -> files of dead processes
    dropped: list[Path] = []  # `gauge_all_<pid>.db` of dead processes
    pids: set[int] = set()
    for entry in os.scandir(path):
        summed = _SUMMED_FILE.fullmatch(entry.name)
        gauge = _GAUGE_FILE.fullmatch(entry.name)
        match = summed or gauge
        if match is None or _alive(int(match["pid"])):
            continue
        if gauge is not None and gauge["mode"] == "all":
            dropped.append(Path(entry.path))
        elif gauge is not None and gauge["mode"] in _FOLDED_GAUGES:
            dead.setdefault(f"gauge_{gauge['mode']}", []).append(Path(entry.path))
        elif gauge is not None:
            mark_process_dead(int(gauge["pid"]), str(path))  # missed by worker_gone (e.g. a respawn race)
            continue
        else:
            dead.setdefault(match["type"], []).append(Path(entry.path))
        pids.add(int(match["pid"]))
    if not dead and not dropped:
        return 0

    staged: dict[Path, Path] = {}  # new archive (built aside) -> the archive it replaces
    try:
        for kind, files in dead.items():
            archive = path / f"{kind}_{ARCHIVE}.db"
            merged: dict[str, Fold] = {}
            how = _FOLDED_GAUGES.get(kind.removeprefix("gauge_"), "sum")
            for source in ([archive] if archive.exists() else []) + files:
                if source.stat().st_size < FILE_HEADER:  # its process died before it sized it: nothing in it
                    continue
                for key, value, timestamp, _ in MmapedDict.read_all_values_from_file(str(source)):
                    merged[key] = _fold(how, merged.get(key), (value, timestamp))
            staging = archive.with_name(archive.name + ".new")  # not `*.db`: no scrape reads it
            staging.unlink(missing_ok=True)  # left by a compaction that was cut short
            reserve(staging, _archive_size(merged))  # a full file system: OSError here, not SIGBUS below
            new = MmapedDict(str(staging))
            try:
                for key, (value, timestamp) in merged.items():
                    new.write_value(key, value, timestamp)
            finally:
                new.close()
            staged[staging] = archive
        with _exclusive(path / LOCK_FILE) as locked:
            if not locked or any(_alive(pid) for pid in pids):
                return 0
            for staging, archive in staged.items():
                os.replace(staging, archive)
            staged.clear()
            for file in [*dropped, *(file for files in dead.values() for file in files)]:
                file.unlink(missing_ok=True)
    finally:
        for staging in staged:
            staging.unlink(missing_ok=True)
    return len(dropped) + sum(len(files) for files in dead.values())


def _fold(how: str, kept: Fold | None, new: Fold) -> Fold:
    """One more process's value for a key, merged as a scrape merges the processes of that kind."""
    if kept is None:
        return new
    if how == "min":
        return min(kept, new, key=lambda fold: fold[0])
    if how == "max":
        return max(kept, new, key=lambda fold: fold[0])
    if how == "latest":
        return max(kept, new, key=lambda fold: fold[1])
    return kept[0] + new[0], 0.0


def _archive_size(merged: dict[str, Fold]) -> int:
    """Room for an archive of these values in prometheus-client's format (a little more), in whole pages."""
    entries = sum(4 + len(key.encode()) + 8 + 16 for key in merged)  # length, padded key, value, timestamp
    return max(RESERVED, round_up(FILE_HEADER + entries, mmap.PAGESIZE))


@contextlib.contextmanager
def _exclusive(lock_file: Path) -> Iterator[bool]:
    """Hold the lock exclusively, waiting at most LOCK_WAIT for scrapes to let go; yields whether it is held."""
    fd = os.open(lock_file, os.O_RDWR | os.O_CLOEXEC)
    try:
        deadline = time.monotonic() + LOCK_WAIT
        held = False
        for _ in range(int(LOCK_WAIT / 0.01) + 1):  # non-blocking tries: a stuck scrape must not stop the master
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.01)
            else:
                held = True
                break
        yield held
    finally:
        os.close(fd)
