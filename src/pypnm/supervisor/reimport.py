"""An incremental import, in a zygote forked from the previous generation's zygote.

The master decided which modules to drop (import_graph.py: those whose files changed and
every module that imports them, transitively); `drop` drops them from `sys.modules` (and from
their kept parent package's attributes, where `from pkg import mod` would find them), `move`
moves every module kept to the new snapshot, and the app's import (worker.find_app) then imports
the dropped ones again from there, as the app's import reaches them. A standby (template.py)
drops and releases ahead of the reload, and moves once the reload names the new snapshot.

Moving a kept module to the new snapshot: its file there has the same bytes (it did not
change), but its `__file__`, `__spec__`, loader path and, for a package, `__path__` still
name the previous snapshot's directory, which is removed once that generation has drained.
A package's `__path__` is where its submodules are found: left as it was, a submodule
imported for the first time later (a lazy import) would be looked for in a directory that
is gone, or found in the previous snapshot. Tracebacks are not affected: the master compiles
each file with its original path as the code's file name (snapshot.py).

Releasing what was dropped. Once dropped, the previous generation's modules and app are garbage,
but garbage in reference cycles (a module's functions and its globals, an app and its routers),
which only the cycle collector frees, and which the frameworks' own caches keep reachable:
FastAPI memoizes facts about each endpoint function and model class in `functools.lru_cache`s,
and a cached function holds its module's globals, so the whole previous app. Uncollected, each
incremental import would add the previous app to the zygote's memory, and its workers'. So
`release` clears the caches of the frameworks in `FRAMEWORK_CACHES` and typing's (caches are
transparent: what is asked again is computed again, for the kept code too), forgets the pydantic
adapters of the dropped modules' fields (field_adapters.py) and pydantic's parametrized generic
models that name them (`forget_generic_models`), and collects. A cache
of the app's own, in a kept module, that holds dropped code keeps it: that is the stale-state
limit of incremental imports (README).

Freezing what is kept. A collection's cost is the objects it walks, and writing each one's header
copies the pages the zygote shares with its parent: walking a whole app of 200 modules took 65-80 ms
(most of an incremental reload's time but the routes'). What is dropped is nearly always what the
previous zygote imported itself: the modules edited last, the app module, which imports them all,
and the routes built for the app. So right after its collection a zygote can freeze everything it
keeps (`gc.freeze`, a constant-time list splice), and what it imports next stays unfrozen: the
next zygote walks only that, 20-30 ms for the same app. `Frozen` tracks which project modules
were frozen that way. Frozen garbage is never collected, so when a dropped module is one of them
(another file changed than last time), `release` first thaws everything (`gc.unfreeze`, the
template's libraries too) and walks it all (a full collection: libraries and app, about twice as
long as the app alone), then freezes again, as the libraries must be. That is why a zygote
freezes only when it dropped the same modules as the release before (`Frozen.worth_freezing`):
one file edited again and again, where it pays from the next reload on; edits that move from
file to file keep walking the app, as without freezing, instead of a full collection each time.
Garbage can end up frozen two more ways: what a cache `release` does not clear (one of the app's
own) still held from a dropped module at the collection and let go of later; and an object a kept
module made in an earlier generation, held only by kept state that a changed module replaces at
import. It cannot pile up: a line of incremental imports is at most `reload_import_line` long
(lifecycle.py), and the clean import that ends it starts from the fork template, without any of it.
The price of a full collection: it walks the libraries' objects as well, and writing their headers
gives that zygote, and the line after it, its own copy of the pages they are on.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import importlib
import importlib.abc
import importlib.machinery
import logging
import os
import sys
import typing
from collections.abc import Collection, Iterable, MutableMapping, Sequence
from dataclasses import dataclass
from importlib.abc import Loader
from importlib.machinery import ModuleSpec
from types import FunctionType, ModuleType
from typing import Any

from pypnm.supervisor import field_adapters, route_contexts

logger = logging.getLogger("pypnm.supervisor.reimport")


def drop(packages: list[str], names: list[str]) -> KeptSubmodules:
    """Drop `names` from `sys.modules`, and from their kept parent package's attributes.

    Returns the finder that gives a dropped package its kept submodules when it is imported
    again; it is on `sys.meta_path` until `remove()` (after the app's import).
    """
    kept = KeptSubmodules(packages, names)
    for name in names:
        module = sys.modules.pop(name, None)
        if module is None:
            continue
        # `from pkg import mod` takes the package's attribute when it has one: a kept package
        # must not hand out the dropped module (the import system sets it again on import).
        parent, _, child = name.rpartition(".")
        if parent in sys.modules and getattr(sys.modules[parent], child, None) is module:
            delattr(sys.modules[parent], child)
    sys.meta_path.insert(0, kept)
    return kept


def move(packages: list[str], old: str, new: str) -> None:
    """Point the project's kept modules, and `sys.path`, from the snapshot `old` to the snapshot `new`.

    Only the project's modules are looked at: a module of the libraries is never in a snapshot,
    and touching one (its reference count) would copy the page it shares with the parent zygote.
    """
    for name in project_modules(packages):
        module = sys.modules.get(name)
        if isinstance(module, ModuleType):
            _move(module, old, new)
    sys.path[:] = [new if entry == old else entry for entry in sys.path]
    sys.path_importer_cache.pop(old, None)
    importlib.invalidate_caches()


class KeptSubmodules(importlib.abc.MetaPathFinder):
    """Gives each dropped package, as it is imported again, its kept submodules as attributes.

    A submodule that did not change and does not import from its package is kept, but the
    package's new module object would not have it as an attribute (the import system sets
    that only when it loads the submodule), so `import pkg.mod; pkg.mod.f()` would fail. The
    attributes are set before the package's own code runs, as they were when it last ran.
    """

    def __init__(self, packages: list[str], drop: list[str]) -> None:
        dropped = set(drop)
        self.children: dict[str, dict[str, ModuleType]] = {}
        for name in project_modules(packages):
            parent, _, child = name.rpartition(".")
            module = sys.modules.get(name)
            if parent in dropped and name not in dropped and isinstance(module, ModuleType):
                self.children.setdefault(parent, {})[child] = module

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        children = self.children.pop(fullname, None)
        if not children:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _WithAttributes(spec.loader, children)
        return spec

    def remove(self) -> None:
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self)


class _WithAttributes(importlib.abc.Loader):
    """A package's own loader, which first sets the kept submodules on the new module."""

    def __init__(self, loader: Loader, children: dict[str, ModuleType]) -> None:
        self.loader = loader
        self.children = children

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__dict__.update(self.children)
        self.loader.exec_module(module)

    def __getattr__(self, name: str) -> Any:  # get_source, path, ...: the package's loader answers
        return getattr(self.loader, name)


