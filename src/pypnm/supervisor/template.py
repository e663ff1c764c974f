"""The fork template: a process with the third-party stack imported, that forks each generation's zygote.

Why: a fresh interpreter spends most of a worker's start importing FastAPI, pydantic
and uvicorn. This process pays that once. It never imports the project's application
code, so every fork starts clean. `multiprocessing`'s forkserver does the same job but
owns its processes' lives and talks pickles; here the master needs the workers' pids,
their socketpairs and the listening sockets handed over as they are.

Zygotes. A generation's code is imported once, by its zygote: a process the template forks
for it (`ZygoteRequest`), which puts the snapshot first on `sys.path`, imports the app (the
`--app module:attr` import), and then forks the generation's workers, which so start with
the app imported and share its pages with each other. Each worker still runs its own lifespan
startup and smoke checks after the fork: nothing that holds a connection or a thread is made
before it. The zygote lives as long as its generation serves or drains (the master closes its
channel after), and forks the respawns of its generation's workers. An incremental reload
asks the serving generation's zygote for the next one (`ZygoteRequest.drop`, reimport.py).

Standby. When the serving generation was imported incrementally, the master asks its zygote
for a standby (`StandbyRequest`), as the next reload begins or ahead of it (standby.py says
when): the next zygote, forked before the new code is known, which drops and releases what the
last reload dropped, then waits for the reload's `ZygoteRequest` and goes on from there as its
zygote (`run_standby` says why). The master closes its channel when that reload drops other
modules, and it exits.

The template and every zygote run the same loop (`serve_forks`) on a SEQPACKET socketpair
with the master (protocol.py, "fork template"): a hello (`TemplateHello`, `ZygoteReady`), then
an answer to each request, whose file descriptors are the new process's channels (a worker's:
[worker channel, listeners...]; a zygote's: [its channel]), with its pid or the error.
End-of-file means the master is gone (or, for a zygote, done with it): the process exits.
The template runs in a session of its own (so a terminal's signals reach only the master).

Exit statuses. Only a process's parent can wait for it, so each loop reaps its children and
sends each one's wait status to the master (`WorkerExited`), which names it wherever it
reports a worker's end ("exit code 3", "killed by SIGKILL"): a zygote reports its workers', the
template its zygotes'. The template is also the children's subreaper (PR_SET_CHILD_SUBREAPER):
a worker whose zygote ended first (a discarded candidate's zygote leaves at once, a zygote
killed by hand, a serving zygote after an incremental reload: the next zygote is its child)
is given to the template instead of init, and the template reports it just the same. The master
reads all of them into one table (spawner.py), so who reaped a process does not matter to it.
That is the simplest way that works: the master cannot `waitpid` a grandchild, a pidfd tells it
only *that* a process ended, not how, and making the master the subreaper would give it the
workers only after the template died. The reaping is done by the loop's one thread (SIGCHLD
wakes its `select` through a wakeup pipe), not by a thread of its own: forking while another
thread may hold a lock (logging's, the channel's) could leave a worker deadlocked. A worker that
ends after its template left (a template is replaced when packages change on disk) is reaped by
init, and the master says its status is unknown. The master still learns *that* a worker is gone
from the worker's own socketpair.

Garbage collection. What the template imported is moved to the collector's permanent
generation (`gc.freeze`) before it forks, and so is what a zygote imported, by each worker as
it starts (a freeze is a constant-time list splice): a collection in a worker would otherwise walk
every object of the app and its libraries, writing to each one's header, which copies every page
a worker shares with its zygote (memory) and takes long pauses (latency). The zygote itself does
not freeze what it imported: the next generation's zygote, forked from it for an incremental
import, collects what the modules it dropped held (reimport.release), which a frozen object never
is. When it dropped the same modules as the zygote before it (one file edited again and again),
it freezes what it kept before it imports, so that the next collection walks little more than what
it imported (reimport.py, "Freezing what is kept").

The stack. A forked process does not run its life inside the loop that forked it: `fork_for`
returns its `Child` up out of that loop, and `live` runs it from the bottom of the stack. Run
inside, a zygote forked from a zygote would keep the previous generation's frames, and with them
its app, for good, and each incremental import would add a level to the stack.

An importing zygote or standby watches no channel: the app's import runs, however long it takes,
and may hang. So until it is done (`serve_generation`) it dies with the process that forked it
(PR_SET_PDEATHSIG, `exit_with_parent`), which reads its own channel and leaves at once when the
master is gone: a SIGKILLed master takes along a zygote in the middle of an import too, instead
of leaving it to run to the import's end. Only until then: a serving zygote outlives the
previous generation's, which forked it. The one import this ends while the master lives is a
respawn's, when the zygote a generation lost is imported again from a template that a reload
replaces meanwhile (third-party packages changed): that respawn is tried again after its back-off.

It holds the master's runtime directory lock, which its zygotes and workers inherit by fork;
whichever of them leaves last after the master died removes that directory (runtime.py).
Candidates run niced until they serve (priority.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib
import logging
import os
import select
import signal
import socket
import sys
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from pypnm import metrics
from pypnm.logs import set_generation, setup_logging
from pypnm.supervisor import (
    factory_signatures,
    field_adapters,
    priority,
    protocol,
    reimport,
    route_contexts,
    runtime,
    worker,
)
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

logger = logging.getLogger("pypnm.supervisor.template")

# The stack every pypnm generation imports; `preload_modules` adds an app's own.
PRELOADED = (
    "fastapi",
    "fastapi.middleware.cors",
    "fastapi.middleware.gzip",
    "fastapi.openapi.utils",
    "fastapi.openapi.docs",  # the offline /docs and /redoc (pypnm.api.docs)
    "fastapi.staticfiles",
    "fastapi_offline",
    "pydantic",
    "pydantic_settings",
    "starlette.routing",
    "pydantic.v1",  # fastapi imports it lazily when it builds the first route
    "uvicorn",
    "uvicorn.lifespan.on",
    "uvicorn.protocols.http.auto",  # uvicorn.Config.load() imports these two in every worker
    "uvicorn.protocols.websockets.auto",
    "httptools",
    "uvloop",
    "httpx",
    "prometheus_client",  # pypnm.api.metrics; multiprocess mode: the master set PROMETHEUS_MULTIPROC_DIR for us
    "prometheus_client.multiprocess",
)


def preload(names: list[str]) -> None:
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as exc:  # a missing optional module only costs speed
            logger.warning("cannot preload %s: %s", name, exc)


# prctl(2): the signal this process gets when the thread that forked it exits (0: none).
PR_SET_PDEATHSIG = 1
# prctl(2): orphaned descendants are reparented to this process instead of init.
PR_SET_CHILD_SUBREAPER = 36


@dataclass
class Imported:
    """What a zygote has imported: its generation's spec (its snapshot) and the app object."""

    spec: WorkerSpec
    app: Any
    frozen: reimport.Frozen = reimport.NOTHING_FROZEN  # what the collector skips (reimport.py, "Freezing what is kept")
    outside: reimport.Stamps = field(default_factory=dict)  # the files of modules kept that are not the snapshot's


