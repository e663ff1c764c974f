"""Self-upgrade: a new master, in a fresh interpreter, takes the listening sockets over from this one.

`SIGUSR2` to the master, or `pypnm upgrade` (the System Operation `GET .../upgrade`, through the
control channel), starts `python -m pypnm` again with the same command line, in a session of its
own, so it runs whatever pypnm, FastAPI, uvicorn, ... are installed *now*. The two masters speak
protocol.py's "handover" channel over a SOCK_SEQPACKET socketpair, the only descriptor the new one
inherits (named by `HANDOVER_ENV`):

    old                                            new
    HandoverOffer + the listening sockets    ->    takes them (or binds anew: host/port changed)
                                                   builds and validates generation 1, like a reload
                                             <-    HandoverServing (its generation accepts)
    MAINPID=<new> to systemd
    HandoverComplete                         ->    writes pid_file; notifies systemd from now on
    stops accepting, drains, exits 0               serves on

While both serve, both accept on the same sockets, exactly as the two generations of a reload's
swap do, so no connection is refused. Anything else ends the upgrade as failed, with the reason,
and the old master serves on: the new one says `HandoverFailed` (its settings, its sockets or its
generation failed), or exits first (the reason is the exception it died of: `BOOTSTRAP` reports
one that escapes even an import of the new install), or does not serve within `reload_timeout`
plus `UPGRADE_START` (it is stopped). A stop of the old master while the new one is coming up stops
the new one too (`abort`): neither master is left behind by the other.

Why the sockets travel as SCM_RIGHTS rather than systemd's `LISTEN_FDS`/`LISTEN_PID`: `LISTEN_PID`
must name the new process, whose pid exists only after the fork, and setting it there needs a
`preexec_fn`, which is unsafe in a process with threads (the master has some). The new master's
`activated` flag still says when the sockets were systemd's. systemd: with `NotifyAccess=main`
(deploy/systemd) only the main pid may notify, so the *old* master sends `MAINPID=<new>` on the
new one's behalf, and the new one stays silent until `HandoverComplete` (`Notifier.defer_until_main`).

`PidFile` is the `pid_file` setting: written atomically (a temporary file renamed over it), by a
fresh master at start and by a new master once it took over, and removed at a clean stop only
while it still names this process (after a handover it names the successor).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pypnm
from pypnm.identity import utc_now
from pypnm.settings import Settings
from pypnm.supervisor import protocol
from pypnm.supervisor.generation import signal_name
from pypnm.supervisor.protocol import (
    ForwardedReload,
    HandoverComplete,
    HandoverFailed,
    HandoverOffer,
    HandoverServing,
)
from pypnm.supervisor.reloads import ReloadQueue
from pypnm.supervisor.systemd import MAX_LISTENERS, Notifier
from pypnm.supervisor.timeouts import AFTER_KILL, HANDOVER_ANSWER, UPGRADE_START

logger = logging.getLogger("pypnm.supervisor.master")

HANDOVER_ENV = "PYPNM_HANDOVER_FD"  # the new master's end of the handover channel; taken out of the environment
BOOTSTRAP_ENV = "PYPNM_HANDOVER_BOOTSTRAP"  # BOOTSTRAP, run by a one-line `-c` (keeps `ps` readable)

# The new master's entry point: `python -m pypnm ARGS`, plus one thing the new install cannot do for
# itself when it is broken: report the exception that kills it (say a SyntaxError in a module it
# imports) to the old master, as a HandoverFailed in this (old) master's encoding. Standard library only.
_FAILED = json.loads(protocol.encode_handover(HandoverFailed("")))
BOOTSTRAP = f"""\
import json, os, runpy, sys
os.environ.pop({BOOTSTRAP_ENV!r}, None)
try:
    report = os.dup(int(os.environ[{HANDOVER_ENV!r}]))
except (KeyError, ValueError, OSError):
    report = None
try:
    runpy.run_module("pypnm", run_name="__main__", alter_sys=True)
except (SystemExit, KeyboardInterrupt):
    raise
