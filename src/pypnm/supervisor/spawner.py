"""The master's side of the fork template: start it, ask it for workers, renew it when needed.

Third-party packages are imported once, in the template. When they are upgraded on
disk (pip install -U fastapi), workers forked from the old template would still run
the old versions, so before each generation the spawner compares the installed
versions with those the template started with and, if they differ, starts a new
template and says so in the log.

One task reads the template's channel: the answers to spawn requests go to the request
waiting for them (one at a time, under a lock), and the exit statuses the template reports
at any time (`WorkerExited`) to whoever asked `exit_status(pid)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import logging
import socket
import subprocess
import sys

from pypnm.supervisor import protocol
from pypnm.supervisor.protocol import Spawned, SpawnRefused, SpawnRequest, TemplateHello, WorkerExited, WorkerSpec
from pypnm.supervisor.runtime import RuntimeDir
from pypnm.supervisor.timeouts import SPAWN_ANSWER, TEMPLATE_START, TEMPLATE_STOP

logger = logging.getLogger("pypnm.supervisor.spawner")

# Distributions whose modules the template preloads.
WATCHED_DISTRIBUTIONS = (
    "fastapi",
    "starlette",
    "pydantic",
    "pydantic-core",
    "pydantic-settings",
    "uvicorn",
    "httpx",
    "httptools",
    "uvloop",
    "anyio",
    "prometheus-client",
)


class SpawnError(RuntimeError):
    """The template could not fork a worker."""


def installed_versions() -> dict[str, str]:
    versions = {}
    for name in WATCHED_DISTRIBUTIONS:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    return versions


class ForkTemplate:
    def __init__(self, log_level: str, preload: list[str], runtime: RuntimeDir) -> None:
        self.log_level = log_level
        self.preload = preload
        self.runtime = runtime  # its lock goes to the template and, by fork, to every worker
        self.process: subprocess.Popen[bytes] | None = None
        self.channel: socket.socket | None = None
        self.versions: dict[str, str] = {}
        self._lock = asyncio.Lock()
        self._answers: asyncio.Queue[protocol.TemplateMessage | SpawnError] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None
        # pid -> its wait status: awaited by the worker's WorkerProcess, or reported before it asked.
        self._exits: dict[int, asyncio.Future[int]] = {}

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    async def start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.versions = installed_versions()
        lock = self.runtime.lock_fd
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pypnm.supervisor.template",
                str(theirs.fileno()),
                str(lock),
                str(self.runtime.path),
                self.log_level,
                *self.preload,
            ],
            pass_fds=[theirs.fileno(), lock],
            # Its own session: a terminal's SIGINT or SIGHUP reaches the master only, which then
            # stops or reloads the workers in order instead of having them die under it.
            start_new_session=True,
        )
        theirs.close()
        ours.setblocking(False)
        self.channel = ours
        hello = await asyncio.wait_for(self._receive(), TEMPLATE_START)
        if not isinstance(hello, TemplateHello):
            raise SpawnError(f"the fork template did not start: {hello}")
        self._answers = asyncio.Queue()
        self._reader = asyncio.create_task(self._read())
        logger.info("fork template started pid=%d", self.process.pid)

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    async def refresh_if_stale(self) -> None:
        """Start a new template when third-party packages changed on disk, or when it died."""
        async with self._lock:
            now = installed_versions()
            if self.is_running() and now == self.versions:
                return
            if self.is_running():
                changes = ", ".join(
                    f"{name} {self.versions.get(name, '-')} -> {now.get(name, '-')}"
                    for name in sorted(set(now) | set(self.versions))
                    if now.get(name) != self.versions.get(name)
                )
                logger.warning(
                    "third-party packages changed (%s): starting a new fork template so new workers load them; "
                    "the master keeps its own imports until pypnm is restarted",
                    changes,
                )
            await self._restart()

    async def spawn(self, spec: WorkerSpec, fds: list[int]) -> int:
        """Fork a worker with `fds` (its channel, then the listeners); return its pid."""
        async with self._lock:  # one request at a time, and never while the template is replaced
            if not self.is_running():
                await self._restart()
            assert self.channel is not None
            try:
                socket.send_fds(self.channel, [protocol.encode_template(SpawnRequest(spec))], fds)
                answer = await asyncio.wait_for(self._answers.get(), SPAWN_ANSWER)
            except (OSError, TimeoutError) as exc:
                raise SpawnError(f"the fork template did not answer: {exc or type(exc).__name__}") from exc
        if isinstance(answer, SpawnError):
            raise answer
        if isinstance(answer, SpawnRefused):
            raise SpawnError(answer.error)
        if not isinstance(answer, Spawned):
            raise SpawnError(f"the fork template answered {answer} to a spawn request")
        return answer.pid

    def exit_status(self, pid: int) -> asyncio.Future[int]:
        """The wait status of worker `pid`, once the template reports it (never, if the template left first)."""
        future = self._exits.pop(pid, None) or asyncio.get_running_loop().create_future()
        if not future.done():
            self._exits[pid] = future
        return future

    async def _read(self) -> None:
        """Every message after the hello: exit statuses to their futures, the rest to the spawn request."""
        assert self.channel is not None
        while True:
            data = await asyncio.get_running_loop().sock_recv(self.channel, protocol.MAX_MESSAGE)
            if not data:  # a spawn request waiting now learns why; the next one starts a new template
                self._answers.put_nowait(SpawnError("the fork template exited"))
                return
            try:
                message = protocol.decode_template(data)
            except protocol.ProtocolError as exc:  # e.g. a template of another pypnm version, after an upgrade
                self._answers.put_nowait(SpawnError(str(exc)))
                continue
            if isinstance(message, WorkerExited):
                future = self._exits.pop(message.pid, None)
                if future is None:  # reported before its WorkerProcess asked: kept for it
                    self._exits[message.pid] = future = asyncio.get_running_loop().create_future()
                if not future.done():
                    future.set_result(message.status)
            else:
                self._answers.put_nowait(message)

    async def _restart(self) -> None:
        if not self.is_running():
            logger.warning("fork template is gone; starting a new one")
        await self.stop()
        await self.start()

    async def _receive(self) -> protocol.TemplateMessage:
        assert self.channel is not None
        data = await asyncio.get_running_loop().sock_recv(self.channel, protocol.MAX_MESSAGE)
        if not data:
            raise SpawnError("the fork template exited")
        try:
            return protocol.decode_template(data)
        except protocol.ProtocolError as exc:  # e.g. a template of another pypnm version, after an upgrade
            raise SpawnError(str(exc)) from exc

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None
        if self.channel is not None:
            self.channel.close()  # end-of-file tells the template to exit
            self.channel = None
        if self.process is not None:
            try:
                await asyncio.wait_for(asyncio.to_thread(self.process.wait), TEMPLATE_STOP)
            except TimeoutError:
                self.process.kill()
                await asyncio.to_thread(self.process.wait)
            self.process = None