@dataclass
class WorkerChild:
    """A worker just forked from its zygote: the app is imported; lifespan, checks and serving are its own."""

    request: SpawnRequest
    fds: list[int]
    imported: Imported
    role = "worker"

    def run(self) -> int | Child:
        gc.freeze()  # see the module docstring, "Garbage collection"
        worker_channel = socket.socket(fileno=self.fds[0])
        listeners = [socket.socket(fileno=fd) for fd in self.fds[1:]]
        return worker.run(self.request.spec, worker_channel, listeners, self.imported.app)


@dataclass
class ZygoteChild:
    """A generation's zygote just forked: from the template (`previous` None) or the serving generation's zygote."""

    request: ZygoteRequest
    fds: list[int]
    previous: Imported | None
    parent: int  # the pid of the process that forked it (exit_with_parent)
    role = "zygote"

    def run(self) -> int | Child:
        return run_zygote(self)


@dataclass
class StandbyChild:
    """The next reload's zygote, forked ahead of it from the serving generation's zygote (`run_standby`)."""

    request: StandbyRequest
    fds: list[int]
    previous: Imported | None
    parent: int  # the pid of the process that forked it (exit_with_parent)
    role = "zygote"

    def run(self) -> int | Child:
        return run_standby(self)


Child = WorkerChild | ZygoteChild | StandbyChild


def live(child: Child) -> NoReturn:
    """Run a forked process's life, and the life of each process it forks in turn, then exit with its code.

    Called at the bottom of the stack (see the module docstring, "The stack"): a zygote's loop
    returns here, in the process it forked, with that process's `Child`.
    """
    code = 1
    try:
        while True:
            outcome = child.run()
            if isinstance(outcome, int):
                code = outcome
                break
            child = outcome
    except BaseException:
        logger.exception("%s failed", child.role)
    finally:
        runtime.leave()  # the last process of a dead master removes its runtime directory
        logging.shutdown()
        priority.leave()
        os._exit(code)


