"""The master's side of the fork template and the zygotes: start them, ask them for workers, renew them.

Third-party packages are imported once, in the template. When they are upgraded on
disk (pip install -U fastapi), workers forked from the old template would still run
the old versions, so before each generation the spawner compares the installed
versions with those the template started with and, if they differ, starts a new
template and says so in the log.

The same channel, and the same client (`ForkChannel`), talks with each generation's zygote
(`Zygote`, forked by the template or, for an incremental import, by the previous zygote, or
made ahead of the reload: `Standby`).
One task reads each channel: the answers to requests go to the requests waiting for them, in
the order they were sent (several may wait at once), and the exit statuses reported at any time (`WorkerExited`)
to one table shared by all of them (`ExitTable`), for whoever asks `exit_status(pid)`:
a worker's status may come from its zygote or, when the zygote left first, from the template.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import logging
import os
import signal
import socket
import subprocess
import sys
from collections import deque
from pathlib import Path

from pypnm.supervisor import protocol
from pypnm.supervisor.protocol import (
    Spawned,
    SpawnRefused,
    SpawnRequest,
    StandbyReady,
    StandbyRequest,
    TemplateHello,
    WorkerExited,
    WorkerSpec,
    ZygoteFailed,
    ZygoteReady,
    ZygoteRequest,
)
from pypnm.supervisor.runtime import RuntimeDir
from pypnm.supervisor.snapshot import path_stamp
from pypnm.supervisor.timeouts import SPAWN_ANSWER, STANDBY_READY, TEMPLATE_START, TEMPLATE_STOP

logger = logging.getLogger("pypnm.supervisor.spawner")

# Distributions whose modules the template preloads (and those of `preload_modules`: `distributions_of`).
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
    """The template or a zygote could not fork what was asked."""


class ImportFailed(SpawnError):
    """A zygote could not import its generation's app; the message is the reload's reason (file and line)."""


class ZygoteExited(SpawnError):
    """A zygote ended before it said whether its import worked (it crashed, or was killed)."""

    def __init__(self, pid: int) -> None:
        super().__init__(f"the zygote pid={pid} exited before it imported the app")
        self.pid = pid


class StandbyGone(SpawnError):
    """A standby that ended before the reload was handed to it: nothing of the reload ran there."""


def installed_versions(preload: list[str]) -> dict[str, str]:
    """The installed versions of what the template imports: `WATCHED_DISTRIBUTIONS` and those of `preload`."""
    versions = {}
    for name in [*WATCHED_DISTRIBUTIONS, *sorted(distributions_of(preload))]:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    return versions


def distributions_of(modules: list[str]) -> set[str]:
    """The installed distributions that provide `modules` (the `preload_modules` setting: numpy, pandas, ...)."""
    if not modules:
        return set()
    provided = importlib.metadata.packages_distributions()
    return {name for module in modules for name in provided.get(module.partition(".")[0], [])}


class ExitTable:
    """The wait statuses the template and the zygotes report, by pid: the master asks whoever reaped it here."""

    def __init__(self) -> None:
        # pid -> its wait status: awaited by the process's owner, or reported before it asked.
        self._exits: dict[int, asyncio.Future[int]] = {}

    def exit_status(self, pid: int) -> asyncio.Future[int]:
        """The wait status of `pid`, once reported (never, if the process that reaps it left first)."""
        future = self._exits.pop(pid, None) or asyncio.get_running_loop().create_future()
        if not future.done():
            self._exits[pid] = future
        return future

    # Statuses nobody asked for (a zygote that left with its generation) are kept up to this many.
    MAX_UNCLAIMED = 1024

    def report(self, pid: int, status: int) -> None:
        future = self._exits.pop(pid, None)
        if future is None:  # reported before its owner asked: kept for it
            if len(self._exits) >= self.MAX_UNCLAIMED:
                for old in [other for other, kept in self._exits.items() if kept.done()]:
                    del self._exits[old]
            self._exits[pid] = future = asyncio.get_running_loop().create_future()
        if not future.done():
            future.set_result(status)


class ForkChannel:
    """The master's end of the channel to a process that forks on request: the template, or a zygote.

    One task reads it: exit statuses go to the exit table, everything else answers the oldest
    request still waiting. The process answers its requests in the order they came, one fork
    each, so several may be sent before the first is answered (a generation's workers are
    asked for all at once, and forked back to back).
    """

    def __init__(self, exits: ExitTable) -> None:
        self.exits = exits
        self.channel: socket.socket | None = None
        # The fork template whose third-party imports this process carries (its pid): a zygote's is
        # the template it descends from, however many zygotes lie between.
        self.template_pid: int | None = None
        self._waiting: deque[asyncio.Future[protocol.TemplateMessage]] = deque()  # oldest request first
        self._lock = asyncio.Lock()  # held to send, and by a template's restart (none is sent meanwhile)
        self._reader: asyncio.Task[None] | None = None

    def is_open(self) -> bool:
        """The channel is there and the process has not closed its end."""
        return self.channel is not None and self._reader is not None and not self._reader.done()

    async def request(self, message: protocol.TemplateMessage, fds: list[int]) -> int:
        """Send a spawn or zygote request with `fds`; the pid of what was forked."""
        answer_to_this = asyncio.get_running_loop().create_future()
        async with self._lock:
            await self._ensure_open()
            assert self.channel is not None
            try:
                # A datagram goes out whole or not at all, at once: the socket buffer holds
                # thousands of requests, far more than are ever waiting.
                socket.send_fds(self.channel, [protocol.encode_template(message)], fds)
            except OSError as exc:
                raise SpawnError(f"the {self.name} did not answer: {exc}") from exc
            self._waiting.append(answer_to_this)
        before = process_cpu(self.process_pid())
        try:
            answer = await asyncio.wait_for(answer_to_this, SPAWN_ANSWER)
        except TimeoutError:
            raise SpawnError(self._no_answer(before)) from None
        if isinstance(answer, SpawnRefused):
            raise SpawnError(answer.error)
        if not isinstance(answer, Spawned):
            raise SpawnError(f"the {self.name} answered {answer} to a request to fork")
        return answer.pid

    async def spawn(self, spec: WorkerSpec, fds: list[int]) -> int:
        """Fork a worker with `fds` (its channel, then the listeners); return its pid."""
        return await self.request(SpawnRequest(spec), fds)

    def exit_status(self, pid: int) -> asyncio.Future[int]:
        return self.exits.exit_status(pid)

    def process_pid(self) -> int | None:
        """The pid of the process at the other end."""
        return None

    def _no_answer(self, before: tuple[int, str] | None) -> str:
        """Why a fork request failed unanswered; a process that is stuck is killed first.

        A fork is a matter of milliseconds. A process that answers none in SPAWN_ANSWER and is
        stopped, or asleep without having used any CPU meanwhile (deadlocked), would fail every
        reload or respawn after: killed, it is as if it had died, and the next reload starts a
        new template, the next respawn imports the generation again. One that is only starved
        (it runs at the candidates' priority on cores the serving workers keep busy) is left alone.
        """
        pid = self.process_pid()
        now = process_cpu(pid)
        stuck = now is not None and (now[1] in "tT" or (now[1] == "S" and before is not None and now[0] == before[0]))
        if pid is None or not stuck:
            return f"the {self.name} did not answer within {SPAWN_ANSWER:g}s"
        with contextlib.suppress(OSError):  # gone meanwhile
            os.kill(pid, signal.SIGKILL)
        return f"the {self.name} answered no fork request within {SPAWN_ANSWER:g}s: killed, a new one takes over"

    @property
    def name(self) -> str:
        return "fork template"

    async def _ensure_open(self) -> None:
        if not self.is_open():
            raise SpawnError(f"the {self.name} exited")

    def _open(self, channel: socket.socket) -> None:
        channel.setblocking(False)
        self.channel = channel
        self._waiting.clear()

    async def _receive(self) -> protocol.TemplateMessage:
        """The first message (the hello), before the reader runs."""
        assert self.channel is not None
        return await receive_hello(self.channel, self.name)

    def _start_reading(self) -> None:
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        """Every message after the hello: exit statuses to the table, the rest to the waiting request."""
        assert self.channel is not None
        while True:
            data = await asyncio.get_running_loop().sock_recv(self.channel, protocol.MAX_MESSAGE)
            if not data:  # the requests waiting now learn why
                self._answer_all(SpawnError(f"the {self.name} exited"))
                return
            try:
                message = protocol.decode_template(data)
            except protocol.ProtocolError as exc:  # e.g. a template of another pypnm version, after an upgrade
                self._answer_oldest(SpawnError(str(exc)))
                continue
            if isinstance(message, WorkerExited):
                self.exits.report(message.pid, message.status)
            else:
                self._answer_oldest(message)

    def _answer_oldest(self, answer: protocol.TemplateMessage | SpawnError) -> None:
        """Answer the oldest request waiting (one that gave up, cancelled, still takes its turn: order is kept)."""
        if not self._waiting:
            logger.warning("the %s said %s, answering no request", self.name, answer)
            return
        waiting = self._waiting.popleft()
        if waiting.done():
            return
        if isinstance(answer, SpawnError):
            waiting.set_exception(answer)
        else:
            waiting.set_result(answer)

    def _answer_all(self, error: SpawnError) -> None:
        while self._waiting:
            self._answer_oldest(error)

    def _close(self) -> None:
        self._answer_all(SpawnError(f"the channel to the {self.name} was closed"))
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None
        if self.channel is not None:
            self.channel.close()  # end-of-file tells the process to exit
            self.channel = None


def process_cpu(pid: int | None) -> tuple[int, str] | None:
    """A process's CPU time so far (clock ticks, user and system) and its state letter, from /proc; None if unknown."""
    if pid is None:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after the command name, which may hold spaces
    return int(fields[11]) + int(fields[12]), fields[0]


async def receive_hello(channel: socket.socket, name: str) -> protocol.TemplateMessage:
    """The first message of a process on its new channel (its hello); SpawnError if it exits or says garbage."""
    data = await asyncio.get_running_loop().sock_recv(channel, protocol.MAX_MESSAGE)
    if not data:
        raise SpawnError(f"the {name} exited")
    try:
        return protocol.decode_template(data)
    except protocol.ProtocolError as exc:  # e.g. a template of another pypnm version, after an upgrade
        raise SpawnError(str(exc)) from exc


async def fork_with_channel(parent: ForkChannel, request: protocol.TemplateMessage) -> tuple[int, socket.socket]:
    """Have `parent` fork a process for `request` with a channel of its own: its pid, and the master's end."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        pid = await parent.request(request, [theirs.fileno()])
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    return pid, ours


class Zygote(ForkChannel):
    """A generation's zygote (template.py): it imported the app, and forks the generation's workers."""

    def __init__(self, pid: int, exits: ExitTable) -> None:
        super().__init__(exits)
        self.pid = pid
        self.nice = 0  # its nice value, which its workers validate at
        self.reimported: int | None = None  # modules imported again (incremental), None: a clean import
        self.took_ms: dict[str, int] = {}  # how long its steps took (ZygoteReady.took_ms)
        self.adapters: tuple[int, int] | None = None  # field adapters (reused, built) (ZygoteReady.adapters)
        self.cpu_ms: int | None = None  # the CPU time it used over its steps (ZygoteReady.cpu_ms)
        self.contexts: tuple[int, int] | None = None  # route contexts (reused, built) (ZygoteReady.contexts)

    @property
    def name(self) -> str:
        return f"zygote pid={self.pid}"

    def process_pid(self) -> int | None:
        return self.pid

    @classmethod
    async def fork(cls, parent: ForkChannel, request: ZygoteRequest) -> Zygote:
        """Have `parent` (the template, or the previous generation's zygote) fork one, which starts importing the app.

        Two steps, so that the master knows the pid while the import runs (SIGUSR1 reaches it):
        this one returns once it is forked, `imported` once it has imported. SpawnError when it
        could not be forked.
        """
        pid, ours = await fork_with_channel(parent, request)
        zygote = cls(pid, parent.exits)
        zygote.template_pid = parent.template_pid
        zygote._open(ours)
        return zygote

    @classmethod
    async def from_standby(cls, standby: Standby, request: ZygoteRequest) -> Zygote:
        """The standby goes on as the reload's zygote: `request` (whose drop is the standby's) tells it the new code.

        Returns once it was told, as `fork` does; StandbyGone when the standby was gone before.
        """
        zygote = cls(standby.pid, standby.exits)
        zygote.template_pid = standby.template_pid
        zygote._open(standby.hand_over())
        assert zygote.channel is not None
        try:
            await asyncio.get_running_loop().sock_sendall(zygote.channel, protocol.encode_template(request))
        except OSError as exc:
            zygote._close()
            raise StandbyGone(f"the standby pid={standby.pid} is gone: {exc}") from None
        return zygote

    async def imported(self) -> Zygote:
        """Itself once it says ZygoteReady: it has imported the app.

        ImportFailed when the app cannot be imported, ZygoteExited when the zygote ended first,
        SpawnError when it says something else. Interrupted (a timeout), it is killed.
        """
        try:
            hello = await self._receive()
        except SpawnError:
            self._close()
            raise ZygoteExited(self.pid) from None
        except BaseException:
            self.kill()
            raise
        if isinstance(hello, ZygoteFailed):
            self._close()
            raise ImportFailed(hello.reason)
        if not isinstance(hello, ZygoteReady):
            self.kill()
            raise SpawnError(f"the zygote pid={self.pid} said {hello} instead of hello")
        self.nice, self.reimported, self.took_ms = hello.nice, hello.reimported, hello.took_ms
        self.adapters, self.cpu_ms, self.contexts = hello.adapters, hello.cpu_ms, hello.contexts
        self._start_reading()
        return self

    def stop(self) -> None:
        """Its generation is over: closing the channel makes it exit (its workers are gone or being killed)."""
        self._close()

    def kill(self) -> None:
        self._close()
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)


class Standby:
    """The next reload's zygote, forked ahead of it by the serving generation's zygote (template.py, `run_standby`).

    It has dropped `drop` and released what those modules held. A reload that drops the same
    modules has it go on as its zygote (`Zygote.from_standby`); any other reload stops it.
    """

    def __init__(self, pid: int, drop: frozenset[str], channel: socket.socket, exits: ExitTable) -> None:
        self.pid = pid
        self.drop = drop
        self.exits = exits
        self.channel: socket.socket | None = channel
        self.took_ms: dict[str, int] = {}  # how long its drop and release took (StandbyReady.took_ms)
        self.template_pid: int | None = None  # as its zygote's (ForkChannel.template_pid)

    @classmethod
    async def fork(cls, zygote: Zygote, drop: list[str], nice: int) -> Standby:
        """Have `zygote` fork one that drops `drop`; returns once it is forked (`ready` waits for the rest).

        SpawnError if it cannot be forked.
        """
        pid, ours = await fork_with_channel(zygote, StandbyRequest(drop, nice))
        ours.setblocking(False)
        standby = cls(pid, frozenset(drop), ours, zygote.exits)
        standby.template_pid = zygote.template_pid
        return standby

    @property
    def name(self) -> str:
        return f"standby pid={self.pid}"

    async def ready(self) -> Standby:
        """Itself once it has dropped and released; SpawnError (and it is killed) if it does not get there."""
        assert self.channel is not None
        try:
            hello = await asyncio.wait_for(receive_hello(self.channel, self.name), STANDBY_READY)
        except (OSError, TimeoutError) as exc:
            self.kill()
            raise SpawnError(f"the {self.name} did not get ready: {exc or type(exc).__name__}") from None
        except BaseException:  # SpawnError among them: it exited, or said garbage
            self.kill()
            raise
        if not isinstance(hello, StandbyReady):
            self.kill()
            raise SpawnError(f"the {self.name} said {hello} instead of ready")
        self.took_ms = hello.took_ms
        # Ready, it says nothing more until its reload. Why watch it: it may wait for hours, and one
        # that ended meanwhile (killed by hand, the OOM killer) must leave the status and the SIGUSR1
        # list before its pid is given to another process.
        asyncio.get_running_loop().add_reader(self.channel.fileno(), self._ended)
        return self

    def _ended(self) -> None:
        """Its channel is readable while it waits: it ended (end-of-file), or said what it should not."""
        assert self.channel is not None
        try:
            said = self.channel.recv(protocol.MAX_MESSAGE)
        except OSError:
            said = b""
        logger.warning(
            "%s %s while standing by: the next reload forks its zygote",
            self.name,
            "sent a message out of turn, and was killed" if said else "ended",
        )
        if said:
            self.kill()
        else:
            self.stop()

    def is_standing_by(self) -> bool:
        """Not yet handed over to the zygote it becomes, stopped, killed or ended."""
        return self.channel is not None

    def hand_over(self) -> socket.socket:
        """Its channel, for the zygote it becomes."""
        channel, self.channel = self.channel, None
        if channel is None:
            raise StandbyGone(f"the standby pid={self.pid} was stopped")
        _unwatch(channel)
        return channel

    def stop(self) -> None:
        """Not wanted (the reload dropped other modules, or its generation is over): end-of-file ends it."""
        if self.channel is not None:
            _unwatch(self.channel)
            self.channel.close()
            self.channel = None

    def kill(self) -> None:
        self.stop()
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)


def _unwatch(channel: socket.socket) -> None:
    """No more reading of `channel` by the loop (`Standby.ready` watches a standby's)."""
    with contextlib.suppress(RuntimeError):  # no running loop: nothing watches it
        asyncio.get_running_loop().remove_reader(channel.fileno())


class ForkTemplate(ForkChannel):
    """The fork template process (template.py), started and renewed by the master."""

    def __init__(self, log_level: str, preload: list[str], runtime: RuntimeDir) -> None:
        super().__init__(ExitTable())
        self.log_level = log_level
        self.preload = preload
        self.runtime = runtime  # its lock goes to the template and, by fork, to every zygote and worker
        self.process: subprocess.Popen[bytes] | None = None
        self.versions: dict[str, str] = {}
        self._path_stamp: list[int | None] = []  # sys.path's when `versions` were read (snapshot.path_stamp)
        self.renice = False  # it can give a lowered nice value back: candidates run niced (priority.py)
        self._told_no_renice = False

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def process_pid(self) -> int | None:
        return self.pid if self.is_running() else None  # a pid Popen reaped may be another process's now

    async def start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._path_stamp = path_stamp(sys.path)  # before reading: an install meanwhile shows next time
        self.versions = await asyncio.to_thread(installed_versions, self.preload)  # metadata reads: ~0.1 s
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
            # stops or reloads the workers in order instead of having them die under it. Not only a
            # process group of its own: that is a background job of the terminal's session, whose
            # worker is stopped (SIGTTIN) when it reads the terminal, as `breakpoint()` in a handler does.
            start_new_session=True,
        )
        theirs.close()
        self._open(ours)
        hello = await asyncio.wait_for(self._receive(), TEMPLATE_START)
        if not isinstance(hello, TemplateHello):
            raise SpawnError(f"the fork template did not start: {hello}")
        if not hello.renice and not self._told_no_renice:  # said once, not at every renewal of the template
            self._told_no_renice = True
            logger.warning(
                "reload candidates run at the serving workers' priority: lowering a nice value back needs "
                "CAP_SYS_NICE or an RLIMIT_NICE of at least %d (systemd LimitNICE=, ulimit -e)",
                20 - os.getpriority(os.PRIO_PROCESS, 0),
            )
        self.renice = hello.renice
        self.template_pid = self.process.pid
        self._start_reading()
        logger.info("fork template started pid=%d", self.process.pid)

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    async def refresh_if_stale(self) -> None:
        """Start a new template when third-party packages changed on disk, or when it died.

        The installed versions are read again (metadata lookups: a few milliseconds, about 0.1 s
        with `preload_modules`) only when the directories on sys.path changed since they were last
        read: an install changes them.
        """
        async with self._lock:
            if self._waiting:  # requests sent to the running template get their answers first
                await asyncio.wait(list(self._waiting))
            stamp = path_stamp(sys.path)
            if self.is_running() and stamp == self._path_stamp:
                return
            now = await asyncio.to_thread(installed_versions, self.preload)
            if self.is_running() and now == self.versions:
                self._path_stamp = stamp
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

    async def _ensure_open(self) -> None:
        if not self.is_running():
            await self._restart()

    async def _restart(self) -> None:
        if not self.is_running():
            logger.warning("fork template is gone; starting a new one")
        await self.stop()
        await self.start()

    async def stop(self) -> None:
        self._close()
        if self.process is not None:
            try:
                await asyncio.wait_for(asyncio.to_thread(self.process.wait), TEMPLATE_STOP)
            except TimeoutError:
                self.process.kill()
                await asyncio.to_thread(self.process.wait)
            self.process = None
