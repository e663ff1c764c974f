"""A generation: the workers that run one snapshot of the code, as the master sees them.

Words, one meaning each: a worker is *brought up* (forked, then validated: `WorkerReady`),
then *accepts* on the listening sockets; the generation whose workers accept is the
*serving* one. A generation replaced by a reload *drains*: its workers stop accepting,
finish what is in flight and leave, within `graceful_timeout`. A draining generation may
also be *closed* early (`close_now`, over `max_draining_generations`): its workers cut
what they still have open and leave at once.

Each worker talks to the master over a socketpair of its own (protocol.py, "worker");
end-of-file on it is how the master learns that a worker is gone, and its generation's
zygote (or the fork template, when the zygote left first) then reports how it ended
(`exit_status`, see template.py). The zygote imported the generation's code once and forks
its workers, the respawns too; it leaves with its generation (`stop_zygote`). A worker that announced
heartbeats answers them from its event loop: `heartbeat()` says for how long it has not.
A worker's `state` is written by `WorkerProcess` alone, from what it commands and what
the worker reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pypnm.identity import utc_now
from pypnm.profile import resident_bytes
from pypnm.supervisor import protocol
from pypnm.supervisor.import_graph import CodeScan
from pypnm.supervisor.metrics import worker_gone
from pypnm.supervisor.priority import CANDIDATE_NICE, ready_or_promoted
from pypnm.supervisor.protocol import (
    Close,
    Heartbeat,
    HeartbeatAnswer,
    StartAccepting,
    StopAccepting,
    WorkerAccepting,
    WorkerClosing,
    WorkerCommand,
    WorkerFailed,
    WorkerLimitReached,
    WorkerReady,
    WorkerSpec,
    WorkerStoppedAccepting,
    ZygoteRequest,
)
from pypnm.supervisor.snapshot import Snapshot
from pypnm.supervisor.spawner import (
    ForkChannel,
    ForkTemplate,
    ImportFailed,
    Standby,
    StandbyGone,
    Zygote,
    ZygoteExited,
)
from pypnm.supervisor.timeouts import AFTER_KILL, CLOSE_GRACE, EXIT_STATUS_WAIT, START_ACCEPTING, STOP_ACCEPTING

logger = logging.getLogger("pypnm.supervisor.generation")


class WorkerState(StrEnum):
    """A worker's state as `/status` shows it (the values are part of that answer)."""

    STARTING = "starting"  # forked, importing and validating its generation's code
    READY = "ready"  # validated, waiting to be told to accept
    SERVING = "serving"  # accepting on the listening sockets
    DRAINING = "draining"  # told to stop accepting; finishing what is in flight
    CLOSING = "closing"  # its generation was closed early: cutting what it has open
    EXITED = "exited"  # its channel closed: the process is gone


class CandidateFailed(Exception):
    """A worker could not be brought up (failed validation, or left first); the message is the reason."""


@dataclass
class Closed:
    """What a generation closed early still had: summed over the workers that reported it."""

    connections: int = 0
    requests: int = 0
    unreported: int = 0  # workers that did not say (they are killed after the grace period)
    killed: int = 0