def fork_child(channel: socket.socket, wakeup: tuple[int, int], child: Child) -> int | Child:
    """Fork; the parent gets the pid, the child gets `child`, with the loop's own descriptors and signals dropped."""
    pid = os.fork()
    if pid:
        return pid
    try:
        channel.close()
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for fd in wakeup:
            os.close(fd)
        for fd in child.fds:
            os.set_inheritable(fd, False)  # SCM_RIGHTS fds arrive inheritable; the app's children must not get them
    except BaseException:  # the child must never go on with its parent's loop
        logger.exception("%s failed", child.role)
        os._exit(1)
    return child


def run_zygote(child: ZygoteChild) -> int | Child:
    """A generation's zygote: import the app (or re-import what changed since `previous`), then fork its workers."""
    request, previous = child.request, child.previous
    child.previous = None  # the previous generation's app: garbage once its modules are dropped (reimport.release)
    spec = request.spec
    channel = socket.socket(fileno=child.fds[0])
    if not exit_with_parent(child.parent):
        return 1
    os.environ.update(spec.env)  # the app may read its settings as it is imported
    setup_logging("zygote", spec.log_level)
    set_generation(spec.generation)
    if not reserve_metrics(channel, spec):
        return 1
    nice = priority.lower(request.nice)
    took = Stopwatch()
    if request.drop is None or previous is None:
        field_adapters.begin()
        route_contexts.begin()  # nothing kept: what a clean import builds, for the next generation's
        before = set(sys.modules)  # the fork template's
        try:
            app = worker.load_app(spec)
        except worker.AppLoadError as exc:
            return import_failed(channel, spec, exc)
        took.lap("import")
        outside = reimport.stamp_files(set(sys.modules) - before - reimport.project_modules(spec.packages))
        return serve_generation(channel, Imported(spec, app, outside=outside), nice, None, took)
    packages, old_snapshot = previous.spec.packages, previous.spec.snapshot_dir
    was = Was(previous)
    previous = None  # nothing here may hold the previous app while the release collects it
    kept = reimport.drop(packages, request.drop)
    reimport.move(packages, old_snapshot, spec.snapshot_dir)
    took.lap("drop")
    dropped = release(packages, was, request.drop, kept, took)
    return import_again(channel, spec, dropped, nice, took)


def run_standby(child: StandbyChild) -> int | Child:
    """Drop and release ahead of the next reload, wait for it on the channel, then go on as its zygote.

    Why: the fork, dropping the modules and collecting what they held are a sixth of an
    incremental reload of a large app (about 30 ms of 200), and none of it needs the new code,
    only which modules it replaces. The master guesses them from the last reload (the module
    edited last is the likeliest to be edited again: `Generation.drop`), forks this process
    ahead of the next reload (standby.py), and sends it that reload's `ZygoteRequest` only when
    that drops the same modules; otherwise it closes the channel and this process exits, having
    cost some CPU, niced. What is left for the reload: pointing the kept modules at the new
    snapshot (`reimport.move`), the import, the routes. While it waits, the pages its drop and
    collection wrote are its own.
    """
    request, previous = child.request, child.previous
    child.previous = None
    assert previous is not None, "a standby is forked by a zygote"
    channel = socket.socket(fileno=child.fds[0])
    if not exit_with_parent(child.parent):
        return 1
    setup_logging("zygote", previous.spec.log_level)
    nice = priority.lower(request.nice)
    took = Stopwatch()
    packages, old_snapshot = previous.spec.packages, previous.spec.snapshot_dir
    was = Was(previous)
    previous = None  # nothing here may hold the previous app while the release collects it
    kept = reimport.drop(packages, request.drop)
    took.lap("drop")
    dropped = release(packages, was, request.drop, kept, took)
    try:
        channel.sendall(protocol.encode_template(StandbyReady(os.getpid(), dict(took.laps))))
    except OSError:  # the master closed the channel meanwhile: it stops, or no longer wants this standby
        return 0
    go = wait_for_reload(channel, request)
    if go is None:
        return 0
    spec = go.spec
    os.environ.update(spec.env)
    set_generation(spec.generation)
    if not reserve_metrics(channel, spec):
        return 1
    took.restart()  # the wait is no step of the reload's
    reimport.move(packages, old_snapshot, spec.snapshot_dir)
    took.lap("paths")
    return import_again(channel, spec, dropped, nice, took)


