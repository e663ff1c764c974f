"""A generation's code and settings, frozen: a private copy that its workers import from.

Why copy: a worker that crashes must come back on its own generation's code, not on
whatever is on disk by then, and a candidate must not import a tree that an editor
or a deploy is still half-way through writing. Compiling the copy here, in the master,
finds syntax errors before any worker starts and saves each worker the compile.

A snapshot costs what changed, not the size of the tree: a file whose content is as in
the previous snapshot (the serving generation's) is a hard link to that snapshot's copy
and bytecode; only changed and new files are copied and compiled (`_Freezer`). Removing
the previous snapshot after its generation drains leaves the links of the new one whole.
The links need not wait for the reload: `prepare_next` makes them ahead, while the service is
quiet (next_snapshot.py says when), and `take_snapshot` then takes that directory over, so a
reload only stats the tree, replaces what changed and removes what is gone.
Where hard links are refused (another file system, a file system without them, a
permission), files are copied instead. `Snapshot.changes` says which modules changed
(`SnapshotChanges.between`, the one comparison of two snapshots' files: import_graph.py's
plan compares with it too), and `module_name` is the one reading of a file path as a module.
What a snapshot leaves out of the tree: compiled bytecode, every path with a part that matches
`reload_excludes` (`excluded`, the one reading of those patterns, which the `--reload` watcher
uses too: an editor's backup, swap and lock files), and symbolic links that lead nowhere.

The master only reads and compiles these files; it never imports them. Where the
project's sources are is asked again before each snapshot (`SourceLocator`), so a reload
after a reinstall copies the newly installed code.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib.util
import json
import logging
import os
import py_compile
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatch
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path
from stat import S_ISREG

from pypnm.identity import code_version_of
from pypnm.supervisor.timeouts import LOCATE_SOURCES

logger = logging.getLogger(__name__)

# The settings files a snapshot freezes, by the name of their copy, and how an operator calls them.
CONFIG_FILE = "settings.toml"
TOKENS_FILE = "tokens"
TLS_CERT_FILE = "tls-cert.pem"
TLS_KEY_FILE = "tls-key.pem"
FILE_SETTING = {
    CONFIG_FILE: "config file",
    TOKENS_FILE: "api_tokens_file",
    TLS_CERT_FILE: "ssl_certfile",
    TLS_KEY_FILE: "ssl_keyfile",
}


# A file whose modification or change time is this close to the moment it was read may be written
# again within the same timestamp tick (coarse kernel clocks, 1-2 s on some file systems, a skewed
# network server) without its stat changing: the next snapshot hashes it instead of trusting the stat.
RACY_NS = 3_000_000_000
READ_ONLY = 0o555  # a snapshot's files keep their read and execute bits, never a write bit
BYTECODE_MODE = 0o444


class SnapshotError(Exception):
    """The code or the settings file cannot be frozen; the message is the reload's reason."""


@dataclass(frozen=True)
class FileRecord:
    """One file of a snapshot: the stat of the source it was read from, and a hash of its content."""

    stat: tuple[int, int, int, int, int]  # (st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns) of the source
    digest: bytes  # sha256 of the bytes in the snapshot
    racy: bool  # written so shortly before it was read that the next snapshot must hash it (see RACY_NS)


@dataclass(frozen=True)
class SnapshotChanges:
    """What differs from the previous snapshot (the serving generation's), by content.

    Modules are dotted names (`pkg.sub.mod`; a package's `__init__.py` is `pkg.sub`). A file
    only touched, or rewritten with the same bytes, is not a change.
    """

    changed: frozenset[str] = frozenset()  # Python modules whose source differs
    added: frozenset[str] = frozenset()  # Python modules new in this snapshot
    removed: frozenset[str] = frozenset()  # Python modules gone from it
    native: frozenset[str] = frozenset()  # C extension modules changed, added or removed
    other: frozenset[str] = frozenset()  # any other file changed, added or removed (paths, as in `manifest`)

    # Every path whose content differs (changed, added or removed), as the fields above were read from.
    paths: frozenset[str] = field(default=frozenset(), compare=False)

    @classmethod
    def between(cls, before: Mapping[str, bytes], after: Mapping[str, bytes]) -> SnapshotChanges:
        """What differs from `before` to `after`: two sets of files as content hashes by relative path."""
        changed = {path for path in before.keys() & after.keys() if before[path] != after[path]}
        added = after.keys() - before.keys()
        removed = before.keys() - after.keys()

        def modules(paths: Iterable[str], suffixes: Iterable[str] = (".py",)) -> frozenset[str]:
            return frozenset(name for path in paths if (name := module_name(path, suffixes)) is not None)

        every = frozenset(changed | added | removed)
        native = {path for path in every if module_name(path, NATIVE_SUFFIXES) is not None}
        return cls(
            changed=modules(changed),
            added=modules(added),
            removed=modules(removed),
            native=modules(native, NATIVE_SUFFIXES),
            other=frozenset(path for path in every - native if module_name(path) is None),
            paths=every,
        )

    @property
    def modules(self) -> frozenset[str]:
        """Every Python module changed, added or removed."""
        return self.changed | self.added | self.removed

    def __bool__(self) -> bool:
        return bool(self.modules or self.native or self.other)


