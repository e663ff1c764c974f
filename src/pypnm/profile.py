"""The machine as a worker sees it (CPUs, memory, with container limits), `workers = "auto"`, the runtime profile.

`detect_cpu_count`: the CPUs this process may run on (`os.process_cpu_count`, else the
scheduler affinity), lowered to a cgroup CPU quota when one is set (cgroup v2 `cpu.max`, v1
`cpu.cfs_quota_us`/`cpu.cfs_period_us`), rounded up: a container limited to 1.5 CPUs counts 2.
`detect_total_memory`: `MemTotal` of /proc/meminfo, lowered to the cgroup memory limit when
one is set (v2 `memory.max`, v1 `memory.limit_in_bytes`). Both read the files of the cgroup
namespace root, which is the container's own cgroup in Docker and Kubernetes; anything
unreadable counts as "no limit". Hand-written: psutil reports neither container limit.

`auto_workers` is the formula of `workers = "auto"` (stated in the README):

    min(2 * cpus + 1, memory // (2 * per-worker budget)), between 1 and 64

The CPU term is the figure operators know from gunicorn: an async worker overlaps its I/O
waits, but a handler that computes (PNM analysis) holds a core, and one spare process per
core keeps the cores busy while others wait. The memory term makes room for two
generations at once (a reload brings the new one up beside the old); the per-worker
budget is `limit_worker_memory` when set (a worker is recycled past it anyway), else 256 MiB.

`runtime_profile` is the answer of `GET /pypnm/system/webService/runtimeProfile`: the
master builds it (master.py) because only it knows where the `workers` value came from,
once for each settings it takes on (a reload), not for each `/status`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from pypnm.settings import Settings

GIB = 1024**3
MIB = 1024**2
DEFAULT_WORKER_BUDGET = 256 * MIB  # a FastAPI worker's RSS is typically 60-150 MiB; room for the app's data
MAX_WORKERS = 64  # the `workers` setting's own limit

CGROUP = Path("/sys/fs/cgroup")
MEMINFO = Path("/proc/meminfo")

# Where a setting's value came from, strongest first (the order pydantic-settings applies them in).
SettingSource = Literal["explicit_cli", "environment", "settings_file", "default"]


_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes(pid: int | str = "self") -> int | None:
    """A process's resident set size (RSS) in bytes, from /proc/<pid>/statm; None without /proc, or once it is gone."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return None


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def cgroup_cpu_limit(root: Path = CGROUP) -> float | None:
    """The CPU quota of the cgroup, in CPUs, or None when there is none."""
    v2 = _read(root / "cpu.max")  # "max 100000" or "150000 100000"
    if v2 is not None:
        quota, _, period = v2.partition(" ")
        if quota != "max" and quota.isdigit() and period.isdigit() and int(period) > 0:
            return int(quota) / int(period)
        return None
    quota_v1, period_v1 = _read(root / "cpu" / "cpu.cfs_quota_us"), _read(root / "cpu" / "cpu.cfs_period_us")
    if quota_v1 and period_v1 and quota_v1.isdigit() and period_v1.isdigit() and int(period_v1) > 0:
        return int(quota_v1) / int(period_v1)  # -1 (no quota) is not all digits
    return None


def cgroup_memory_limit(root: Path = CGROUP) -> int | None:
    """The memory limit of the cgroup in bytes, or None when there is none."""
    for path in (root / "memory.max", root / "memory" / "memory.limit_in_bytes"):
        text = _read(path)
        if text is not None and text.isdigit() and int(text) < 2**62:  # v1 says "none" with a huge number
            return int(text)
    return None


def detect_cpu_count(root: Path = CGROUP) -> int:
    process_cpu_count = getattr(os, "process_cpu_count", None)  # Python 3.13+
    if process_cpu_count is not None:
        cpus = process_cpu_count() or 1
    elif hasattr(os, "sched_getaffinity"):
        cpus = len(os.sched_getaffinity(0)) or 1
    else:
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_limit(root)
    return max(1, min(cpus, math.ceil(quota))) if quota else cpus


def detect_total_memory(root: Path = CGROUP, meminfo: Path = MEMINFO) -> int | None:
    """Bytes of memory this process's cgroup may use (or the machine has); None when nothing says."""
    total: int | None = None
    for line in (_read(meminfo) or "").splitlines():
        if line.startswith("MemTotal:"):
            total = int(line.split()[1]) * 1024  # kB
    limit = cgroup_memory_limit(root)
    if limit is not None and (total is None or limit < total):
        return limit
    return total


def auto_workers(cpus: int, memory: int | None, worker_budget: int = 0) -> int:
    """The `workers = "auto"` formula (see the module docstring)."""
    by_cpu = 2 * cpus + 1
    budget = worker_budget or DEFAULT_WORKER_BUDGET
    by_memory = memory // (2 * budget) if memory is not None else by_cpu
    return max(1, min(by_cpu, by_memory, MAX_WORKERS))


def workers_for_auto(worker_budget: int = 0) -> int:
    """`workers = "auto"` on this machine, now."""
    return auto_workers(detect_cpu_count(), detect_total_memory(), worker_budget)


def runtime_profile(
    settings: Settings, *, active_workers: int | None, source: SettingSource, given: Any
) -> dict[str, Any]:
    """The runtime profile: what was detected, what runs, and where the worker count came from.

    `source` and `given` are `setting_source("workers", ...)`: where the value came from, as given there.
    """
    cpus = detect_cpu_count()
    memory = detect_total_memory()
    auto = isinstance(given, str) and given.strip() == "auto"
    return {
        "detected_cpu_count": cpus,
        "detected_total_memory_gib": round(memory / GIB, 2) if memory is not None else None,
        "active_workers": active_workers,
        "active_limit_max_requests": settings.limit_max_requests,
        "active_source": source,
        "workers_setting": "auto" if auto else settings.workers,
        "auto_workers": auto_workers(cpus, memory, settings.limit_worker_memory),  # what "auto" gives here
        "limit_max_requests_jitter": settings.max_requests_jitter,
        "limit_worker_memory": settings.limit_worker_memory,  # bytes; 0: no limit
        "worker_timeout": settings.worker_timeout,
    }