def wait_for_reload(channel: socket.socket, request: StandbyRequest) -> ZygoteRequest | None:
    """The reload's ZygoteRequest, when it dropped what this standby did; None when the master closed the channel."""
    try:
        data = channel.recv(protocol.MAX_MESSAGE)
    except OSError:
        return None
    if not data:  # the reload dropped other modules, or was a clean one, or the master is gone
        return None
    try:
        message = protocol.decode_template(data)
    except protocol.ProtocolError as exc:
        logger.error("standby: %s", exc)
        return None
    if not isinstance(message, ZygoteRequest) or sorted(message.drop or []) != sorted(request.drop):
        reason = f"a standby that dropped {sorted(request.drop)} cannot serve {message}"
        logger.error("%s", reason)
        with contextlib.suppress(OSError):
            channel.sendall(protocol.encode_template(ZygoteFailed(reason)))
        return None
    return message


class Was:
    """What an incremental zygote needs of the previous generation's `Imported`, without holding its app.

    The app only by a weak reference: a release must be able to free it (reimport.release), and
    when it was not freed, because it outlived the drop, `import_again` must see that.
    """

    def __init__(self, previous: Imported) -> None:
        self.frozen = previous.frozen
        self.outside = previous.outside
        try:
            self.app: weakref.ref[Any] | None = weakref.ref(previous.app)
        except TypeError:  # an app object that takes no weak reference: that check is skipped
            self.app = None


@dataclass
class Dropped:
    """What an incremental zygote kept, after it dropped and released: ready to import the rest again."""

    kept: reimport.KeptSubmodules
    present: set[str]  # the project's modules still imported: what is not here after the import was imported
    frozen: reimport.Frozen
    was: Was
    names: frozenset[str]  # the modules dropped


def release(packages: list[str], was: Was, drop: list[str], kept: reimport.KeptSubmodules, took: Stopwatch) -> Dropped:
    """Collect what the dropped modules held (reimport.release); the caller holds the previous app no more."""
    present = reimport.project_modules(packages)
    frozen = was.frozen
    if drop:  # nothing dropped: nothing to free
        frozen = reimport.release(frozen, drop, present)
        took.lap("full release" if frozen.walked_all else "release")
    return Dropped(kept, present, frozen, was, frozenset(drop))


def import_again(channel: socket.socket, spec: WorkerSpec, dropped: Dropped, nice: int, took: Stopwatch) -> int | Child:
    """Import what was dropped from the new snapshot (the app's import reaches it), then serve the generation.

    Or leave the reload to a clean import (`cannot_vouch`) when a kept module's file outside the
    snapshot changed, or when the app object is the previous generation's although modules were
    dropped: it is made in a module that imports none of the changed ones, and the changed ones
    that add routes to it have added them again, behind the old ones. Or when the app still
    routes to a dropped module's previous code: the same, on a kept module's router
    (reimport.stale_endpoint).
    """
    changed = reimport.changed_file(dropped.was.outside)
    if changed is not None:
        dropped.kept.remove()
        reason = f"{changed} changed, and it is not in the app's package: its module would be kept"
        return cannot_vouch(channel, spec, reason)
    field_adapters.begin()
    route_contexts.begin()
    before = set(sys.modules)
    try:
        app = worker.find_app(spec)
    except worker.AppLoadError as exc:
        return import_failed(channel, spec, exc)
    finally:
        dropped.kept.remove()
    took.lap("import")
    if dropped.names and dropped.was.app is not None and app is dropped.was.app():
        return cannot_vouch(
            channel,
            spec,
            f"the app object ({spec.app}) is the previous generation's: the module that makes it imports none of "
            "the changed modules, so what they add to it (routes) would be added again beside the old",
        )
    stale = reimport.stale_endpoint(app, dropped.names) if dropped.names else None
    if stale is not None:
        return cannot_vouch(
            channel,
            spec,
            f"the app still routes to the previous {stale}: a module imported again added its routes to a router "
            "of a kept module, which holds the previous ones too",
        )
    project = reimport.project_modules(spec.packages)
    outside = dropped.was.outside | reimport.stamp_files(set(sys.modules) - before - project)
    reimported = len(project - dropped.present)
    return serve_generation(channel, Imported(spec, app, dropped.frozen, outside), nice, reimported, took)