# The endings of a C extension module's file, longest first: `.cpython-311-x86_64-linux-gnu.so` before `.so`.
NATIVE_SUFFIXES = tuple(sorted(EXTENSION_SUFFIXES, key=len, reverse=True))


def module_name(relative: str, suffixes: Iterable[str] = (".py",)) -> str | None:
    """`pkg/sub/mod.py` -> `pkg.sub.mod`, `pkg/__init__.py` -> `pkg`: the module a file path (relative to the
    snapshot directory) holds; None for a file with none of `suffixes` or a name an import cannot spell.

    `suffixes`: a Python module's (the default) or a C extension module's (NATIVE_SUFFIXES).
    """
    suffix = next((suffix for suffix in suffixes if relative.endswith(suffix)), None)
    if suffix is None:
        return None
    parts = relative[: -len(suffix)].split("/")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts) if parts and all(part.isidentifier() for part in parts) else None


def excluded(name: str, patterns: Iterable[str]) -> bool:
    """Whether `name`, one part of a path (a file or directory name), matches one of `patterns` (`reload_excludes`).

    The `--reload` watcher ignores a change when a part of its path matches (triggers.py), and a
    snapshot leaves out a file when a part of its path below the project's directory does (`_walk`):
    a file whose changes do not trigger a reload must not change what a reload imports either.
    """
    return any(fnmatch(name, pattern) for pattern in patterns)


def code_digests(manifest: Mapping[str, FileRecord]) -> dict[str, bytes]:
    """A manifest's content hashes by relative path: what `SnapshotChanges.between` compares."""
    return {relative: record.digest for relative, record in manifest.items()}


@dataclass
class Snapshot:
    directory: Path  # first on the workers' sys.path
    packages: list[str]  # top-level names the workers import from here
    source_dirs: dict[str, str]  # copy → original, to name files as the operator knows them
    code_version: str
    files: dict[str, Path] = field(default_factory=dict)  # frozen copies of settings files, by role
    # The sha256 of each settings file's copy, by role (which is the copy's name in `directory`).
    file_digests: dict[str, bytes] = field(default_factory=dict)
    # Every code file, by its path relative to `directory` (posix, e.g. "pkg/sub/mod.py").
    manifest: dict[str, FileRecord] = field(default_factory=dict)
    changes: SnapshotChanges | None = None  # None: no previous snapshot to compare with, everything is new
    shared: int = 0  # files hard-linked from the previous snapshot rather than copied
    took_ms: float = 0.0
    # How long making the links it took over took (prepare_next); None: it made its own. Not the
    # Prepared itself: that holds the previous snapshot, and each snapshot would hold all before it.
    linked_ahead_ms: float | None = None
    lineage: Lineage | None = None  # the incremental imports it takes part in (None: imported clean only)

    @property
    def config_file(self) -> Path | None:
        return self.files.get(CONFIG_FILE)

    def add_file(self, role: str, source: Path) -> Path:
        """Freeze a copy of `source` (a settings file) as `role`; SnapshotError when unreadable."""
        try:
            data = source.read_bytes()
        except OSError as exc:
            what = FILE_SETTING.get(role, role)
            raise SnapshotError(f"{what} {str(source)!r}: cannot read it ({exc.strerror})") from None
        copy = self.directory / role
        try:
            copy.write_bytes(data)
        except OSError as exc:
            raise SnapshotError(_write_problem(exc)) from None
        self.files[role] = copy
        self.file_digests[role] = hashlib.sha256(data).digest()  # the import scan compares it (import_graph.py)
        self.source_dirs[str(copy)] = str(source)  # reasons name the operator's file
        return copy

    def summary(self) -> str:
        """How the snapshot was made, for the master's log."""
        made = f"{len(self.manifest)} files in {self.took_ms:.0f}ms"
        if self.changes is None:
            return f"{made}, all copied (no previous snapshot)"
        summary = f"{made}, {self.shared} shared with the previous one, {len(self.changes.modules)} modules changed"
        if self.linked_ahead_ms is not None:
            summary += f"; linked ahead in {self.linked_ahead_ms:.0f}ms"
        return summary

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


