"""What asks the master for a reload or a stop: signals, the control channel, and files.

- Signals: SIGHUP asks for a reload; SIGUSR2 for a self-upgrade (upgrade.py); SIGTERM and
  SIGINT for a graceful stop; SIGUSR1 (logrotate's `postrotate`) reopens the log file here
  and in the fork template and the workers (logfile.py).
- The control channel (`control_handler`): a reload request (the HTTP endpoint, the CLI)
  is queued unless the service is stopping or the request's deadline has passed; a status
  request is answered with the master's status view.
- Files (`FileWatch`): a touch of the route module file (the seed's mechanism) always
  triggers a reload; with `--reload`, so does any change to a watched source file. The
  watch follows the sources when a reload finds them moved or their directories replaced
  (a reinstall). The settings and tokens files are watched by their content instead
  (`ConfigWatch`, config_watch.py: `watch_config`, and always with `--reload`).

Each trigger only hands the reload queue its source ("SIGHUP", "file change: <path>",
"http (request <id>)"); the queue decides what happens next. Logs under the master's logger name, like every
line about reloads.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Iterable
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import watchfiles

from pypnm.settings import Settings
from pypnm.supervisor import control, protocol
from pypnm.supervisor.build import DEFAULT_APP
from pypnm.supervisor.logfile import reopen_log_files
from pypnm.supervisor.reloads import ReloadDropped, ReloadQueue
from pypnm.supervisor.snapshot import excluded
from pypnm.supervisor.upgrade import UpgradeRecord, UpgradeRefused

logger = logging.getLogger("pypnm.supervisor.master")

ROUTE_MODULE = "api/web_service.py"  # inside the pypnm package: the seed's "route module file"


def install_signals(
    on_reload: Callable[[str], object],
    on_stop: Callable[[int], object],
    log_writers: Callable[[], Iterable[int | None]],
    on_upgrade: Callable[[], object] | None = None,
) -> None:
    """Route the process's signals to the master's loop (call from inside it).

    `log_writers`: the pids of the other processes that have the log file open (the fork
    template, zygotes and a standby from their fork on, every live worker), read when SIGUSR1 arrives.
    """
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_stop, signum)
    loop.add_signal_handler(signal.SIGHUP, on_reload, "SIGHUP")
    loop.add_signal_handler(signal.SIGUSR1, reopen_log_files, log_writers)
    if on_upgrade is not None:
        loop.add_signal_handler(signal.SIGUSR2, on_upgrade)


def control_handler(
    queue: ReloadQueue,
    stopping: Callable[[], bool],
    status: Callable[[], dict[str, Any]],
    upgrade: Callable[[str], UpgradeRecord] | None = None,
) -> control.Handler:
    """How the master answers its control channel."""

    async def answer(request: protocol.ControlRequest) -> protocol.ControlAnswer:
        if isinstance(request, protocol.StatusRequest):
            return protocol.StatusAnswer(status())
        if stopping():
            return protocol.Refused("the service is stopping")
        source = request.source
        if request.request_id:
            source += f" (request {request.request_id})"  # ties the master's log to the access log
        if isinstance(request, protocol.UpgradeRequest):
            if upgrade is None:
                return protocol.Refused("this master does not upgrade itself")
            if control.expired_by(request.deadline) is not None:
                return protocol.Refused("the request arrived after its caller stopped waiting: not started")
            try:
                return protocol.UpgradeAccepted(upgrade(source).id)
            except UpgradeRefused as exc:
                return protocol.Refused(str(exc))
        try:
            return protocol.ReloadAccepted(queue.request(source, request.deadline).id)
        except ReloadDropped as exc:  # its caller already answered "not started": a retry must not reload twice
            return protocol.Refused(str(exc))

    return answer


def _identity(directory: Path) -> tuple[int, int] | None:
    """Which directory is at a path now (device, inode); None when there is none."""
    try:
        st = directory.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


class FileWatch:
    """The route module file always; with `watch` (--reload) the sources too."""

    def __init__(
        self,
        app: str,
        sources: dict[str, Path],
        watch: bool,
        settings: Callable[[], Settings],
        on_reload: Callable[[str], object],
    ) -> None:
        self.app = app
        self.sources = sources  # top-level name -> package directory or module file, where reloads copy from
        self.watch = watch
        self._settings = settings  # reload_dirs, reload_includes, reload_excludes may change with a reload
        self._on_reload = on_reload
        self.route_file = self._route_file()
        self._again: asyncio.Event | None = None  # set when the sources move: watch the new place
        self._watched: dict[Path, tuple[int, int] | None] = {}  # each watched directory's identity
        self._stopped = False

    async def run(self) -> None:
        """Watch until `stop`; starts over when `follow` finds the sources moved or replaced."""
        while not self._stopped:
            self._again = asyncio.Event()
            dirs = [self.route_file.parent]
            if self.watch:
                dirs += [Path(p).resolve() for p in self._settings().reload_dirs] or [
                    p if p.is_dir() else p.parent for p in self.sources.values()
                ]
            self._watched = {d: _identity(d) for d in dirs}
            roots = sorted({d for d in dirs if d.is_dir()})
            logger.info("watching %s", ", ".join(map(str, roots)) or "nothing (the directories are missing)")
            if not roots:
                await self._again.wait()
                continue
            async for changes in watchfiles.awatch(*roots, watch_filter=self.is_trigger, stop_event=self._again):
                first = sorted(path for _, path in changes)[0]
                self._on_reload(f"file change: {first}")

    def stop(self) -> None:
        self._stopped = True
        if self._again is not None:
            self._again.set()  # the watcher's thread ends at its next step, not at its 5 s timeout

    def follow(self, sources: dict[str, Path]) -> None:
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
        if self._again is not None:
            self._again.set()

    def is_trigger(self, change: watchfiles.Change, path: str) -> bool:
        candidate = Path(path)
        if candidate == self.route_file:  # the settings file is ConfigWatch's (by content)
            return True
        if not self.watch or (change == watchfiles.Change.deleted and candidate.suffix != ".py"):
            return False
        settings = self._settings()
        if any(excluded(part, settings.reload_excludes) for part in self._below_root(candidate)):
            return False  # the snapshot leaves the same paths out (snapshot.excluded)
        return any(fnmatch(candidate.name, pattern) for pattern in settings.reload_includes)

    def _below_root(self, path: Path) -> tuple[str, ...]:
        """The parts of `path` below the watched directory it is in: where the project lives is not the
        patterns' business (a project under `~/.local/src`, or one installed in a `.venv`, still reloads)."""
        roots = [root for root in self._watched if path.is_relative_to(root)]
        return path.relative_to(max(roots, key=lambda root: len(root.parts))).parts if roots else path.parts

    def _route_file(self) -> Path:
        """The file whose touch triggers a reload: the seed's route module, or the module of --app."""
        return self.sources["pypnm"] / ROUTE_MODULE if self.app == DEFAULT_APP else self._module_file(self.app)

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
