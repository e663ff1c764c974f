"""The fork template: a process with the third-party stack imported, that forks workers.

Why: a fresh interpreter spends most of a worker's start importing FastAPI, pydantic
and uvicorn. This process pays that once; each worker it forks only imports the
project's own modules, from its generation's snapshot. It never imports the project's
application code, so every fork starts clean. `multiprocessing`'s forkserver does the
same job but owns its processes' lives and talks pickles; here the master needs the
workers' pids, their socketpairs and the listening sockets handed over as they are.

It talks with the master over a SEQPACKET socketpair (protocol.py, "fork template"): it
says hello once its modules are imported, then answers each spawn request, whose file
descriptors are [worker channel, listeners...], with the worker's pid or the error.
End-of-file means the master is gone: the template exits. It runs in a session of its
own (so a terminal's signals reach only the master).

Exit statuses. The workers are the template's children, so only the template can wait for
them: it reaps them and sends each one's wait status to the master (`WorkerExited`), which
names it wherever it reports a worker's end ("exit code 3", "killed by SIGKILL"). That is the
simplest way that works: the master cannot `waitpid` a grandchild, a pidfd tells it only *that*
a process ended, not how, and making the master a subreaper would give it the workers only
after the template died. The reaping is done by the template's one thread, in the loop that
answers spawn requests (SIGCHLD wakes its `select` through a wakeup pipe), not by a thread of
its own: forking while another thread may hold a lock (logging's, the channel's) could leave
a worker deadlocked. A worker that ends after its template left (a template is replaced when
packages change on disk) is reaped by init, and the master says its status is unknown. The
master still learns *that* a worker is gone from the worker's own socketpair.
It holds the master's runtime directory lock, which its workers inherit by fork; whichever
of them leaves last after the master died removes that directory (runtime.py).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import select
import signal
import socket
import sys
from pathlib import Path

from pypnm.logs import setup_logging
from pypnm.supervisor import protocol, runtime, worker
from pypnm.supervisor.protocol import Spawned, SpawnRefused, SpawnRequest, TemplateHello, WorkerExited

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


def fork_worker(channel: socket.socket, wakeup: tuple[int, int], request: SpawnRequest, fds: list[int]) -> int:
    pid = os.fork()
    if pid:
        return pid
    # The child: becomes a worker and never returns into the template's loop.
    code = 1
    try:
        channel.close()
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for fd in wakeup:
            os.close(fd)
        for fd in fds:
            os.set_inheritable(fd, False)  # SCM_RIGHTS fds arrive inheritable; the app's children must not get them
        worker_channel = socket.socket(fileno=fds[0])
        listeners = [socket.socket(fileno=fd) for fd in fds[1:]]
        code = worker.run(request.spec, worker_channel, listeners)
    except BaseException:
        logger.exception("worker failed")
    finally:
        runtime.leave()  # the last process of a dead master removes its runtime directory
        logging.shutdown()
        os._exit(code)


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


def answer_spawn_requests(channel: socket.socket) -> None:
    """Say hello, then fork a worker for each spawn request and report each exit, until the master is gone."""
    wakeup = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wakeup[1], warn_on_full_buffer=False)
    # A handler, not SIG_DFL: with SIG_DFL the signal is discarded before Python's wakeup fd sees it.
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    channel.sendall(protocol.encode_template(TemplateHello(os.getpid())))
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
            logger.info("master is gone; fork template exiting")
            return
        answer: protocol.TemplateMessage
        try:
            request = protocol.decode_template(message)
            if not isinstance(request, SpawnRequest):
                raise protocol.ProtocolError("fork template", f"expected a spawn request, got {request}")
            answer = Spawned(fork_worker(channel, wakeup, request, fds))
        except protocol.ProtocolError as exc:  # e.g. a master of another pypnm version: say so, fork nothing
            logger.error("cannot fork a worker: %s", exc)
            answer = SpawnRefused(str(exc))
        except Exception as exc:
            logger.exception("cannot fork a worker")
            answer = SpawnRefused(f"{type(exc).__name__}: {exc}")
        finally:
            for fd in fds:
                os.close(fd)
        channel.sendall(protocol.encode_template(answer))


def main() -> None:
    channel_fd, lock_fd, runtime_dir, log_level, *extra = sys.argv[1:]
    runtime.adopt(int(lock_fd), Path(runtime_dir))
    setup_logging("template", log_level)
    try:
        preload([*PRELOADED, *extra])
        answer_spawn_requests(socket.socket(fileno=int(channel_fd)))
    finally:
        runtime.leave()


if __name__ == "__main__":
    main()
