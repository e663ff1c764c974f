"""The generations' life, as the master drives it: bring up, validate, swap, drain, respawn.

`Generations` owns which generation is the candidate, which one serves and which ones
drain, and is the only one to change that. A reload goes
`validate` (bring up the candidate's workers) -> `start_accepting` (the candidate accepts
beside the serving one) -> `swap` (the candidate serves, the one it replaces stops accepting)
-> `drain` (the replaced one's workers finish and leave). A serving
worker that dies is replaced from its own generation by the same bring-up
(`Generation.bring_up`), never from what is on disk now; so is one whose event loop
stops answering heartbeats for `worker_timeout` (hung), the replacement first, then the kill;
and so is one past `limit_max_requests` or `limit_worker_memory` (recycled), the replacement
first, then the old one drains (it stops accepting and finishes what it has in flight).

Who sees a recycle's limit: the request count is the worker's own (it says so once,
`WorkerLimitReached`; the master would otherwise have to ask every worker all the time),
the memory is read by the master from /proc/<pid>/statm on its heartbeat tick (one small
read per worker per second, and it works for a worker whose loop is busy, or of an older
pypnm). A slot recycles again only once its previous worker has left, so recycling adds
at most `workers` processes to the bound below. A worker that holds more than the memory limit
as it starts serving (the app's import and its lifespan startup are that large) is not recycled
for memory: its replacement would hold as much, and be replaced in turn every second. The master
says so once per generation, with the size the limit must exceed.

A generation's snapshot is removed once no generation uses it any more, unless it is the one
`kept`: the last-known-good one that rollback.py holds on to during a new generation's
`rollback_window` (a rollback serves it again, as a new generation on the same snapshot).
Which one that is, rollback.py alone knows: `kept` asks it.

At most `max_draining_generations` generations drain at once: a swap beyond that closes the
oldest one early, and the next candidate is brought up only once it is gone, so the service
never runs more than `workers * (2 + max_draining_generations)` workers (the largest `workers` among them:
a reload may change the count), and one zygote per generation.

It logs under the master's logger name for the lines operators grep ("generation N drained",
"stopped early", "worker exited", "worker hung", "worker killed", "worker recycled", "respawned").
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from pypnm.identity import utc_now
from pypnm.profile import MIB
from pypnm.settings import Settings
from pypnm.supervisor import import_graph
from pypnm.supervisor.generation import CandidateFailed, Generation, WorkerProcess
from pypnm.supervisor.import_graph import CodeScan, Plan
from pypnm.supervisor.protocol import WorkerReady, WorkerSpec
from pypnm.supervisor.snapshot import Lineage, Snapshot
from pypnm.supervisor.spawner import ForkTemplate, SpawnError, Zygote
from pypnm.supervisor.standby import NextStandby
from pypnm.supervisor.timeouts import (
    AFTER_KILL,
    CLOSE_GRACE,
    HEARTBEAT_INTERVAL,
    RESPAWN_BACKOFF_FIRST,
    RESPAWN_BACKOFF_MAX,
)

logger = logging.getLogger("pypnm.supervisor.master")

SpawnTask = Callable[[Coroutine[Any, Any, Any]], "asyncio.Task[Any]"]


@dataclass(frozen=True)
class Recycle:
    """A serving worker is past a limit; `reason` says which ("served 1003 requests (limit 1000)")."""

    reason: str


class Generations:
    """The candidate, the serving generation and the draining ones; every change of them is made here."""

    def __init__(
        self,
        template: ForkTemplate,
        listeners: list[socket.socket],
        settings: Callable[[], Settings],
        stopping: Callable[[], bool],
        spawn_task: SpawnTask,
        *,
        worker_restarted: Callable[[str], object] = lambda reason: None,
        worker_failed: Callable[[int, str], object] = lambda generation, ended: None,
        kept: Callable[[], Snapshot | None] = lambda: None,
        standby_ahead: Callable[[], bool] = lambda: False,
    ) -> None:
        self.template = template
        self.listeners = listeners
        self._settings = settings  # the master's settings, which a reload replaces
        self._stopping = stopping  # the master's: once it stops, nothing is respawned
        self._spawn_task = spawn_task  # the master's: its tasks end with it
        self._worker_restarted = worker_restarted  # the metrics' pypnm_worker_restarts_total{reason}
        self._worker_failed = worker_failed  # rollback.py counts a serving worker's crash or hang, by generation
        self._kept = kept  # rollback.py's: the snapshot a rollback would serve again, which must stay
        self._standby_ahead = standby_ahead  # reload_standby is `ahead` (standby.py)
        self._reloading = False  # between begin_reload and end_reload
        self.candidate: Generation | None = None
        self.serving: Generation | None = None
        self.draining: set[Generation] = set()
        self._closing: set[asyncio.Task[None]] = set()  # generations being closed early
        self.standby = NextStandby(spawn_task)  # the next reload's zygote, forked ahead of it
        # The last serving workers that ended and were replaced, newest last: /status's `worker_exits`.
        self.exits: deque[dict[str, Any]] = deque(maxlen=10)

    def all(self) -> list[Generation]:
        """Every generation with live workers: candidate, serving, draining."""
        return [g for g in (self.candidate, self.serving, *self.draining) if g is not None]

    def serving_number(self) -> int | None:
        return self.serving.number if self.serving else None

    def child_pids(self) -> list[int | None]:
        """The pids of the fork template (None while it is down), zygotes, a standby, live workers: for SIGUSR1.

        A zygote or a standby is in the list from its fork on, not only once it is ready: one
        that missed a SIGUSR1 while it imported would hold the rotated file open for as long as
        its generation serves, since it seldom logs.
        """
        return [
            self.template.pid,
            *(generation.zygote.pid for generation in self.all() if generation.zygote is not None),
            *(generation.importing.pid for generation in self.all() if generation.importing is not None),
            *self.standby.pids(),
            *(worker.pid for generation in self.all() for worker in generation.live_workers()),
        ]

    # ----- a reload -----------------------------------------------------------------------------

    async def validate(
        self, number: int, snapshot: Snapshot, spec: WorkerSpec, size: int, timeout: float, code: CodeScan | None
    ) -> list[WorkerReady]:
        """Bring up the candidate generation of `size` workers (its own settings' count); what they reported.

        `code`: the snapshot's import graph when `reload_import` is incremental (None: clean). An
        incremental import that cannot be planned, or whose candidate fails, is retried clean,
        within the same `timeout`; `candidate.imported` says which way it went.
        Raises CandidateFailed, SpawnError or TimeoutError; `discard` then ends the candidate.
        """
        if self._closing:  # generations closed early leave before the candidate's workers are forked
            await asyncio.wait(self._closing)
        candidate = self.candidate = Generation(number, snapshot, spec, size)
        candidate.code = code
        imported: dict[str, Any] = {"mode": "clean"}
        candidate.imported = imported
        async with asyncio.timeout(timeout):
            if code is not None:
                plan = self._import_plan(candidate, code)
                if plan.drop is not None and self.serving is not None and self.serving.zygote is not None:
                    try:
                        standby = await self.standby.take(plan.drop)
                        zygote = await candidate.start_zygote(self.serving.zygote, plan.drop, standby)
                        workers = await candidate.bring_up(self.template, self.listeners, candidate.size)
                    except (CandidateFailed, SpawnError) as exc:
                        candidate.kill()
                        plan = Plan.clean(f"the incremental import failed: {exc}")
                    else:
                        candidate.imported = {"mode": "incremental", "reimported": zygote.reimported}
                        return [worker.ready.result() for worker in workers]
                imported["reason"] = plan.reason
                logger.info("generation %d: clean import: %s", number, plan.reason)
            workers = await candidate.bring_up(self.template, self.listeners, candidate.size)
        return [worker.ready.result() for worker in workers]

    def _import_plan(self, candidate: Generation, code: CodeScan) -> Plan:
        """An incremental import from the serving generation's zygote, or why not."""
        serving = self.serving
        if serving is None:
            return Plan.clean("nothing serves yet")
        # Why a line of incremental imports (each zygote forked from the one before) has an end: state
        # kept from earlier code can be stale, and garbage can end up frozen (reimport.py, "Freezing
        # what is kept"). A clean import, from the fork template, leaves all of it behind.
        if serving.incremental_line >= self._settings().reload_import_line:
            return Plan.clean(f"{serving.incremental_line} incremental imports in a row: this one starts afresh")
        if serving.code is None:
            return Plan.clean("the serving generation's import graph is unknown (it was imported clean)")
        if serving.zygote is None or not serving.zygote.is_open():
            return Plan.clean("the serving generation's zygote is gone")
        # A zygote forked from the serving one would keep the third-party modules of the template
        # that generation's line began from: an upgraded library (the reason a template is renewed)
        # would never be imported.
        if serving.zygote.template_pid != self.template.template_pid:
            return Plan.clean("the fork template was renewed: third-party modules are imported afresh")
        old, new = serving.spec, candidate.spec
        moved = {name: value.replace(old.snapshot_dir, new.snapshot_dir) for name, value in old.env.items()}
        if old.app != new.app or moved != new.env:
            return Plan.clean("the app or the workers' environment changed")
        return import_graph.plan(serving.code, code, new.app.partition(":")[0])

    def discard(self) -> None:
        """End the candidate of a failed or interrupted reload; the serving generation is untouched."""
        if self.candidate is not None:
            self.candidate.kill()
            snapshot, self.candidate = self.candidate.snapshot, None
            self.release(snapshot)

    # ----- the standby: the next zygote, forked ahead of the reload (standby.py) ------------------

    def begin_reload(self) -> None:
        """A reload (from disk, or a rollback) begins: no standby is forked ahead until it ends."""
        self._reloading = True

    def end_reload(self) -> None:
        """The reload is over (swapped, rolled back or failed): the standby for the next one, if any.

        With `reload_standby = "ahead"`, a standby it did not take stays if it fits the serving
        generation; if there is none, one is forked now or, while a generation drains, once it
        has drained (`_drain`). With `at_reload`, none stays.
        """
        self._reloading = False
        if self._standby_ahead():
            self._standby_for_next(fork=not self.draining)
        else:
            self.standby.stop()

    def start_standby(self) -> None:
        """As a reload from disk begins: the standby that fits the serving generation, or one forked now."""
        self._standby_for_next(fork=True)

    def _standby_for_next(self, fork: bool) -> None:
        """Keep the standby if it fits the serving generation, else stop it, and then fork one if `fork`."""
        source = self._standby_source()
        if source is None:
            self.standby.stop()
            return
        zygote, drop, generation = source
        if not self.standby.keep_if_fits(zygote, drop) and fork:
            self.standby.fork(zygote, drop, generation)

    def _standby_source(self) -> tuple[Zygote, list[str], int] | None:
        """The serving zygote, what its standby drops and its generation; None if the next reload imports clean."""
        serving = self.serving
        if serving is None or serving.code is None or not serving.drop or serving.zygote is None:
            return None  # it was imported clean: nothing to guess from
        if serving.incremental_line >= self._settings().reload_import_line or self._stopping():
            return None
        if not serving.zygote.is_open() or serving.zygote.template_pid != self.template.template_pid:
            return None  # (`_import_plan`)
        return serving.zygote, serving.drop, serving.number

    def release(self, snapshot: Snapshot) -> None:
        """Remove a snapshot that no live generation uses and that is not `kept` (a rollback reuses one).

        A snapshot of a lineage of incremental imports leaves a link to the lineage's newest live
        one in its place, for the paths the kept modules hold into it (snapshot.Lineage).
        """
        if snapshot is self._kept() or any(g.snapshot is snapshot for g in self.all()):
            return
        lineage = snapshot.lineage
        heirs = [g for g in self.all() if lineage is not None and g.snapshot.lineage is lineage]
        if lineage is not None and heirs:
            lineage.replace(snapshot.directory, max(heirs, key=lambda g: g.number).snapshot.directory)
            return
        snapshot.remove()
        if lineage is not None:  # no process holds the lineage's modules any more
            lineage.end()

    async def start_accepting(self) -> None:
        """The validated candidate accepts beside the serving generation; CandidateFailed or TimeoutError if not."""
        assert self.candidate is not None, "start_accepting() follows a successful validate()"
        await self.candidate.start_accepting()

    async def swap(self, reload_id: str) -> Generation | None:
        """The accepting candidate serves; the generation it replaces (returned) stops accepting."""
        candidate = self.candidate
        assert candidate is not None, "swap() follows start_accepting()"
        old, self.serving, self.candidate = self.serving, candidate, None
        if old is not None and (candidate.imported or {}).get("mode") == "incremental":  # forked from its zygote
            candidate.snapshot.lineage = old.snapshot.lineage = old.snapshot.lineage or Lineage()
            candidate.incremental_line = old.incremental_line + 1
        if old is not None:
            self._make_room_to_drain(reload_id)
            self.draining.add(old)  # in the same step as the swap: a stop now drains it too
            await old.stop_accepting()  # from here on only the new generation takes connections
        for worker in candidate.workers:
            self._spawn_task(self._keep_up(candidate, worker))
        return old

    def drain(self, generation: Generation) -> None:
        """Let a replaced generation finish its requests and leave, in the background."""
        self._spawn_task(self._drain(generation))

    async def _drain(self, generation: Generation) -> None:
        clean = await generation.drain()
        self.draining.discard(generation)
        generation.stop_zygote()
        self.release(generation.snapshot)
        if not generation.closed_early:  # _close_early says how that one ended
            logger.info("generation %d drained%s", generation.number, "" if clean else " (some workers were killed)")
        if not self._reloading and self._standby_ahead():  # the next reload's standby, ahead of it
            self._standby_for_next(fork=True)

    def _make_room_to_drain(self, reload_id: str) -> None:
        """Close the oldest draining generations early so that one more may drain."""
        cap = self._settings().max_draining_generations
        draining = sorted((g for g in self.draining if not g.closed_early and g.live_workers()), key=lambda g: g.number)
        for generation in draining[: max(len(draining) - cap + 1, 0)]:
            generation.closed_early = True  # counted out now, before its task runs
            task = self._spawn_task(self._close_early(generation, reload_id, len(draining)))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def _close_early(self, generation: Generation, reload_id: str, draining: int) -> None:
        closed = await generation.close_now()
        killed = (
            f"; killed {closed.killed} worker(s) that did not leave within {CLOSE_GRACE:g}s"
            + (f" ({closed.unreported} did not report what they had open)" if closed.unreported else "")
            if closed.killed
            else ""
        )
        logger.warning(
            "reload %s: generation %d stopped early (%d draining, max_draining_generations=%d): "
            "closing %d connection(s), %d request(s) still in progress%s",
            reload_id,
            generation.number,
            draining,
            self._settings().max_draining_generations,
            closed.connections,
            closed.requests,
            killed,
        )

    # ----- respawn ------------------------------------------------------------------------------

    def _still_serving(self, generation: Generation) -> bool:
        return not self._stopping() and generation is self.serving

    async def _keep_up(self, generation: Generation, worker: WorkerProcess) -> None:
        """Replace a serving worker that dies or hangs, from its own generation's snapshot, by the same bring-up.

        A dead worker is replaced after a back-off that grows while replacements keep failing.
        A hung one (its event loop has not answered a heartbeat for `worker_timeout`) is
        replaced first and killed after, so its share of the connections is taken over at once.
        Each wait is followed by a check that the generation still serves: a reload may
        swap it out meanwhile, and a replacement must never outlive its generation.
        """
        failures = 0
        predecessor: asyncio.Task[Any] | None = None  # the recycled worker this slot's worker replaced, draining
        while True:
            if not failures:  # `worker` serves (after a failed attempt, it is the one that ended)
                blocked = await self._watch(generation, worker, predecessor)
                if not self._still_serving(generation):
                    return
                if isinstance(blocked, Recycle):
                    recycled = await self._recycle(generation, worker, blocked.reason)
                    if not self._still_serving(generation):
                        return
                    if recycled is None:  # no replacement came up: the old one serves on, and is tried again
                        await asyncio.sleep(RESPAWN_BACKOFF_MAX)
                        continue
                    predecessor = self._spawn_task(self._retire(generation, worker, blocked.reason))
                    worker = recycled
                    continue
                if blocked is not None:
                    hung_replacement = await self._replace_hung(generation, worker, blocked)
                    if not self._still_serving(generation):
                        return
                    if hung_replacement is not None:
                        worker = hung_replacement
                        continue
                    failures = 1  # killed, not replaced yet: tried again below, after a back-off
                else:
                    ended = await worker.ended()
                    logger.warning(
                        "worker exited pid=%d generation=%d (%s): replacing it from the same generation",
                        worker.pid,
                        generation.number,
                        ended,
                    )
                    self._record_exit(worker, "crash", ended)
                    self._worker_restarted("crash")
                    self._worker_failed(generation.number, f"pid {worker.pid} {ended}")
                    generation.forget(worker)
            await asyncio.sleep(min(RESPAWN_BACKOFF_FIRST * 2**failures, RESPAWN_BACKOFF_MAX))  # keeps dying: slower
            if not self._still_serving(generation):
                return
            replacement = await self._bring_up_one(generation)
            if replacement is None:
                if not self._still_serving(generation):
                    return
                failures += 1
                continue  # `worker` is still the one that ended: next attempt, after a longer back-off
            worker, failures = replacement, 0
            logger.info("worker respawned pid=%d generation=%d", worker.pid, generation.number)

    async def _bring_up_one(
        self, generation: Generation, recycling: tuple[WorkerProcess, str] | None = None
    ) -> WorkerProcess | None:
        """One more accepting worker for `generation`; None if none came up (logged here, for every caller)
        or if the generation stopped serving meanwhile (the new one is killed).

        `recycling`: the worker it is to replace because it is past a limit, and which limit; its
        failure says the old one serves on, where any other says the generation has one worker less.
        """
        replacement: WorkerProcess | None = None
        try:
            async with asyncio.timeout(self._settings().reload_timeout):
                [replacement] = await generation.bring_up(self.template, self.listeners, 1)
                if not self._still_serving(generation):
                    replacement.signal(signal.SIGKILL)
                    return None
                await generation.start_accepting([replacement])
        except BaseException as exc:
            if replacement is not None:  # brought up but not accepting (bring_up ends its own failures)
                replacement.signal(signal.SIGKILL)
                generation.forget(replacement)
            if not isinstance(exc, CandidateFailed | SpawnError | TimeoutError):
                raise
            self._log_bring_up_failed(generation, str(exc) or type(exc).__name__, recycling)
            return None
        return replacement

    @staticmethod
    def _log_bring_up_failed(generation: Generation, error: str, recycling: tuple[WorkerProcess, str] | None) -> None:
        """One line for a failed bring-up: a recycle's says the old worker serves on, a respawn's that one is gone."""
        if recycling is None:
            logger.error("cannot respawn a worker of generation %d: %s", generation.number, error)
            return
        worker, reason = recycling
        logger.error(
            "cannot recycle worker pid=%d generation=%d (%s): no replacement came up: %s; it serves on",
            worker.pid,
            generation.number,
            reason,
            error,
        )

    async def _watch(
        self, generation: Generation, worker: WorkerProcess, predecessor: asyncio.Task[Any] | None = None
    ) -> float | Recycle | None:
        """Wait until `worker` exits (None), has left a heartbeat unanswered for `worker_timeout` (the seconds),
        or is past a recycling limit (Recycle; only once the `predecessor` it replaced has drained).

        Only a worker that announced heartbeats is asked (one of an older pypnm is not, and is
        never taken for hung); worker_timeout = 0 turns the check off. A reload applies new values.
        """
        if worker.serving_rss is None:  # once: a recycle that found no replacement watches the same worker again
            worker.serving_rss = worker.resident_memory()
        while self._still_serving(generation) and not worker.exited.done():
            settings = self._settings()
            if worker.heartbeats and settings.worker_timeout > 0:
                waited = worker.heartbeat()
                if waited >= settings.worker_timeout:
                    return waited
            may_recycle = predecessor is None or predecessor.done()
            if may_recycle and (recycle := self._past_limit(generation, worker, settings)) is not None:
                return recycle
            wake: list[asyncio.Future[Any]] = [worker.exited]
            if not worker.limit_reached.done():  # wakes at once when it says so; once said, no more
                wake.append(worker.limit_reached)
            await asyncio.wait(wake, timeout=HEARTBEAT_INTERVAL)
        return None

    @staticmethod
    def _past_limit(generation: Generation, worker: WorkerProcess, settings: Settings) -> Recycle | None:
        """Why `worker` is recycled now, or None."""
        if worker.limit_reached.done():
            reached = worker.limit_reached.result()
            return Recycle(f"served {reached.requests} requests (limit {reached.limit})")
        limit = settings.limit_worker_memory
        if limit <= 0:
            return None
        started = worker.serving_rss
        if started is not None and started > limit:
            if generation.memory_limit_told != limit:
                generation.memory_limit_told = limit
                logger.warning(
                    "limit_worker_memory %.0f MiB is below what worker pid=%d generation=%d held as it started "
                    "serving (RSS %.0f MiB): its generation's workers are not recycled for memory; "
                    "set limit_worker_memory above that",
                    limit / MIB,
                    worker.pid,
                    generation.number,
                    started / MIB,
                )
            return None
        rss = worker.resident_memory()
        if rss is not None and rss > limit:
            return Recycle(f"RSS {rss / MIB:.0f} MiB over limit_worker_memory {limit / MIB:.0f} MiB")
        return None

    async def _recycle(self, generation: Generation, worker: WorkerProcess, reason: str) -> WorkerProcess | None:
        """Bring up a worker in place of one past its limit; the replacement, accepting (None: none came up)."""
        replacement = await self._bring_up_one(generation, (worker, reason))
        if replacement is None:  # none came up, or its generation stopped serving meanwhile (its drain takes it)
            return None
        logger.info(
            "worker recycled pid=%d generation=%d: %s: replaced by pid=%d, draining it",
            worker.pid,
            generation.number,
            reason,
            replacement.pid,
        )
        self._worker_restarted("recycle")
        return replacement

    async def _retire(self, generation: Generation, worker: WorkerProcess, reason: str) -> None:
        """Drain a recycled worker (its replacement already accepts); its end goes in `worker_exits`."""
        await generation.retire(worker)
        self._record_exit(worker, "recycle", f"{reason}, {await worker.ended()}")

    async def _replace_hung(
        self, generation: Generation, worker: WorkerProcess, blocked: float
    ) -> WorkerProcess | None:
        """Bring up a worker in place of a hung one, then kill the hung one (SIGTERM would need its blocked loop)."""
        reason = f"event loop blocked for {blocked:.0f} s"
        logger.warning(
            "worker hung pid=%d generation=%d: %s (worker_timeout=%gs): replacing it, then killing it",
            worker.pid,
            generation.number,
            reason,
            self._settings().worker_timeout,
        )
        self._worker_restarted("hung")
        replacement = await self._bring_up_one(generation)
        worker.signal(signal.SIGKILL)
        generation.forget(worker)
        await asyncio.wait([worker.exited], timeout=AFTER_KILL)
        ended = await worker.ended()
        logger.warning(
            "worker killed pid=%d generation=%d (%s): %s; %s",
            worker.pid,
            generation.number,
            reason,
            ended,
            f"replaced by pid={replacement.pid}" if replacement else "replacing it from the same generation",
        )
        self._record_exit(worker, "hung", f"{reason}, {ended}")
        self._worker_failed(generation.number, f"pid {worker.pid} hung ({reason}), {ended}")
        return replacement

    def _record_exit(self, worker: WorkerProcess, reason: str, ended: str) -> None:
        self.exits.append(
            {"pid": worker.pid, "generation": worker.generation, "reason": reason, "ended": ended, "at": utc_now()}
        )

    # ----- stop ---------------------------------------------------------------------------------

    def kill(self) -> None:
        """A second stop signal: every worker of every generation ends at once."""
        self.standby.stop()
        for generation in self.all():
            generation.kill()

    async def shutdown(self) -> None:
        """Drain every generation (the master is stopping: nothing is respawned)."""
        self.standby.stop()
        generations = self.all()
        await asyncio.gather(*(g.drain() for g in generations))
        for generation in generations:
            generation.stop_zygote()