except BaseException as exc:
    if report is not None:
        body = dict({_FAILED!r}, reason=f"the new master died: {{type(exc).__name__}}: {{exc}}"[:{protocol.MAX_REASON}])
        try:
            os.write(report, json.dumps(body).encode())
        except OSError:
            pass
    raise
"""


class HandoverError(Exception):
    """The handover channel is unusable (the new master's side); one line for the operator."""


class PidFileError(Exception):
    """The pid_file cannot be written; one line for the operator."""


class UpgradeRefused(Exception):
    """An upgrade cannot start now; the message says why."""


@dataclass
class UpgradeRecord:
    """One self-upgrade, as `/status` shows it under `upgrade`."""

    source: str
    from_pid: int
    from_version: str
    id: str = field(default_factory=lambda: "u" + uuid.uuid4().hex[:11])
    requested_at: str = field(default_factory=utc_now)
    to_pid: int | None = None
    to_version: str | None = None
    outcome: Literal["succeeded", "failed"] | None = None
    reason: str | None = None
    finished_at: str | None = None

    def finish(self, outcome: Literal["succeeded", "failed"], reason: str | None = None) -> None:
        self.outcome, self.reason, self.finished_at = outcome, reason, utc_now()

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "source": self.source,
            "requested_at": self.requested_at,
            "finished_at": self.finished_at,
            "outcome": self.outcome,
            "reason": self.reason,
            "from": {"pid": self.from_pid, "version": self.from_version},
            "to": {"pid": self.to_pid, "version": self.to_version} if self.to_pid else None,
        }


# ----- the old master's side ---------------------------------------------------------------------


