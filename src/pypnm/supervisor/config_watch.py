"""The master's watch on the settings files: a reload when their content changes.

Owns which settings files are watched (the settings file given by `--config`, kept as given,
and the `api_tokens_file` and, with `ssl`, the `ssl_certfile` and `ssl_keyfile` that the settings
file the latest reload read names, even when that tokens file could not be read yet: a renewed
certificate, or a Secret landing after the ConfigMap that names it, is served without a hand), the
content each had when a reload last read it, and the watch itself. It is one of the master's triggers (triggers.py
has the others) and hands the reload queue its source ("file change: <path>"). The master
calls it at three points: `run` once the first generation serves, `read_by_reload` each
time a reload's build has frozen the files into its snapshot (`Master._build`), and
`watched` for the status (`master.watching_config`).

Why it works this way:

- Kubernetes updates a ConfigMap or Secret volume atomically: each file is a symlink through
  `..data` to a timestamped directory; the kubelet writes a new directory, points a
  `..data_tmp` symlink at it, renames that over `..data` and deletes the old directory. The
  events name `..data` and the directories, never the file's own path. So the watch is on the
  directory of the path as given, not recursive (a mount point, or `/etc`, holds much else),
  and on the directory of the file the path leads to now, which catches an edit in place of a
  symlink's target elsewhere; the watch is set up again when that directory changes.
- An event that names a watched file (by its name as given, a symlink on its way, or the file
  it leads to) or an entry of the kubelet's (`..data`, `..2026_…`) makes the files be read again; events that
  name only other files of the directory (a log file written there, many times a second) are
  passed over, and the files are then read at most every few seconds. A reload is asked for
  only when a file's content (SHA-256, read through its symlinks) differs from what the last
  reload read or the last trigger saw. A touch, a metadata change or an editor saving the same
  bytes reload nothing.
- Besides the events, the files are compared every few seconds: that catches a change made
  while the watch is being set up, which no event reports.

The path is never resolved: read through its symlinks at each reload, it leads to the current
`..data` directory, whereas a resolved path names a directory that the kubelet deletes.
watchfiles (which `--reload` uses too) does the watching; only the comparison is ours.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import watchfiles

from pypnm.settings import Settings
from pypnm.supervisor.snapshot import CONFIG_FILE, FILE_SETTING, TLS_CERT_FILE, TLS_KEY_FILE, TOKENS_FILE, Snapshot

logger = logging.getLogger("pypnm.supervisor.config_watch")

CHECK_INTERVAL_MS = 5000  # the comparison besides the events (see the module docstring)
SETTINGS_FILE = "settings file"


def as_given(path: Path) -> Path:
    """An absolute path with its symlinks kept, so that each read goes through them again."""
    return path.absolute()


def content_digest(path: Path) -> str:
    """What a file holds now, read through its symlinks; a missing or unreadable file is a state of its own."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        return f"unreadable: {exc.strerror or exc}"


def names_a_file(changes: Iterable[tuple[object, str]], files: list[Path]) -> bool:
    """Whether a batch of watchfiles changes names one of `files` (or a link on its way) or a kubelet entry."""
    names = {name for path in files for name in _names_on_the_way(path)}
    return any((name := Path(changed).name) in names or name.startswith("..") for _, changed in changes)


def _names_on_the_way(path: Path) -> set[str]:
    """The name of `path`, of each symlink it leads through, and of the file it leads to."""
    names, current = {path.name}, path
    for _ in range(40):  # as many links as the kernel follows
        try:
            current = current.parent / os.readlink(current)
        except OSError:  # not a link (any more), or gone
            break
        names.add(current.name)
    names.add(Path(os.path.realpath(path)).name)
    return names


def directories_to_watch(files: list[Path]) -> list[Path]:
    """The directory of each path as given (the `..data` swap) and of the file it leads to now."""
    # realpath, not Path.resolve: it never raises, not even for a symlink loop.
    dirs = {d for path in files for d in (path.parent, Path(os.path.realpath(path)).parent)}
    return sorted(d for d in dirs if d.is_dir())


