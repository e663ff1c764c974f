"""Which modules an incremental import must import again, read from the snapshots' files (`reload_import`).

The master never imports the project, so it reads the import graph from the source: each
`.py` file of a snapshot is parsed (its AST), and every `import`, `from … import` (relative
ones resolved) and `importlib.import_module("literal")` anywhere in it, inside functions too,
is an edge to the modules it names. A file is read and parsed only when its content is new:
the parse is kept by content hash, as the bytecode is (snapshot.Compiler), and the hashes are
the snapshot's own (`Snapshot.manifest`: take_snapshot hashed each file it copied and kept the
previous digest of each it linked), so a reload that changed one file hashes it once, in the
snapshot, and reads and parses it once, here.

Comparing the serving generation's snapshot with the new one by content gives the changed
files; the modules to drop are the changed ones and every module that imports one of them
(transitively: its names would still point at the old objects). A submodule does not depend on
its package unless it imports from it: a package imported again is given its kept submodules
as attributes (reimport.py).
What the graph cannot vouch for makes the reload a clean import, with the reason:

- a changed file that is not a `.py` module: a C extension, a data file read at import, the
  settings file (the app reads its settings as it is built);
- a dynamic import in a module the app imports and the incremental import keeps: it may hold a
  module the graph does not know it holds. That is a call of `importlib.import_module`,
  `__import__` or `importlib.reload` with anything but a string literal, under whatever name it
  was imported (`from importlib import import_module as load`) or passed on (`load =
  importlib.import_module`); and any use at all of what loads a module by its file or runs one
  (`spec_from_file_location`, `exec_module`, `load_module`, `SourceFileLoader`, `runpy.run_path`
  and the like: `_LOADERS`), which no import statement names;
- a different environment or `--app` for the workers.

What it cannot see either is state: a kept module that a dropped one wrote into as it was
imported (a registry a module adds itself to) keeps what the old code wrote. That is the
limit `incremental` is opted into with (README, "Incremental imports").
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

from pypnm.supervisor.snapshot import Snapshot, SnapshotChanges
from pypnm.supervisor.snapshot import module_name as module_name  # a path's module: the snapshot's reading, here too

# Calls that import a module named by their first argument: a string literal is an edge, anything else dynamic.
_DYNAMIC_FUNCTIONS = frozenset({"import_module", "__import__", "reload"})
# Those of them whose name means nothing else: used other than called (`load = importlib.import_module`,
# `map(import_module, names)`), the calls cannot be followed. (`reload` is also an ordinary method's name.)
_UNAMBIGUOUS_FUNCTIONS = frozenset({"import_module", "__import__"})
# What loads or runs a module by its file, or by a spec made from one: no import names the module it
# gives, so any use of these names (a call, an alias, a subclass of a loader) is a dynamic import.
_LOADERS = frozenset(
    {
        "spec_from_file_location",
        "spec_from_loader",
        "module_from_spec",
        "exec_module",
        "load_module",
        "load_source",  # imp's
        "SourceFileLoader",
        "SourcelessFileLoader",
        "run_path",
        "run_module",
    }
)


@dataclass(frozen=True)
class ModuleFacts:
    """What the master read in one module's source."""

    imports: frozenset[str]  # every module name it may import (not all of them exist in the project)
    dynamic: int | None  # the line of a dynamic import it cannot resolve, if any


@dataclass
class CodeScan:
    """A snapshot's files by content, and its modules' imports."""

    root: str  # the snapshot directory, which the file names below are relative to
    files: dict[str, bytes] = field(default_factory=dict)  # relative path -> sha256 of the content
    modules: dict[str, ModuleFacts] = field(default_factory=dict)  # module name -> facts
    paths: dict[str, str] = field(default_factory=dict)  # module name -> relative path


@dataclass(frozen=True)
class Plan:
    """An incremental import (`drop`, possibly empty) or, with `reason`, a clean one."""

    drop: list[str] | None
    reason: str | None = None

    @classmethod
    def clean(cls, reason: str) -> Plan:
        return cls(None, reason)


class ImportScanner:
    """Reads snapshots' import graphs, keeping each file's parse by content hash (a bounded cache)."""

    MAX_ENTRIES = 4096

    def __init__(self) -> None:
        self._facts: dict[tuple[str, bytes], ModuleFacts] = {}

    def scan(self, snapshot: Snapshot) -> CodeScan:
        """`snapshot`'s files by the digests it recorded, and the imports of its project's modules."""
        directory = snapshot.directory
        scan = CodeScan(str(directory))
        for relative, record in snapshot.manifest.items():
            scan.files[relative] = record.digest
            module = module_name(relative)
            if module is None or module.split(".")[0] not in snapshot.packages:
                continue
            scan.modules[module] = self._read(module, directory / relative, relative, record.digest)
            scan.paths[module] = relative
        # The settings files frozen beside the code (settings file, tokens, TLS pair) are not in the
        # manifest: their digests (hashed as they were copied) are added, so that a change to one is seen.
        scan.files.update(snapshot.file_digests)
        return scan

    def _read(self, module: str, path: Path, relative: str, digest: bytes) -> ModuleFacts:
        key = (relative, digest)
        facts = self._facts.get(key)
        if facts is None:
            facts = read_imports(module, relative.endswith("/__init__.py"), path.read_bytes())
            if len(self._facts) >= self.MAX_ENTRIES:
                self._facts.clear()
            self._facts[key] = facts
        return facts