class Upgrades:
    """Starts new masters and hands over to the first that serves; one upgrade at a time."""

    def __init__(
        self,
        command: list[str],
        listeners: list[socket.socket],
        settings: Callable[[], Settings],
        notifier: Notifier,
        *,
        activated: bool,
        serving: Callable[[], int | None],
        numbered: Callable[[], int],
        reloads: ReloadQueue,
        on_handed_over: Callable[[], None],
        spawn_task: Callable[[Any], asyncio.Task[Any]],
    ) -> None:
        self.command = command  # `pypnm ...` as this master was started, without the interpreter
        self.listeners = listeners
        self._settings = settings
        self.notifier = notifier
        self.activated = activated
        self._serving = serving  # the serving generation's number (None: nothing to hand over yet)
        self._numbered = numbered  # the highest generation number given (a running reload's, if any)
        self._reloads = reloads  # held while an upgrade runs (reloads.py)
        self._on_handed_over = on_handed_over
        self._spawn_task = spawn_task
        self.current: UpgradeRecord | None = None
        self.last: UpgradeRecord | None = None  # the running one, else the last that ended (or the one we came from)
        self.handed_over = False
        self._aborted = False
        self._process: subprocess.Popen[bytes] | None = None

    def request(self, source: str) -> UpgradeRecord:
        """Start an upgrade, or join the one running; UpgradeRefused when there is nothing to hand over."""
        if self.current is not None:
            logger.info("upgrade requested by %s: joined upgrade %s, which is running", source, self.current.id)
            return self.current
        if self.handed_over:
            raise UpgradeRefused("this master has handed over to a new one and is stopping")
        if self._serving() is None:
            raise UpgradeRefused("nothing serves yet: wait until the first generation serves")
        record = UpgradeRecord(source, os.getpid(), pypnm.__version__)
        self.current = self.last = record
        logger.info("upgrade %s requested by %s: starting a new master", record.id, source)
        self._reloads.hold()
        self._spawn_task(self._run(record))
        return record

    def view(self) -> dict[str, Any] | None:
        return self.last.as_dict() if self.last else None

    async def abort(self) -> None:
        """This master stops: a new master still coming up is stopped too (and waited for)."""
        process = self._process
        if process is None or process.poll() is not None or self.handed_over:
            return
        logger.warning("upgrade aborted: this master stops; stopping the new master pid=%d", process.pid)
        self._aborted = True
        await self._stop(process)

    async def _run(self, record: UpgradeRecord) -> None:
        self._process = None
        ours: socket.socket | None = None
        try:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                process = self._start(theirs)
            finally:
                theirs.close()
            record.to_pid = process.pid
            ours.setblocking(False)
            offer = HandoverOffer(
                upgrade_id=record.id,
                source=record.source,
                requested_at=record.requested_at,
                pid=os.getpid(),
                version=pypnm.__version__,
                host=self._settings().host,
                port=self._settings().port,
                activated=self.activated,
                generation=self._numbered(),  # the new master numbers its generations from the next one
            )
            socket.send_fds(ours, [protocol.encode_handover(offer)], [sock.fileno() for sock in self.listeners])
            timeout = self._settings().reload_timeout + UPGRADE_START
            answer = await self._answer(ours, process, timeout)
            if isinstance(answer, HandoverServing) and _peer_open(ours) and not self._aborted:
                record.to_version = answer.version
                unconfirmed = self._hand_over(record, ours, answer)
                if unconfirmed is None:
                    return
                answer = unconfirmed
            elif isinstance(answer, HandoverServing):  # it gave up waiting for us (Successor.took_over) and stops
                answer = "the new master left before the handover completed (it waited too long for this one)"
            await self._stop(process)
            self._failed(record, answer)
        except OSError as exc:  # the interpreter cannot be started, or the channel broke
            self._failed(record, f"cannot start the new master: {exc.strerror or exc}")
            if self._process is not None:
                await self._stop(self._process)
        finally:
            if ours is not None:
                ours.close()
            self.current = None
            if not self.handed_over:
                self._reloads.release()  # a reload asked for meanwhile runs here

    def _start(self, channel: socket.socket) -> subprocess.Popen[bytes]:
        env = {
            **os.environ,
            HANDOVER_ENV: str(channel.fileno()),
            BOOTSTRAP_ENV: BOOTSTRAP,
            **self.notifier.successor_env(),
        }
        process = subprocess.Popen(
            [sys.executable, "-c", f"import os; exec(os.environ[{BOOTSTRAP_ENV!r}])", *self.command],
            env=env,
            pass_fds=[channel.fileno()],
            stdin=subprocess.DEVNULL,
            # Its own session: it outlives this master, and a terminal's SIGINT is for this one alone.
            start_new_session=True,
        )
        self._process = process
        logger.info(
            "upgrade %s: new master started pid=%d (%s -m pypnm)", self.current_id(), process.pid, sys.executable
        )
        return process

    def current_id(self) -> str | None:
        return self.current.id if self.current else None

    async def _answer(
        self, channel: socket.socket, process: subprocess.Popen[bytes], timeout: float
    ) -> HandoverServing | str:
        """The new master's HandoverServing, or the reason it will not serve."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            try:
                data = await asyncio.wait_for(loop.sock_recv(channel, protocol.MAX_MESSAGE), 0.25)
            except TimeoutError:
                if process.poll() is not None:  # it died without a word (or its word is still queued)
                    with contextlib.suppress(BlockingIOError):
                        data = channel.recv(protocol.MAX_MESSAGE)
                        if data:
                            return self._read(data)
                    return f"the new master exited ({_ended(process.returncode)}) before serving; see its log lines"
                continue
            if not data:
                code = await _wait_exit(process, AFTER_KILL, kill=False)
                return f"the new master exited ({_ended(code)}) before serving; see its log lines"
            return self._read(data)
        return f"the new master did not serve within {timeout:g}s (reload_timeout + {UPGRADE_START:g}s to start)"

    @staticmethod
    def _read(data: bytes) -> HandoverServing | str:
        try:
            message = protocol.decode_handover(data)
        except protocol.ProtocolError as exc:
            return str(exc)
        if isinstance(message, HandoverServing):
            return message
        if isinstance(message, HandoverFailed):
            return message.reason
        return f"the new master sent {type(message).__name__} instead of an answer"

    def _hand_over(self, record: UpgradeRecord, channel: socket.socket, serving: HandoverServing) -> str | None:
        """Confirm to the new master and let go; None, or why it could not be confirmed (this master serves on)."""
        # Before HandoverComplete: the new master notifies systemd only once it is the main pid.
        self.notifier.handed_over(serving.pid, f"upgraded: pid {serving.pid} (pypnm {serving.version}) serving")
        waited = self._reloads.pending
        forwarded = None
        if waited is not None and serving.takes_reload:
            forwarded = ForwardedReload(waited.id, waited.source, waited.requested_at, waited.coalesced)
        try:
            channel.send(protocol.encode_handover(HandoverComplete(forwarded)))
        except OSError as exc:  # it left since _peer_open looked (under systemd, told the new main pid, the unit ends)
            return f"the new master left as this one confirmed the handover ({exc.strerror or exc})"
        self.handed_over = True
        record.finish("succeeded")
        self._reloads.forward()  # taken out of this queue: the new master runs it, or no one
        if forwarded is not None:
            logger.info("reload %s: handed to the new master, which runs it once it serves", forwarded.id)
        elif waited is not None:  # an older new master: no master will run it
            self._reloads.give_up(
                waited,
                f"asked for during upgrade {record.id}, whose new master (pypnm {serving.version}) could not take "
                "it over: reload again",
            )
        logger.info(
            "upgrade %s succeeded: new master pid=%d (pypnm %s) serving; pid=%d (pypnm %s) stops accepting and drains",
            record.id,
            serving.pid,
            serving.version,
            os.getpid(),
            pypnm.__version__,
        )
        self._on_handed_over()
        return None

    def _failed(self, record: UpgradeRecord, reason: str) -> None:
        if self._aborted:
            record.finish("failed", "aborted: this master was stopped before the new one served")
            return  # abort() said so in the log
        record.finish("failed", reason)
        logger.error("upgrade %s failed: %s; this master pid=%d keeps serving", record.id, reason, os.getpid())

    async def _stop(self, process: subprocess.Popen[bytes]) -> None:
        """The new master leaves, whatever state it is in: SIGTERM (it stops its own workers), then SIGKILL."""
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        await _wait_exit(process, self._settings().graceful_timeout + AFTER_KILL)


def _peer_open(channel: socket.socket) -> bool:
    """Whether the new master still holds its end: it closes it when it stops waiting for HandoverComplete.

    Asked just before systemd is told the new main pid, which cannot be taken back.
    """
    try:
        return channel.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
    except BlockingIOError:
        return True  # open, and nothing more said
    except OSError:
        return False


async def _wait_exit(process: subprocess.Popen[bytes], timeout: float, *, kill: bool = True) -> int | None:
    """Its exit code once it ended (reaped); SIGKILL after `timeout` (unless `kill` is False: None)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while process.poll() is None and loop.time() < deadline:
        await asyncio.sleep(0.05)
    if process.poll() is None and kill:
        process.kill()
        await asyncio.to_thread(process.wait, AFTER_KILL)
    return process.returncode