class ConfigWatch:
    def __init__(
        self, config_file: Path | None, request_reload: Callable[[str], object], *, always: bool = False
    ) -> None:
        """`always`: watch the settings file whatever `watch_config` says (`--reload` always did)."""
        self.config_file = config_file
        self._request_reload = request_reload
        self._always = always
        self._files: dict[Path, str] = {}  # path as given -> what it is, for the log
        self._known: dict[Path, str] = {}  # path -> content digest last read by a reload or seen by a trigger
        self._rearm = asyncio.Event()  # set: the files changed, or the master stops
        self._next_check = 0.0  # time.monotonic() after which any event, or none, makes the files be read

    def watched(self) -> list[str]:
        """The files watched now, for the status."""
        return [str(path) for path in self._files]

    def read_by_reload(self, snapshot: Snapshot, settings: Settings) -> None:
        """A reload has frozen the settings files into `snapshot`; `settings` are those its settings file names.

        Their content is now the one to compare with; the tokens file and TLS pair to watch are the
        ones these settings name, as is `watch_config`: the new file's even when the tokens file it
        names cannot be read (yet), so that its arrival reloads; the running ones when the new file
        itself cannot be read (build.settings_for).
        """
        named = {  # the files these settings name, by their role in the snapshot
            TOKENS_FILE: settings.api_tokens_file,
            TLS_CERT_FILE: settings.ssl_certfile if settings.ssl else None,
            TLS_KEY_FILE: settings.ssl_keyfile if settings.ssl else None,
        }
        given = {CONFIG_FILE: self.config_file} | named
        frozen: set[Path] = set()
        for role, digest in snapshot.file_digests.items():  # hashed as the snapshot copied them
            original = given.get(role)
            if original is not None:
                frozen.add(as_given(original))
                self._known[as_given(original)] = digest.hex()  # as content_digest() says it
        files: dict[Path, str] = {}
        if self.config_file is not None and (settings.watch_config or self._always):
            files[self.config_file] = SETTINGS_FILE
        if settings.watch_config:
            files |= {as_given(path): FILE_SETTING[role] for role, path in named.items() if path is not None}
        for path in files.keys() - self._files.keys() - frozen:
            # First named by this reload, which just tried to read it (a tokens file it could not read
            # is not in the snapshot): known as it is now, not when the watch first looks, so that a
            # file arriving in between still reloads.
            self._known[path] = content_digest(path)
        if files != self._files:
            self._files = files
            self._rearm.set()

    def check(self, events: bool) -> None:
        """Ask for one reload if any watched file's content differs from the last one known.

        `events`: events named the files (for the debug line when nothing changed).
        """
        self._next_check = time.monotonic() + CHECK_INTERVAL_MS / 1000
        changed: list[Path] = []
        for path in self._files:
            digest = content_digest(path)
            known = self._known.setdefault(path, digest)  # first sight: nothing to compare with yet
            if digest != known:
                self._known[path] = digest
                changed.append(path)
        if changed:
            self._request_reload("file change: " + ", ".join(map(str, changed)))
        elif events:
            logger.debug("settings files: a change in their directories, same content: no reload")

    async def run(self, stopping: asyncio.Event) -> None:
        """Watch until `stopping` is set; set up the watch again whenever the files or their places change."""
        relay = asyncio.create_task(self._stop_when(stopping))
        shown: tuple[list[Path], list[Path]] | None = None  # what the last log line said, to say it once
        try:
            while not stopping.is_set():
                self._rearm = asyncio.Event()
                files = list(self._files)
                if not files:
                    await self._rearm.wait()
                    continue
                roots = directories_to_watch(files)
                if (files, roots) != shown:
                    shown = (files, roots)
                    logger.info(
                        "watching the content of %s, by events in %s and every %gs",
                        ", ".join(f"{self._files[p]} {p}" for p in files),
                        ", ".join(map(str, roots)) or "no directory (missing)",
                        CHECK_INTERVAL_MS / 1000,
                    )
                self.check(events=False)  # a change since the last reload read them
                try:
                    if roots:
                        await self._watch(files, roots)
                        continue
                except OSError as exc:  # a directory went away while the watch was being set up
                    logger.warning("cannot watch %s: %s; trying again", ", ".join(map(str, roots)), exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._rearm.wait(), CHECK_INTERVAL_MS / 1000)
        finally:
            relay.cancel()

    async def _watch(self, files: list[Path], roots: list[Path]) -> None:
        """One watch on `roots`, until the files change, their places change or the master stops."""
        changes = watchfiles.awatch(
            *roots,
            watch_filter=None,
            recursive=False,
            stop_event=self._rearm,
            rust_timeout=CHECK_INTERVAL_MS,
            yield_on_timeout=True,
        )
        async with contextlib.aclosing(changes):
            async for batch in changes:
                named = names_a_file(batch, files)
                if named or time.monotonic() >= self._next_check:
                    self.check(events=named)
                if directories_to_watch(files) != roots:  # e.g. `..data` leads to another directory now
                    return

    async def _stop_when(self, stopping: asyncio.Event) -> None:
        # The watch thread sees only its stop event; without this it would keep shutdown waiting
        # until its next timeout.
        await stopping.wait()
        self._rearm.set()
