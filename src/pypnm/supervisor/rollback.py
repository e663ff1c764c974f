"""Automatic rollback: the watch of a new generation after its swap, and the snapshot kept to go back to.

After a swap the generation it replaced is the last-known-good one: its snapshot (code copy,
settings file, frozen TLS pair) and its settings are kept (`previous`; lifecycle.py asks `kept`
before it removes a snapshot) while the new generation is watched for `rollback_window` seconds.
A serving worker of the watched generation that crashes, or hangs and is killed (lifecycle.py
reports both), counts; at `rollback_crashes` the master is asked for a rollback, which is a
reload (reloads.py queues it in a slot of its own, so it is serialized with every other reload,
runs before a queued one and never joins one) that
brings up a generation from the kept snapshot by the ordinary path (validate, start accepting,
swap, drain) and applies the kept settings. A hang counts like a crash: a worker that has to be
killed took its requests down with it just the same, and a new version that deadlocks is as bad
as one that dies.

What is kept, and for how long:
- at most one snapshot beyond the serving ones: kept from the swap until the window passes (then
  removed, unless a generation still drains on it), or until the rollback serves it again;
- a generation that has not proved itself (its window still runs, or it crashed and could not be
  rolled back) is never the one to go back to: a generation that replaces it inherits the
  last-known-good of before. A generation brought up by a rollback serves proven code and is not
  watched (a rollback never rolls back itself, so two broken versions cannot flap);
- the first generation of the service has nothing before it: it is watched only to say so in the
  log when it crashes `rollback_crashes` times; its workers keep being replaced with back-off;
- `rollback_window = 0` keeps nothing and watches nothing. Both settings apply from the reload that
  brings them (the new generation's settings), like every reloadable setting.

The reload's record says what became of its generation (`stability`, reloads.py); the rollback's
own record has the outcome `rolled_back` and the crashes as its reason.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pypnm.settings import Settings
from pypnm.supervisor.lifecycle import Generations, SpawnTask
from pypnm.supervisor.reloads import ReloadQueue, ReloadRecord, Stability
from pypnm.supervisor.snapshot import Snapshot

logger = logging.getLogger("pypnm.supervisor.master")


@dataclass
class KnownGood:
    """A generation that served and proved itself, as a rollback brings it back: its snapshot and settings."""

    generation: int
    snapshot: Snapshot
    settings: Settings


@dataclass
class Watch:
    """One generation in its `rollback_window`: the reload that brought it, what it would go back to, its crashes."""

    generation: int
    record: ReloadRecord
    previous: KnownGood | None
    window: float
    allowed: int  # rollback_crashes, as its settings said
    crashes: list[str] = field(default_factory=list)
    rollback: ReloadRecord | None = None  # the rollback asked for, once the crashes reached `allowed`
    timer: asyncio.Task[None] | None = None

    def summary(self) -> str:
        return (
            f"generation {self.generation} (reload {self.record.id}) crashed {len(self.crashes)} times within "
            f"rollback_window ({self.window:g} s): " + "; ".join(self.crashes)
        )


class Rollback:
    """The watched generation (`watch`) and the last-known-good kept for it (`previous`, whose snapshot is `kept`)."""

    def __init__(
        self,
        queue: ReloadQueue,
        generations: Generations,
        settings: Callable[[], Settings],
        spawn_task: SpawnTask,
    ) -> None:
        self.queue = queue
        self.generations = generations
        self._settings = settings  # the serving generation's: its window and crash count
        self._spawn_task = spawn_task
        self.watch: Watch | None = None
        self.previous: KnownGood | None = None  # the last-known-good, kept: what a rollback would serve
        self.proven = True  # whether the serving generation proved itself (the start has nothing before it)

    def swapped(self, record: ReloadRecord, generation: int, replaced: KnownGood | None) -> None:
        """Generation `generation` serves now (reload `record`), in place of `replaced` (None: the first).

        Called right after the swap, before the replaced generation drains, so its snapshot is kept in time.
        """
        # One that had not proved itself is passed over, unless there is nothing before it (the start).
        previous = replaced if self.proven or self.previous is None else self.previous
        earlier = self.watch
        if earlier is not None:
            self._end(earlier, "replaced", f"replaced by reload {record.id} within its rollback_window", by=record.id)
            if earlier.rollback is not None and self.queue.withdraw_rollback() is not None:
                logger.info(
                    "rollback of generation %d withdrawn: reload %s replaced it first", earlier.generation, record.id
                )
        window, allowed = self._settings().rollback_window, self._settings().rollback_crashes
        if window <= 0:
            self._keep(None)
            self.proven = True  # not watched: the next reload's generation goes back to this one
            return
        self._keep(previous)
        self.proven = False
        self.watch = Watch(generation, record, previous, window, allowed)
        record.watch(window)
        self.watch.timer = self._spawn_task(self._wait_out(self.watch))
        if previous is not None:
            logger.info(
                "generation %d watched for %g s (rollback_window): generation %d's snapshot kept to roll back to",
                generation,
                window,
                previous.generation,
            )

    def rolled_back(self, record: ReloadRecord) -> None:
        """The rollback `record` serves the kept snapshot again, as a new generation: the last-known-good now."""
        watch = self.watch
        assert watch is not None and watch.rollback is record, "rolled_back() follows the rollback it asked for"
        self._end(watch, "rolled_back", watch.summary(), by=record.id)
        self.previous = None  # serving again, as the new generation's snapshot: it stays
        self.proven = True

    def rollback_failed(self, record: ReloadRecord) -> None:
        """The rollback could not bring the kept snapshot up: the watched generation keeps serving, as it is."""
        watch = self.watch
        assert watch is not None and watch.rollback is record, "rollback_failed() follows the rollback it asked for"
        # Still kept: the next reload's generation may go back to it (this one has not proved itself).
        self._end(watch, "unstable", f"{watch.summary()}; the rollback failed: {record.reason}")

    def target(self, record: ReloadRecord) -> tuple[Watch, KnownGood]:
        """What the queued rollback `record` undoes, and what it brings back."""
        watch = self.watch
        assert watch is not None and watch.rollback is record and watch.previous is not None, "a rollback in its watch"
        return watch, watch.previous

    def worker_failed(self, generation: int, ended: str) -> None:
        """A serving worker of `generation` crashed or hung (lifecycle.py); ask for a rollback at `allowed`."""
        watch = self.watch
        if watch is None or watch.generation != generation or watch.rollback is not None:
            return
        watch.crashes.append(ended)
        if len(watch.crashes) < watch.allowed:
            return
        if watch.previous is None:
            logger.error(
                "%s; there is no earlier generation to roll back to: its workers keep being replaced", watch.summary()
            )
            self._end(watch, "unstable", f"{watch.summary()}; nothing to roll back to")
            return
        watch.rollback = self.queue.request_rollback(watch.record.id)
        if watch.timer is not None:
            watch.timer.cancel()  # the window no longer ends it: the rollback does
        logger.warning(
            "%s: rolling back to generation %d's snapshot (reload %s)",
            watch.summary(),
            watch.previous.generation,
            watch.rollback.id,
        )

    def kept(self) -> Snapshot | None:
        """The snapshot a rollback would serve again: `Generations.release` leaves it in place."""
        return self.previous.snapshot if self.previous else None

    def stop(self) -> None:
        """The master stops: the kept snapshot goes now (the runtime directory's removal would take it anyway)."""
        self._keep(None)

    def view(self) -> dict[str, Any] | None:
        """The watch for /status: which generation, since which reload, its crashes so far, what is kept.

        Only the serving generation's: during a swap the new generation serves a moment before
        `swapped` replaces the old one's watch (the swap waits for the old generation to stop
        accepting), and /status must not show the new generation with the old one's watch.
        """
        watch = self.watch
        if watch is None or watch.generation != self.generations.serving_number():
            return None
        return {
            "generation": watch.generation,
            "reload": watch.record.id,
            "window": watch.window,
            "crashes": list(watch.crashes),
            "rollback_crashes": watch.allowed,
            "kept_generation": watch.previous.generation if watch.previous else None,
            "rollback": watch.rollback.id if watch.rollback else None,
        }

    async def _wait_out(self, watch: Watch) -> None:
        await asyncio.sleep(watch.window)
        if self.watch is not watch or watch.rollback is not None:
            return
        kept = f": generation {watch.previous.generation}'s snapshot released" if watch.previous else ""
        self._end(watch, "stable")
        self._keep(None)
        self.proven = True
        logger.info(
            "generation %d stable for %g s (rollback_window), %d crash(es)%s",
            watch.generation,
            watch.window,
            len(watch.crashes),
            kept,
        )

    def _end(self, watch: Watch, stability: Stability, detail: str | None = None, by: str | None = None) -> None:
        watch.record.settle(stability, detail, by)
        if watch.timer is not None and watch.timer is not asyncio.current_task():
            watch.timer.cancel()
        if self.watch is watch:
            self.watch = None

    def _keep(self, previous: KnownGood | None) -> None:
        """Hold on to `previous`'s snapshot (None: to none); the one held before is removed if nothing uses it."""
        before = self.kept()
        self.previous = previous
        if before is not None and before is not self.kept():
            self.generations.release(before)