@dataclass(eq=False)
class Lineage:
    """Snapshots whose generations were imported incrementally, each on top of the one before.

    A module an incremental import keeps was imported from an earlier snapshot of the lineage,
    and whatever paths it computed from its `__file__` at import (a data file, a templates or
    static directory) name that snapshot's directory for as long as the module lives, in every
    later generation. So a snapshot of a lineage is not simply removed once its generation is
    gone: while a later generation of the lineage lives, its directory is replaced by a link to
    the newest one's (`replace`). The link's target has the same files but for `.py` modules:
    any other file that changed made the reload a clean import, which starts a new lineage.
    Each replaced directory links to one alias of the lineage, and only the alias is pointed at
    the newest snapshot, so a reload costs one link however long the lineage. The links go when
    the lineage's last generation does (`end`).
    """

    links: list[Path] = field(default_factory=list)
    alias: Path | None = None

    def replace(self, directory: Path, newest: Path) -> None:
        """Remove `directory` (a snapshot no generation uses), leaving a link that leads to `newest`.

        In this order, so that a path into it never fails: the alias first leads to `newest`
        (it may have led to `directory`), then the directory is moved aside, the link takes its
        name, and only then is the directory's tree removed.
        """
        alias = self.alias = self.alias or directory.with_name(f".lineage-{directory.name}")
        aside = directory.with_name(f".{directory.name}.removed")
        try:
            _link(alias, newest.name)  # relative: snapshots are siblings in the runtime directory
            os.rename(directory, aside)
        except OSError as exc:  # the runtime directory refuses a write: paths into the old one stop working
            logger.warning("cannot link %s to %s: %s", directory, newest, exc.strerror or exc)
            shutil.rmtree(directory, ignore_errors=True)
            return
        try:
            _link(directory, alias.name)
            self.links.append(directory)
        except OSError as exc:
            logger.warning("cannot link %s to %s: %s", directory, newest, exc.strerror or exc)
        shutil.rmtree(aside, ignore_errors=True)

    def end(self) -> None:
        """The lineage's last generation is gone: remove its links."""
        for link in [*self.links, *([self.alias] if self.alias else [])]:
            with contextlib.suppress(OSError):
                link.unlink()
        self.links.clear()
        self.alias = None


def _link(path: Path, target: str) -> None:
    """Point the symbolic link `path` at `target`, replacing what was there in one step."""
    temporary = path.with_name(f".{path.name}.new")
    temporary.unlink(missing_ok=True)
    os.symlink(target, temporary)
    try:
        os.replace(temporary, path)
    except OSError:
        temporary.unlink(missing_ok=True)
        raise


# Run by a fresh interpreter (in the master's directory and environment): where would a new
# process import the top-level module from? It stamps its sys.path *before* looking, so a change
# made while it looks shows up as a changed stamp next time.
_LOCATE = """
import importlib.util, json, os, sys
sys.path.insert(0, os.getcwd())
def stamp(entry):
    try:
        return os.stat(entry or ".").st_mtime_ns
    except OSError:
        return None
answer = {"path": sys.path, "stamp": [stamp(entry) for entry in sys.path]}
try:
    spec = importlib.util.find_spec(sys.argv[1])
except (ImportError, ValueError) as exc:
    answer["error"] = str(exc) or type(exc).__name__
else:
    if spec is not None and spec.origin is not None:
        answer["origin"] = spec.origin
        answer["package"] = spec.submodule_search_locations is not None
print(json.dumps(answer))
"""