# The packages whose module-level `lru_cache`s are cleared when modules are dropped (see "Releasing"):
# FastAPI's cache facts about the app's functions and classes. Not pydantic's `lru_cache`s: they hold no
# app code, and one of them returns a class it makes at its first call (clearing it would make a second
# one). pydantic's cache of parametrized generic models does hold app code: `forget_generic_models`.
FRAMEWORK_CACHES = ("fastapi", "starlette")
MAX_KEY_DEPTH = 12  # how deep `forget_generic_models` looks into a key (nested typing forms, validators)
MAX_KEY_PARTS = 2000  # and how many objects of one key at most
_PLAIN = (str, bytes, int, float, bool, complex, type(None))  # values that hold nothing


@dataclass(frozen=True)
class Frozen:
    """What of the project a zygote keeps frozen, and what the releases before it did (see "Freezing").

    A zygote of a clean import has frozen nothing of the project (the template froze only the
    libraries).
    """

    modules: frozenset[str] = frozenset()  # the project's modules whose objects are frozen
    last_drop: frozenset[str] = frozenset()  # what the release before dropped
    walked_all: bool = False  # that release was a full collection

    def needs_full_collection(self, drop: Collection[str]) -> bool:
        """Whether what `drop` held may be frozen."""
        return not self.modules.isdisjoint(drop)

    def worth_freezing(self, drop: Collection[str]) -> bool:
        """The same modules dropped twice in a row (one file edited again and again): freezing pays.

        Edits that move from file to file gain nothing from it: each would drop a module frozen
        the time before, which needs a full collection.
        """
        return frozenset(drop) == self.last_drop


NOTHING_FROZEN = Frozen()


