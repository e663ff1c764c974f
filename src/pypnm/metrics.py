"""What the master and the workers agree on about metrics: names, label values, buckets, the directory.

`GET /metrics` (pypnm.api.metrics) sums what every process of the service wrote, using
prometheus-client's multiprocess mode: each process that counts something writes its
values to files of its own (`counter_<pid>.db`, `histogram_<pid>.db`, `gauge_<mode>_<pid>.db`)
in one directory, and a scrape adds them up. The master owns that directory
(pypnm.supervisor.metrics): `metrics/` inside its private runtime directory, made at start,
named to every process by the environment variable `PROMETHEUS_MULTIPROC_DIR` (set before
the fork template starts, so the template and every worker it forks have it before they
import prometheus_client), and removed with the runtime directory.

Because the files of a process that died stay, a counter never goes back when a reload
replaces the workers or a worker is respawned. The master folds the files of dead
processes into one archive file per type (`counter_archive.db`, `histogram_archive.db`),
so the directory does not grow with every worker ever started. A scrape holds a shared
`flock` on `metrics.lock` while it reads the files and the master an exclusive one while
it swaps the archive in and removes what it folded, so a scrape never counts a value twice
or misses one.

Room on disk is reserved ahead (`reserve`): prometheus-client grows its files by truncating
them, so their blocks are taken only as the memory map is written, and on a full file system
that write is a SIGBUS, which kills the process. Each zygote and worker reserves its own files
as it starts (`reserve_worker_files`) and the master an archive before it writes one, so a full
file system fails an import, a worker's start or a compaction with an error that says so instead.
(The master's own files are written whole at its start: every label value is set then.)

This module is imported by both sides, which may run different versions of pypnm (the
master keeps the code it was started with; workers run each reload's snapshot), so what it
defines is a protocol: change names and the lock only together with a restart in mind. It
does not import prometheus_client, which must be imported only once the environment
variable is set (the master imports this module before its directory exists).
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
from collections.abc import Iterator
from pathlib import Path

# prometheus-client reads this (before its first metric is made) to switch to multiprocess mode.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
DIRECTORY = "metrics"  # inside the master's runtime directory
LOCK_FILE = "metrics.lock"  # shared while a scrape reads, exclusive while the master compacts
ARCHIVE = "archive"  # `<type>_archive.db`: the sum of the files of dead processes

# Families. prometheus-client adds `_total` to counters, `_bucket`/`_sum`/`_count` to histograms.
HTTP_REQUESTS = "pypnm_http_requests"  # counter {method, route, status}: written by workers
HTTP_REQUEST_DURATION = "pypnm_http_request_duration_seconds"  # histogram {method, route}: workers
HTTP_IN_PROGRESS = "pypnm_http_requests_in_progress"  # gauge (livesum): workers
RELOADS = "pypnm_reloads"  # counter {outcome}: the master
RELOAD_DURATION = "pypnm_reload_duration_seconds"  # histogram, trigger -> new generation serving: the master
WORKER_RESTARTS = "pypnm_worker_restarts"  # counter {reason}: the master
GENERATION = "pypnm_generation"  # gauge, from the master's status at scrape time
WORKERS = "pypnm_workers"  # gauge {state}, from the master's status at scrape time
BUILD_INFO = "pypnm_build_info"  # gauge {version, code_version} = 1, of the code that answered
METRICS_FILES = "pypnm_metrics_files"  # gauge: files the scrape read (see the README on growth)

# Label values. Every value is written at start with 0, so `increase()` sees the first event.
RELOAD_OUTCOMES = ("succeeded", "failed", "rolled_back")
RESTART_REASONS = ("crash", "recycle", "hung")
WORKER_STATES = ("starting", "ready", "serving", "draining", "closing")  # as /status names them
UNMATCHED_ROUTE = "<unmatched>"  # any path no route serves: clients cannot add label values
OTHER_METHOD = "<other>"
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"})

# pypnm answers most requests in about a millisecond: the default buckets (from 5 ms) would hide that.
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
RELOAD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


# What a worker's own families write (a file per type and pid), and the room each takes per route
# (method and path) it may be labelled with: a histogram series is 15 entries of up to ~260 bytes,
# a counter's a few (by status). At least prometheus-client's own first size, at most RESERVED_MAX.
WORKER_FILES = {"counter": 1024, "histogram": 4096, "gauge_livesum": 0}
RESERVED = 64 * 1024
RESERVED_MAX = 1024 * 1024


def reserve(path: Path, size: int) -> None:
    """Give `path` (created if missing) `size` bytes of blocks of its own; OSError (ENOSPC) when there is no room."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.posix_fallocate(fd, 0, size)  # blocks that hold data are kept as they are
    finally:
        os.close(fd)


def reserve_worker_files(routes: int = 0) -> str | None:
    """Reserve this process's value files before it writes to them (see the module docstring).

    `routes`: how many (method, path) pairs the app serves. Past what was reserved, a file grows
    as prometheus-client grows it, unreserved. Returns why it could not (no room), else None.
    """
    path = directory()
    if path is None:
        return None
    try:
        for kind, per_route in WORKER_FILES.items():
            wanted = round_up(routes * per_route, RESERVED)
            reserve(path / f"{kind}_{os.getpid()}.db", min(RESERVED_MAX, max(RESERVED, wanted)))
    except OSError as exc:
        return f"cannot reserve room for its metrics in {path}: {exc}"
    return None


def round_up(size: int, unit: int) -> int:
    """`size` rounded up to a whole multiple of `unit`."""
    return -(-size // unit) * unit


def directory() -> Path | None:
    """The multiprocess directory of this process, or None when it runs without one (plain uvicorn)."""
    path = os.environ.get(MULTIPROC_ENV)
    return Path(path) if path and os.path.isdir(path) else None


# prometheus-client's files start with 8 bytes (the used size, padding) before any value. A shorter
# one was created by a process that died (or is) between creating it and sizing it: it holds nothing,
# and prometheus-client's reader fails on it, which would fail every scrape.
FILE_HEADER = 8


def value_files(path: Path) -> list[str]:
    """The `*.db` files of the directory that a reader can read (see FILE_HEADER)."""
    files = []
    for name in glob.glob(os.path.join(path, "*.db")):
        try:
            if os.stat(name).st_size >= FILE_HEADER:
                files.append(name)
        except FileNotFoundError:  # folded into an archive meanwhile
            continue
    return files


@contextlib.contextmanager
def reading(path: Path) -> Iterator[None]:
    """Hold the directory's shared lock while the files are read (a no-op for a directory without one).

    A directory that pypnm's master did not make (PROMETHEUS_MULTIPROC_DIR set by hand for a plain
    uvicorn) has no lock file and no compaction, so there is nothing to wait for.
    """
    try:
        fd = os.open(path / LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # the master holds it exclusively only for a rename and a few unlinks
        yield
    finally:
        os.close(fd)