def path_stamp(path: list[str]) -> list[int | None]:
    """What an install or uninstall changes: the modification times of the directories on sys.path.

    Any install or uninstall adds or removes entries (a package, its `.dist-info`) in a directory on
    sys.path, which changes that directory's modification time.
    """
    stamps: list[int | None] = []
    for entry in path:
        try:
            stamps.append(os.stat(entry or ".").st_mtime_ns)
        except OSError:
            stamps.append(None)
    return stamps


def _locate(top: str) -> tuple[Path, list[str], list[int | None]]:
    """Ask a fresh interpreter; returns (the package directory or module file, its sys.path, their stamps)."""
    try:
        result = subprocess.run(
            [sys.executable, "-c", _LOCATE, top],
            capture_output=True,
            text=True,
            timeout=LOCATE_SOURCES,
            stdin=subprocess.DEVNULL,
        )
        lines = result.stdout.strip().splitlines()
        answer = json.loads(lines[-1]) if lines else {}
    except (OSError, subprocess.TimeoutExpired, ValueError) as exc:
        raise SnapshotError(f"cannot locate {top!r}: {type(exc).__name__}: {exc}") from None
    if not isinstance(answer, dict) or "path" not in answer:
        stderr = result.stderr.strip().splitlines()
        raise SnapshotError(f"cannot locate {top!r}: {stderr[-1] if stderr else f'exit {result.returncode}'}")
    if "error" in answer:
        raise SnapshotError(f"cannot locate {top!r}: {answer['error']}")
    if "origin" not in answer:
        raise SnapshotError(f"cannot find module {top!r}: check --app and the directory pypnm runs in")
    origin = Path(answer["origin"]).resolve()
    return (origin.parent if answer["package"] else origin), answer["path"], answer["stamp"]


def find_project_sources(app: str) -> dict[str, Path]:
    """The top-level package or module of `module:attr`, where a new process would import it now.

    Asked of a fresh interpreter rather than of this process: `importlib.util.find_spec`
    here answers from this process's `sys.modules` and its `sys.path` as `.pth` files made
    it at start, so after a reinstall (another version, editable <-> wheel) it names the
    old place. Nothing of the project is imported, here or there.
    """
    top = app.partition(":")[0].split(".")[0]
    return {top: _locate(top)[0]}


class SourceLocator:
    """The master's `find_project_sources`, asked again only when an install may have changed the answer.

    Any install or uninstall adds or removes entries in a directory on sys.path (its
    site-packages, or the directory an editable install points at), which changes that
    directory's modification time. While those times and the sources found last are as
    they were, the last answer stands, so an ordinary reload costs no extra process.
    """

    def __init__(self, app: str) -> None:
        self.top = app.partition(":")[0].split(".")[0]
        self._found: Path | None = None
        self._path: list[str] = []
        self._stamp: list[int | None] = []

    def find(self) -> dict[str, Path]:
        """SnapshotError when the project cannot be found (e.g. half-way through an install)."""
        if self._found is None or not self._found.exists() or path_stamp(self._path) != self._stamp:
            self._found, self._path, self._stamp = _locate(self.top)
        return {self.top: self._found}


@dataclass(eq=False)
class Prepared:
    """A directory made ahead of a reload: every code file of `base` and its bytecode, hard-linked (`prepare_next`)."""

    directory: Path
    base: Snapshot  # whose files it links: only a snapshot taken with this one as the previous may take it over
    took_ms: float

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def prepare_next(base: Snapshot, directory: Path) -> Prepared:
    """Hard-link every code file of `base` (the serving generation's snapshot), and its bytecode, into `directory`.

    What the next snapshot would link anyway for every file that did not change, done before it is
    asked for. All or nothing: OSError (the directory removed) when any link is refused.
    """
    if sys.pycache_prefix is not None:  # the bytecode's links would be named after `directory`, not the snapshot
        raise OSError(errno.ENOTSUP, "the bytecode is kept outside the tree (PYTHONPYCACHEPREFIX)", str(directory))
    started = time.perf_counter()
    made: set[str] = set()
    try:
        directory.mkdir()
        for relative in base.manifest:
            _link_copy(base.directory, directory, relative, made)
    except OSError:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return Prepared(directory, base, (time.perf_counter() - started) * 1000)


