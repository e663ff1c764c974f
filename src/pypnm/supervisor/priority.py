"""Candidates run at the lowest CPU priority (SCHED_IDLE, niced) until they serve.

Why: a reload's zygote imports the new code and its workers run lifespan startup and smoke
checks while the serving generation answers requests on the same cores. The candidate must
take only the CPU the serving workers leave over, so that their latency stays near steady.

Why SCHED_IDLE and not only a higher nice value: when a task wakes, the scheduler looks for an
idle core to run it on, and it counts a core that runs only SCHED_IDLE tasks as idle. A serving
worker that wakes up is then put on the candidate's core and takes it at once. With a nice value
alone the candidate's core counts as busy, and the worker often waited behind another serving
worker on the other core: on the large benchmark app (4 workers, 2 cores) the serving workers'
wake-ups delayed over 1 ms added up to 39-58 ms per second of reload window niced, 23-33 ms
SCHED_IDLE (`perf sched`, 5 and 7 runs). The candidate is niced as well, so that it stays
niced once promoted (below).

A SCHED_IDLE process runs only when nothing else wants the core: on cores that the serving
workers keep busy all the time, a candidate would wait for idle time that never comes. So the
master promotes a candidate that is not ready IDLE_LIMIT seconds after its fork to the normal
policy, still niced (`ready_or_promoted`); the workers it forks after that inherit the normal
policy.

Raising a nice value and entering SCHED_IDLE are always allowed; going back (what a worker does
when it starts accepting, and the master's promotion) is not for an unprivileged process: it
needs CAP_SYS_NICE, or an RLIMIT_NICE soft limit of at least `20 - base nice` (systemd:
`LimitNICE=`; a shell: `ulimit -e`; the default limit, 0, allows nothing). A worker that could
not go back would serve at the lowest priority for good, so the fork template asks once, at
start (`start`), whether it can, trying both on a thread of its own (both are per thread on
Linux); when it cannot, candidates run at the serving priority, the template says so, and the
master logs it once (spawner.py): reloads then run as before, at the serving workers' priority.

The priority is per thread: a worker gives it back to every thread it has when it starts
accepting (threads a lifespan startup started inherit the lowered priority), and threads
started later inherit it from their creator.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import Awaitable
from typing import TypeVar

logger = logging.getLogger(__name__)
T = TypeVar("T")

# How much a candidate's nice value is raised while it imports and validates.
CANDIDATE_NICE = 10
MAX_NICE = 19
# A candidate not ready this long after its fork runs at the normal policy, still niced (`ready_or_promoted`).
IDLE_LIMIT = 1.0
# Linux has SCHED_IDLE; elsewhere candidates are only niced.
_SCHED_IDLE: int | None = getattr(os, "SCHED_IDLE", None) if hasattr(os, "sched_setscheduler") else None

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
    """Enter and leave the lowered priority on a thread: does this process have the right to leave it?"""
    if base >= MAX_NICE:
        return False
    answer: list[bool] = []

    def attempt() -> None:
        # Linux: with `who` 0, setpriority and sched_setscheduler act on the calling thread only.
        try:
            os.setpriority(os.PRIO_PROCESS, 0, base + 1)
            _set_idle(0)
            _set_normal(0)
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
    """Run this process (a candidate's zygote) SCHED_IDLE, `increment` nice levels below serving; its nice now."""
    if increment > 0 and _can_renice:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, 0, min(_base + increment, MAX_NICE))
            _set_idle(0)
    return os.getpriority(os.PRIO_PROCESS, 0)


def restore() -> None:
    """Give every thread of this process (a worker that starts accepting) the serving priority back."""
    if not _can_renice:
        return
    for tid in _threads("self"):
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            _set_normal(tid)
            os.setpriority(os.PRIO_PROCESS, tid, _base)


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
    for tid in _threads("self"):
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            os.setpriority(os.PRIO_PROCESS, tid, nice)


def _threads(pid: int | str) -> list[int]:
    """The thread ids of process `pid` ("self": this one); [0], this thread, where /proc cannot tell."""
    try:
        return [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return [0] if pid == "self" else []


def _set_idle(tid: int) -> None:
    if _SCHED_IDLE is not None:
        os.sched_setscheduler(tid, _SCHED_IDLE, os.sched_param(0))


def _set_normal(tid: int) -> None:
    if _SCHED_IDLE is not None:
        os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))


def lower_this_thread() -> None:
    """Run the calling thread CANDIDATE_NICE levels below its process, for good (the master's background threads).

    Why: the master's threads (its loop's default executor) do a reload's file work, the snapshot's
    stat calls, hard links and compiles, and the import-graph scan, while the serving workers answer
    on the same cores, and the master's loop (signals, the control channel, the swap) must not wait
    behind it either. Where the workers share a scheduling group with the master (a systemd
    service's control group with the CPU controller on), the niced threads yield to them: with the
    workers moved into the master's session for a trial, the serving workers' waits behind the
    master in a reload's first 50 ms fell from 23 ms (the snapshot in the master's loop) to 14 ms
    over 10 reloads of the large benchmark app (`perf sched`). Where the kernel groups tasks by
    session (autogroups), the workers' own session (spawner.py says why) is a group of its own,
    weighed against the master's as a whole, and a thread's nice value counts only inside its
    group: there the waits stayed about the same (32 ms in that trial).
    Not SCHED_IDLE, as candidates are: the reload waits for this work, and a master without the
    right to renice could never take a thread out of SCHED_IDLE.
    """
    with contextlib.suppress(OSError):  # Linux: `who` 0 is the calling thread
        os.setpriority(os.PRIO_PROCESS, 0, min(os.getpriority(os.PRIO_PROCESS, 0) + CANDIDATE_NICE, MAX_NICE))


# ----- the master's side ---------------------------------------------------------------------------


async def ready_or_promoted(pid: int, ready: Awaitable[T], name: str) -> T:
    """Await candidate `pid` getting ready; if that takes over IDLE_LIMIT seconds, promote it meanwhile.

    Promoted: each of its threads leaves SCHED_IDLE for the normal policy and keeps its nice
    value, so it gets the share of the CPU a niced process gets even on cores that never go
    idle. `name` says which candidate in the log line.
    """
    promotion = asyncio.get_running_loop().call_later(IDLE_LIMIT, _promote, pid, name)
    try:
        return await ready
    finally:
        promotion.cancel()


def _promote(pid: int, name: str) -> None:
    promoted = 0
    for tid in _threads(pid):
        with contextlib.suppress(OSError):  # a thread (or the process) that ended meanwhile
            if _SCHED_IDLE is not None and os.sched_getscheduler(tid) == _SCHED_IDLE:
                _set_normal(tid)
                promoted += 1
    if promoted:
        logger.info(
            "%s not ready %.0fs after its fork with idle CPU time only: it runs niced now, no longer SCHED_IDLE",
            name,
            IDLE_LIMIT,
        )
