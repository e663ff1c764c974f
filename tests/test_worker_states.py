"""A worker's states and a generation's steps as the master sees them (supervisor/generation.py), in-process.

The test plays the worker: it holds the other end of the socketpair, reads the master's
commands and answers with events, all encoded by supervisor/protocol.py. No process is
started, and the workers' pid is one no process can have, so a signal the code under test
might send reaches nobody.
"""

from __future__ import annotations

import asyncio
import functools
import socket
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from pypnm.supervisor import protocol
from pypnm.supervisor.generation import CandidateFailed, Generation, WorkerProcess, WorkerState
from pypnm.supervisor.protocol import (
    Close,
    StartAccepting,
    StopAccepting,
    WorkerAccepting,
    WorkerClosing,
    WorkerFailed,
    WorkerReady,
    WorkerSpec,
    WorkerStoppedAccepting,
)
from pypnm.supervisor.snapshot import Snapshot


def in_loop(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test in a fresh event loop (the suite has no asyncio plugin)."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(asyncio.wait_for(test(*args, **kwargs), 10))

    return run


class FakeWorker:
    """The worker's end of the channel."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.setblocking(False)
        self._buffer = b""

    def send(self, event: protocol.WorkerEvent) -> None:
        self.sock.send(protocol.encode_worker(event))

    async def command(self) -> protocol.WorkerMessage:
        loop = asyncio.get_running_loop()
        while b"\n" not in self._buffer:
            chunk = await loop.sock_recv(self.sock, 4096)
            assert chunk, "the master closed the channel"
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return protocol.decode_worker(line)

    def leave(self) -> None:
        self.sock.close()


def state(worker: WorkerProcess) -> WorkerState:
    """Read afresh (a plain attribute read would be narrowed by mypy after the first assert)."""
    return worker.state


NO_SUCH_PID = 2**30  # above the kernel's largest pid (2**22): kill() answers ESRCH


def worker_pair(generation: int = 1) -> tuple[WorkerProcess, FakeWorker]:
    ours, theirs = socket.socketpair()
    return WorkerProcess(generation, NO_SUCH_PID, ours), FakeWorker(theirs)


async def ready_pair() -> tuple[WorkerProcess, FakeWorker]:
    """A worker that has been brought up: validated, waiting to accept."""
    worker, fake = worker_pair()
    fake.send(WorkerReady())
    await worker.ready
    return worker, fake


@in_loop
async def test_a_worker_goes_from_starting_to_serving_to_draining_to_exited() -> None:
    worker, fake = worker_pair()
    assert worker.describe("abc")["state"] == "starting"  # as /status shows it
    fake.send(WorkerReady({"workers": 2}))
    assert await worker.ready == WorkerReady({"workers": 2})
    assert state(worker) == WorkerState.READY

    worker.start_accepting()
    assert await fake.command() == StartAccepting()
    assert state(worker) == WorkerState.READY  # commanded is not done: the worker says when it accepts
    fake.send(WorkerAccepting())
    await worker.accepting
    assert state(worker) == WorkerState.SERVING

    worker.stop_accepting()
    assert state(worker) == WorkerState.DRAINING
    assert await fake.command() == StopAccepting()
    fake.send(WorkerStoppedAccepting())
    await worker.stopped_accepting

    fake.leave()
    await worker.exited
    assert state(worker) == WorkerState.EXITED
    assert worker.describe("abc")["state"] == "exited"


@in_loop
async def test_a_failed_worker_fails_its_bring_up_with_the_reason() -> None:
    worker, fake = worker_pair()
    fake.send(WorkerFailed("ImportError: no module named 'x' (app.py, line 1)"))
    with pytest.raises(CandidateFailed, match=r"ImportError: no module named 'x' \(app.py, line 1\)"):
        await worker.ready
    fake.leave()
    await worker.exited


@in_loop
async def test_a_worker_that_leaves_early_fails_every_wait_and_resolves_the_rest() -> None:
    worker, fake = worker_pair()
    fake.leave()
    await worker.exited
    assert state(worker) == WorkerState.EXITED
    with pytest.raises(CandidateFailed, match="exited before it was ready"):
        await worker.ready
    with pytest.raises(CandidateFailed, match="exited before it served"):
        await worker.accepting
    await worker.stopped_accepting  # gone is as good as not accepting
    assert await worker.closing is None  # it said nothing about what it had open


@in_loop
async def test_a_garbled_channel_is_a_gone_worker() -> None:
    worker, fake = worker_pair()
    fake.sock.send(b"this is not a message\n")
    await worker.exited  # the master stops trusting the channel: the worker counts as gone (and is killed)
    assert state(worker) == WorkerState.EXITED
    with pytest.raises(CandidateFailed, match="cannot talk to a worker: worker channel: not JSON"):
        await worker.ready
    fake.leave()


@in_loop
async def test_a_worker_of_an_incompatible_version_fails_its_bring_up_clearly() -> None:
    worker, fake = worker_pair()
    fake.sock.send(b'{"event": "ready", "v": 99}\n')  # a pypnm from the future
    with pytest.raises(CandidateFailed, match=r"protocol version 99.*incompatible pypnm versions"):
        await worker.ready
    await worker.exited
    fake.leave()


def generation_of(tmp_path: Path, *workers: WorkerProcess) -> Generation:
    snapshot = Snapshot(tmp_path, ["app"], {}, "0123456789abcdef")
    spec = WorkerSpec(app="app:app", generation=1, snapshot_dir=str(tmp_path), packages=["app"], source_dirs={})
    generation = Generation(1, snapshot, spec, size=len(workers))
    generation.workers.extend(workers)
    return generation


@in_loop
async def test_a_generation_starts_accepting_when_every_worker_does(tmp_path: Path) -> None:
    (w1, f1), (w2, f2) = await ready_pair(), await ready_pair()
    generation = generation_of(tmp_path, w1, w2)
    accepting = asyncio.create_task(generation.start_accepting())
    for fake in (f1, f2):
        assert await fake.command() == StartAccepting()
    f1.send(WorkerAccepting())
    await asyncio.sleep(0.05)
    assert not accepting.done()  # all or nothing: one worker still has not said so
    f2.send(WorkerAccepting())
    await accepting
    assert {state(w1), state(w2)} == {WorkerState.SERVING}
    for fake in (f1, f2):
        fake.leave()
    await asyncio.gather(w1.exited, w2.exited)


@in_loop
async def test_a_generation_closed_early_sums_what_its_workers_had_open(tmp_path: Path) -> None:
    (w1, f1), (w2, f2) = await ready_pair(), await ready_pair()
    generation = generation_of(tmp_path, w1, w2)

    async def answer_close(fake: FakeWorker, connections: int, requests: int) -> None:
        assert await fake.command() == Close()
        fake.send(WorkerClosing(connections, requests))
        fake.leave()

    answers = asyncio.gather(answer_close(f1, 3, 1), answer_close(f2, 2, 2))
    closed = await generation.close_now(grace=5)
    await answers
    assert generation.closed_early
    assert (closed.connections, closed.requests, closed.unreported, closed.killed) == (5, 3, 0, 0)
    assert {state(w1), state(w2)} == {WorkerState.EXITED}
    assert generation.live_workers() == []


@in_loop
async def test_stop_accepting_marks_every_live_worker_draining(tmp_path: Path) -> None:
    (w1, f1), (w2, f2) = await ready_pair(), await ready_pair()
    generation = generation_of(tmp_path, w1, w2)
    f2.leave()
    await w2.exited
    stopping = asyncio.create_task(generation.stop_accepting())
    assert await f1.command() == StopAccepting()
    assert state(w1) == WorkerState.DRAINING and state(w2) == WorkerState.EXITED  # a gone worker stays gone
    f1.send(WorkerStoppedAccepting())
    await stopping
    assert generation.stopped_accepting
    f1.leave()
    await w1.exited