def signal_name(number: int) -> str:
    """ "SIGTERM", or "signal 40" for one Python has no name for (a real-time signal)."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def describe_exit(status: int | None, killed_by_master: bool = False) -> str:
    """A wait status in words: "exit code 3", "killed by SIGKILL (killed, out of memory?)"."""
    if status is None:
        return "exit status unknown"
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        name = signal_name(number)
        if number == signal.SIGKILL:
            # Nobody but the master and the kernel's OOM killer sends SIGKILL to a worker, as a rule.
            return f"killed by {name} ({'by the master' if killed_by_master else 'killed, out of memory?'})"
        return f"killed by {name}"
    return f"exit code {os.waitstatus_to_exitcode(status)}"


class WorkerProcess:
    """One worker process, through its socketpair and its pid; the one writer of its `state`."""

    def __init__(
        self, generation: int, pid: int, channel: socket.socket, exit_status: asyncio.Future[int] | None = None
    ) -> None:
        self.generation = generation
        self.pid = pid
        self.started_at = utc_now()
        self.state = WorkerState.STARTING
        loop = asyncio.get_running_loop()
        # Its wait status, from the fork template (never set when the template left first).
        self.exit_status: asyncio.Future[int] = exit_status if exit_status is not None else loop.create_future()
        self.killed_by_master = False
        self.heartbeats = False  # it said in WorkerReady that it answers them
        self.serving_rss: int | None = None  # its RSS as it began serving: what a replacement holds too
        self._heartbeat_sent: float | None = None  # loop time of the unanswered heartbeat
        self.ready: asyncio.Future[WorkerReady] = loop.create_future()
        self.accepting: asyncio.Future[None] = loop.create_future()
        self.stopped_accepting: asyncio.Future[None] = loop.create_future()
        # What the worker still had open when told to close, or None if it left without saying.
        self.closing: asyncio.Future[WorkerClosing | None] = loop.create_future()
        self.exited: asyncio.Future[None] = loop.create_future()
        # Set when it says it is past limit_max_requests (and its jitter): the master recycles it.
        self.limit_reached: asyncio.Future[WorkerLimitReached] = loop.create_future()
        for future in (self.ready, self.accepting):
            # Only the first failure of a candidate is awaited; the others are expected, not lost.
            future.add_done_callback(_mark_retrieved)
        self._channel = channel
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        reader, self._writer = await asyncio.open_unix_connection(sock=self._channel)
        try:
            while line := await reader.readline():
                self._on_event(protocol.decode_worker(line))
        except ConnectionError as exc:
            logger.warning("worker pid=%d generation=%d: channel broken: %s", self.pid, self.generation, exc)
        except ValueError as exc:  # a ProtocolError, or a line past the reader's limit
            # A worker the master cannot understand (another pypnm version, a garbled channel)
            # must not run on unsupervised: it is killed, and the reason is its bring-up's failure.
            logger.error("worker pid=%d generation=%d: %s; killing it", self.pid, self.generation, exc)
            if not self.ready.done():
                self.ready.set_exception(CandidateFailed(f"cannot talk to a worker: {exc}"))
            self.signal(signal.SIGKILL)
        finally:
            self.state = WorkerState.EXITED
            self._writer.close()
            if not self.ready.done():
                how = await self.ended()  # waits for the template's report: the reload's reason names it
                if not self.ready.done():
                    self.ready.set_exception(
                        CandidateFailed(f"a worker exited before it was ready ({how}; see its log)")
                    )
            if not self.accepting.done():
                self.accepting.set_exception(CandidateFailed("a worker exited before it served"))
            if not self.stopped_accepting.done():
                self.stopped_accepting.set_result(None)  # gone is as good as not accepting
            if not self.closing.done():
                self.closing.set_result(None)
            worker_gone(self.pid)  # its live gauges go at once (mark_process_dead, supervisor/metrics.py)
            self.exited.set_result(None)

    async def ended(self) -> str:
        """How the process ended, in words, once its zygote or the template says (waits at most EXIT_STATUS_WAIT)."""
        return await _ended(self.exit_status, self.killed_by_master)

    def heartbeat(self) -> float:
        """Send a heartbeat unless one is unanswered; the seconds the oldest unanswered one has waited (0: none)."""
        now = asyncio.get_running_loop().time()
        if self._heartbeat_sent is None:
            self._heartbeat_sent = now
            self._command(Heartbeat())
            return 0.0
        return now - self._heartbeat_sent

    def _on_event(self, event: protocol.WorkerMessage) -> None:
        if isinstance(event, HeartbeatAnswer):
            self._heartbeat_sent = None
        elif isinstance(event, WorkerReady) and not self.ready.done():
            self.state = WorkerState.READY
            self.heartbeats = event.heartbeat
            self.ready.set_result(event)
        elif isinstance(event, WorkerFailed) and not self.ready.done():
            self.ready.set_exception(CandidateFailed(event.reason))
        elif isinstance(event, WorkerAccepting) and not self.accepting.done():
            self.state = WorkerState.SERVING
            self.accepting.set_result(None)
        elif isinstance(event, WorkerStoppedAccepting) and not self.stopped_accepting.done():
            self.stopped_accepting.set_result(None)
        elif isinstance(event, WorkerClosing) and not self.closing.done():
            self.closing.set_result(event)
        elif isinstance(event, WorkerLimitReached) and not self.limit_reached.done():
            self.limit_reached.set_result(event)

    def start_accepting(self) -> None:
        self._command(StartAccepting())

    def stop_accepting(self) -> None:
        self.state = WorkerState.DRAINING
        self._command(StopAccepting())

    def close(self) -> None:
        self.state = WorkerState.CLOSING
        self._command(Close())

    def _command(self, command: WorkerCommand) -> None:
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(protocol.encode_worker(command))

    def signal(self, signum: int) -> None:
        if signum == signal.SIGKILL:
            self.killed_by_master = True
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signum)

    def resident_memory(self) -> int | None:
        """Its resident set size (RSS) in bytes, as the kernel counts it (pages shared with the fork
        template included), from /proc/<pid>/statm; None where there is no /proc or it is gone."""
        return resident_bytes(self.pid)

    def describe(self, code_version: str) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "generation": self.generation,
            "code_version": code_version,
            "started_at": self.started_at,
            "state": self.state.value,
        }


async def _ended(exit_status: asyncio.Future[int], killed_by_master: bool = False) -> str:
    """How a process ended, in words, once its parent reports it (waits at most EXIT_STATUS_WAIT)."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(exit_status), EXIT_STATUS_WAIT)
    return describe_exit(exit_status.result() if exit_status.done() else None, killed_by_master)


