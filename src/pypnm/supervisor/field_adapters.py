"""One pydantic TypeAdapter per distinct FastAPI field while a zygote imports its app and builds its routes.

Why: FastAPI validates and serializes each field of a route (a parameter, a body, a response
model) with a pydantic `TypeAdapter` it builds for that field, and it builds every route twice:
when a router declares it, and again for each app that includes the router (the route's
effective context, built at its first match: `worker.build_routes`). An incremental import
re-runs the app module, so the routes of every kept module are built again. In the large
benchmark app the route build makes 820 adapters, most of its 120 ms (unloaded), which was
over a third of an incremental reload; nearly all of them are for fields equal to ones built
before. An adapter is a function of its field's annotation,
constraint metadata, `FieldInfo` attributes and config alone, so fields equal in those can
share one. While a zygote imports and builds its routes (`begin` to `end`), the first field of
each kind builds its adapter and every equal field after it takes that one; an incremental
zygote keeps the adapters its parent built for the modules it kept. The zygote's line in the
master's log says how many were reused.

Equal fields. Values are compared as keys: the same type and equal (`==`), containers, typing
forms and dataclasses (constraints such as `Le(5)`) part by part, classes and functions by
identity (that is their equality), so a class that a changed module defines again is a new key.
A value that cannot be hashed (an array as a default) makes its field build its own adapter, as
without pypnm.

Never outside a zygote's import. Workers, the template and the app's own requests build their
adapters as FastAPI does (`end` turns the reuse off before the zygote forks), so nothing made at
run time is kept here.

Forgetting. The adapters hold their fields' classes and functions, which hold their modules'
globals: kept across a release, an adapter of a dropped module would keep the previous code
alive. `forget`, called before the release's collection (reimport.release), removes every
adapter whose field names an object of a dropped module: a class or function defined there, or
an instance of one, also inside typing forms and dataclass metadata (validators). A class of a
kept module cannot hold one of a dropped module in its fields: a module that imports a dropped
one is dropped too (import_graph.py), the assumption incremental imports rest on.

Written here rather than taken from a library: none does this, FastAPI has no hook for it and
pydantic keeps no cache of adapters. An adapter is built in the private
`fastapi._compat.v2.ModelField.__post_init__`; `install` wraps it only after building a field
with it and checking that it sets nothing but `_type_adapter`. Another FastAPI, where that does
not hold, builds its own adapters, as without pypnm, and the template's log says so once.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Collection, Hashable
from typing import Any

# A field's value is looked into this deep (nested containers, typing forms); deeper is not reused.
MAX_DEPTH = 12
_PLAIN = (str, int, float, bool, bytes, type(None))


class _NotReusable(Exception):
    """The field holds a value that cannot be compared as a key."""


@dataclasses.dataclass(frozen=True)
class _Entry:
    adapter: Any
    modules: frozenset[str]  # the modules of the classes and functions its field names


class _Reuse:
    """The adapters built so far, whether they are handed out now, and what this import reused."""

    def __init__(self) -> None:
        self.original: Callable[[Any], None] | None = None  # ModelField.__post_init__, once installed
        self.entries: dict[Hashable, _Entry] = {}
        self.active = False
        self.reused = 0
        self.built = 0


_reuse = _Reuse()


def install() -> str | None:
    """Wrap FastAPI's field construction; the reason it is left alone, or None once wrapped."""
    if _reuse.original is not None:
        return None
    try:
        from fastapi._compat import v2
        from pydantic import TypeAdapter
        from pydantic.fields import FieldInfo
    except ImportError as exc:
        return f"cannot import FastAPI's field class ({exc})"
    model_field: Any = getattr(v2, "ModelField", None)
    original = getattr(model_field, "__post_init__", None)
    a_dataclass = isinstance(model_field, type) and dataclasses.is_dataclass(model_field)
    if original is None or not a_dataclass:
        return "FastAPI builds its fields otherwise than the version pypnm knows"
    try:
        probe = model_field(field_info=FieldInfo(annotation=int), name="probe")
        made = set(vars(probe)) - {field.name for field in dataclasses.fields(model_field)}
        usable = made == {"_type_adapter"} and isinstance(probe._type_adapter, TypeAdapter)
        usable = usable and set(FieldInfo(annotation=int).asdict()) == {"annotation", "metadata", "attributes"}
    except Exception as exc:  # any other shape: FastAPI's own way
        return f"FastAPI's fields are not the kind pypnm knows ({type(exc).__name__}: {exc})"
    if not usable:
        return "FastAPI's fields set more than their adapter"
    _reuse.original = original
    model_field.__post_init__ = _post_init
    return None


