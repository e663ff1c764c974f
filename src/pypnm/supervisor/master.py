"""The master: owns the listening sockets, the generations and the reload state.

One asyncio loop handles everything that can happen to the service: signals
(SIGHUP reload, SIGTERM/SIGINT graceful stop), reload requests from the control
channel and the file watcher, and worker exits. Reloads run one at a time in
`_reloader`; requests that arrive meanwhile collapse into one follow-up, which starts
no sooner than `reload_min_interval` after the previous one, so a storm of triggers
within that interval builds at most two generations. The master never imports the application: it copies
and compiles the code (snapshot.py) and leaves importing it to the candidate workers.

At most `max_draining_generations` old generations drain at once: a swap beyond that closes
the oldest one early, and the next candidate is forked only once it is gone, so the service
never runs more than `workers * (2 + max_draining_generations)` workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import signal
import socket
import time
import uuid
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import watchfiles

from pypnm.identity import SUPERVISOR_ENV, utc_now
from pypnm.logs import set_generation, set_level, set_reload_id_source
from pypnm.settings import CONFIG_ENV, ENV_PREFIX, RESTART_ONLY, Settings, SettingsError, load_settings
from pypnm.supervisor import control
from pypnm.supervisor.config_watch import ConfigWatch, as_given
from pypnm.supervisor.generation import CLOSE_GRACE, CandidateFailed, Generation, WorkerProcess
from pypnm.supervisor.logfile import reopen_log_files
from pypnm.supervisor.metrics import MasterMetrics
from pypnm.supervisor.runtime import RuntimeDir
from pypnm.supervisor.snapshot import (
    TOKENS_FILE,
    Compiler,
    Snapshot,
    SnapshotError,
    SourceLocator,
    take_snapshot,
)
from pypnm.supervisor.spawner import ForkTemplate, SpawnError
from pypnm.supervisor.systemd import Notifier
from pypnm.supervisor.worker import WorkerSpec

logger = logging.getLogger("pypnm.supervisor.master")

DEFAULT_APP = "pypnm.main:app"
DEFAULT_CHECK_PATHS = ["/health", "/openapi.json"]
ROUTE_MODULE = "api/web_service.py"  # inside the pypnm package: the seed's "route module file"
HISTORY = 20


@dataclass
class ReloadRecord:
    """One reload, from request to outcome; what `/status` and `pypnm reload --wait` read."""

    source: str
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    requested_at: str = field(default_factory=utc_now)
    coalesced: int = 0
    generation: int | None = None
    outcome: str | None = None  # "succeeded" or "failed"
    reason: str | None = None
    warnings: list[str] = field(default_factory=list)
    started_at: str | None = None
    finished_at: str | None = None
    duration_ms: float | None = None
    validated_ms: float | None = None  # start -> candidate validated; the rest of duration_ms is the swap
    _requested_monotonic: float = field(default_factory=time.monotonic, repr=False)  # metrics hook: trigger time
    _t0: float = field(default=0.0, repr=False)
    _finished: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    def begin(self, generation: int) -> None:
        self.generation = generation
        self.started_at = utc_now()
        self._t0 = time.perf_counter()

    def validated(self) -> None:
        self.validated_ms = round((time.perf_counter() - self._t0) * 1000, 1)

    def finish(self, outcome: str, reason: str | None = None) -> None:
        self.outcome = outcome
        self.reason = reason
        self.finished_at = utc_now()
        self.duration_ms = round((time.perf_counter() - self._t0) * 1000, 1)
        self._finished.set()

    async def wait(self) -> None:
        await self._finished.wait()

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}


def _identity(directory: Path) -> tuple[int, int] | None:
    """Which directory is at a path now (device, inode); None when there is none."""
    try:
        st = directory.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def bind_listeners(host: str, port: int) -> list[socket.socket]:
    """Bind once, before anything else starts; raises OSError with the system's reason."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return [socket.create_server((host, port), family=family, backlog=2048)]


