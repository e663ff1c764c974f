"""The next reload's standby zygote, as the master keeps it: forked, handed over or stopped.

A standby (template.py, `run_standby`) is the next zygote of an incremental line, forked from
the serving generation's zygote before the new code is known: it drops the modules the last
reload dropped (the file edited last is the likeliest to be edited again), collects what they
held, and waits. A reload whose plan drops the same modules has it go on as its zygote; any
other reload forks its zygote as usual, and the standby leaves.

`NextStandby` owns the one standby there is at a time, with the zygote it was forked from and
what it drops: whether it fits the serving generation (`keep_if_fits`), forking one (`fork`),
handing it to a reload (`take`), stopping it (`stop`). Generations (lifecycle.py) says when.

When, by `reload_standby`: `at_reload`, as a reload from disk begins, beside the snapshot; none
waits between reloads. `ahead`, also once a reload is over (when the generation it replaced has
drained, or right away when none drains), so that the fork, the drop and the collection run
between reloads, niced, and the next reload's zygote starts at pointing the kept modules at the
new snapshot; a reload from disk that begins with none (one that follows the last before its
replaced generation drained, or after a standby ended while it waited) forks it as it begins.

What waiting costs: the pages its drop and collection wrote, which are its own while it waits
(the README's "Incremental imports" gives the figure for the benchmark's large app).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from pypnm.supervisor.priority import CANDIDATE_NICE, ready_or_promoted
from pypnm.supervisor.spawner import SpawnError, Standby, Zygote

logger = logging.getLogger("pypnm.supervisor.master")


@dataclass
class _Forking:
    """A standby asked of `zygote`, dropping `drop`: `task` ends with it ready, or None when it failed."""

    zygote: Zygote
    drop: frozenset[str]
    task: asyncio.Task[Standby | None]

    def fits(self, zygote: Zygote, drop: list[str]) -> bool:
        """Asked of `zygote`, dropping `drop`, and still usable: getting ready, standing by, or its fork failed."""
        return self.zygote is zygote and self.drop == frozenset(drop) and _usable(self.task)


class NextStandby:
    """At most one standby for the next reload, forked from the serving generation's zygote."""

    def __init__(self, spawn_task: Callable[[Coroutine[Any, Any, Any]], asyncio.Task[Any]]) -> None:
        self._spawn_task = spawn_task  # the master's: its tasks end with it
        self._next: _Forking | None = None
        self._forked: list[Standby] = []  # those still standing by get SIGUSR1 (`pids`)

    def pids(self) -> list[int]:
        """The standbys still standing by (not handed over, not stopped, not ended), from their fork on."""
        return [standby.pid for standby in self._standing_by()]

    def _standing_by(self) -> list[Standby]:
        self._forked = [standby for standby in self._forked if standby.is_standing_by()]
        return self._forked

    def keep_if_fits(self, zygote: Zygote, drop: list[str]) -> bool:
        """Whether the standby there is was forked by `zygote` and drops `drop`; one that was not is stopped.

        One that ended while it waited does not fit. One whose fork failed does: the same fork
        would fail again, and the reload forks its zygote as usual.
        """
        if self._next is not None and self._next.fits(zygote, drop):
            return True
        self.stop()
        return False

    def fork(self, zygote: Zygote, drop: list[str], generation: int) -> None:
        """Have `zygote`, generation `generation`'s, fork a standby that drops `drop`, in the background."""
        assert self._next is None, "keep_if_fits stops the standby there was"
        self._next = _Forking(zygote, frozenset(drop), self._spawn_task(self._fork(zygote, drop, generation)))

    async def _fork(self, zygote: Zygote, drop: list[str], generation: int) -> Standby | None:
        try:
            standby = await Standby.fork(zygote, drop, CANDIDATE_NICE)
            self._forked = [*self._standing_by(), standby]
            await ready_or_promoted(standby.pid, standby.ready(), standby.name)
        except SpawnError as exc:
            logger.warning("no standby for the next reload: %s", exc)
            return None
        logger.info(
            "standby pid=%d of generation %d's zygote ready: dropped the %d module(s) the last reload dropped (%s)",
            standby.pid,
            generation,
            len(drop),
            ", ".join(f"{step} {ms}ms" for step, ms in standby.took_ms.items()),
        )
        return standby

    async def take(self, drop: list[str]) -> Standby | None:
        """The standby, for a reload that drops `drop`, if it dropped the same; otherwise it is stopped.

        One still getting ready is waited for: it does what a zygote forked now would do first,
        and it started earlier.
        """
        forking, self._next = self._next, None
        if forking is None:
            return None
        standby = await forking.task
        if standby is None or standby.drop == frozenset(drop):
            return standby
        logger.debug("standby pid=%d not used: the reload drops other modules", standby.pid)
        standby.stop()
        return None

    def stop(self) -> None:
        """The standby leaves (once it is ready, if it is not yet): end-of-file on its channel ends it."""
        forking, self._next = self._next, None
        if forking is not None:
            forking.task.add_done_callback(_stop_standby)


def _usable(task: asyncio.Task[Standby | None]) -> bool:
    """Getting ready, standing by, or its fork failed (a reload then forks its zygote as usual): not ended."""
    if not task.done():
        return True
    if not _returned(task):
        return False
    standby = task.result()
    return standby is None or standby.is_standing_by()


def _stop_standby(task: asyncio.Task[Standby | None]) -> None:
    if _returned(task) and (standby := task.result()) is not None:
        standby.stop()


def _returned(task: asyncio.Task[Standby | None]) -> bool:
    """The task ended with a result (a standby, or None when its fork failed), not cancelled or raising."""
    return task.done() and not task.cancelled() and task.exception() is None