def _ended(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        return f"killed by {signal_name(-code)}"
    return f"exit code {code}"


# ----- the new master's side ----------------------------------------------------------------------


class Successor:
    """A master started by an upgrade: the old master's offer, its sockets, and the answers owed to it."""

    def __init__(self, channel: socket.socket, offer: HandoverOffer, inherited: list[socket.socket]) -> None:
        self.channel = channel
        self.offer = offer
        self.inherited = inherited
        self.record = UpgradeRecord(
            offer.source, offer.pid, offer.version, id=offer.upgrade_id, requested_at=offer.requested_at
        )
        self.record.to_pid, self.record.to_version = os.getpid(), pypnm.__version__
        self.forwarded: ForwardedReload | None = None  # a reload the old master held for this one (took_over)

    @classmethod
    def take(cls) -> Successor | None:
        """The handover this process was started for (HANDOVER_ENV), or None; HandoverError if unusable."""
        raw = os.environ.pop(HANDOVER_ENV, None)
        if raw is None:
            return None
        try:
            channel = socket.socket(fileno=int(raw))
            channel.set_inheritable(False)
            channel.settimeout(HANDOVER_ANSWER)
            data, fds, flags, _ = socket.recv_fds(channel, protocol.MAX_MESSAGE, MAX_LISTENERS)
        except (ValueError, OSError) as exc:
            raise HandoverError(f"{HANDOVER_ENV}={raw}: no handover from an old master: {exc}") from None
        inherited = [socket.socket(fileno=fd) for fd in fds]
        try:
            if flags & socket.MSG_CTRUNC:  # sockets beyond the room: serving on the rest would lose some silently
                raise HandoverError(f"the old master passed more than {MAX_LISTENERS} listening sockets")
            try:
                offer = protocol.decode_handover(data)
            except protocol.ProtocolError as exc:
                raise HandoverError(str(exc)) from None
            if not isinstance(offer, HandoverOffer) or not inherited:
                raise HandoverError(f"expected an offer with the listening sockets, got {type(offer).__name__}")
        except HandoverError as exc:  # the old master records this reason, not only "exit code 2"
            with contextlib.suppress(OSError):
                channel.send(protocol.encode_handover(HandoverFailed(f"the new master cannot take over: {exc}")))
            for sock in inherited:
                sock.close()
            raise
        return cls(channel, offer, inherited)

    def announce(self) -> None:
        """The new master's first log line; called once logging is set up (`take` runs before the settings are read)."""
        offer = self.offer
        logger.info("upgrade %s: taking over from master pid=%d (pypnm %s)", offer.upgrade_id, offer.pid, offer.version)

    def listeners(self, settings: Settings, bind: Callable[[str, int], list[socket.socket]]) -> list[socket.socket]:
        """The old master's sockets, unless this master's host or port differ (then new ones; OSError if not)."""
        offer = self.offer
        if offer.activated or (settings.host, settings.port) == (offer.host, offer.port):
            return self.inherited
        listeners = bind(settings.host, settings.port)
        logger.warning(
            "upgrade %s: host/port changed (%s:%d -> %s:%d): listening anew; the old one closes with the old master",
            offer.upgrade_id,
            offer.host,
            offer.port,
            settings.host,
            settings.port,
        )
        for sock in self.inherited:
            sock.close()
        return listeners

    def failed(self, reason: str) -> None:
        """Tell the old master that this one will not serve (it exits next)."""
        with contextlib.suppress(OSError):
            self.channel.send(protocol.encode_handover(HandoverFailed(reason)))

    async def took_over(self, generation: int | None, stopping: asyncio.Event) -> bool:
        """The first generation serves: say so, and wait (bounded) for the old master to let go.

        True when this master serves on: the old master confirmed, or it is gone (this process
        has another parent now). The old master writes on the channel only as it lets go, so any
        answer is its confirmation, even one this master cannot read. False when the old master is
        alive but did not confirm, which is how it refuses (an answer it could not read, its
        timeout, its own stop: it keeps serving and stops this master), or when this master is
        told to stop meanwhile: then it claims nothing (the pid file, systemd's main pid) and stops.
        """
        loop = asyncio.get_running_loop()
        self.channel.setblocking(False)
        let_go, problem = False, "this master was told to stop"
        try:
            if not stopping.is_set():
                serving = HandoverServing(os.getpid(), pypnm.__version__, takes_reload=True)
                await loop.sock_sendall(self.channel, protocol.encode_handover(serving))
                let_go, problem = await self._answer(stopping)
        except OSError as exc:
            problem = str(exc)
        finally:
            with contextlib.suppress(OSError):
                # The socket's end, not only this descriptor: the bootstrap holds a copy of it, and the
                # old master must see at once that this one no longer waits (`_peer_open`).
                self.channel.shutdown(socket.SHUT_RDWR)
            self.channel.close()
        old_gone = os.getppid() != self.offer.pid  # the old master started this one: its child until it dies
        if not let_go and (stopping.is_set() or not old_gone):
            reason = f"the old master pid={self.offer.pid} did not let go ({problem})"
            self.record.finish("failed", reason)
            logger.error("upgrade %s: %s; it serves on, and this master stops", self.offer.upgrade_id, reason)
            return False
        self.record.finish("succeeded")
        logger.info(
            "upgrade %s: generation %s serving; master pid=%d (pypnm %s) took over from pid=%d (pypnm %s)%s",
            self.offer.upgrade_id,
            generation,
            os.getpid(),
            pypnm.__version__,
            self.offer.pid,
            self.offer.version,
            "" if let_go else f" (the old master is gone without confirming: {problem})",
        )
        return True

    async def _answer(self, stopping: asyncio.Event) -> tuple[bool, str]:
        """Whether the old master let go (it answered HandoverServing), and if not, why not."""
        receive = asyncio.ensure_future(asyncio.get_running_loop().sock_recv(self.channel, protocol.MAX_MESSAGE))
        stop = asyncio.ensure_future(stopping.wait())
        try:
            done, _ = await asyncio.wait({receive, stop}, timeout=HANDOVER_ANSWER, return_when=asyncio.FIRST_COMPLETED)
        finally:
            receive.cancel()
            stop.cancel()
        data = receive.result() if receive in done else self._last_word()
        if data:
            self._confirmation(data)
            return True, ""
        if receive in done:
            return False, "it closed the handover channel"
        return False, "this master was told to stop" if stop in done else f"no answer within {HANDOVER_ANSWER:g}s"

    def _last_word(self) -> bytes:
        """An answer that came just as the wait ended, if any."""
        try:
            return self.channel.recv(protocol.MAX_MESSAGE)
        except (BlockingIOError, InterruptedError):
            return b""

    def _confirmation(self, data: bytes) -> None:
        """Read what came with the old master's confirmation: a reload it held for this master."""
        try:
            answer = protocol.decode_handover(data)
        except protocol.ProtocolError as exc:
            logger.warning("upgrade %s: the old master's confirmation cannot be read (%s)", self.offer.upgrade_id, exc)
            return
        if isinstance(answer, HandoverComplete):
            self.forwarded = answer.reload


# ----- pid_file ------------------------------------------------------------------------------------


class PidFile:
    """The `pid_file` setting: this master's pid, for scripts and process managers."""

    def __init__(self) -> None:
        self.path: Path | None = None

    def write(self, path: Path | None) -> None:
        """Write (atomically) our pid to `path`, and remove the previous file if it was another one; OSError.

        The temporary file beside it has a name no one can guess and is created, never opened:
        in a directory others may write to (/run, /tmp), a link planted under a predictable name
        would make the master overwrite whatever file the link points to.
        """
        if path is not None:
            temporary = _pid_beside(path)
            try:
                os.replace(temporary, path)
            except OSError:
                temporary.unlink(missing_ok=True)
                raise
        if self.path is not None and self.path != path:
            self.remove()
        self.path = path

    def remove(self) -> None:
        """Remove the file if it still names this process (after a handover it names the new master)."""
        if self.path is None:
            return
        with contextlib.suppress(OSError, ValueError):
            if int(self.path.read_text().strip()) == os.getpid():
                self.path.unlink()
        self.path = None


def _pid_beside(path: Path) -> Path:
    """A new file beside `path`, under a name no one can guess, holding this process's pid; OSError."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "w") as file:
            file.write(f"{os.getpid()}\n")
    except FileExistsError:
        raise  # not ours to remove
    except OSError:
        temporary.unlink(missing_ok=True)
        raise
    return temporary


def check_pid_file(path: Path) -> None:
    """PidFileError when a master could not write `path` (as PidFile.write would fail at start).

    For `pypnm check`: the temporary file a write starts with is made beside it and removed
    again; the pid file itself (perhaps a running master's) is not touched.
    """
    try:
        if path.is_dir():
            raise IsADirectoryError(21, "Is a directory")
        _pid_beside(path).unlink()
    except OSError as exc:
        raise PidFileError(f"cannot write pid_file {path}: {exc.strerror or exc}") from None