def env_value(value: Any) -> str:
    """A setting's value as pydantic-settings reads it back from an environment variable."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | dict):
        return json.dumps([str(v) for v in value] if isinstance(value, list) else value)
    return str(value)


def generation_spec(app: str, number: int, snapshot: Snapshot, settings: Settings, env: dict[str, str]) -> WorkerSpec:
    """What every worker of a generation is told: its app, snapshot, files and checks."""
    env = dict(env)
    if snapshot.config_file is not None:
        env[CONFIG_ENV] = str(snapshot.config_file)
    if TOKENS_FILE in snapshot.files:
        env[f"{ENV_PREFIX}API_TOKENS_FILE"] = str(snapshot.files[TOKENS_FILE])
    check_paths = settings.check_paths
    if check_paths is None:
        check_paths = DEFAULT_CHECK_PATHS if app == DEFAULT_APP else []
    return WorkerSpec(
        app=app,
        generation=number,
        snapshot_dir=str(snapshot.directory),
        packages=snapshot.packages,
        source_dirs=snapshot.source_dirs,
        env=env,
        check_paths=check_paths,
        log_level=settings.log_level,
        graceful_timeout=settings.graceful_timeout,
        ssl_certfile=str(settings.ssl_certfile) if settings.ssl else None,
        ssl_keyfile=str(settings.ssl_keyfile) if settings.ssl else None,
        limit_request_line_size=settings.limit_request_line_size,
        limit_request_header_size=settings.limit_request_header_size,
        timeout_request_header=settings.timeout_request_header,
        limit_concurrency=settings.limit_concurrency,
    )


class Master:
    def __init__(
        self,
        settings: Settings,
        listeners: list[socket.socket],
        *,
        app: str = DEFAULT_APP,
        config_file: Path | None = None,
        overrides: dict[str, Any] | None = None,
        watch: bool = False,
        notifier: Notifier | None = None,
    ) -> None:
        self.settings = settings
        self.systemd = notifier or Notifier()  # systemd hook: sd_notify (a no-op without NOTIFY_SOCKET)
        self.listeners = listeners
        self.app = app
        # config_watch hook: the settings file's path as given, symlinks kept, so that each reload
        # reads it through them (a path resolved once breaks when a ConfigMap update deletes its target).
        self.config_file = as_given(config_file) if config_file else None
        self.overrides = overrides or {}
        self.watch = watch
        self.locator = SourceLocator(app)
        self.sources = self.locator.find()
        self.route_file = self._route_file()
        self._watch_again: asyncio.Event | None = None  # set when the sources move: watch the new place
        self._watched: dict[Path, tuple[int, int] | None] = {}  # each watched directory's identity
        self.compiler = Compiler()
        # 0700: the control socket's access control. RuntimeDirError (one line) when it cannot be made.
        self.runtime = RuntimeDir.create(settings.runtime_dir)
        self.runtime_dir = self.runtime.path
        self.metrics = MasterMetrics.start(self.runtime_dir)  # metrics hook: before the fork template starts
        self.control_path = str(self.runtime_dir / "control.sock")
        self.template = ForkTemplate(settings.log_level, settings.preload_modules, self.runtime)
        logger.info("runtime directory %s", self.runtime_dir)

        self.serving: Generation | None = None
        self.candidate: Generation | None = None
        self.draining: set[Generation] = set()
        self._closing: set[asyncio.Task[None]] = set()  # generations being closed early (_close_early)
        self.phase: str | None = None  # "validating" or "swapping" while a reload runs
        self.started_at = utc_now()
        self.history: list[ReloadRecord] = []
        self.current: ReloadRecord | None = None
        self.pending: ReloadRecord | None = None
        self.exit_code = 0
        self.stopping = False
        self._next_generation = 1
        self._last_reload_started = -1e9
        self._reload_wanted = asyncio.Event()
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        # config_watch hook: reloads when the content of the settings file or the tokens file changes.
        self.config_watch = ConfigWatch(self.config_file, self.request_reload, always=watch)

    # ----- life -----------------------------------------------------------------------------

    def run(self) -> int:
        try:
            asyncio.run(self._main())
        except (SpawnError, TimeoutError, OSError) as exc:  # the fork template or control socket could not start
            logger.error("cannot start: %s", str(exc) or type(exc).__name__)
            self.exit_code = 1
        finally:
            self.runtime.remove()
        return self.exit_code

    async def _main(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_stop_signal, signum)
        loop.add_signal_handler(signal.SIGHUP, self.request_reload, "SIGHUP")
        self.systemd.start_watchdog()  # systemd hook: WATCHDOG=1 from this loop, so a hung loop stops them
        # Hooks for logs.py / logfile.py (issue 9.3): JSON lines carry the running reload's id; SIGUSR1
        # reopens the log file here and is passed on to the fork template and every live worker.
        set_reload_id_source(lambda: self.current.id if self.current else None)
        loop.add_signal_handler(signal.SIGUSR1, reopen_log_files, lambda: [
            self.template.pid, *(w.pid for g in self._generations() for w in g.live_workers())])
        control_server = await control.serve(self.control_path, self._on_control)
        await self.template.start()

        first = self.request_reload("start")
        self._spawn_task(self._reloader())
        self._spawn_task(self.metrics.maintain())  # metrics hook: fold dead workers' files into the archives
        waits = [asyncio.create_task(first.wait()), asyncio.create_task(self._stop.wait())]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for wait in waits:
            wait.cancel()
        if first.outcome == "failed":
            logger.error("cannot start: %s", first.reason)
            self.exit_code = 1
            self._stop.set()
        elif first.outcome == "succeeded":
            host, port = self.listeners[0].getsockname()[:2]
            scheme = "https" if self.settings.ssl else "http"
            shown = f"[{host}]" if ":" in host else host
            endpoint = "GET /pypnm/system/webService/reload, " if self.app == DEFAULT_APP else ""
            logger.info(
                "serving %s on %s://%s:%d with %d worker(s); reload: %sSIGHUP to pid %d, or touch %s",
                self.app, scheme, shown, port, self.settings.workers, endpoint, os.getpid(), self.route_file,
            )
            self._log_access()
            self._spawn_task(self._watch_files())
            self._spawn_task(self.config_watch.run(self._stop))  # config_watch hook: watch the settings files

        await self._stop.wait()
        self.systemd.stopping(self.serving.number if self.serving else None)  # systemd hook: STOPPING=1
        control_server.close()
        await self._shutdown()

    def _log_access(self) -> None:
        """Say once, at start, who may use System Operations (/pypnm/system/...)."""
        networks = self.settings.trusted_networks
        try:
            tokens = len(self.settings.tokens())
        except SettingsError as exc:
            tokens = 0
            logger.warning("%s", exc)
        logger.info(
            "System Operations (/pypnm/system/) are open to trusted_networks %s and to %d bearer token(s)",
            ", ".join(map(str, networks)) or "(none)", tokens,
        )
        try:
            loopback_host = self.settings.host == "localhost" or ipaddress.ip_address(self.settings.host).is_loopback
        except ValueError:
            loopback_host = False
        if not loopback_host and tokens == 0:
            who = (
                "no client" if not networks
                else "only loopback clients" if all(n.is_loopback for n in networks)
                else "only clients in trusted_networks"
            )
            logger.warning(
                "listening on %s, which is not loopback, with no api token configured: %s can use "
                "System Operations; set api_tokens or api_tokens_file to let other callers in",
                self.settings.host, who,
            )

    def _on_stop_signal(self, signum: int) -> None:
        if self.stopping:
            logger.warning("%s again: stopping at once", signal.Signals(signum).name)
            for generation in self._generations():
                generation.kill()
            return
        logger.info("%s: stopping gracefully", signal.Signals(signum).name)
        self.stopping = True  # before any worker's exit is seen, so none is respawned
        self._stop.set()

    async def _shutdown(self) -> None:
        self.stopping = True
        if self._watch_again is not None:
            self._watch_again.set()  # the watcher's thread ends at its next step, not at its 5 s timeout
        for task in list(self._tasks):
            task.cancel()
        for sock in self.listeners:
            sock.close()  # with the workers' copies closed too, new connections are refused
        timeout = self.settings.graceful_timeout
        await asyncio.gather(*(g.drain(timeout) for g in self._generations()))
        await self.template.stop()
        logger.info("stopped")

    def _generations(self) -> list[Generation]:
        """Every generation with live workers: candidate, serving, draining."""
        return [g for g in (self.candidate, self.serving, *self.draining) if g is not None]

    def _spawn_task(self, coroutine: Any) -> asyncio.Task[Any]:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("supervisor task failed", exc_info=task.exception())

    # ----- reloads --------------------------------------------------------------------------

    def request_reload(self, source: str) -> ReloadRecord:
        """Queue a reload, or join the one already queued; returns the record that will carry the outcome."""
        if self.pending is not None:
            self.pending.coalesced += 1
            logger.info("reload requested by %s: coalesced into queued reload %s", source, self.pending.id)
            return self.pending
        self.pending = ReloadRecord(source=source)
        logger.info("reload requested by %s: reload %s queued", source, self.pending.id)
        self._reload_wanted.set()
        return self.pending

    async def _reloader(self) -> None:
        while True:
            await self._reload_wanted.wait()
            self._reload_wanted.clear()
            while self.pending is not None:
                delay = self._last_reload_started + self.settings.reload_min_interval - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)  # triggers arriving now join self.pending
                record, self.pending = self.pending, None
                self._last_reload_started = time.monotonic()
                self.current = record
                # systemd hook: RELOADING=1 when a reload starts, never when it is queued: a SIGHUP that
                # joined this record was received before now, as Type=notify-reload needs (systemd.py).
                self.systemd.reload_started(record, self.serving.number if self.serving else None)
                try:
                    await self._reload(record)
                finally:
                    if record.outcome is None:
                        record.finish("failed", "interrupted: pypnm is stopping")
                    self.current = None
                    self.phase = None
                    self.history = [*self.history, record][-HISTORY:]
                    # systemd hook: READY=1 with the outcome (the first one, after the start, with MAINPID=)
                    self.systemd.reload_finished(record, self.serving.number if self.serving else None)
                    self.metrics.reload_finished(record)  # metrics hook: pypnm_reloads_total, duration

    @property
    def reload_state(self) -> str:
        return self.phase or ("draining" if self.draining else "idle")

    async def _reload(self, record: ReloadRecord) -> None:
        number = self._next_generation
        self._next_generation += 1
        record.begin(number)
        self.phase = "validating"
        logger.info("reload %s: building generation %d", record.id, number)
        candidate: Generation | None = None
        settings = self.settings
        try:
            await self.template.refresh_if_stale()
            self._follow_sources(await asyncio.to_thread(self.locator.find))
            snapshot = take_snapshot(
                self.sources, self.runtime_dir / f"gen-{number}", self.config_file, self.compiler
            )
            settings = self._settings_for(snapshot)
            self.config_watch.read_by_reload(snapshot, settings)  # config_watch hook: the content now known
            await self._closing_done()  # generations closed early leave before the candidate's workers are forked
            candidate = self.candidate = Generation(
                number, snapshot, self._worker_spec(number, snapshot, settings), self.settings.workers
            )
            async with asyncio.timeout(settings.reload_timeout):
                ready = await candidate.start(self.template, self.listeners)
            record.warnings = self._restart_only_changes(ready)
            record.validated()
            logger.info("reload %s: generation %d validated (code_version %s)", record.id, number,
                        snapshot.code_version)
            self.phase = "swapping"
            async with asyncio.timeout(10):
                await candidate.serve()
        except asyncio.CancelledError:
            if candidate is not None:
                candidate.kill()
            raise
        except Exception as exc:
            known = (SnapshotError, CandidateFailed, SpawnError, TimeoutError)
            if not isinstance(exc, known):
                logger.exception("reload %s: unexpected error", record.id)
            reason = str(exc) if isinstance(exc, known) else f"{type(exc).__name__}: {exc}"
            reason = reason or "timed out: the candidate was not ready within reload_timeout"
            if candidate is not None:
                candidate.kill()
                candidate.snapshot.remove()
            record.finish("failed", reason)
            serving = f"generation {self.serving.number} keeps serving" if self.serving else "nothing serves"
            logger.error("reload %s failed: generation %d discarded, %s: %s", record.id, number, serving, reason)
            return
        finally:
            self.candidate = None

        old, self.serving = self.serving, candidate
        self.settings = settings
        set_generation(number)
        if old is not None:
            self._make_room_to_drain(record)
            self.draining.add(old)  # in the same step as the swap: a stop now drains it too
            await old.stop_accepting()  # from here on only the new generation takes connections
        for warning in record.warnings:
            logger.warning("reload %s: %s", record.id, warning)
        for worker in candidate.workers:
            self._spawn_task(self._supervise(candidate, worker))
        record.finish("succeeded")
        logger.info(
            "reload %s: swapped in %.0fms: generation %d serving%s",
            record.id, record.duration_ms or 0, number, f", generation {old.number} draining" if old else "",
        )
        if old is not None:
            self._spawn_task(self._drain(old))

    async def _drain(self, generation: Generation) -> None:
        clean = await generation.drain(self.settings.graceful_timeout)
        self.draining.discard(generation)
        generation.snapshot.remove()
        if not generation.closed_early:  # _close_early says how that one ended
            logger.info("generation %d drained%s", generation.number, "" if clean else " (some workers were killed)")

    def _make_room_to_drain(self, record: ReloadRecord) -> None:
        """Close the oldest draining generations early so that one more may drain."""
        cap = self.settings.max_draining_generations
        draining = sorted((g for g in self.draining if not g.closed_early and g.live_workers()),
                          key=lambda g: g.number)
        for generation in draining[: max(len(draining) - cap + 1, 0)]:
            generation.closed_early = True  # counted out now, before its task runs
            task = self._spawn_task(self._close_early(generation, record, len(draining)))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def _close_early(self, generation: Generation, record: ReloadRecord, draining: int) -> None:
        closed = await generation.close_now()
        killed = (
            f"; killed {closed.killed} worker(s) that did not leave within {CLOSE_GRACE:g}s"
            + (f" ({closed.unreported} did not report what they had open)" if closed.unreported else "")
            if closed.killed else ""
        )
        logger.warning(
            "reload %s: generation %d stopped early (%d draining, max_draining_generations=%d): "
            "closing %d connection(s), %d request(s) still in progress%s",
            record.id, generation.number, draining, self.settings.max_draining_generations,
            closed.connections, closed.requests, killed,
        )

    async def _closing_done(self) -> None:
        """Wait until the generations being closed early are gone (close_now is bounded)."""
        if self._closing:
            await asyncio.wait(self._closing)

    def _settings_for(self, snapshot: Snapshot) -> Settings:
        """The settings a new generation runs with, as far as the master applies them itself.

        The candidate's own code is the judge of the settings file; when this (older) code
        cannot read it, the running settings stay in force here and the candidate decides.
        The tokens file is frozen into the snapshot, so a respawned worker reads the same one.
        """
        try:
            fresh = load_settings(snapshot.config_file, **self.overrides)
        except SettingsError:
            return self.settings
        if fresh.api_tokens_file is not None:
            snapshot.add_file(TOKENS_FILE, fresh.api_tokens_file)
        set_level(fresh.log_level)
        return fresh.model_copy(update={name: getattr(self.settings, name) for name in RESTART_ONLY})

    def _worker_spec(self, number: int, snapshot: Snapshot, settings: Settings) -> WorkerSpec:
        env = {f"{ENV_PREFIX}{name.upper()}": env_value(value) for name, value in self.overrides.items()}
        env[SUPERVISOR_ENV] = self.control_path
        return generation_spec(self.app, number, snapshot, settings, env)

    def _restart_only_changes(self, ready_events: list[dict[str, Any]]) -> list[str]:
        """Name each setting that the new settings change but only a restart can apply."""
        seen = next((e["restart_only"] for e in ready_events if e.get("restart_only")), None)
        if not seen:
            return []
        running = self.settings.restart_only()
        return [
            f"setting {name!r} changed ({running.get(name)!r} -> {value!r}) but needs a restart; "
            f"still using {running.get(name)!r}"
            for name, value in seen.items()
            if name in running and running[name] != value
        ]

    # ----- workers --------------------------------------------------------------------------

    def _still_serving(self, generation: Generation) -> bool:
        return not self.stopping and generation is self.serving

    async def _supervise(self, generation: Generation, worker: WorkerProcess) -> None:
        """Replace a serving worker that dies, from its own generation's snapshot.

        Each wait is followed by a check that the generation still serves: a reload may
        swap it out meanwhile, and a replacement must never outlive its generation.
        """
        failures = 0
        while True:
            # Shielded: cancelling this task (at shutdown) must not cancel the shared future, or
            # the worker would look exited and the graceful drain would not wait for it.
            await asyncio.shield(worker.exited)
            if not self._still_serving(generation):
                return
            logger.warning("worker exited pid=%d generation=%d: replacing it from the same generation",
                           worker.pid, generation.number)
            self.metrics.worker_restarted("crash")  # metrics hook: pypnm_worker_restarts_total{reason="crash"}
            with contextlib.suppress(ValueError):
                generation.workers.remove(worker)
            await asyncio.sleep(min(0.1 * 2**failures, 5.0))  # back off when it keeps dying
            if not self._still_serving(generation):
                return
            replacement: WorkerProcess | None = None
            try:
                replacement = await generation.spawn_worker(self.template, self.listeners)
                async with asyncio.timeout(self.settings.reload_timeout):
                    await replacement.ready
                    if not self._still_serving(generation):
                        replacement.signal(signal.SIGKILL)
                        return
                    replacement.command("serve")
                    await replacement.serving
            except (CandidateFailed, SpawnError, TimeoutError) as exc:
                failures += 1
                logger.error("cannot respawn a worker of generation %d: %s", generation.number,
                             str(exc) or type(exc).__name__)
                if replacement is not None:
                    replacement.signal(signal.SIGKILL)  # its exit brings us round again
                    worker = replacement
                continue
            worker, failures = replacement, 0
            logger.info("worker respawned pid=%d generation=%d", worker.pid, generation.number)

    # ----- triggers -------------------------------------------------------------------------

    async def _watch_files(self) -> None:
        """Reload when the route module file is touched, and with --reload on any watched change.

        Runs until shutdown; starts over when a reload finds the sources moved or their
        directories replaced (`_follow_sources`).
        """
        while not self.stopping:
            self._watch_again = asyncio.Event()
            dirs = [self.route_file.parent]
            if self.watch:
                dirs += [Path(p).resolve() for p in self.settings.reload_dirs] or [
                    p if p.is_dir() else p.parent for p in self.sources.values()
                ]
                # config_watch hook: the settings file is watched by self.config_watch, not here.
            self._watched = {d: _identity(d) for d in dirs}
            roots = sorted({d for d in dirs if d.is_dir()})
            logger.info("watching %s", ", ".join(map(str, roots)) or "nothing (the directories are missing)")
            if not roots:
                await self._watch_again.wait()
                continue
            async for changes in watchfiles.awatch(
                *roots, watch_filter=self._is_trigger, stop_event=self._watch_again
            ):
                first = sorted(path for _, path in changes)[0]
                self.request_reload(f"file change: {first}")

    def _follow_sources(self, sources: dict[str, Path]) -> None:
        """After a reinstall: build from where the project is now, and watch what is there now.

        pip replaces a package's directories even when it installs to the same place, and a
        watch on the old directories would see nothing any more, so those are watched anew too.
        """
        replaced = any(_identity(d) != identity for d, identity in self._watched.items())
        if sources != self.sources:
            moved = ", ".join(f"{self.sources.get(top)} -> {path}" for top, path in sources.items())
            logger.warning("the project's sources moved (reinstalled?): %s; reloads copy them from there now", moved)
            self.sources = sources
            route_file = self._route_file()
            if route_file != self.route_file:
                logger.info("the route module file is now %s", route_file)
                self.route_file = route_file
        elif not replaced:
            return
        if self._watch_again is not None:
            self._watch_again.set()

    def _route_file(self) -> Path:
        """The file whose touch triggers a reload: the seed's route module, or the module of --app."""
        return self.sources["pypnm"] / ROUTE_MODULE if self.app == DEFAULT_APP else self._module_file(self.app)

    def _is_trigger(self, change: watchfiles.Change, path: str) -> bool:
        candidate = Path(path)
        if candidate == self.route_file:  # config_watch hook: the settings file is config_watch's
            return True
        if not self.watch or (change == watchfiles.Change.deleted and candidate.suffix != ".py"):
            return False
        parts = candidate.parts
        if any(fnmatch(part, pattern) for part in parts for pattern in self.settings.reload_excludes):
            return False
        return any(fnmatch(candidate.name, pattern) for pattern in self.settings.reload_includes)

    def _module_file(self, app: str) -> Path:
        """The file of the app's module, found from its top-level source without importing anything.

        (`importlib.util.find_spec("pkg.mod")` would import `pkg` into the master.)
        """
        top, *rest = app.partition(":")[0].split(".")
        path = self.sources[top]
        if not rest:
            return path / "__init__.py" if path.is_dir() else path
        module = path.joinpath(*rest)
        return module / "__init__.py" if module.is_dir() else module.with_suffix(".py")

    # ----- status ---------------------------------------------------------------------------

    async def _on_control(self, request: dict[str, Any]) -> dict[str, Any]:
        command = request.get("cmd")
        if command == "reload":
            if self.stopping:
                return {"error": "the service is stopping"}
            source = str(request.get("source", "control"))
            if request.get("request_id"):
                source += f" (request {request['request_id']})"  # ties the master's log to the access log
            late = control.expired_by(request)
            if late is not None:
                # The caller has already answered its client "not started" (the master was not
                # answering, e.g. stopped); starting it now would make a retry reload twice.
                logger.warning("reload requested by %s dropped: its caller gave up (read %.1fs after its "
                               "deadline; the master was not answering); nothing was started", source, late)
                return {"error": "the request expired before the supervisor read it; nothing was started"}
            return {"reload_id": self.request_reload(source).id}
        if command == "status":
            return self.status()
        return {"error": f"unknown command {command!r}"}

    def status(self) -> dict[str, Any]:
        records = [*self.history, *([self.current] if self.current else [])]
        workers = [
            worker.describe(generation.code_version)
            for generation in self._generations()
            for worker in generation.live_workers()
        ]
        return {
            "generation": self.serving.number if self.serving else None,
            "generation_code_version": self.serving.code_version if self.serving else None,
            "workers": workers,
            "reload_state": self.reload_state,
            "last_reload": self.history[-1].as_dict() if self.history else None,
            "pending_reload": self.pending.id if self.pending else None,
            "reloads": [r.as_dict() for r in reversed(records)],
            "master": {
                "pid": os.getpid(),
                "started_at": self.started_at,
                "app": self.app,
                "route_module_file": str(self.route_file),
                "watching_source": self.watch,
                "watching_config": self.config_watch.watched(),  # config_watch hook
                "template_pid": self.template.pid,
            },
        }