def _link_copy(source_dir: Path | str, target_dir: Path | str, relative: str, made: set[str]) -> None:
    """Hard-link the snapshot file `relative` of `source_dir`, and its bytecode for a `.py` file, into `target_dir`.

    OSError when the file system refuses (EXDEV, EPERM, EMLINK, no links at all, the copy gone);
    then neither is left in `target_dir`. `made`: the directories known to exist already.
    """
    source = os.path.join(source_dir, relative)
    target = os.path.join(target_dir, relative)
    _make_parent(target, made)
    os.link(source, target)
    if relative.endswith(".py"):
        cfile = importlib.util.cache_from_source(target)
        _make_parent(cfile, made)
        try:
            os.link(importlib.util.cache_from_source(source), cfile)
        except OSError:
            os.unlink(target)  # its bytecode could not follow
            raise


def _make_parent(path: str, made: set[str]) -> None:
    directory = os.path.dirname(path)
    if directory not in made:
        os.makedirs(directory, exist_ok=True)
        made.add(directory)


def take_snapshot(
    sources: dict[str, Path],
    directory: Path,
    config_file: Path | None,
    compiler: Compiler | None = None,
    previous: Snapshot | None = None,
    prepared: Prepared | None = None,
    excludes: Sequence[str] = (),
) -> Snapshot:
    """Freeze `sources` into `directory`, sharing with `previous` (the serving generation's) what did not change.

    `prepared`: the links of `previous`'s files made ahead (`prepare_next`); the snapshot takes its
    directory over (renamed to `directory`), or removes it when it was made from another snapshot.
    `excludes`: the `reload_excludes` patterns; a path below a package with a part that matches one is left out.
    """
    started = time.perf_counter()
    compiler = compiler or Compiler()
    prelinked = _take_over(prepared, previous, directory)
    try:
        if prelinked is None:
            directory.mkdir(parents=True)
    except OSError as exc:
        raise SnapshotError(_write_problem(exc)) from None
    source_dirs: dict[str, str] = {}
    digest = hashlib.sha256()
    package_version = ""
    freezer = _Freezer(directory, compiler, previous, prelinked or set())
    try:
        for top, source in sources.items():
            if source.is_dir():
                target = directory / top
                for original, relative in _walk(source, excludes):
                    freezer.freeze(original, f"{top}/{relative}")
                package_version = code_version_of(
                    (relative.removeprefix(f"{top}/"), record.digest)
                    for relative, record in freezer.manifest.items()
                    if relative.startswith(f"{top}/") and relative.endswith(".py")
                )
                digest.update(package_version.encode())
            else:
                target = directory / source.name
                freezer.freeze(str(source), source.name)
                digest.update(target.read_bytes())
            source_dirs[str(target)] = str(source)
        freezer.remove_unseen()
        single_package = len(sources) == 1 and next(iter(sources.values())).is_dir()
        version = package_version if single_package else digest.hexdigest()[:16]
        snapshot = Snapshot(
            directory,
            list(sources),
            source_dirs,
            version,
            manifest=freezer.manifest,
            changes=(
                SnapshotChanges.between(code_digests(previous.manifest), code_digests(freezer.manifest))
                if previous is not None
                else None
            ),
            shared=freezer.shared,
            linked_ahead_ms=prepared.took_ms if prepared is not None and prelinked is not None else None,
        )
        if config_file is not None:
            snapshot.add_file(CONFIG_FILE, config_file)
    except OSError as exc:  # a file that vanished mid-copy, a dangling link, a full file system
        shutil.rmtree(directory, ignore_errors=True)
        if prelinked is not None:  # or a path the links made ahead stand in the way of (a file now a directory)
            logger.debug("snapshot %s made again without its links made ahead: %s", directory, exc)
            return take_snapshot(sources, directory, config_file, compiler, previous, excludes=excludes)
        raise SnapshotError(_copy_problem(exc)) from None
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    snapshot.took_ms = (time.perf_counter() - started) * 1000
    return snapshot