def release(frozen: Frozen, drop: Collection[str], kept: Collection[str]) -> Frozen:
    """Clear the frameworks' caches, collect what the dropped modules held, then freeze what is kept if that pays.

    `frozen` is the previous zygote's (this process inherited it by fork), `drop` what was
    dropped, `kept` the project's modules still imported. Returns this zygote's `Frozen`.
    """
    full = frozen.needs_full_collection(drop)
    field_adapters.forget(drop)  # the adapters of the dropped modules' fields hold their classes
    route_contexts.forget(drop)  # and the route contexts of their routes, their endpoints
    forget_generic_models(frozenset(drop))
    for name, module in list(sys.modules.items()):
        if name.partition(".")[0] in FRAMEWORK_CACHES and isinstance(module, ModuleType):
            for value in list(vars(module).values()):
                if isinstance(value, functools._lru_cache_wrapper):
                    value.cache_clear()
    # typing's caches (`Optional[Model]`, `list[Model]` of a dropped module's class), which CPython's
    # own test runner clears this way between tests.
    for clear in getattr(typing, "_cleanups", ()):
        clear()
    if full:
        gc.unfreeze()
    gc.collect()
    dropped = frozenset(drop)
    if full or frozen.worth_freezing(drop):  # a full collection thawed the libraries: they are frozen again
        gc.freeze()
        return Frozen(frozenset(kept), dropped, full)
    return Frozen(frozen.modules, dropped, full)


def forget_generic_models(dropped: frozenset[str]) -> int:
    """Take out of pydantic's cache of parametrized generic models every entry that names dropped code.

    Why: `Page[Item]`, a generic model of a kept module parametrized with a class of a dropped
    one, is cached under a key that holds `Item`, for as long as `Page[Item]` lives. The cache
    holds the model only weakly, but the model lives in a cycle (a class and its validators) that
    only the release's collection frees, and the key, with `Item` and its module's globals, is let
    go of only once that collection has run. The zygote then freezes what survived (see
    "Freezing"), so the dropped module would stay for the rest of the line of incremental imports,
    one more with each reload. Taken out first, the entry's key is freed now, and the collection
    frees the model and the dropped module with it. An entry that names only kept code stays, so
    `Page[int]` is the same class before and after a release. Returns how many entries were taken
    out; a pydantic whose cache is not where this looks leaves it alone, and one whose keys cannot
    be looked into as here is logged, the entries left in place (the leak, not a failed reload).
    """
    generics = sys.modules.get("pydantic._internal._generics")
    cache = getattr(generics, "_GENERIC_TYPES_CACHE", None)
    if not isinstance(cache, MutableMapping):
        return 0
    try:
        stale = [key for key in list(cache.keys()) if _names_dropped(key, dropped)]
    except Exception as exc:  # pydantic's own internals: never let them fail a reload
        logger.warning("pydantic's generic models were not looked into: %s: %s", type(exc).__name__, exc)
        return 0
    for key in stale:
        cache.pop(key, None)
    return len(stale)


def _names_dropped(key: Any, dropped: frozenset[str]) -> bool:
    """Whether a cache key holds anything of a dropped module, however deep (`MAX_KEY_DEPTH`, `MAX_KEY_PARTS`).

    Classes, functions and anything else with a `__module__` (a TypeVar, an enum member) are
    judged by it: a module dropped, or no longer imported at all (a module an earlier release
    dropped). Everything else is looked into, typing forms by their arguments and other objects
    by what they hold (a validator in `Annotated` holds its function, an evaluated forward
    reference its class). A parametrized model (`Page[int]`) is judged by its generic and its
    arguments, not by its `__module__`, which names the module that first asked for it: one of a
    kept generic and kept arguments is kept, whichever module made it. A key too large or deep to
    look through is taken out, which costs only making its model again.
    """
    seen: set[int] = set()
    pending: list[tuple[Any, int]] = [(key, 0)]
    while pending:
        value, depth = pending.pop()
        if type(value) in _PLAIN or id(value) in seen:
            continue
        seen.add(id(value))
        if depth > MAX_KEY_DEPTH or len(seen) > MAX_KEY_PARTS:
            return True
        generic = getattr(value, "__pydantic_generic_metadata__", None) if isinstance(value, type) else None
        if isinstance(generic, dict) and generic.get("origin") is not None:
            parts: Iterable[Any] = (generic["origin"], *generic.get("args", ()))
        else:
            module = getattr(value, "__module__", None)
            if isinstance(module, str) and (module in dropped or module not in sys.modules):
                return True
            if isinstance(value, type | FunctionType | ModuleType):  # judged by their module: nothing more to see
                continue
            parts = (*typing.get_args(value), *gc.get_referents(value))
        pending.extend((part, depth + 1) for part in parts)
    return False