def import_failed(channel: socket.socket, spec: WorkerSpec, exc: worker.AppLoadError | str) -> int:
    logger.error("generation %d cannot serve: %s", spec.generation, exc)
    channel.sendall(protocol.encode_template(ZygoteFailed(str(exc))))
    return 1


def cannot_vouch(channel: socket.socket, spec: WorkerSpec, reason: str) -> int:
    """End an incremental zygote whose import cannot be trusted; the master tries the reload clean."""
    logger.info("generation %d: not imported incrementally: %s", spec.generation, reason)
    channel.sendall(protocol.encode_template(ZygoteFailed(reason)))
    return 1


def reserve_metrics(channel: socket.socket, spec: WorkerSpec) -> bool:
    """Reserve the value files the app's metrics write as it is imported; False, said, when there is no room.

    A full file system then fails the reload here, in so many words, instead of killing the
    zygote by SIGBUS as its import writes to a metrics file (pypnm.metrics).
    """
    no_room = metrics.reserve_worker_files()
    if no_room is not None:
        import_failed(channel, spec, no_room)
    return no_room is None


def serve_generation(
    channel: socket.socket, imported: Imported, nice: int, reimported: int | None, took: Stopwatch
) -> int | Child:
    """Build the routes, say ready, and fork the generation's workers (and the next zygote) until the master is done."""
    worker.build_routes(imported.app)  # what the first request would build in each worker (worker.build_routes)
    took.lap("routes")
    adapters = field_adapters.end()  # the workers build their own (field_adapters.py)
    contexts = route_contexts.end()
    exit_with_parent(None)  # from here on its loop reads the channel (see the module docstring)
    cpu_ms = took.cpu_ms()
    ready = ZygoteReady(os.getpid(), nice, reimported, took.laps, adapters=adapters, cpu_ms=cpu_ms, contexts=contexts)
    return serve_forks(channel, ready, imported) or 0


class Stopwatch:
    """The milliseconds each step of a zygote's start took, and the CPU time it used over them, for the master's log."""

    def __init__(self) -> None:
        self.laps: dict[str, int] = {}
        self._cpu = 0.0  # seconds of CPU time in the laps
        self._last, self._last_cpu = time.perf_counter(), time.process_time()

    def cpu_ms(self) -> int:
        return round(self._cpu * 1000)

    def lap(self, step: str) -> None:
        now, now_cpu = time.perf_counter(), time.process_time()
        self.laps[step] = round((now - self._last) * 1000)
        self._cpu += now_cpu - self._last_cpu
        self._last, self._last_cpu = now, now_cpu

    def restart(self) -> None:
        """The time since the last lap belongs to no step (a standby's wait for its reload)."""
        self._last, self._last_cpu = time.perf_counter(), time.process_time()


def report_exits(channel: socket.socket, wakeup: int) -> None:
    """Reap every worker that has ended and send its wait status to the master."""
    with contextlib.suppress(BlockingIOError):
        while os.read(wakeup, 512):  # empty the wakeup pipe: one SIGCHLD may stand for many exits
            pass
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:  # no children left
            return
        if pid == 0:
            return
        with contextlib.suppress(OSError):  # the master is gone: the loop reads end-of-file next and exits
            channel.sendall(protocol.encode_template(WorkerExited(pid, status)))


def serve_forks(channel: socket.socket, hello: TemplateHello | ZygoteReady, imported: Imported | None) -> Child | None:
    """Say hello, then fork for each request and report each child's exit, until the master closes the channel.

    The template (`imported` None) forks zygotes; a zygote forks its generation's workers, and
    the next generation's zygote when asked for an incremental import. Returns None once the
    master closed the channel; in a process it forked, returns that process's `Child` (for `live`).
    """
    wakeup = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wakeup[1], warn_on_full_buffer=False)
    # A handler, not SIG_DFL: with SIG_DFL the signal is discarded before Python's wakeup fd sees it.
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    channel.sendall(protocol.encode_template(hello))
    while True:
        readable, _, _ = select.select([channel.fileno(), wakeup[0]], [], [])
        if wakeup[0] in readable:
            report_exits(channel, wakeup[0])
        if channel.fileno() not in readable:
            continue
        try:
            message, fds, _flags, _addr = socket.recv_fds(channel, protocol.MAX_MESSAGE, 32)
        except OSError:
            message, fds = b"", []
        if not message:
            logger.info(
                "master is gone; fork template exiting"
                if imported is None
                else "the master closed the channel; zygote exiting"
            )
            return None
        answer: protocol.TemplateMessage
        try:
            forked = fork_for(channel, wakeup, protocol.decode_template(message), fds, imported)
        except protocol.ProtocolError as exc:  # e.g. a master of another pypnm version: say so, fork nothing
            logger.error("cannot fork: %s", exc)
            answer = SpawnRefused(str(exc))
        except Exception as exc:
            logger.exception("cannot fork")
            answer = SpawnRefused(f"{type(exc).__name__}: {exc}")
        else:
            if not isinstance(forked, int):
                return forked  # this is the new process, and the descriptors are its own
            answer = Spawned(forked)
        for fd in fds:
            os.close(fd)
        channel.sendall(protocol.encode_template(answer))


