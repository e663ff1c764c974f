"""One worker: a uvicorn server that proves its generation's code works before it accepts.

The order is what makes a reload safe: the app is imported from the generation's snapshot
(by the generation's zygote, which forks the worker after: template.py), then the worker
runs lifespan startup, answers smoke requests in-process, tells the master "ready", and
only when the master says so (StartAccepting) starts accepting on the inherited listening socket.
uvicorn's own `Server.startup` would accept right after lifespan startup, so
`GenerationServer` replaces that one step and keeps the rest of uvicorn (main loop,
signals, graceful shutdown).

Draining is uvicorn's graceful shutdown with one change (`DrainingHttpToolsProtocol`):
uvicorn closes idle keep-alive connections at once, which races with a client that is
just sending its next request on them, and drops connections accepted but not yet
read. Here such a connection may still deliver one request, answered with
`Connection: close`, and is closed only after it has stayed idle for a grace period.
A draining worker told to close (its generation is over `max_draining_generations`)
reports what it still has open, cuts it, and leaves without waiting for it.
The size and time limits on request heads come from `LimitedHttpToolsProtocol`.
The worker answers the master's heartbeats from its event loop, so a handler that blocks
the loop is seen by the master, which replaces the worker (`worker_timeout`, lifecycle.py).
With `limit_max_requests` it counts its requests (uvicorn's own count, checked on uvicorn's
tick) and tells the master once it is past its limit: the master recycles it, replacement
first. uvicorn's own `limit_max_requests` is not used: it makes the worker exit by itself,
before anything replaces it.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import random
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.server import ServerState

from pypnm import metrics
from pypnm.identity import WORKER_STATE_KEY
from pypnm.logs import set_generation, setup_logging
from pypnm.supervisor import priority, protocol, runtime, warmup
from pypnm.supervisor.http_limits import HeadLimits, LimitedHttpToolsProtocol
from pypnm.supervisor.protocol import (
    Close,
    Heartbeat,
    HeartbeatAnswer,
    StartAccepting,
    StopAccepting,
    WorkerAccepting,
    WorkerClosing,
    WorkerCommand,
    WorkerEvent,
    WorkerFailed,
    WorkerLimitReached,
    WorkerReady,
    WorkerSpec,
    WorkerStoppedAccepting,
)
from pypnm.supervisor.timeouts import CHECK_REQUEST, CLOSE_REQUEST_GRACE, IDLE_DRAIN_GRACE, ORPHAN_GRACE

logger = logging.getLogger("pypnm.supervisor.worker")

# uvicorn's main loop sleeps this long between ticks (uvicorn.Server.main_loop).
TICK = 0.1


class AppLoadError(Exception):
    """The app cannot be imported or configured in this worker; the message is the one-line reason.

    The worker reports it to the master as WorkerFailed, which the master turns into its own
    CandidateFailed (generation.py) and records as the reload's reason.
    """


def describe_exception(exc: BaseException, spec: WorkerSpec) -> str:
    """A one-line reason: type and message, plus file and line where the error points at code."""
    if isinstance(exc, SystemExit) and exc.__context__ is not None:
        # pypnm.main turns a settings error into SystemExit(2); its message already says where.
        text = f"{type(exc.__context__).__name__}: {exc.__context__}"
    elif isinstance(exc, SyntaxError):
        where = f" ({exc.filename}, line {exc.lineno})" if exc.filename else ""
        text = f"{type(exc).__name__}: {exc.msg}{where}"
    else:
        text = f"{type(exc).__name__}: {exc}"
        frames = traceback.extract_tb(exc.__traceback__)
        ours = [f for f in frames if f.filename.startswith(spec.snapshot_dir)]
        if ours:
            text += f" ({ours[-1].filename}, line {ours[-1].lineno})"
    for snapshot_path, source_path in spec.source_dirs.items():
        text = text.replace(snapshot_path, source_path)
    return text


def load_app(spec: WorkerSpec) -> Any:
    """Import the app from the generation's snapshot, never from modules already in memory.

    The fork template imported third-party modules only; the project's own packages
    are dropped from `sys.modules` and found again first on `sys.path`, in the snapshot.
    """
    for name in list(sys.modules):
        if any(name == top or name.startswith(top + ".") for top in spec.packages):
            del sys.modules[name]
    sys.path.insert(0, spec.snapshot_dir)
    importlib.invalidate_caches()
    return find_app(spec)


def build_routes(app: Any) -> None:
    """Match a request that names no route against each of the app's routes, so that routing
    state a framework builds at its first request is built here, once, by the zygote.

    FastAPI builds each included route's effective context (dependencies, limits, middleware)
    the first time a request is matched against it: for an app of hundreds of routes that is
    ~0.1 s of CPU in every worker's first request, after it accepts, while new connections
    wait (the reload's slowest requests). Built in the zygote before it forks, it is done once
    per generation, before the workers accept, and shared with them. Only `matches`, which a
    route answers from the request's path and method, is called: no handler, middleware or
    lifespan runs, no event loop, thread or connection is made. An app without a Starlette-style
    `router.routes` list is left alone, and a route that cannot be matched this way ends it
    quietly: the first request then builds the rest, as it would have anyway.
    Each worker walks the routes once more before it accepts (`GenerationServer._warm_up`):
    there it builds nothing, it takes the page copies the walk causes after the fork.
    """
    routes = getattr(getattr(app, "router", None), "routes", None)
    if not isinstance(routes, list):
        return
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/.pypnm-zygote-matches-no-route",
        "raw_path": b"/.pypnm-zygote-matches-no-route",
        "root_path": "",
        "query_string": b"",
        "headers": [],
        "server": ("127.0.0.1", 0),
        "client": ("127.0.0.1", 0),
    }
    try:
        for route in routes:
            route.matches(dict(scope))
    except Exception as exc:  # a route of its own kind that wants more of a request: the first request builds it
        logger.debug("routes not all matched in advance: %s: %s", type(exc).__name__, exc)


def find_app(spec: WorkerSpec) -> Any:
    """The `--app module:attr` object, importing its module if it is not imported yet (AppLoadError if it fails)."""
    module_name, _, attr = spec.app.partition(":")
    try:
        module = importlib.import_module(module_name)
        app = module
        for part in (attr or "app").split("."):
            app = getattr(app, part)
    except BaseException as exc:
        raise AppLoadError(describe_exception(exc, spec)) from exc
    return app


async def call_in_process(app: Any, path: str, state: dict[str, Any]) -> tuple[int, bytes]:
    """Send one GET through the ASGI app without a socket, with the lifespan state a real request gets.

    Written here rather than using httpx's ASGITransport because that transport does
    not pass the lifespan `state`, so an app that keeps resources there would fail.
    """
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"localhost"), (b"user-agent", b"pypnm-reload-check")],
        "client": ("127.0.0.1", 0),
        "server": ("127.0.0.1", 0),
        "state": dict(state),
    }
    status = 0
    body = bytearray()
    request_sent = False

    async def receive() -> dict[str, Any]:
        nonlocal request_sent
        if not request_sent:
            request_sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.Event().wait()  # never disconnects while the app answers
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            body.extend(message.get("body", b""))

    await app(scope, receive, send)
    return status, bytes(body)


class DrainingHttpToolsProtocol(LimitedHttpToolsProtocol):
    """uvicorn's httptools protocol, with a shutdown that lets idle connections finish cleanly."""

    draining = False

    def shutdown(self) -> None:
        if self.draining:  # told at StopAccepting already; uvicorn's own shutdown tells it again
            return
        self.draining = True
        if self.cycle is None or self.cycle.response_complete:
            self.loop.call_later(IDLE_DRAIN_GRACE, self._close_if_idle)
        else:
            self.cycle.keep_alive = False

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        if self.draining and self.cycle is not None:
            self.cycle.keep_alive = False  # answer with Connection: close, then close

    def _close_if_idle(self) -> None:
        if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
            self.transport.close()


class MasterChannel:
    """The worker's end of its socketpair with the master.

    A thread reads it, so that the master's death is noticed even while the event loop
    is busy: on end-of-file the worker starts a graceful exit and leaves after ORPHAN_GRACE.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.setblocking(True)
        self._lock = threading.Lock()

    def send(self, event: WorkerEvent) -> None:
        with self._lock:
            self.sock.sendall(protocol.encode_worker(event))

    def start(self, on_command: Callable[[WorkerCommand], object], on_master_gone: Callable[[], object]) -> None:
        threading.Thread(target=self._read, args=(on_command, on_master_gone), daemon=True).start()

    def _read(self, on_command: Callable[[WorkerCommand], object], on_master_gone: Callable[[], object]) -> None:
        buffer = b""
        while True:
            try:
                chunk = self.sock.recv(4096)
            except OSError:
                chunk = b""
            if not chunk:
                break
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                try:
                    message = protocol.decode_worker(line)
                except protocol.ProtocolError as exc:  # e.g. a master of another pypnm version
                    logger.error("ignoring a message from the master: %s", exc)
                    continue
                if isinstance(message, StartAccepting | StopAccepting | Close | Heartbeat):
                    on_command(message)
        logger.warning("master is gone; leaving within %.1fs", ORPHAN_GRACE)
        on_master_gone()
        time.sleep(ORPHAN_GRACE)
        runtime.leave()  # the last process of a dead master removes its runtime directory
        os._exit(1)


class GenerationServer(uvicorn.Server):
    """A uvicorn server whose startup validates, reports, and waits for the master's go."""

    def __init__(self, config: uvicorn.Config, app: Any, spec: WorkerSpec, channel: MasterChannel | None) -> None:
        super().__init__(config)
        self.app = app  # as the project built it, before uvicorn wraps it
        self.spec = spec
        self.channel = channel
        self.failure: str | None = None
        self._go = asyncio.Event()
        # Read by the app's /health and /ready through the lifespan state (see pypnm.identity).
        self.worker_state: dict[str, Any] = {"generation": spec.generation, "stopping": False}
        self.head_limits = HeadLimits(
            spec.limit_request_line_size, spec.limit_request_header_size, spec.timeout_request_header
        )
        # This worker's own limit: the jitter is drawn here, after the fork (which reseeds `random`),
        # so that the workers of a generation, started together, are not recycled together.
        self.request_limit = (
            spec.limit_max_requests + random.randint(0, spec.limit_max_requests_jitter)
            if spec.limit_max_requests > 0
            else 0
        )
        self._limit_reported = False

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        loop = asyncio.get_running_loop()
        if self.channel is not None:
            self.channel.start(
                on_command=lambda command: loop.call_soon_threadsafe(self._on_command, command),
                on_master_gone=lambda: loop.call_soon_threadsafe(self._on_master_gone),
            )
        self.lifespan.state[WORKER_STATE_KEY] = self.worker_state
        self.failure = await self.validate()
        if self.failure is not None:
            self._report(WorkerFailed(self.failure))
            self.should_exit = True
            return
        if self.channel is not None:
            await self._warm_up()
        self._report(WorkerReady(self._restart_only_settings(), heartbeat=True))
        if self.channel is None:
            self.should_exit = True  # `pypnm check`: validated, nothing to serve
            await self.lifespan.shutdown()
            return
        await self._go.wait()
        if self.should_exit:
            await self.lifespan.shutdown()
            return

        # Validated at the candidates' lower priority; serves at the normal one, from its first connection on.
        priority.restore()
        # A TLS handshake comes before the protocol sees the connection, so before the head's clock
        # (http_limits) starts: it gets the same time of its own, instead of asyncio's 60 s.
        handshake = self.head_limits.timeout if self.config.ssl else None
        self.servers = [
            await loop.create_server(
                lambda: self._protocol(self.server_state),
                sock=sock,
                ssl=self.config.ssl,
                backlog=self.config.backlog,
                ssl_handshake_timeout=handshake,
            )
            for sock in sockets or []
        ]
        self.started = True
        self._report(WorkerAccepting())
        logger.info("generation %d worker serving", self.spec.generation)

    def _protocol(self, server_state: ServerState) -> DrainingHttpToolsProtocol:
        """One connection's protocol; `server_state` is where it counts itself (the server's, or the warm-up's own)."""
        return DrainingHttpToolsProtocol(
            config=self.config, server_state=server_state, app_state=self.lifespan.state, limits=self.head_limits
        )

    async def _warm_up(self) -> None:
        """Pay a forked worker's first-request costs before it is ready, still niced (warmup.py says why).

        Two steps, neither of which runs the app's handlers or middleware: the route walk
        (`build_routes` again: in the worker it builds nothing, it takes the copies of the
        routing table's pages that every client request would otherwise take) and one request
        through this worker's own HTTP stack, with its own ServerState so that it is not one
        of the worker's (no request count, no open connection). A warm-up that fails costs
        only its speed-up, so it is logged, not fatal: the smoke requests decided whether the
        code can serve.
        """
        started = time.perf_counter()
        build_routes(self.app)  # the route walk of every request: its pages are copied here, not in a client's
        try:
            status = await warmup.warm_up(lambda: self._protocol(ServerState()), CHECK_REQUEST)
        except (OSError, TimeoutError) as exc:
            logger.warning("warm-up request failed: %s: %s", type(exc).__name__, exc)
            return
        if status != 200:
            logger.warning("warm-up request answered %d", status)
            return
        logger.debug("warmed up before accepting in %.1fms", (time.perf_counter() - started) * 1000)

    async def validate(self) -> str | None:
        """Lifespan startup and smoke requests; the reason it cannot serve, or None."""
        errors = _LastError()
        logging.getLogger("uvicorn.error").addHandler(errors)
        try:
            await self.lifespan.startup()
        finally:
            logging.getLogger("uvicorn.error").removeHandler(errors)
        if self.lifespan.should_exit:
            return f"lifespan startup failed: {errors.text or 'see the worker log'}"
        for path in self.spec.check_paths:
            try:
                status, _ = await asyncio.wait_for(
                    call_in_process(self.config.loaded_app, path, self.lifespan.state), CHECK_REQUEST
                )
            except Exception as exc:
                reason = f"check GET {path} raised {describe_exception(exc, self.spec)}"
            else:
                if 200 <= status < 300:
                    continue
                reason = f"check GET {path} answered {status}"
            await self.lifespan.shutdown()
            return reason
        return None

    def _restart_only_settings(self) -> dict[str, Any] | None:
        """The new code's view of the settings only a restart applies, when the app exposes them."""
        settings = getattr(getattr(self.app, "state", None), "settings", None)
        restart_only = getattr(settings, "restart_only", None)
        return restart_only() if callable(restart_only) else None

    async def main_loop(self) -> None:
        """uvicorn's loop of 0.1 s ticks, begun at a random point of the first tick.

        Why: a worker leaves at the first tick after it is told to (or its drain is done), and the
        workers of a generation start their loops together, at the swap: their ticks, and so
        their exits, would coincide. A drained generation's workers then tore down their memory
        in the kernel all at once, and the serving workers' requests at that moment were the
        slowest of a reload (the large app, 4 workers on 2 cores: window p99 1.36-1.42x steady
        with the phases spread, 1.47-1.80x without, in alternating runs).
        """
        await asyncio.sleep(random.uniform(0, TICK))
        await super().main_loop()

    async def on_tick(self, counter: int) -> bool:
        """uvicorn's tick (every 0.1 s): also tells the master, once, that this worker is past its request limit."""
        served = self.server_state.total_requests
        if self.request_limit and not self._limit_reported and served >= self.request_limit:
            self._limit_reported = True
            self._report(WorkerLimitReached(served, self.request_limit))
        return await super().on_tick(counter)

    def _report(self, event: WorkerEvent) -> None:
        if self.channel is not None:
            self.channel.send(event)

    def _on_command(self, command: WorkerCommand) -> None:
        """Run by the event loop (the channel's thread only hands commands over): so a Heartbeat
        answered here proves the loop runs, and a loop blocked by a handler goes unanswered."""
        if isinstance(command, Heartbeat):
            self._report(HeartbeatAnswer())
        elif isinstance(command, StartAccepting):
            self._go.set()
        elif isinstance(command, StopAccepting):
            # Stop accepting now, not at uvicorn's next tick, and say so: the master records
            # the swap as done only when no old worker takes new connections any more.
            for server in getattr(self, "servers", []):
                server.close()
            # And drain now: uvicorn would start only at its next tick (up to 0.1 s later), and a
            # keep-alive connection would meanwhile get old-code answers and be kept open for more.
            for connection in list(self.server_state.connections):
                connection.shutdown()
            self.worker_state["stopping"] = True
            self.should_exit = True
            self._go.set()
            self._report(WorkerStoppedAccepting())
        elif isinstance(command, Close):
            self._close_now()

    def _close_now(self) -> None:
        """End a draining worker now: too many generations drain (max_draining_generations).

        Reports first how many connections and requests it still had (the master logs them),
        then aborts those connections; requests that do not end on the disconnect are cancelled
        after CLOSE_REQUEST_GRACE. uvicorn's graceful shutdown then finds nothing left to wait
        for, and the app's lifespan shutdown still runs. Aborting rather than closing: a client
        that stopped reading must not hold the exit up.
        """
        connections = list(self.server_state.connections)
        requests = [task for task in self.server_state.tasks if not task.done()]
        self._report(WorkerClosing(len(connections), len(requests)))
        for server in getattr(self, "servers", []):
            server.close()
        for connection in connections:
            connection.transport.abort()
        asyncio.get_running_loop().call_later(CLOSE_REQUEST_GRACE, self._cancel_requests)
        self.should_exit = True
        self._go.set()

    def _cancel_requests(self) -> None:
        tasks = list(self.server_state.tasks)
        if tasks:
            logging.getLogger("uvicorn.error").addFilter(_CancelledRequest())
        for task in tasks:
            task.cancel()

    def _on_master_gone(self) -> None:
        self.worker_state["stopping"] = True
        self.should_exit = True
        self._go.set()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """SIGTERM/SIGINT straight to the worker: /ready says so while uvicorn shuts down."""
        self.worker_state["stopping"] = True
        super().handle_exit(sig, frame)


class _CancelledRequest(logging.Filter):
    """uvicorn logs a cancelled request with its whole traceback; after a "close" one line says it all."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], asyncio.CancelledError):
            record.msg, record.args, record.exc_info = (
                "request cancelled: its connection was closed (generation stopped early) and it did not end "
                "within %.1fs",
                (CLOSE_REQUEST_GRACE,),
                None,
            )
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


class _LastError(logging.Handler):
    """Keeps the error uvicorn logs during lifespan startup, to use as the reload's reason.

    uvicorn logs the app's exception (with exc_info, or as the traceback text that Starlette
    sends in `lifespan.startup.failed`), then "Application startup failed. Exiting."; the
    exception is the reason, so a plain line replaces only another plain line.
    """

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.text = ""
        self._from_exception = False

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            self.text = f"{type(exc).__name__}: {exc}"
            self._from_exception = True
        elif record.getMessage().startswith("Traceback (most recent call last)"):
            lines = [line for line in record.getMessage().splitlines() if line.strip()]
            self.text = lines[-1].strip()  # "RuntimeError: no database"
            self._from_exception = True
        elif not self._from_exception:
            self.text = record.getMessage()


def make_server(spec: WorkerSpec, channel: MasterChannel | None, app: Any = None) -> GenerationServer:
    """Wrap the app in a GenerationServer, loading it first unless given (raises AppLoadError)."""
    if app is None:
        app = load_app(spec)
    config = uvicorn.Config(
        app,
        lifespan="on",
        http=DrainingHttpToolsProtocol,
        log_config=None,
        access_log=False,  # pypnm's own middleware writes the request line
        proxy_headers=False,  # the client address is decided by pypnm's trusted-proxy setting
        timeout_graceful_shutdown=spec.drain_seconds(),
        # uvicorn answers 503 once the open connections, the requesting one included, reach its
        # limit; one more makes limit_concurrency the number of connections that are served.
        limit_concurrency=spec.limit_concurrency + 1,
        ssl_certfile=spec.ssl_certfile,
        ssl_keyfile=spec.ssl_keyfile,
        log_level=spec.log_level if spec.log_level != "trace" else "debug",
    )
    try:
        config.load()
    except BaseException as exc:
        raise AppLoadError(describe_exception(exc, spec)) from exc
    return GenerationServer(config, app, spec, channel)


def run(spec: WorkerSpec, channel_sock: socket.socket, listeners: list[socket.socket], app: Any) -> int:
    """The worker's whole life, from its fork off the generation's zygote (`app` imported there) to exit."""
    os.environ.update(spec.env)
    setup_logging("worker", spec.log_level)
    set_generation(spec.generation)
    channel = MasterChannel(channel_sock)
    no_room = metrics.reserve_worker_files(route_methods(app))
    if no_room is not None:  # a full file system: refused here, not killed by SIGBUS at a request (pypnm.metrics)
        return refuse(spec, channel, no_room)
    try:
        server = make_server(spec, channel, app)
    except AppLoadError as exc:
        return refuse(spec, channel, str(exc))
    server.run(sockets=listeners)
    return 1 if server.failure else 0


def route_methods(app: Any) -> int:
    """How many (method, path) pairs the app's routes serve, and a few more: what request metrics are labelled by.

    As far as `app.routes` shows them: FastAPI keeps a router it includes behind one entry there,
    with no public way to list its routes (pypnm.api.metrics reads the OpenAPI document instead,
    too costly at a worker's start), so such a router counts as one route.
    """
    routes = getattr(app, "routes", None) or []
    return 4 + sum(len(getattr(route, "methods", None) or ()) or 1 for route in routes)


def refuse(spec: WorkerSpec, channel: MasterChannel, reason: str) -> int:
    logger.error("generation %d cannot serve: %s", spec.generation, reason)
    channel.send(WorkerFailed(reason))
    return 1


def check(spec: WorkerSpec) -> str | None:
    """Validate a generation in this process exactly as a candidate worker does; the reason or None."""
    os.environ.update(spec.env)
    try:
        server = make_server(spec, None)
    except AppLoadError as exc:
        return str(exc)
    server.run(sockets=[])
    return server.failure