def begin() -> None:
    """Hand out equal fields' adapters from now on (a zygote, before it imports the app)."""
    _reuse.active = _reuse.original is not None
    _reuse.reused = _reuse.built = 0


def end() -> tuple[int, int] | None:
    """Stop handing them out; (adapters reused, adapters built) since `begin`, or None when not installed."""
    _reuse.active = False
    if _reuse.original is None:
        return None
    return _reuse.reused, _reuse.built


def forget(modules: Collection[str]) -> None:
    """Remove the adapters whose fields name anything of `modules` (dropped: see "Forgetting")."""
    dropped = frozenset(modules)
    for key in [key for key, entry in _reuse.entries.items() if not entry.modules.isdisjoint(dropped)]:
        del _reuse.entries[key]


def _post_init(field: Any) -> None:
    """ModelField.__post_init__: an equal field's adapter while a zygote imports, else FastAPI's own."""
    original = _reuse.original
    assert original is not None
    if not _reuse.active:
        original(field)
        return
    try:
        parts = field.field_info.asdict()
        values = (parts["annotation"], parts["metadata"], parts["attributes"], field.config)
        key = _key(values, 0)
        entry = _reuse.entries.get(key)
    except Exception:  # unhashable, too deep, or an __eq__ that raises: this field builds its own
        entry, key = None, None
    if entry is not None:
        field._type_adapter = entry.adapter
        _reuse.reused += 1
        return
    original(field)
    _reuse.built += 1
    if key is not None:
        modules: set[str] = set()
        _note_modules(values, modules, 0)
        _reuse.entries[key] = _Entry(field._type_adapter, frozenset(modules))


def _key(value: Any, depth: int) -> Hashable:
    """`value` as a key: tagged with its type; containers, typing forms and dataclasses part by part.

    Part by part, so that the type of every value inside counts: `Annotated[int, Le(1)]` and
    `Annotated[int, Le(True)]` are equal (`==`) but not the same field.
    """
    if depth > MAX_DEPTH:
        raise _NotReusable("nested too deep")
    kind = type(value)
    if kind in _PLAIN:
        return (kind, value)
    if isinstance(value, dict):
        return (kind, tuple((_key(k, depth + 1), _key(v, depth + 1)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return (kind, tuple(_key(item, depth + 1) for item in value))
    if isinstance(value, set | frozenset):
        return (kind, frozenset(_key(item, depth + 1) for item in value))
    origin = typing.get_origin(value)
    if origin is not None:
        return (kind, _key(origin, depth + 1), tuple(_key(argument, depth + 1) for argument in typing.get_args(value)))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return (kind, tuple(_key(getattr(value, field.name), depth + 1) for field in dataclasses.fields(value)))
    hash(value)  # TypeError: not reusable
    return (kind, value)


def _note_modules(value: Any, modules: set[str], depth: int) -> None:
    """Add the modules that define `value` (a class, a function) or its class; into typing forms and dataclasses."""
    if depth > MAX_DEPTH or type(value) in _PLAIN:
        return
    if typing.get_origin(value) is not None:
        _note_modules(typing.get_origin(value), modules, depth + 1)
        for argument in typing.get_args(value):  # Annotated's metadata are among them
            _note_modules(argument, modules, depth + 1)
        return
    if isinstance(value, type) or callable(value):
        module = getattr(value, "__module__", None)
        if isinstance(module, str):
            modules.add(module)
        if not isinstance(value, type):
            for inner in ("__func__", "func"):  # bound methods, functools.partial
                if hasattr(value, inner):
                    _note_modules(getattr(value, inner), modules, depth + 1)
        return
    modules.add(type(value).__module__)
    if dataclasses.is_dataclass(value):
        for field in dataclasses.fields(value):
            _note_modules(getattr(value, field.name, None), modules, depth + 1)
    elif isinstance(value, dict):
        for item in value.items():
            _note_modules(item, modules, depth + 1)
    elif isinstance(value, tuple | list | set | frozenset):
        for item in value:
            _note_modules(item, modules, depth + 1)