def _take_over(prepared: Prepared | None, previous: Snapshot | None, directory: Path) -> set[str] | None:
    """Rename `prepared`'s directory to `directory` if it holds `previous`'s files: the files it links, else None.

    Prepared from another snapshot (the serving one changed since: a rollback) or not movable, it is removed.
    """
    if prepared is None:
        return None
    if previous is not None and prepared.base is previous:
        try:
            directory.parent.mkdir(parents=True, exist_ok=True)
            os.rename(prepared.directory, directory)
        except OSError as exc:
            logger.debug("cannot take over %s: %s", prepared.directory, exc.strerror or exc)
        else:
            return set(previous.manifest)
    prepared.remove()
    return None


def _walk(source: Path, excludes: Sequence[str]) -> Iterator[tuple[str, str]]:
    """Every file below `source` but compiled bytecode and `excluded` paths, in a stable order: (its path, its
    path relative to `source`).

    Symbolic links are followed, as a copy would (a linked directory is copied as a directory);
    a directory met again through a link is not entered twice, so a link loop ends. A link that
    leads nowhere is yielded like a file: the freezer leaves it out (it stats every file anyway).
    An excluded directory is not entered, so each part of a path is matched once, as it is met.
    Strings, not Path objects: this runs for every file of the tree at every reload.
    """
    seen: set[tuple[int, int]] = set()

    def refuse(exc: OSError) -> None:
        raise exc  # an unreadable directory fails the snapshot instead of leaving files out silently

    for root, dirs, files in os.walk(source, onerror=refuse, followlinks=True):
        info = os.stat(root)
        if (info.st_dev, info.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((info.st_dev, info.st_ino))
        dirs[:] = sorted(name for name in dirs if name != "__pycache__" and not excluded(name, excludes))
        prefix = Path(root).relative_to(source).as_posix()
        for name in sorted(files):
            if not name.endswith(".pyc") and not excluded(name, excludes):
                yield os.path.join(root, name), name if prefix == "." else f"{prefix}/{name}"


class _Freezer:
    """Puts each file into a new snapshot: a hard link to the previous snapshot's copy when unchanged, else a copy.

    Correctness rests on two rules. A snapshot's files are written once, read-only, and never
    opened for writing again (new files are created exclusively, bytecode is written to a
    temporary name and renamed), so a file shared by several snapshots cannot change under
    any generation that runs it. And a file counts as unchanged only when its content is: the
    source's stat (device, inode, size, modification and change times) saves reading it,
    unless the previous snapshot read it so soon after it was written that a second write in
    the same clock tick could leave the stat as it was ("racy", as git calls it): then, and
    whenever the stat differs, the content is hashed and compared.
    """

    def __init__(self, directory: Path, compiler: Compiler, previous: Snapshot | None, prelinked: set[str]) -> None:
        self.directory = directory
        self.compiler = compiler
        self.previous = previous
        self.manifest: dict[str, FileRecord] = {}
        self.shared = 0  # files hard-linked from the previous snapshot
        self._made: set[str] = set()  # directories made so far (strings: this runs for every file of the tree)
        # Files of the previous snapshot linked ahead (prepare_next) and not yet met in the walk.
        self._prelinked = prelinked

    def freeze(self, original: str, relative: str) -> None:
        """Put `original` into the snapshot as `relative`; nothing when it is a symbolic link that leads nowhere."""
        try:
            stat = os.stat(original)  # before reading: a write after this changes the stat seen next time
        except OSError as exc:
            # A link to nothing (Emacs's lock file `.#name.py` while a buffer is modified, a link to a
            # file removed since) holds no code: left out, as a copy of the tree could not hold it either.
            # A file that vanished is still an error: the tree is being written, the reload fails.
            if exc.errno in (errno.ENOENT, errno.ELOOP) and os.path.islink(original):
                logger.debug("snapshot: %s left out: a symbolic link that leads nowhere", original)
                return
            raise
        target = os.path.join(self.directory, relative)
        _make_parent(target, self._made)  # after the stat: a directory of links to nothing is not made
        if not S_ISREG(stat.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", original)
        key = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
        before = self.previous.manifest.get(relative) if self.previous is not None else None
        if before is not None and before.stat == key and not before.racy and self._link(relative, target):
            self.manifest[relative] = before
            return
        with open(original, "rb") as file:
            data = file.read()
        now = time.time_ns()
        racy = max(stat.st_mtime_ns, stat.st_ctime_ns) > now - RACY_NS
        record = FileRecord(key, hashlib.sha256(data).digest(), racy)
        self.manifest[relative] = record
        if before is not None and before.digest == record.digest and self._link(relative, target):
            return  # touched, or rewritten with the same bytes
        if relative in self._prelinked:  # changed: the link made ahead goes, never written through
            self._prelinked.discard(relative)
            self._unlink(relative)
        _write_new(Path(target), data, stat.st_mode)
        if relative.endswith(".py"):
            self.compiler.compile(Path(target), Path(original), record.digest)

    def _link(self, relative: str, target: str) -> bool:
        """Hard-link the previous snapshot's copy and its bytecode; False when the file system refuses."""
        assert self.previous is not None
        if relative in self._prelinked:  # linked ahead already
            self._prelinked.discard(relative)
            self.shared += 1
            return True
        try:
            _link_copy(self.previous.directory, self.directory, relative, self._made)
        except OSError:  # the caller copies and compiles both
            return False
        self.shared += 1
        return True

    def remove_unseen(self) -> None:
        """Remove the links made ahead of files the walk did not meet (gone from the sources), and what that empties.

        An empty directory must go too: below a package, it would import as a namespace package.
        """
        top = str(self.directory)
        for relative in sorted(self._prelinked, reverse=True):  # a directory's files before the directory
            target = self._unlink(relative)
            empty = [os.path.dirname(importlib.util.cache_from_source(target))] if relative.endswith(".py") else []
            directory = os.path.dirname(target)
            while directory != top:
                empty.append(directory)
                directory = os.path.dirname(directory)
            for directory in empty:
                if not _remove_if_empty(directory):
                    break
        self._prelinked.clear()

    def _unlink(self, relative: str) -> str:
        """Remove the link made ahead for `relative`, and its bytecode's; the removed path."""
        target = os.path.join(self.directory, relative)
        os.unlink(target)
        if relative.endswith(".py"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(importlib.util.cache_from_source(target))
        return target


def _remove_if_empty(directory: str) -> bool:
    try:
        os.rmdir(directory)
    except OSError:  # ENOTEMPTY, mostly
        return False
    return True


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create `path` (it must not exist: nothing is ever written through a shared link), read-only."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode & READ_ONLY)
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)


def _write_problem(exc: OSError) -> str:
    """The runtime directory refuses a write (read-only or full file system, something in the way)."""
    return f"cannot write the snapshot in the runtime directory: {exc.filename or ''}: {exc.strerror or exc}"


def _copy_problem(exc: OSError) -> str:
    return f"cannot copy the code: {exc.filename or ''}: {exc.strerror or exc}"


class Compiler:
    """Compiles snapshot files, reusing the bytecode of files unchanged since an earlier snapshot.

    The bytecode is hash-checked (PEP 552), so it stays valid for a copy whose bytes are
    the same whatever its mtime: a touched but unchanged file costs no compile.
    """

    MAX_ENTRIES = 4096

    def __init__(self) -> None:
        self._cache: dict[tuple[str, bytes], bytes] = {}

    def compile(self, path: Path, original: Path, digest: bytes) -> None:
        """Compile `path` (a snapshot's copy of `original`, whose content hashes to `digest`), read-only."""
        try:
            key = (str(original), digest)
            cfile = Path(importlib.util.cache_from_source(str(path)))
            cached = self._cache.get(key)
            if cached is not None:
                cfile.parent.mkdir(exist_ok=True)
                _write_new(cfile, cached, BYTECODE_MODE)
                return
            py_compile.compile(
                str(path),
                cfile=str(cfile),
                dfile=str(original),
                doraise=True,
                invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH,
            )  # written to a temporary name and renamed: never through an existing file
            os.chmod(cfile, BYTECODE_MODE)
            if len(self._cache) >= self.MAX_ENTRIES:
                self._cache.clear()
            self._cache[key] = cfile.read_bytes()
        except py_compile.PyCompileError as exc:
            error = exc.exc_value
            if isinstance(error, SyntaxError):
                raise SnapshotError(f"{type(error).__name__}: {error.msg} ({original}, line {error.lineno})") from None
            raise SnapshotError(f"{exc.exc_type_name}: {error} ({original})") from None
        except OSError as exc:
            raise SnapshotError(f"cannot copy {original}: {exc.strerror}") from None