def project_modules(packages: list[str]) -> set[str]:
    """The names of the project's modules imported in this process now."""
    tops = set(packages)
    return {name for name in list(sys.modules) if name.partition(".")[0] in tops}


Stamps = dict[str, tuple[int, int]]  # a module's file: its mtime (ns) and size as the module was imported


def stamp_files(names: Iterable[str]) -> Stamps:
    """The files of the modules `names` that have one, with their mtime and size now.

    Why: an incremental import keeps every module that is not the snapshot's (its import graph
    knows only the snapshot's packages), so a module the app imported from elsewhere (a sibling
    package of a top-level `main.py`, a library the app imports itself, which the fork template
    does not hold) would be kept after its file changed, and the reload would serve the old code.
    The next incremental zygote compares these stamps (`changed_file`) and, on any difference,
    leaves the reload to a clean import.
    """
    stamps: Stamps = {}
    for name in names:
        path = getattr(sys.modules.get(name), "__file__", None)
        if isinstance(path, str):  # not a namespace package, a built-in or frozen module: a file that can change
            stamp = _stamp(path)
            if stamp is not None:
                stamps[path] = stamp
    return stamps


def changed_file(stamps: Stamps) -> str | None:
    """The first of the stamped files that changed or went away since, or None."""
    return next((path for path, stamp in stamps.items() if _stamp(path) != stamp), None)


def _stamp(path: str) -> tuple[int, int] | None:
    """A file's modification time (ns) and size; None when it cannot be read."""
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_mtime_ns, status.st_size


MAX_ROUTE_WALK = 100_000  # routes, routers and mounted apps `stale_endpoint` looks at, at most


def stale_endpoint(app: Any, dropped: Collection[str]) -> str | None:
    """A route of the app whose endpoint is a dropped module's previous code, named; None when there is none.

    Why: a module imported again that adds routes to a router of a kept module (the app module
    calling `kept.router.add_api_route(...)`) adds them again at each incremental import, beside
    the previous ones, which the kept router still holds and which answer first. The endpoint
    of such a route is a function whose module was dropped and whose globals are not the module
    imported again (a function made anew, even inside a function, has the new module's). Walks
    the app's routes, the routers it includes and the apps it mounts, duck-typed (`routes`,
    `router`, `original_router`, `app`), as FastAPI and Starlette hold them.
    """
    gone = frozenset(dropped)
    pending: list[Any] = [app]
    seen: set[int] = set()
    while pending and len(seen) < MAX_ROUTE_WALK:
        item = pending.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        endpoint = getattr(item, "endpoint", None)
        if isinstance(endpoint, FunctionType) and endpoint.__module__ in gone:
            module = sys.modules.get(endpoint.__module__)
            if module is None or endpoint.__globals__ is not vars(module):
                return f"{endpoint.__module__}.{endpoint.__qualname__}"
        for name in ("router", "original_router", "app"):
            child = getattr(item, name, None)
            if child is not None and not isinstance(child, FunctionType):
                pending.append(child)
        routes = getattr(item, "routes", None)
        if isinstance(routes, list):
            pending.extend(routes)
    return None


def _moved(path: object, old: str, new: str) -> object:
    if isinstance(path, str) and (path == old or path.startswith(old + "/")):
        return new + path[len(old) :]
    return path


def _move(module: ModuleType, old: str, new: str) -> None:
    """Point a kept module's paths at the new snapshot (a no-op for modules from elsewhere)."""
    namespace = module.__dict__
    if not isinstance(namespace.get("__file__"), str) or not namespace["__file__"].startswith(old + "/"):
        return
    for attribute in ("__file__", "__cached__"):
        if attribute in namespace:
            namespace[attribute] = _moved(namespace[attribute], old, new)
    package_path = namespace.get("__path__")
    if isinstance(package_path, list):
        package_path[:] = [_moved(entry, old, new) for entry in package_path]
    spec = namespace.get("__spec__")
    if spec is not None:
        spec.origin = _moved(spec.origin, old, new)
        if spec.has_location and spec.cached is not None:
            spec.cached = _moved(spec.cached, old, new)
        locations = spec.submodule_search_locations
        if isinstance(locations, list):
            locations[:] = [_moved(entry, old, new) for entry in locations]
    loader = namespace.get("__loader__")
    if loader is not None and isinstance(getattr(loader, "path", None), str):
        loader.path = _moved(loader.path, old, new)
