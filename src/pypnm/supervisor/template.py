"""The fork template: a process with the third-party stack imported, that forks workers.

Why: a fresh interpreter spends most of a worker's start importing FastAPI, pydantic
and uvicorn. This process pays that once; each worker it forks only imports the
project's own modules, from its generation's snapshot. It never imports the project's
application code, so every fork starts clean. `multiprocessing`'s forkserver does the
same job but owns its processes' lives and talks pickles; here the master needs the
workers' pids, their socketpairs and the listening sockets handed over as they are.

Protocol (a Unix socketpair with the master): the master sends
`{"cmd": "spawn", "spec": {...}}` with file descriptors [worker channel, listeners...];
the template answers `{"pid": N}` (or `{"error": "..."}`). At start it sends
`{"ready": true}` once its modules are imported. End-of-file means the master is gone:
the template exits. It runs in a session of its own (so a terminal's signals reach only
the master) and lets the kernel reap its children (SIGCHLD ignored); the master learns
of a worker's exit from the worker's own socketpair. It holds the master's runtime
directory lock, which its workers inherit by fork; whichever of them leaves last after
the master died removes that directory (runtime.py).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import signal
import socket
import sys
from pathlib import Path

from pypnm.logs import setup_logging
from pypnm.supervisor import runtime, worker

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


def fork_worker(channel: socket.socket, request: dict[str, object], fds: list[int]) -> int:
    pid = os.fork()
    if pid:
        return pid
    # The child: becomes a worker and never returns into the template's loop.
    code = 1
    try:
        channel.close()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for fd in fds:
            os.set_inheritable(fd, False)  # SCM_RIGHTS fds arrive inheritable; the app's children must not get them
        spec = worker.WorkerSpec.from_json(json.dumps(request["spec"]))
        worker_channel = socket.socket(fileno=fds[0])
        listeners = [socket.socket(fileno=fd) for fd in fds[1:]]
        code = worker.run(spec, worker_channel, listeners)
    except BaseException:
        logger.exception("worker failed")
    finally:
        runtime.leave()  # the last process of a dead master removes its runtime directory
        logging.shutdown()
        os._exit(code)


def serve(channel: socket.socket) -> None:
    channel.sendall(json.dumps({"ready": True, "pid": os.getpid()}).encode() + b"\n")
    while True:
        try:
            message, fds, _flags, _addr = socket.recv_fds(channel, 65536, 32)
        except OSError:
            message, fds = b"", []
        if not message:
            logger.info("master is gone; fork template exiting")
            return
        try:
            request = json.loads(message)
            pid = fork_worker(channel, request, fds)
            answer: dict[str, object] = {"pid": pid}
        except Exception as exc:
            logger.exception("cannot fork a worker")
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            for fd in fds:
                os.close(fd)
        channel.sendall(json.dumps(answer).encode() + b"\n")


def main() -> None:
    channel_fd, lock_fd, runtime_dir, log_level, *extra = sys.argv[1:]
    runtime.adopt(int(lock_fd), Path(runtime_dir))
    setup_logging("template", log_level)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    try:
        preload([*PRELOADED, *extra])
        serve(socket.socket(fileno=int(channel_fd)))
    finally:
        runtime.leave()


if __name__ == "__main__":
    main()