def fork_for(
    channel: socket.socket,
    wakeup: tuple[int, int],
    request: protocol.TemplateMessage,
    fds: list[int],
    imported: Imported | None,
) -> int | Child:
    """Fork what `request` asks for: its pid, or in the child its `Child`. ProtocolError for a request not for here."""
    if isinstance(request, ZygoteRequest) and len(fds) == 1:
        return fork_child(channel, wakeup, ZygoteChild(request, fds, imported, os.getpid()))
    if isinstance(request, StandbyRequest) and imported is not None and len(fds) == 1:
        return fork_child(channel, wakeup, StandbyChild(request, fds, imported, os.getpid()))
    if isinstance(request, SpawnRequest) and imported is not None and fds:
        return fork_child(channel, wakeup, WorkerChild(request, fds, imported))
    if isinstance(request, SpawnRequest):
        raise protocol.ProtocolError("fork template", "a worker is forked by its generation's zygote, not the template")
    raise protocol.ProtocolError("fork template", f"expected a spawn or zygote request, got {request}")


def prctl(option: int, value: int) -> bool:
    """prctl(2) with one argument; False where it failed or there is none (not Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(option, value, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def wake_stopped() -> None:
    """As the template leaves, continue every process of its group: one stopped (SIGSTOP) then sees its master gone.

    Its zygotes and workers leave by themselves once they read end-of-file from the master; a
    stopped one reads nothing, and would hold the listening socket and the runtime directory
    for good. Whether the master died or only replaced this template (whose generations serve
    on) cannot be told apart here without a race (the kernel closes a dying master's channel
    before it reparents its children), and need not be: SIGCONT does nothing to a process that
    runs, and one stopped by hand would only go on serving.
    """
    with contextlib.suppress(OSError):
        os.killpg(0, signal.SIGCONT)


def become_subreaper() -> None:
    """Be given the orphans among this process's descendants (a worker whose zygote left first)."""
    if not prctl(PR_SET_CHILD_SUBREAPER, 1):  # those workers then go to init: their exit status is unknown
        logger.warning("cannot become the subreaper of the workers: some exit statuses will be unknown")


def exit_with_parent(parent: int | None) -> bool:
    """Be SIGKILLed when `parent`, which forked this process, exits (None: no longer); False if it already has.

    See the module docstring for why and until when. Where prctl is missing (not Linux), an
    importing zygote whose master died lives on until its import ends, as it did before.
    """
    prctl(PR_SET_PDEATHSIG, 0 if parent is None else signal.SIGKILL)
    return parent is None or os.getppid() == parent  # it left before the prctl: no signal will come


def main() -> None:
    channel_fd, lock_fd, runtime_dir, log_level, *extra = sys.argv[1:]
    runtime.adopt(int(lock_fd), Path(runtime_dir))
    setup_logging("template", log_level)
    try:
        # Before the preloads, which may declare pydantic models of their own.
        not_kept = factory_signatures.install()
        if not_kept is not None:
            logger.info("default factories' signatures are not kept: %s", not_kept)
        preload([*PRELOADED, *extra])
        not_reused = field_adapters.install()
        if not_reused is not None:
            logger.info("field adapters are not reused: %s", not_reused)
        not_reused = route_contexts.install()
        if not_reused is not None:
            logger.info("route contexts are not reused: %s", not_reused)
        gc.freeze()  # see the module docstring, "Garbage collection"
        become_subreaper()
        renice = priority.start()
        child = serve_forks(socket.socket(fileno=int(channel_fd)), TemplateHello(os.getpid(), renice), None)
        if child is not None:  # this is a zygote the template forked (live never returns)
            live(child)
    finally:
        wake_stopped()  # also when the loop failed: a master that died mid-request breaks the channel
        runtime.leave()


if __name__ == "__main__":
    main()
