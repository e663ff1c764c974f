"""The master's side of systemd: readiness and reload notifications, the watchdog, socket activation.

Notifications (sd_notify(3)): when `NOTIFY_SOCKET` is set, `Notifier` sends datagrams to it:

- `READY=1`, `MAINPID=<master pid>` and `STATUS=generation 1 serving` once the first generation serves;
- for every reload, `RELOADING=1` with `MONOTONIC_USEC=<CLOCK_MONOTONIC now, µs>` when it starts,
  then `READY=1` when it ends, each with a `STATUS=` naming the serving generation and the outcome;
- `STOPPING=1` when the master starts to stop (nothing after it: systemd ignores a READY=1 then);
- on a self-upgrade (upgrade.py), the old master sends `MAINPID=<new master>` once the new one
  serves, and nothing after it; the new master, started with NOTIFY_SOCKET and WATCHDOG_USEC,
  stays silent until then (`defer_until_main`: with `NotifyAccess=main` systemd refuses
  notifications from any other pid), then sends `READY=1` and pings the watchdog;
- `WATCHDOG=1` every `WATCHDOG_USEC`/2 when `WATCHDOG_USEC` is set (and `WATCHDOG_PID` is unset or
  the master's pid), from a task on the master's event loop: a loop that hangs stops the pings, and
  systemd stops the service (and starts it again with Restart=on-failure). The pings end with
  `STOPPING=1`: systemd stops the watchdog when the unit leaves its running states, and
  `TimeoutStopSec=` bounds the stop instead.

Reloads under `Type=notify-reload`: on `systemctl reload` systemd notes the monotonic time, sends
SIGHUP and waits for a `RELOADING=1` whose `MONOTONIC_USEC` is not older than that time, then for
`READY=1`; a `READY=1` without it, or a `RELOADING=1` with an older time, is ignored. The master
coalesces reloads (one runs, later triggers join one queued follow-up), and sends `RELOADING=1`
when a reload *starts* (after `reload_min_interval`), not when it is queued, so:

- a SIGHUP that joins a queued reload was received before that reload starts: its `RELOADING=1`
  carries a later time and is accepted, and its `READY=1` ends systemd's reload;
- a SIGHUP that arrives while a reload runs queues a follow-up; the running reload's `READY=1`
  is ignored (systemd still waits for a newer `RELOADING=1`), the follow-up's pair completes it;
- a reload started by another trigger after systemd sent its SIGHUP but before the master read
  it satisfies systemd (it began after the request, so it reads what the operator changed), and
  the queued follow-up then sends one more pair, which systemd takes as a reload of its own;
- every reload, failed ones included, ends in `READY=1`: the old generation keeps serving, so the
  service is ready; `STATUS=` says that the reload failed and why (`systemctl status`, the journal).
  systemd itself counts it as a finished reload: `pypnm reload --wait` reports the outcome.

A reload's `READY=1` must never be lost, or systemd waits until its timeout and fails the reload:
systemd drops a whole datagram of `PIPE_BUF` (4096) bytes or more, or with invalid UTF-8 in `STATUS=`,
so `STATUS=` is one line of at most `STATUS_MAX_BYTES`; and when the receiver's queue is full, state
changes wait and are sent in order from a timer rather than dropped (`Notifier`).

Socket activation (sd_listen_fds(3)): with `LISTEN_PID` equal to the master's pid and `LISTEN_FDS=N`,
`activated_listeners` takes fds 3..3+N-1 (names from `LISTEN_FDNAMES`) as the listening sockets,
checks that each is a listening TCP stream socket, and the master serves on them instead of binding
`host`:`port`.

The variables are removed from the environment as they are read (`take_notifier`,
`activated_listeners`), before the master starts any process: the fork template, the workers and
anything the app runs must not notify in the service's name, or take fds 3.. for systemd's.

Hand-written rather than a library: the protocol is two environment variables and a datagram to a
Unix socket, documented by systemd as stable and meant to be implemented without libsystemd.
`systemd-python` and `cysystemd` wrap libsystemd (a C extension to build or a native wheel) for
what is a `sendto`; `sdnotify` (last release 2017) and `systemd-watchdog` cover notifications only,
with no `MONOTONIC_USEC` for `RELOADING=1` and no socket activation, which would still be written
here. And a plain blocking send on the master's event loop would let a receiver that reads late
hold up the whole supervisor; here state changes wait in a queue instead, and pings are dropped.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import socket
import stat
import time
from typing import Protocol

logger = logging.getLogger("pypnm.supervisor.systemd")

NOTIFY_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
LISTEN_ENV = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
LISTEN_FDS_START = 3  # SD_LISTEN_FDS_START: systemd passes its sockets from fd 3 on
# The most listening sockets a master serves on: a self-upgrade hands them all over in one
# message, whose room for descriptors is fixed before it is read (upgrade.py). Far more than anyone configures.
MAX_LISTENERS = 64
# systemd drops a whole datagram of PIPE_BUF (4096) bytes or more; the other fields need < 100.
STATUS_MAX_BYTES = 2048
RETRY_INTERVAL = 0.05  # seconds between tries to send a state change the receiver had no room for


class ActivationError(Exception):
    """The sockets systemd passed cannot be served; the message is one line for the operator."""


class ReloadInfo(Protocol):
    """What the notifier reads of a reload (the master's ReloadRecord)."""

    @property
    def id(self) -> str: ...

    @property
    def source(self) -> str: ...

    @property
    def outcome(self) -> str | None: ...

    @property
    def reason(self) -> str | None: ...


def monotonic_usec() -> int:
    """Now on CLOCK_MONOTONIC in µs, the clock systemd compares `MONOTONIC_USEC=` against."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def status_text(text: str) -> str:
    """One line of valid UTF-8 that keeps the datagram well within systemd's size limit."""
    line = "".join(" " if ch < " " or ch == "\x7f" else ch for ch in text)
    data = line.encode("utf-8", "replace")
    if len(data) > STATUS_MAX_BYTES:
        line = data[: STATUS_MAX_BYTES - 3].decode("utf-8", "ignore") + "..."
    return line.encode("utf-8", "replace").decode("utf-8")


def _address(value: str) -> str | None:
    """NOTIFY_SOCKET as a socket address: a path, or `@name` in the abstract namespace."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    return None  # e.g. vsock:…, which this master does not speak


class Notifier:
    """Sends the master's life to systemd; every method is a no-op without NOTIFY_SOCKET.

    Never blocks or raises into the master's loop. The socket is non-blocking; when the
    receiver's queue is full (it reads late), state changes wait in `_backlog` and are sent in
    order from a timer, since a lost READY=1 would leave systemd waiting; a WATCHDOG=1 is dropped
    instead (a queue that is full already holds signs of life). Other send errors are logged
    (a warning for the first in a row) and the datagram dropped, as sd_notify(3) does.
    """

    def __init__(self, address: str | None = None, watchdog_usec: int | None = None) -> None:
        self.address = address
        self.watchdog_usec = watchdog_usec if address else None
        self._socket: socket.socket | None = None
        self._backlog: collections.deque[str] = collections.deque()
        self._failing = False
        self._serving = False  # READY=1 sent for the first generation
        self._stopping = False
        self._deferred = False  # a new master of an upgrade, not yet the main pid
        self._watchdog: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    # ----- the master's events -------------------------------------------------------------

    def reload_started(self, record: ReloadInfo, serving: int | None) -> None:
        """A reload starts (the first generation's start is not one: READY=1 ends it)."""
        if not self._serving:
            return
        self._send(
            "RELOADING=1",
            f"MONOTONIC_USEC={monotonic_usec()}",
            f"STATUS=generation {serving} serving; reloading (reload {record.id}, requested by {record.source})",
        )

    def reload_finished(self, record: ReloadInfo, serving: int | None) -> None:
        """A reload (or the start) ended: READY=1 with the outcome, unless the master is stopping."""
        if not self._serving:
            if record.outcome == "succeeded":
                self._serving = True
                self._send("READY=1", f"MAINPID={os.getpid()}", f"STATUS=generation {serving} serving")
            else:
                self._send(f"STATUS=cannot start: {record.reason}")
            return
        if record.outcome == "succeeded":
            outcome = f"reload {record.id} succeeded"
        elif record.outcome == "rolled_back":
            outcome = f"reload {record.id} rolled back: {record.reason}"
        else:
            outcome = f"reload {record.id} failed: {record.reason}"
        self._send("READY=1", f"STATUS=generation {serving} serving; {outcome}")

    def defer_until_main(self) -> None:
        """A new master of an upgrade: say nothing until `became_main` (the old master is the main pid)."""
        self._deferred = True
        self._serving = True  # the service is up: its first generation's end is a reload's to systemd

    def became_main(self, serving: int | None, status: str) -> None:
        """The old master has made this one the main pid: notifications go through from now on."""
        if self._deferred:
            self._deferred = False
            self._send("READY=1", f"STATUS=generation {serving} serving; {status}")

    def handed_over(self, pid: int, status: str) -> None:
        """The old master's last word: `pid` is the main process now; nothing is sent after it."""
        self._send(f"MAINPID={pid}", f"STATUS={status}")
        self._stopping = True  # no STOPPING=1 from here: the service goes on
        if self._watchdog is not None:
            self._watchdog.cancel()

    def successor_env(self) -> dict[str, str]:
        """The variables a new master needs to notify in the service's name (take_notifier removed ours)."""
        if self.address is None:
            return {}
        raw = "@" + self.address[1:] if self.address.startswith("\0") else self.address
        env = {"NOTIFY_SOCKET": raw}
        if self.watchdog_usec:
            env["WATCHDOG_USEC"] = str(self.watchdog_usec)
        return env

    def stopping(self, serving: int | None) -> None:
        what = f"draining generation {serving}" if serving is not None else "nothing serves"
        self._send("STOPPING=1", f"STATUS=stopping: {what}")
        self._stopping = True
        if self._watchdog is not None:
            self._watchdog.cancel()

    def start_watchdog(self) -> None:
        """Ping from the running event loop every WATCHDOG_USEC/2, until `stopping`."""
        if self.watchdog_usec and self._watchdog is None:
            self._watchdog = asyncio.get_running_loop().create_task(self._ping())

    async def _ping(self) -> None:
        interval = self.watchdog_usec / 2e6 if self.watchdog_usec else 0.0
        while not self._stopping:
            if not self._backlog and not self._deferred:
                with contextlib.suppress(BlockingIOError):
                    self._sendto("WATCHDOG=1")
            await asyncio.sleep(interval)

    # ----- the datagrams -------------------------------------------------------------------

    def _send(self, *fields: str) -> None:
        """Queue one state change for systemd and send what the receiver has room for."""
        if self.address is None or self._stopping or self._deferred:
            return
        message = "\n".join(
            f"STATUS={status_text(f[len('STATUS=') :])}" if f.startswith("STATUS=") else f for f in fields
        )
        logger.debug("sd_notify: %s", message.replace("\n", " "))
        self._backlog.append(message)
        if len(self._backlog) == 1:  # otherwise a retry is already due
            self._flush()

    def _flush(self) -> None:
        while self._backlog:
            try:
                self._sendto(self._backlog[0])
            except BlockingIOError:
                try:
                    asyncio.get_running_loop().call_later(RETRY_INTERVAL, self._flush)
                    return
                except RuntimeError:  # no loop (the master is gone): nothing will read them anyway
                    self._backlog.clear()
                    return
            self._backlog.popleft()

    def _sendto(self, message: str) -> None:
        """Send or drop one datagram; raises only BlockingIOError (the receiver's queue is full)."""
        assert self.address is not None
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._socket.setblocking(False)
            self._socket.sendto(message.encode(), self.address)
        except BlockingIOError:
            raise
        except OSError as exc:
            level = logging.DEBUG if self._failing else logging.WARNING
            self._failing = True
            logger.log(level, "cannot notify systemd (NOTIFY_SOCKET): %s; dropped: %s", exc, message.replace("\n", " "))
            return
        self._failing = False


def take_notifier() -> Notifier:
    """The notifier the environment asks for; removes NOTIFY_SOCKET and WATCHDOG_* from it."""
    env = {name: os.environ.pop(name, None) for name in NOTIFY_ENV}
    raw = env["NOTIFY_SOCKET"]
    if not raw:
        return Notifier()
    address = _address(raw)
    if address is None:
        logger.warning("NOTIFY_SOCKET=%s is neither a path nor an @abstract name: not notifying systemd", raw)
        return Notifier()
    watchdog: int | None = None
    usec, pid = env["WATCHDOG_USEC"], env["WATCHDOG_PID"]
    if usec and pid and pid != str(os.getpid()):
        logger.info("WATCHDOG_PID=%s is not this process (%d): no watchdog pings from here", pid, os.getpid())
    elif usec:
        if usec.isdigit() and int(usec) > 0:
            watchdog = int(usec)
        else:
            logger.warning("WATCHDOG_USEC=%s is not a number of microseconds: no watchdog pings", usec)
    pings = f"; WATCHDOG=1 every {watchdog / 2e6:g}s (WATCHDOG_USEC={watchdog})" if watchdog else ""
    logger.info("notifying systemd at %s%s", raw, pings)
    return Notifier(address, watchdog)


def activated_listeners() -> list[socket.socket] | None:
    """The listening sockets systemd passed to this process, or None: then bind as usual.

    LISTEN_* are removed from the environment in every case. Raises ActivationError when the
    variables are for this process but malformed, or a passed fd is not a listening TCP socket.
    """
    env = {name: os.environ.pop(name, None) for name in LISTEN_ENV}
    listen_pid, listen_fds = env["LISTEN_PID"], env["LISTEN_FDS"]
    if listen_pid is None:
        if listen_fds is not None:
            logger.warning("LISTEN_FDS is set without LISTEN_PID: ignored (not socket activation)")
        return None
    if not listen_pid.isdigit():
        raise ActivationError(f"socket activation: LISTEN_PID={listen_pid!r} is not a process id")
    if int(listen_pid) != os.getpid():
        logger.warning(
            "LISTEN_PID=%s is not this process (%d): the passed sockets are not ours; ignored", listen_pid, os.getpid()
        )
        return None
    if listen_fds is None:
        return None
    if not listen_fds.isdigit() or int(listen_fds) < 1:
        raise ActivationError(
            f"socket activation: LISTEN_FDS={listen_fds!r} is not a number of sockets (1 or more, "
            f"passed as fds {LISTEN_FDS_START}, {LISTEN_FDS_START + 1}, ...)"
        )
    count = int(listen_fds)
    if count > MAX_LISTENERS:
        raise ActivationError(
            f"socket activation: LISTEN_FDS={count}: pypnm serves on at most {MAX_LISTENERS} sockets "
            "(a self-upgrade hands them over in one message); list fewer ListenStream= lines"
        )
    names = (env["LISTEN_FDNAMES"] or "").split(":")
    listeners = [_listener(fd) for fd in range(LISTEN_FDS_START, LISTEN_FDS_START + count)]
    for index, sock in enumerate(listeners):
        name = names[index] if index < len(names) and names[index] else "unnamed"
        logger.info(
            "socket activation: serving fd %d (%s) on %s; the host and port settings are not used",
            sock.fileno(),
            name,
            _shown(sock),
        )
    return listeners


def _listener(fd: int) -> socket.socket:
    """fd as a socket, if it is a listening TCP socket; close-on-exec from now on."""
    where = f"socket activation: LISTEN_FDS includes fd {fd}, which"
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        raise ActivationError(
            f"{where} is not open; systemd passes its sockets from fd {LISTEN_FDS_START} on"
        ) from None
    if not stat.S_ISSOCK(mode):
        raise ActivationError(f"{where} is not a socket")
    sock = socket.socket(fileno=fd)
    try:
        kind = sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
        accepting = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError as exc:
        sock.detach()
        raise ActivationError(f"{where} cannot be queried: {exc}") from None
    problem = (
        "is not a TCP socket (pypnm serves ListenStream= on an IP address and port)"
        if sock.family not in (socket.AF_INET, socket.AF_INET6)
        else "is not a stream socket (ListenStream=, not ListenDatagram=)"
        if kind != socket.SOCK_STREAM
        else "is not listening (Accept=no and ListenStream= pass a listening socket)"
        if not accepting
        else None
    )
    if problem is not None:
        sock.detach()  # leave the fd as it was: it is systemd's
        raise ActivationError(f"{where} {problem}")
    with contextlib.suppress(OSError):
        sock.set_inheritable(False)
    return sock


def _shown(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
