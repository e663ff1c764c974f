"""A generation: the workers that run one snapshot of the code, as the master sees them.

A generation is started as a candidate (every worker validated and waiting), then
told to serve (every worker accepting), and later drained (every worker finishing
its connections and leaving). Its workers talk to the master over a socketpair each;
end-of-file on it is how the master learns that a worker is gone. A draining generation
can also be closed early (`close_now`): its workers cut what they still have open.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
from dataclasses import dataclass
from typing import Any

from pypnm.identity import utc_now
from pypnm.supervisor.metrics import worker_gone
from pypnm.supervisor.snapshot import Snapshot
from pypnm.supervisor.spawner import ForkTemplate
from pypnm.supervisor.worker import WorkerSpec

logger = logging.getLogger("pypnm.supervisor.generation")

# How long the workers of a generation closed early get to report, cut their connections and exit
# (their lifespan shutdown included) before they are killed.
CLOSE_GRACE = 3.0


class CandidateFailed(Exception):
    """A worker of a candidate generation could not become ready; the message is the reason."""


@dataclass
class Closed:
    """What a generation closed early still had: summed over the workers that reported it."""

    connections: int = 0
    requests: int = 0
    unreported: int = 0  # workers that did not say (they are killed after the grace period)
    killed: int = 0


class WorkerProcess:
    """One worker process, through its socketpair and its pid."""

    def __init__(self, generation: int, pid: int, channel: socket.socket) -> None:
        self.generation = generation
        self.pid = pid
        self.started_at = utc_now()
        self.state = "starting"
        loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[dict[str, Any]] = loop.create_future()
        self.serving: asyncio.Future[None] = loop.create_future()
        self.draining: asyncio.Future[None] = loop.create_future()
        # What the worker still had open when told to "close": {"connections": n, "requests": m}, or None if gone.
        self.closing: asyncio.Future[dict[str, Any] | None] = loop.create_future()
        self.exited: asyncio.Future[None] = loop.create_future()
        for future in (self.ready, self.serving):
            # Only the first failure of a candidate is awaited; the others are expected, not lost.
            future.add_done_callback(_mark_retrieved)
        self._channel = channel
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        reader, self._writer = await asyncio.open_unix_connection(sock=self._channel)
        try:
            while line := await reader.readline():
                self._on_event(json.loads(line))
        except (ConnectionError, ValueError) as exc:
            logger.warning("worker pid=%d generation=%d: channel broken: %s", self.pid, self.generation, exc)
        finally:
            self.state = "exited"
            self._writer.close()
            if not self.ready.done():
                self.ready.set_exception(CandidateFailed("a worker exited before it was ready (see its log)"))
            if not self.serving.done():
                self.serving.set_exception(CandidateFailed("a worker exited before it served"))
            if not self.draining.done():
                self.draining.set_result(None)  # gone is as good as not accepting
            if not self.closing.done():
                self.closing.set_result(None)
            worker_gone(self.pid)  # metrics hook: drop its live gauges (mark_process_dead)
            self.exited.set_result(None)

    def _on_event(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "ready" and not self.ready.done():
            self.state = "ready"
            self.ready.set_result(event)
        elif kind == "failed" and not self.ready.done():
            self.ready.set_exception(CandidateFailed(str(event.get("reason", "unknown reason"))))
        elif kind == "serving" and not self.serving.done():
            self.state = "serving"
            self.serving.set_result(None)
        elif kind == "draining" and not self.draining.done():
            self.draining.set_result(None)
        elif kind == "closing" and not self.closing.done():
            self.closing.set_result(event)

    def command(self, cmd: str) -> None:
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(json.dumps({"cmd": cmd}).encode() + b"\n")

    def signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signum)

    def describe(self, code_version: str) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "generation": self.generation,
            "code_version": code_version,
            "started_at": self.started_at,
            "state": self.state,
        }


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

    @property
    def code_version(self) -> str:
        return self.snapshot.code_version

    async def spawn_worker(self, template: ForkTemplate, listeners: list[socket.socket]) -> WorkerProcess:
        ours, theirs = socket.socketpair()
        try:
            pid = await template.spawn(self.spec.to_json(), [theirs.fileno(), *(s.fileno() for s in listeners)])
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        worker = WorkerProcess(self.number, pid, ours)
        self.workers.append(worker)
        logger.info("worker spawned pid=%d generation=%d", pid, self.number)
        return worker

    async def start(self, template: ForkTemplate, listeners: list[socket.socket]) -> list[dict[str, Any]]:
        """Spawn every worker and wait until all are ready; raises CandidateFailed on the first failure."""
        for _ in range(self.size):
            await self.spawn_worker(template, listeners)
        return list(await asyncio.gather(*(w.ready for w in self.workers)))

    async def serve(self) -> None:
        for worker in self.workers:
            worker.command("serve")
        await asyncio.gather(*(w.serving for w in self.workers))

    def live_workers(self) -> list[WorkerProcess]:
        return [w for w in self.workers if not w.exited.done()]

    def kill(self) -> None:
        """End every worker at once: a discarded candidate, or a second stop signal."""
        for worker in self.live_workers():
            worker.signal(signal.SIGKILL)

    async def stop_accepting(self, timeout: float = 2.0) -> None:
        """Tell every worker to stop accepting and wait until each says it has (or is gone)."""
        self.stopped_accepting = True
        workers = self.live_workers()
        for worker in workers:
            worker.state = "draining"
            worker.command("drain")
        if workers:
            await asyncio.wait([w.draining for w in workers], timeout=timeout)

    async def close_now(self, grace: float = CLOSE_GRACE) -> Closed:
        """End a draining generation now: each worker cuts its connections and requests and exits.

        Each worker first reports what it still had open; one that does not report and leave
        within `grace` is killed (its connections are then counted as unknown).
        """
        self.closed_early = True
        workers = self.live_workers()
        for worker in workers:
            worker.state = "closing"
            worker.command("close")
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
                closed.connections += int(report.get("connections", 0))
                closed.requests += int(report.get("requests", 0))
            elif not worker.exited.done():
                closed.unreported += 1
            if not worker.exited.done():
                closed.killed += 1
                worker.signal(signal.SIGKILL)
        if closed.killed:
            await asyncio.wait([w.exited for w in workers], timeout=5)
        return closed

    async def drain(self, timeout: float) -> bool:
        """Stop accepting and finish in-flight requests; True when every worker left in time."""
        if not self.stopped_accepting:
            await self.stop_accepting()
        workers = self.live_workers()
        for worker in workers:
            worker.signal(signal.SIGTERM)  # uvicorn's graceful shutdown, also for a worker that missed "drain"
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
            await asyncio.wait([w.exited for w in workers], timeout=5)
        return not late
