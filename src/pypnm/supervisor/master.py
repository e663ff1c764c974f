"""The master: the conductor of one pypnm service. It owns the listening sockets and runs reloads.

One asyncio loop handles everything that can happen to the service. A reload, top to bottom:

    trigger  signals, file changes or the control channel (triggers.py), settings files' content (config_watch.py)
    queue    coalesced into one running and one queued reload (reloads.py)
    build    snapshot of the code and settings file, the spec its workers run (snapshot.py, build.py)
    validate the candidate generation is brought up and checked (lifecycle.py, generation.py)
    swap     it accepts, the master applies its settings, the old generation stops accepting
    drain    the old generation finishes its requests and leaves
    record   the outcome, in the reload's record; /status shows it (status.py), systemd hears it (systemd.py)
    watch    the new generation for `rollback_window`; rolled back to the kept snapshot if it crashes (rollback.py)

A self-upgrade (SIGUSR2, the control channel) hands the whole service to a new master in a fresh
interpreter (upgrade.py): this one only starts it (`upgrades`), and stops once it serves; a master
started that way (`successor`) takes its sockets and tells the old one when its first generation serves.

The master never imports the application: it copies and compiles the code (and, for an
incremental import, reads its import graph: import_graph.py) and leaves importing it to the
candidate's zygote, which forks the workers (template.py), so it can always load new code. The protocol its
processes speak is in protocol.py; every fixed timeout in timeouts.py.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pypnm.identity import utc_now
from pypnm.logs import set_generation, set_level, set_reload_id_source
from pypnm.profile import runtime_profile
from pypnm.settings import Settings, setting_source
from pypnm.supervisor import build, control, priority, status
from pypnm.supervisor.build import DEFAULT_APP
from pypnm.supervisor.config_watch import ConfigWatch, as_given
from pypnm.supervisor.generation import CandidateFailed, Generation
from pypnm.supervisor.import_graph import CodeScan, ImportScanner
from pypnm.supervisor.lifecycle import Generations
from pypnm.supervisor.metrics import MasterMetrics
from pypnm.supervisor.next_snapshot import NextSnapshot
from pypnm.supervisor.reloads import ReloadOutcome, ReloadQueue, ReloadRecord
from pypnm.supervisor.rollback import KnownGood, Rollback
from pypnm.supervisor.runtime import RuntimeDir, RuntimeDirError
from pypnm.supervisor.snapshot import Compiler, Snapshot, SnapshotError, SourceLocator, take_snapshot
from pypnm.supervisor.spawner import ForkTemplate, SpawnError
from pypnm.supervisor.systemd import Notifier
from pypnm.supervisor.tls import TLSError
from pypnm.supervisor.triggers import FileWatch, control_handler, install_signals
from pypnm.supervisor.upgrade import PidFile, PidFileError, Successor, UpgradeRefused, Upgrades

logger = logging.getLogger("pypnm.supervisor.master")


class Master:
    """Holds the units together and conducts each reload (`_reload`); the state lives in the units.

    `queue` (reloads), `generations` (which serves, which drain), `files` (the watch and where the
    sources are), `config_watch` (the settings files' content), `template` (the fork template),
    `systemd` (sd_notify), `metrics` (the master's counters), `settings` (the serving generation's),
    `rollback` (the watch after a swap, and the snapshot kept for it).
    """

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
        command: list[str] | None = None,
        activated: bool = False,
        successor: Successor | None = None,
    ) -> None:
        self.settings = settings  # the serving generation's, as far as the master applies them
        self.systemd = notifier or Notifier()  # a no-op without NOTIFY_SOCKET
        self.listeners = listeners
        self.app = app
        self.config_file = as_given(config_file) if config_file else None  # symlinks kept: see config_watch.py
        self.overrides = overrides or {}
        self.locator = SourceLocator(app)
        self.compiler = Compiler()
        self.pid_file = PidFile()
        if successor is None:  # PidFileError (one line); a new master of an upgrade writes it once it took over
            self._write_pid_file(self.settings.pid_file)
        self.imports = ImportScanner()  # the snapshots' import graphs, for incremental imports
        # 0700: the control socket's access control. RuntimeDirError (one line) when it cannot be made.
        try:
            self.runtime = RuntimeDir.create(settings.runtime_dir)
        except RuntimeDirError:
            self.pid_file.remove()
            raise
        self.metrics = MasterMetrics.start(self.runtime.path)  # before the fork template starts: it inherits the dir
        self.control_path = str(self.runtime.path / "control.sock")
        self.next_snapshot = NextSnapshot(self.runtime.path)  # the next reload's links, made ahead
        self.template = ForkTemplate(settings.log_level, settings.preload_modules, self.runtime)
        logger.info("runtime directory %s", self.runtime.path)

        self.queue = ReloadQueue(lambda: self.settings.reload_min_interval)
        self.generations = Generations(
            self.template,
            listeners,
            lambda: self.settings,
            lambda: self.stopping,
            self._spawn_task,
            worker_restarted=self.metrics.worker_restarted,
            worker_failed=lambda generation, ended: self.rollback.worker_failed(generation, ended),
            kept=lambda: self.rollback.kept(),
            standby_ahead=lambda: (self.settings.reload_standby or ("ahead" if watch else "at_reload")) == "ahead",
        )
        self.rollback = Rollback(self.queue, self.generations, lambda: self.settings, self._spawn_task)
        self.files = FileWatch(app, self.locator.find(), watch, lambda: self.settings, self.queue.request)
        self.config_watch = ConfigWatch(self.config_file, self.queue.request, always=watch)
        self.successor = successor  # the handover this master was started for, if any
        self.upgrades = Upgrades(
            command or [],
            listeners,
            lambda: self.settings,
            self.systemd,
            activated=activated,
            serving=self.generations.serving_number,
            numbered=lambda: self._next_generation - 1,
            reloads=self.queue,
            on_handed_over=self._handed_over,
            spawn_task=self._spawn_task,
        )
        self.upgrades.last = successor.record if successor else None
        self.started_at = utc_now()
        self.exit_code = 0
        self.stopping = False
        self._next_generation = successor.offer.generation + 1 if successor else 1  # rising across upgrades
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        # runtime_profile's answer, and the settings and serving generation it was built for.
        self._profile: tuple[Settings, Generation | None, dict[str, Any]] | None = None

    # ----- life -----------------------------------------------------------------------------

    def run(self) -> int:
        try:
            asyncio.run(self._main())
        except (SpawnError, TimeoutError, OSError) as exc:  # the fork template or control socket could not start
            logger.error("cannot start: %s", str(exc) or type(exc).__name__)
            if self.successor:
                self.successor.failed(f"the new master cannot start: {str(exc) or type(exc).__name__}")
            self.exit_code = 1
        finally:
            self.pid_file.remove()
            self.runtime.remove()
        return self.exit_code

    async def _main(self) -> None:
        # The master's threads do background file work beside the serving workers: niced (priority.py).
        background = ThreadPoolExecutor(thread_name_prefix="pypnm-master", initializer=priority.lower_this_thread)
        asyncio.get_running_loop().set_default_executor(background)  # asyncio.run shuts it down at the end
        install_signals(
            self.queue.request, self._on_stop_signal, log_writers=self.generations.child_pids, on_upgrade=self._upgrade
        )
        self.systemd.start_watchdog()  # WATCHDOG=1 from this loop: a hung loop stops the pings
        set_reload_id_source(self.queue.current_id)  # the master's JSON lines carry the running reload's id
        handler = control_handler(self.queue, lambda: self.stopping, self.status, self.upgrades.request)
        control_server = await control.listen(self.control_path, handler)
        await self.template.start()

        first = self.queue.request("start")
        serving = self.generations.serving_number  # systemd: RELOADING=1 as each reload starts, READY=1 as it ends
        self._spawn_task(
            self.queue.run(
                self._reload,
                on_start=[lambda r: self.systemd.reload_started(r, serving())],
                on_finish=[lambda r: self.systemd.reload_finished(r, serving()), self.metrics.reload_finished],
            )
        )
        self._spawn_task(self.metrics.maintain())  # folds dead workers' metrics files into the archives
        waits = [asyncio.create_task(first.wait()), asyncio.create_task(self._stop.wait())]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for wait in waits:
            wait.cancel()
        if first.outcome == ReloadOutcome.FAILED:
            logger.error("cannot start: %s", first.reason)
            if self.successor:
                self.successor.failed(f"the new master's generation failed: {first.reason}")
            self.exit_code = 1
            self._stop.set()
        elif (
            first.outcome == ReloadOutcome.SUCCEEDED
            and self.successor
            and not await self.successor.took_over(self.generations.serving_number(), self._stop)
        ):
            self.exit_code = 1  # the old master serves on: this one claims nothing and stops
            self._stop.set()
        elif first.outcome == ReloadOutcome.SUCCEEDED:
            if self.successor:
                try:
                    self._write_pid_file(self.settings.pid_file)
                except PidFileError as exc:  # the old master is gone: serve on, and say so
                    logger.error("%s", exc)
                self.systemd.became_main(
                    self.generations.serving_number(), f"upgraded from pid {self.successor.offer.pid}"
                )
                if (held := self.successor.forwarded) is not None:  # asked of the old master meanwhile
                    self.queue.adopt(held.id, held.source, held.requested_at, held.coalesced)
            status.log_serving(self.settings, self.app, self.listeners, self.files.route_file)
            status.log_access(self.settings)
            self._spawn_task(self.files.run())
            self._spawn_task(self.config_watch.run(self._stop))

        await self._stop.wait()
        self.systemd.stopping(self.generations.serving_number())  # a no-op after a handover: the service goes on
        if not self.upgrades.handed_over:
            control_server.close()
        # After a handover the old workers still answer their keep-alive clients while they drain,
        # /status included: the channel stays open until they have left.
        await self._shutdown()
        control_server.close()

    def _on_stop_signal(self, signum: int) -> None:
        if self.stopping:
            logger.warning("%s again: stopping at once", signal.Signals(signum).name)
            self.generations.kill()
            return
        logger.info("%s: stopping gracefully", signal.Signals(signum).name)
        self.stopping = True  # before any worker's exit is seen, so none is respawned
        self._stop.set()

    def _upgrade(self) -> None:
        try:
            if self.stopping:
                raise UpgradeRefused("the service is stopping")
            self.upgrades.request("SIGUSR2")
        except UpgradeRefused as exc:
            logger.warning("upgrade requested by SIGUSR2 refused: %s", exc)

    def _handed_over(self) -> None:
        """A new master serves: this one stops accepting, drains and exits 0 (no STOPPING=1: the service goes on)."""
        self.stopping = True
        self._stop.set()

    def _write_pid_file(self, path: Path | None) -> None:
        try:
            self.pid_file.write(path)
        except OSError as exc:
            raise PidFileError(f"cannot write pid_file {path}: {exc.strerror or exc}") from None

    async def _shutdown(self) -> None:
        await self.upgrades.abort()  # a new master still coming up does not outlive this one
        self.stopping = True
        self.files.stop()
        self.next_snapshot.discard()
        self.generations.standby.stop()  # before its task is cancelled: one getting ready leaves once it is
        for task in list(self._tasks):
            task.cancel()
        for sock in self.listeners:
            sock.close()  # with the workers' copies closed too, new connections are refused
        await self.generations.shutdown()
        self.rollback.stop()
        await self.template.stop()
        logger.info("stopped")

    def _spawn_task(self, coroutine: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("supervisor task failed", exc_info=task.exception())

    # ----- reloads: trigger -> queue -> build -> validate -> swap -> drain -> record ----------

    async def _reload(self, record: ReloadRecord) -> None:
        """Run one reload as a new generation, then drain the one it replaced.

        The steps every reload shares are here (its generation number and start, the drain); what
        it brings up (from disk, or a rollback's kept snapshot) is `_reload_from_disk`'s or `_roll_back`'s.
        """
        self.next_snapshot.reload_started()
        number = self._next_generation
        self._next_generation += 1
        record.begin(number)
        bring_up = self._roll_back if record.rolls_back is not None else self._reload_from_disk
        self.generations.begin_reload()
        try:
            old = await bring_up(record, number)
        finally:
            self.generations.end_reload()
        if old is not None:
            self.generations.drain(old)
        serving = self.generations.serving
        self.next_snapshot.prepare(serving.snapshot if serving is not None else None)

    async def _reload_from_disk(self, record: ReloadRecord, number: int) -> Generation | None:
        """Build generation `number` from the code and settings on disk; the one it replaced (None: none, or failed)."""
        logger.info("reload %s: building generation %d", record.id, number)
        serving = self.generations.serving
        replaced = KnownGood(serving.number, serving.snapshot, self.settings) if serving else None
        self.generations.start_standby()
        try:
            snapshot, settings, tls_warnings = await self._build(number)
            logger.info("reload %s: snapshot of generation %d: %s", record.id, number, snapshot.summary())
            code = await self._scan(snapshot, settings)
            old = await self._swap_in(record, number, snapshot, settings, tls_warnings, code)
        except Exception as exc:
            self._failed(record, number, exc)
            return None
        record.finish(ReloadOutcome.SUCCEEDED)
        self.rollback.swapped(record, number, replaced)  # before the drain: the replaced snapshot is kept
        logger.info(
            "reload %s: swapped in %.0fms: generation %d serving%s",
            record.id,
            record.duration_ms or 0,
            number,
            f", generation {old.number} draining" if old else "",
        )
        return old

    async def _roll_back(self, record: ReloadRecord, number: int) -> Generation | None:
        """Serve the kept snapshot again, with its settings, as generation `number`: a reload from it, not from disk."""
        watch, good = self.rollback.target(record)
        logger.warning(
            "reload %s: rolling back generation %d: building generation %d from generation %d's snapshot",
            record.id,
            watch.generation,
            number,
            good.generation,
        )
        try:
            tls_warnings = build.refreeze_tls(good.snapshot, good.settings, f"gen-{number}")
            old = await self._swap_in(record, number, good.snapshot, good.settings, tls_warnings)
        except Exception as exc:
            self._failed(record, number, exc)
            self.rollback.rollback_failed(record)
            return None
        record.finish(ReloadOutcome.ROLLED_BACK, watch.summary())
        self.rollback.rolled_back(record)
        logger.warning(
            "reload %s: rolled back in %.0fms: generation %d serves generation %d's code (code_version %s) again%s",
            record.id,
            record.duration_ms or 0,
            number,
            good.generation,
            good.snapshot.code_version,
            f", generation {old.number} draining" if old else "",
        )
        return old

    async def _swap_in(
        self,
        record: ReloadRecord,
        number: int,
        snapshot: Snapshot,
        settings: Settings,
        warnings: list[str],
        code: CodeScan | None = None,
    ) -> Generation | None:
        """Validate generation `number`, let it accept, apply its settings and swap; the generation it replaced.

        `code`: the snapshot's import graph for an incremental import (None: a clean one, as a rollback's).
        What validation raises is raised, the candidate discarded (and the master unchanged).
        """
        try:
            spec = build.supervised_spec(self.app, number, snapshot, settings, self.overrides, self.control_path)
            try:
                ready = await self.generations.validate(
                    number, snapshot, spec, settings.workers, settings.reload_timeout, code
                )
            finally:
                candidate = self.generations.candidate
                record.import_ = candidate.imported if candidate is not None else None
            record.warnings = (
                warnings
                + build.scheme_change(self.settings, settings)
                + build.restart_only_changes(self.settings, ready)
            )
            record.validated()
            logger.info(
                "reload %s: generation %d validated (code_version %s)", record.id, number, snapshot.code_version
            )
            await self.generations.start_accepting()
        except BaseException:  # CancelledError too: a stop during the reload
            self.generations.discard()
            raise
        self._apply(settings, number, record)  # only now: a reload that failed changed nothing in the master
        old = await self.generations.swap(record.id)
        for warning in record.warnings:
            logger.warning("reload %s: %s", record.id, warning)
        return old

    async def _build(self, number: int) -> tuple[Snapshot, Settings, list[str]]:
        """A snapshot of the code, settings file and TLS pair as they are now, the settings it brings, TLS warnings.

        The pair is checked here, before any worker is forked: a bad one fails the reload with a
        reason that names the file (TLSError), instead of every candidate worker failing on it.
        """
        await self.template.refresh_if_stale()
        self.files.follow(await asyncio.to_thread(self.locator.find))
        serving = self.generations.serving  # its snapshot shares what did not change with the new one
        snapshot = await asyncio.to_thread(
            take_snapshot,
            self.files.sources,
            self.runtime.path / f"gen-{number}",
            self.config_file,
            self.compiler,
            serving.snapshot if serving is not None else None,
            await self.next_snapshot.take(),
            self.settings.reload_excludes,  # the watcher's (serving) patterns: what it ignores is not code
        )
        settings, watch = build.settings_for(snapshot, self.settings, self.overrides)
        try:
            tls_warnings = build.freeze_tls(snapshot, settings)
        except (TLSError, SnapshotError):
            snapshot.remove()  # no candidate owns it yet, so no discard() would
            raise
        finally:
            # The content this reload read (the TLS pair as frozen: a renewal from here on differs) is
            # the one to compare with, whether or not the pair passed.
            self.config_watch.read_by_reload(snapshot, watch)
        return snapshot, settings, tls_warnings

    async def _scan(self, snapshot: Snapshot, settings: Settings) -> CodeScan | None:
        """The snapshot's import graph when the generation's code is to be imported incrementally.

        In a thread: the first scan parses every module (a few hundred milliseconds for a large
        app), which the master's loop must not wait for; later ones read and parse only the files
        whose digest (from the snapshot's manifest) is new.
        """
        mode = settings.reload_import or ("incremental" if self.files.watch else "clean")
        if mode == "clean":
            return None
        try:
            return await asyncio.to_thread(self.imports.scan, snapshot)
        except (OSError, SyntaxError, ValueError) as exc:  # a file gone mid-read: this reload imports clean
            logger.warning("cannot read the import graph of %s: %s", snapshot.directory, exc)
            return None

    def _apply(self, settings: Settings, number: int, record: ReloadRecord) -> None:
        """The master takes on the settings of the generation that now serves, and stamps its lines with it.

        A `pid_file` it cannot write is the one setting that can fail here, after validation: the
        reload still succeeds (the code serves), with a warning, and the old file stays in force, so
        that the next reload tries the new one again.
        """
        if settings.pid_file != self.settings.pid_file:  # reloadable: the new file is written, ours removed
            try:
                self._write_pid_file(settings.pid_file)
            except PidFileError as exc:
                record.warnings.append(
                    f"{exc}; {self.settings.pid_file or 'no pid file'} stays in force, and the next start with "
                    "these settings would fail: create its directory or fix the setting"
                )
                settings = settings.model_copy(update={"pid_file": self.settings.pid_file})
        self.settings = settings
        set_level(settings.log_level)
        set_generation(number)

    def _failed(self, record: ReloadRecord, number: int, exc: Exception) -> None:
        """Record and log why the reload failed; an unexpected error with its traceback."""
        known = (SnapshotError, TLSError, CandidateFailed, SpawnError, TimeoutError)
        if not isinstance(exc, known):
            logger.exception("reload %s: unexpected error", record.id)
        reason = str(exc) if isinstance(exc, known) else f"{type(exc).__name__}: {exc}"
        reason = reason or "timed out: the candidate was not ready within reload_timeout"
        record.finish(ReloadOutcome.FAILED, reason)
        serving = self.generations.serving
        still = f"generation {serving.number} keeps serving" if serving else "nothing serves"
        logger.error("reload %s failed: generation %d discarded, %s: %s", record.id, number, still, reason)

    # ----- status ---------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {**self._status_view(), "runtime_profile": self.runtime_profile()}

    def runtime_profile(self) -> dict[str, Any]:
        """GET /pypnm/system/webService/runtimeProfile: the serving generation's worker count and
        limits, and where `workers` came from (the command line, the environment, the settings
        file that generation read, or the default).

        Built once for each settings the master takes on and the generation serving with them, not
        at each /status (which carries it): building it reads the cgroup files and the settings file.
        """
        serving = self.generations.serving
        built = self._profile
        if built is not None and built[0] is self.settings and built[1] is serving:
            return built[2]
        source, given = setting_source("workers", self.overrides, serving.snapshot.config_file if serving else None)
        profile = runtime_profile(
            self.settings, active_workers=serving.size if serving else None, source=source, given=given
        )
        self._profile = (self.settings, serving, profile)
        return profile

    def _status_view(self) -> dict[str, Any]:
        return status.status_view(
            self.queue,
            self.generations,
            started_at=self.started_at,
            app=self.app,
            route_file=self.files.route_file,
            watching_source=self.files.watch,
            watching_config=self.config_watch.watched(),
            template_pid=self.template.pid,
            upgrade=self.upgrades.view(),
            rollback=self.rollback.view(),
        )