def read_imports(module: str, is_package: bool, source: bytes) -> ModuleFacts:
    """The modules `module`'s source may import, and the line of its first unresolvable dynamic import."""
    tree = ast.parse(source)  # the snapshot compiled it already: a syntax error failed the reload there
    package = module if is_package else module.rpartition(".")[0]
    names: set[str] = set()
    dynamic: list[int] = []
    # The names the import functions were imported under here (`from importlib import import_module as load`).
    functions = set(_DYNAMIC_FUNCTIONS)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if alias.name in _DYNAMIC_FUNCTIONS and alias.asname is not None:
                    functions.add(alias.asname)
                elif alias.name in _LOADERS:
                    dynamic.append(node.lineno)
    called: set[int] = set()  # the id() of each function node of a call checked below, not a use of its own
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                # `import a.b.c` binds `a` and reaches `a.b.c` through its attributes: it holds all three.
                parts = alias.name.split(".")
                names.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node.module or "", node.level, package)
            if base is None:
                continue
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
        elif isinstance(node, ast.Call) and _called_name(node.func) in functions:
            called.add(id(node.func))
            first = node.args[0] if node.args else None
            if isinstance(first, ast.Constant) and isinstance(first.value, str) and not first.value.startswith("."):
                names.add(first.value)
            else:
                dynamic.append(node.lineno)
        elif isinstance(node, ast.Name | ast.Attribute) and id(node) not in called:
            name = _called_name(node)
            if name in _LOADERS or name in _UNAMBIGUOUS_FUNCTIONS:
                dynamic.append(node.lineno)
    # `from a.b import c` runs `a` first too, but holds only `a.b` and `c`: a new `a` does not concern it.
    return ModuleFacts(frozenset(names), min(dynamic, default=None))


def _resolve(name: str, level: int, package: str) -> str | None:
    if level == 0:
        return name
    parts = package.split(".") if package else []
    if level - 1 > len(parts):
        return None  # beyond the top-level package: an ImportError at run time, not an edge
    base = parts[: len(parts) - (level - 1)]
    return ".".join([*base, name] if name else base) or None


def _called_name(func: ast.expr) -> str | None:
    """The name a call goes by: `f` of `f(…)` and of `a.b.f(…)`; None for anything else (`f()(…)`, `x[0](…)`)."""
    if isinstance(func, ast.Name):
        return func.id
    return func.attr if isinstance(func, ast.Attribute) else None


def plan(previous: CodeScan, current: CodeScan, app_module: str) -> Plan:
    """What the next zygote, forked from the previous generation's, must drop; or why it must import clean."""
    changes = SnapshotChanges.between(previous.files, current.files)
    not_modules = sorted(path for path in changes.paths if module_name(path) is None)
    if not_modules:
        return Plan.clean(f"{not_modules[0]} changed, which is not a Python module" + _more(not_modules))
    changed_modules = set(changes.modules)
    drop = _importers(changed_modules, current)
    drop |= {name for name in _importers(changed_modules, previous) if name in current.modules}
    for name in sorted(_reachable(app_module, current) - drop):
        line = current.modules[name].dynamic
        if line is not None:
            return Plan.clean(
                f"a dynamic import in {current.paths[name]}, line {line}, which the import graph cannot follow"
            )
    return Plan(sorted(drop))


def _more(items: list[str]) -> str:
    return f" (and {len(items) - 1} more)" if len(items) > 1 else ""


def _importers(changed: set[str], scan: CodeScan) -> set[str]:
    """`changed` and every module that imports one of them, transitively."""
    importers: dict[str, set[str]] = {}
    for name, facts in scan.modules.items():
        for imported in facts.imports:
            importers.setdefault(imported, set()).add(name)
    drop = set(changed)
    todo = list(changed)
    while todo:  # bounded: each module enters `drop` (and `todo`) once
        name = todo.pop()
        for other in importers.get(name, set()) - drop:
            drop.add(other)
            todo.append(other)
    return drop


def _reachable(app_module: str, scan: CodeScan) -> set[str]:
    """The project's modules the app's import reaches by static imports."""
    parts = app_module.split(".")
    todo = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    seen: set[str] = set()
    while todo:  # bounded: each module is visited once
        name = todo.pop()
        if name in seen or name not in scan.modules:
            continue
        seen.add(name)
        todo.extend(scan.modules[name].imports - seen)
    return seen
