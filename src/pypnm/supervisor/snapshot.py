"""A generation's code and settings, frozen: a private copy that its workers import from.

Why copy: a worker that crashes must come back on its own generation's code, not on
whatever is on disk by then, and a candidate must not import a tree that an editor
or a deploy is still half-way through writing. Copying the project's own packages
(not third-party ones) costs milliseconds. Compiling the copy here, in the master,
finds syntax errors before any worker starts and saves each worker the compile.
The master only reads and compiles these files; it never imports them. Where the
project's sources are is asked again before each snapshot (`SourceLocator`), so a reload
after a reinstall copies the newly installed code.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import py_compile
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pypnm.identity import code_version
from pypnm.supervisor.timeouts import LOCATE_SOURCES

# The settings files a snapshot freezes, by the name of their copy, and how an operator calls them.
CONFIG_FILE = "settings.toml"
TOKENS_FILE = "tokens"
TLS_CERT_FILE = "tls-cert.pem"
TLS_KEY_FILE = "tls-key.pem"
_FILE_SETTING = {
    CONFIG_FILE: "config file",
    TOKENS_FILE: "api_tokens_file",
    TLS_CERT_FILE: "ssl_certfile",
    TLS_KEY_FILE: "ssl_keyfile",
}


class SnapshotError(Exception):
    """The code or the settings file cannot be frozen; the message is the reload's reason."""


@dataclass
class Snapshot:
    directory: Path  # first on the workers' sys.path
    packages: list[str]  # top-level names the workers import from here
    source_dirs: dict[str, str]  # copy → original, to name files as the operator knows them
    code_version: str
    files: dict[str, Path] = field(default_factory=dict)  # frozen copies of settings files, by role

    @property
    def config_file(self) -> Path | None:
        return self.files.get(CONFIG_FILE)

    def add_file(self, role: str, source: Path) -> Path:
        """Freeze a copy of `source` (a settings file) as `role`; SnapshotError when unreadable."""
        try:
            data = source.read_bytes()
        except OSError as exc:
            what = _FILE_SETTING.get(role, role)
            raise SnapshotError(f"{what} {str(source)!r}: cannot read it ({exc.strerror})") from None
        copy = self.directory / role
        try:
            copy.write_bytes(data)
        except OSError as exc:
            raise SnapshotError(_write_problem(exc)) from None
        self.files[role] = copy
        self.source_dirs[str(copy)] = str(source)  # reasons name the operator's file
        return copy

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


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


def _stamp(path: list[str]) -> list[int | None]:
    """What an install or uninstall changes: the modification times of the directories on sys.path."""
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
        if self._found is None or not self._found.exists() or _stamp(self._path) != self._stamp:
            self._found, self._path, self._stamp = _locate(self.top)
        return {self.top: self._found}


def take_snapshot(
    sources: dict[str, Path], directory: Path, config_file: Path | None, compiler: Compiler | None = None
) -> Snapshot:
    compiler = compiler or Compiler()
    try:
        directory.mkdir(parents=True)
    except OSError as exc:
        raise SnapshotError(_write_problem(exc)) from None
    source_dirs: dict[str, str] = {}
    digest = hashlib.sha256()
    try:
        for top, source in sources.items():
            if source.is_dir():
                target = directory / top
                shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
                compiler.compile_tree(target, source)
                digest.update(code_version(target).encode())
            else:
                target = directory / source.name
                shutil.copy2(source, target)
                compiler.compile(target, source)
                digest.update(target.read_bytes())
            source_dirs[str(target)] = str(source)
        single_package = len(sources) == 1 and next(iter(sources.values())).is_dir()
        version = code_version(directory / next(iter(sources))) if single_package else digest.hexdigest()[:16]
        snapshot = Snapshot(directory, list(sources), source_dirs, version)
        if config_file is not None:
            snapshot.add_file(CONFIG_FILE, config_file)
    except OSError as exc:  # shutil.Error too: a file that vanished or a dangling link mid-copy
        shutil.rmtree(directory, ignore_errors=True)
        raise SnapshotError(_copy_problem(exc)) from None
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return snapshot


def _write_problem(exc: OSError) -> str:
    """The runtime directory refuses a write (read-only or full file system, something in the way)."""
    return f"cannot write the snapshot in the runtime directory: {exc.filename or ''}: {exc.strerror or exc}"


def _copy_problem(exc: OSError) -> str:
    if isinstance(exc, shutil.Error) and exc.args and isinstance(exc.args[0], list) and exc.args[0]:
        source, _target, why = exc.args[0][0]
        more = f" (and {len(exc.args[0]) - 1} more)" if len(exc.args[0]) > 1 else ""
        return f"cannot copy the code: {source}: {str(why).split(': ', 1)[0]}{more}"
    return f"cannot copy the code: {exc.filename or ''}: {exc.strerror or exc}"


class Compiler:
    """Compiles snapshot files, reusing the bytecode of files unchanged since an earlier snapshot.

    The bytecode is hash-checked (PEP 552), so it stays valid for a copy whose bytes are
    the same whatever its mtime: a touched but unchanged file costs no compile.
    """

    MAX_ENTRIES = 4096

    def __init__(self) -> None:
        self._cache: dict[tuple[str, bytes], bytes] = {}

    def compile_tree(self, target: Path, source: Path) -> None:
        for path in sorted(target.rglob("*.py")):
            self.compile(path, source / path.relative_to(target))

    def compile(self, path: Path, original: Path) -> None:
        try:
            key = (str(original), hashlib.sha256(path.read_bytes()).digest())
            cfile = Path(importlib.util.cache_from_source(str(path)))
            cached = self._cache.get(key)
            if cached is not None:
                cfile.parent.mkdir(exist_ok=True)
                cfile.write_bytes(cached)
                return
            py_compile.compile(
                str(path),
                cfile=str(cfile),
                dfile=str(original),
                doraise=True,
                invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH,
            )
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