def _cpu_part(cpu_ms: int, took_ms: int) -> str:
    """How much of its steps' time a zygote ran: far below 100 %, it waited for the CPU (priority.py)."""
    share = f" ({cpu_ms * 100 // took_ms} %)" if took_ms > 0 else ""
    return f"CPU {cpu_ms}ms of {took_ms}ms{share}"


def _mark_retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


class Generation:
    def __init__(self, number: int, snapshot: Snapshot, spec: WorkerSpec, size: int) -> None:
        self.number = number
        self.snapshot = snapshot
        self.spec = spec
        self.size = size
        self.stopped_accepting = False
        self.closed_early = False  # stopped before its drain ended: no longer counts against max_draining_generations
        self.workers: list[WorkerProcess] = []
        self.zygote: Zygote | None = None  # imported its code once; forks its workers (template.py)
        self.importing: Zygote | None = None  # the zygote while it imports, before it is `zygote`
        self.code: CodeScan | None = None  # its snapshot's import graph, when reload_import is incremental
        self.imported: dict[str, Any] | None = None  # how its code was imported (the reload record's "import")
        self.incremental_line = 0  # incremental imports in a row up to this one's (0: imported clean)
        self.drop: list[str] | None = None  # what its incremental import dropped (None: imported clean)
        self.memory_limit_told: int | None = None  # the limit_worker_memory said to be below a new worker's RSS

    @property
    def code_version(self) -> str:
        return self.snapshot.code_version

    async def start_zygote(
        self, parent: ForkChannel, drop: list[str] | None = None, standby: Standby | None = None
    ) -> Zygote:
        """Have `parent` fork this generation's zygote, which imports the code; CandidateFailed with the reason if not.

        `parent` is the fork template (a clean import) or, with `drop`, the previous generation's
        zygote (an incremental one), unless `standby`, which that zygote forked ahead of this
        reload (standby.py) and which dropped the same modules, goes on as this one's. The zygote runs at the
        lowest priority (SCHED_IDLE, niced), and so do the workers it forks until they accept,
        when they can give the priority back (priority.py).
        """
        request = ZygoteRequest(self.spec, CANDIDATE_NICE, drop)
        try:
            zygote: Zygote | None = None
            if standby is not None:
                try:
                    zygote = await Zygote.from_standby(standby, request)
                except StandbyGone as exc:  # nothing of the reload ran there: the usual way, then
                    logger.warning("%s: forking generation %d's zygote", exc, self.number)
                    standby = None
            if zygote is None:
                zygote = await Zygote.fork(parent, request)
            self.importing = zygote  # a SIGUSR1 meanwhile reaches it (lifecycle.child_pids)
            self.zygote = await ready_or_promoted(
                zygote.pid, zygote.imported(), f"zygote pid={zygote.pid} of generation {self.number}"
            )
        except ImportFailed as exc:
            raise CandidateFailed(str(exc)) from None
        except ZygoteExited as exc:
            how = await _ended(parent.exit_status(exc.pid))
            raise CandidateFailed(f"the zygote exited while importing the app ({how}; see its log)") from None
        finally:
            self.importing = None
        assert self.zygote is not None
        self.drop = drop
        took, cpu = self.zygote.took_ms, self.zygote.cpu_ms
        parts = [", ".join(f"{step} {ms}ms" for step, ms in took.items())] if took else []
        if self.zygote.adapters is not None:
            parts.append("field adapters: {} reused, {} built".format(*self.zygote.adapters))
        if self.zygote.contexts is not None:
            parts.append("route contexts: {} reused, {} built".format(*self.zygote.contexts))
        if cpu is not None and took:  # None: a zygote of an older pypnm leaves it out
            parts.append(_cpu_part(cpu, sum(took.values())))
        steps = "; ".join(parts)
        how = "clean import" if self.zygote.reimported is None else f"{self.zygote.reimported} module(s) re-imported"
        logger.info(
            "zygote imported pid=%d generation=%d (%s%s)%s",
            self.zygote.pid,
            self.number,
            how,
            "; from a standby, which dropped and released before the reload needed it" if standby is not None else "",
            f": {steps}" if steps else "",
        )
        return self.zygote

    def stop_zygote(self) -> None:
        """The generation is over (drained, discarded, or the master stops): its zygote leaves."""
        if self.zygote is not None:
            self.zygote.stop()
            self.zygote = None

    async def bring_up(self, template: ForkTemplate, listeners: list[socket.socket], count: int) -> list[WorkerProcess]:
        """Fork `count` workers from the generation's zygote and wait until each is validated and waiting to accept.

        The one way a worker comes up: a candidate's workers and a serving generation's
        replacements alike. The zygote imported the code; a new one is forked from the
        template (a clean import of this generation's snapshot) when there is none or it died.
        The workers are asked for all at once, and forked one right after the other without
        waiting for any to be ready: they validate in parallel. Raises CandidateFailed (or
        SpawnError) on the first failure, and then kills the workers it forked, so nothing
        half-started stays behind; a caller's timeout (cancellation) does the same.
        """
        new: list[WorkerProcess] = []
        try:
            zygote = self.zygote
            if zygote is None or not zygote.is_open():
                if zygote is not None:
                    logger.warning(
                        "zygote pid=%d of generation %d is gone: importing the generation's code again",
                        zygote.pid,
                        self.number,
                    )
                zygote = await self.start_zygote(template)
            # All asked for at once: the zygote forks them back to back (spawner.ForkChannel).
            spawns = [asyncio.ensure_future(self._spawn(zygote, listeners)) for _ in range(count)]
            try:
                await asyncio.wait(spawns)
            finally:
                for spawn in spawns:
                    if spawn.done() and not spawn.cancelled() and spawn.exception() is None:
                        new.append(spawn.result())
                    else:
                        spawn.cancel()
            for spawn in spawns:
                spawn.result()  # the first failure, raised
            await asyncio.gather(
                *(ready_or_promoted(w.pid, w.ready, f"worker pid={w.pid} of generation {self.number}") for w in new)
            )
        except BaseException:
            for worker in new:
                worker.signal(signal.SIGKILL)
                self.workers.remove(worker)
            raise
        return new

    async def _spawn(self, zygote: Zygote, listeners: list[socket.socket]) -> WorkerProcess:
        ours, theirs = socket.socketpair()
        try:
            pid = await zygote.spawn(self.spec, [theirs.fileno(), *(s.fileno() for s in listeners)])
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        worker = WorkerProcess(self.number, pid, ours, zygote.exit_status(pid))
        self.workers.append(worker)
        logger.info("worker spawned pid=%d generation=%d", pid, self.number)
        return worker

    async def start_accepting(self, workers: list[WorkerProcess] | None = None) -> None:
        """Tell brought-up workers (all by default) to accept; CandidateFailed or TimeoutError if one does not."""
        workers = self.workers if workers is None else workers
        for worker in workers:
            worker.start_accepting()
        async with asyncio.timeout(START_ACCEPTING):
            await asyncio.gather(*(w.accepting for w in workers))

    def forget(self, worker: WorkerProcess) -> None:
        """Drop an exited worker from the generation (a replacement takes its place)."""
        with contextlib.suppress(ValueError):
            self.workers.remove(worker)

    def live_workers(self) -> list[WorkerProcess]:
        return [w for w in self.workers if not w.exited.done()]

    def kill(self) -> None:
        """End every worker at once, and the zygote (one still importing too).

        For a discarded candidate, or a second stop signal.
        """
        for worker in self.live_workers():
            worker.signal(signal.SIGKILL)
        for zygote in (self.zygote, self.importing):
            if zygote is not None:
                zygote.kill()
        self.zygote = self.importing = None

    async def stop_accepting(self) -> None:
        """The drain's first step: every worker stops accepting; waits until each says so (or is gone)."""
        self.stopped_accepting = True
        workers = self.live_workers()
        for worker in workers:
            worker.stop_accepting()
        if workers:
            await asyncio.wait([w.stopped_accepting for w in workers], timeout=STOP_ACCEPTING)

    async def close_now(self, grace: float = CLOSE_GRACE) -> Closed:
        """End a draining generation now: each worker cuts its connections and requests and exits.

        Each worker first reports what it still had open; one that does not report and leave
        within `grace` is killed (its connections are then counted as unknown).
        """
        self.closed_early = True
        workers = self.live_workers()
        for worker in workers:
            worker.close()
        closed = Closed()
        if not workers:
            return closed
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        await asyncio.wait([w.closing for w in workers], timeout=grace)
        await asyncio.wait([w.exited for w in workers], timeout=max(deadline - loop.time(), 0.1))
        for worker in workers:
            report = worker.closing.result() if worker.closing.done() else None
            if report is not None:
                closed.connections += report.connections
                closed.requests += report.requests
            elif not worker.exited.done():
                closed.unreported += 1
            if not worker.exited.done():
                closed.killed += 1
                worker.signal(signal.SIGKILL)
        if closed.killed:
            await asyncio.wait([w.exited for w in workers], timeout=AFTER_KILL)
        return closed

    async def retire(self, worker: WorkerProcess) -> bool:
        """Drain one worker (recycled: its replacement already accepts) and forget it; True when it left in time.

        The same steps as `drain` for one worker: it stops accepting, finishes what is in
        flight (uvicorn's graceful shutdown, at most the generation's `graceful_timeout`), and is
        killed only if late.
        StopAccepting alone starts that shutdown; SIGTERM only goes to a worker that did not
        answer it, so that one that drained says "exit code 0" (uvicorn re-raises a SIGTERM
        it caught once it is done, and the worker would end "killed by SIGTERM").
        """
        worker.stop_accepting()
        await asyncio.wait([worker.stopped_accepting], timeout=STOP_ACCEPTING)
        if not worker.stopped_accepting.done():
            worker.signal(signal.SIGTERM)
        timeout = self.spec.drain_seconds()
        done, _ = await asyncio.wait([worker.exited], timeout=timeout)
        if not done:
            logger.warning(
                "worker pid=%d generation=%d did not finish in %.0fs; killing it", worker.pid, self.number, timeout
            )
            worker.signal(signal.SIGKILL)
            await asyncio.wait([worker.exited], timeout=AFTER_KILL)
        self.forget(worker)
        return bool(done)

    async def drain(self) -> bool:
        """Stop accepting, finish in-flight requests and leave; True when every worker left in time.

        Within the `graceful_timeout` the generation was started with, not the one in force now:
        that is the time its workers' uvicorn gives their requests (`drain_seconds`), so a worker is
        killed only once uvicorn would have given up too. A changed value applies to the
        generations started after it.
        """
        timeout = self.spec.drain_seconds()
        if not self.stopped_accepting:
            await self.stop_accepting()
        workers = self.live_workers()
        for worker in workers:
            worker.signal(signal.SIGTERM)  # uvicorn's graceful shutdown, also for a worker that missed StopAccepting
        if not workers:
            return True
        _, late = await asyncio.wait([w.exited for w in workers], timeout=timeout)
        for worker in workers:
            if not worker.exited.done():
                logger.warning(
                    "worker pid=%d generation=%d did not finish in %.0fs; killing it", worker.pid, self.number, timeout
                )
                worker.signal(signal.SIGKILL)
        if late:
            await asyncio.wait([w.exited for w in workers], timeout=AFTER_KILL)
        return not late
