"""Candidates run at a lower CPU priority (a higher nice value) until they serve.

Why: a reload's zygote imports the new code and its workers run lifespan startup and smoke
checks while the serving generation answers requests on the same cores. Niced, the candidate
takes only the CPU the serving workers leave over, so their latency stays near steady.

Raising a nice value is always allowed; lowering it back (what a worker does when it starts
accepting) is not for an unprivileged process: it needs CAP_SYS_NICE, or an RLIMIT_NICE soft
limit of at least `20 - base nice` (systemd: `LimitNICE=`; a shell: `ulimit -e`; the default
limit, 0, allows nothing). SCHED_IDLE has the same rule for leaving it, and SCHED_BATCH does
not lower the priority. A worker that could not give its nice value back would serve niced
for good, so the fork template asks once, at start (`start`), whether it can, trying it on a
thread of its own (the nice value is per thread on Linux); when it cannot, candidates are not
niced at all, the template says so, and the master logs it once (spawner.py): reloads then
run as before, at the serving workers' priority.

The nice value is per thread: a worker gives it back to every thread it has when it starts
accepting (threads a lifespan startup started inherit the lowered priority), and threads
started later inherit it from their creator.
"""

from __future__ import annotations

import contextlib
import os
import threading

# How much a candidate's nice value is raised while it imports and validates.
CANDIDATE_NICE = 10
MAX_NICE = 19

# Set by the fork template at start; its zygotes and workers inherit them by fork.
_base: int = 0  # the nice value serving workers run at (the template's own)
_can_renice: bool = False


def start() -> bool:
    """Remember this process's nice value as the serving one; whether a lowered value can be given back."""
    global _base, _can_renice
    _base = os.getpriority(os.PRIO_PROCESS, 0)
    _can_renice = _probe(_base)
    return _can_renice


def _probe(base: int) -> bool:
    """Raise and lower a thread's nice value by one: does this process have the right to lower it?"""
    if base >= MAX_NICE:
        return False
    answer: list[bool] = []

    def attempt() -> None:
        # Linux: with `who` 0, setpriority acts on the calling thread only, not the whole process.
        try:
            os.setpriority(os.PRIO_PROCESS, 0, base + 1)
            os.setpriority(os.PRIO_PROCESS, 0, base)
        except OSError:
            answer.append(False)
        else:
            answer.append(True)

    thread = threading.Thread(target=attempt, name="pypnm-nice-probe")
    thread.start()
    thread.join()
    return answer == [True]


def lower(increment: int) -> int:
    """Run this process (a candidate's zygote) `increment` nice levels below serving; its nice value now."""
    if increment > 0 and _can_renice:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, 0, min(_base + increment, MAX_NICE))
    return os.getpriority(os.PRIO_PROCESS, 0)


def restore() -> None:
    """Give every thread of this process (a worker that starts accepting) the serving nice value back."""
    if not _can_renice or os.getpriority(os.PRIO_PROCESS, 0) == _base:
        return
    _set_all_threads(_base)


def leave() -> None:
    """Run this process's end (a worker or zygote done serving) at the lowest priority.

    Why: the kernel tears down an exiting process's memory in that process's time, and for a
    process that mapped a large app that is milliseconds of CPU (its page tables, the pages it
    had copied). A generation's workers and zygote exit together once it has drained, right
    after a reload, while the new generation serves on the same cores. Raising a nice value
    needs no privilege.
    """
    _set_all_threads(MAX_NICE)


def _set_all_threads(nice: int) -> None:
    """Linux: setpriority on a thread id sets that thread's nice value only, so each one is set."""
    try:
        threads = [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:
        threads = [0]
    for tid in threads:
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            os.setpriority(os.PRIO_PROCESS, tid, nice)
