"""One pydantic TypeAdapter per distinct FastAPI field while a zygote imports its app and builds its routes.

Why: FastAPI validates and serializes each field of a route (a parameter, a body, a response
model) with a pydantic `TypeAdapter` it builds for that field, and it builds every route twice:
when a router declares it, and again for each app that includes the router (the route's
effective context, built at its first match: `worker.build_routes`). An incremental import
re-runs the app module, so the routes of every kept module are built again. In the large
benchmark app the route build makes 820 adapters, most of its 120 ms (unloaded), which was
over a third of an incremental reload; nearly all of them are for fields equal to ones built
before. An adapter is a function of its field's annotation, constraint metadata, `FieldInfo`
attributes and config alone, so fields equal in those can share one. While a zygote imports
and builds its routes (`begin` to `end`), the first field of each kind builds its adapter and
every equal field after it takes that one; an incremental zygote keeps the adapters its parent
built for the modules it kept. The zygote's line in the master's log says how many were reused.

Equal fields. Values are compared as keys: the same type and equal (`==`) and, but for plain
values, the same repr (`Decimal("1.0")` and `Decimal("1.00")` are equal, but a schema shows them
apart); containers, typing forms and dataclasses (constraints such as `Le(5)`) part by part;
classes and functions by identity (that is their equality), so a class that a changed module
defines again is a new key. The field's mode (validation, serialization) is part of the key.
A value that cannot be hashed (an array as a default) makes its field build its own adapter, as
without pypnm.

Never outside a zygote's import. Workers, the template and the app's own requests build their
adapters as FastAPI does (`end` turns the reuse off before the zygote forks), so nothing made at
run time is kept here. And `end` keeps only the adapters that import used: one no import used
is of a field that is gone, or could never be equal to a later one (a model FastAPI makes anew
for each app, a constraint pydantic compares by identity), and would pile up over a line of
incremental imports.

Forgetting. The adapters hold their fields' classes and functions, which hold their modules'
globals: kept across a release, an adapter of a dropped module would keep the previous code
alive. So `forget`, called before the release's collection (reimport.release), keeps an adapter
only when everything its field names is still held by name by the modules kept: a class or
function found at its `__qualname__` in its module, which must not be one dropped; an instance
of such a class that holds only such things (a `Field(...)` nested in an annotation holds its
`default_factory`, a validator `TABLE.get` its dict); anything else made in C. A class FastAPI
makes per route (the `Body_…` model of a route with several bodies: module FastAPI's, found
nowhere), one made inside a function, a lambda: forgotten, whatever their module, as they might
hold the previous code. A class of a kept module cannot hold one of a dropped module in its
fields: a module that imports a dropped one is dropped too (import_graph.py), the assumption
incremental imports rest on.

Written here rather than taken from a library: none does this, FastAPI has no hook for it and
pydantic keeps no cache of adapters. An adapter is built in the private
`fastapi._compat.v2.ModelField.__post_init__`; `install` wraps it only after building a field
with it and checking that it sets nothing but `_type_adapter` and that the key holds every
`FieldInfo` attribute FastAPI passes on. Another FastAPI, where that does not hold, builds its
own adapters, as without pypnm, and the template's log says so once.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import types
import typing
from collections.abc import Callable, Collection, Hashable, Iterable
from typing import Any

# A field's value is looked into this deep (nested containers, typing forms); deeper is not reused.
MAX_DEPTH = 12
_PLAIN = (str, int, bool, bytes, type(None))  # compared by value; float by its repr (-0.0 is not 0.0)
_NAMES_NOTHING = (*_PLAIN, float)  # a key's values that hold no code: `forget` looks past them
_HEAP_TYPE = 1 << 9  # Py_TPFLAGS_HEAPTYPE: a class made at run time (a `class` statement), not one built into C


class _NotReusable(Exception):
    """The field holds a value that cannot be compared as a key."""


@dataclasses.dataclass
class _Kept:
    adapter: Any
    names: list[Any] | None = None  # what its key names besides plain values, once a `forget` needed it


class _Reuse:
    """The adapters kept, whether they are handed out now, and what this import used of them."""

    def __init__(self) -> None:
        self.original: Callable[[Any], None] | None = None  # ModelField.__post_init__, once installed
        self.adapters: dict[Hashable, _Kept] = {}  # by field key (`_key`)
        self.used: set[Hashable] = set()  # the keys this import built or reused
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
        # The key holds every FieldInfo attribute FastAPI passes on to the adapter (its own list, where it has one).
        attributes = FieldInfo(annotation=int).asdict()["attributes"]
        usable = usable and set(getattr(v2, "_Attrs", attributes)) <= set(attributes)
    except Exception as exc:  # any other shape: FastAPI's own way
        return f"FastAPI's fields are not the kind pypnm knows ({type(exc).__name__}: {exc})"
    if not usable:
        return "FastAPI's fields are built from more than pypnm compares"
    _reuse.original = original
    model_field.__post_init__ = _post_init
    return None


def begin() -> None:
    """Hand out equal fields' adapters from now on (a zygote, before it imports the app)."""
    _reuse.active = _reuse.original is not None
    _reuse.used = set()
    _reuse.reused = _reuse.built = 0


def end() -> tuple[int, int] | None:
    """Stop handing them out and keep only what this import used; (reused, built), or None when not installed.

    An adapter this import did not use is one of a field that is gone (a route removed, a model
    FastAPI makes anew for each app): no later import would find it either. An import that
    built no field (a reload where nothing changed) keeps them all, for the next.
    """
    _reuse.active = False
    if _reuse.original is None:
        return None
    if _reuse.reused or _reuse.built:
        _reuse.adapters = {key: kept for key, kept in _reuse.adapters.items() if key in _reuse.used}
    _reuse.used = set()
    return _reuse.reused, _reuse.built


def forget(dropped: Collection[str]) -> None:
    """Keep only the adapters whose fields name nothing of the `dropped` modules, once they left sys.modules.

    What a field names survives only if the modules kept still hold it under its name: a
    class or function found at its `__qualname__` in its kept module, an instance of such a
    class holding only such things. A class FastAPI makes per route (`Body_…`), one made in a
    function, a lambda or anything of a dropped module fails that and is forgotten: it might
    hold the previous code.
    """
    gone = frozenset(dropped)
    verdicts: dict[int, bool] = {}  # by id: the same classes recur in many fields
    for key, kept in list(_reuse.adapters.items()):
        if kept.names is None:
            kept.names = _names(key)
        if not all(still_named(value, gone, verdicts, 0) for value in kept.names):
            del _reuse.adapters[key]
            _reuse.used.discard(key)


def _post_init(field: Any) -> None:
    """ModelField.__post_init__: an equal field's adapter while a zygote imports, else FastAPI's own."""
    original = _reuse.original
    assert original is not None
    if not _reuse.active:
        original(field)
        return
    try:
        parts = field.field_info.asdict()
        key = (
            _key(parts["annotation"], 0),
            _key(parts["metadata"], 0),
            # Every attribute is there, most of them None: leaving those out keeps the key short and as unique.
            tuple((name, _key(value, 0)) for name, value in parts["attributes"].items() if value is not None),
            _key(field.config, 0),
            field.mode,
        )
        kept = _reuse.adapters.get(key)
    except Exception:  # unhashable, too deep, or an __eq__ or repr that raises: this field builds its own
        kept, key = None, None
    if kept is not None:
        field._type_adapter = kept.adapter
        _reuse.reused += 1
        _reuse.used.add(key)
        return
    original(field)
    _reuse.built += 1
    if key is not None:
        _reuse.adapters[key] = _Kept(field._type_adapter)
        _reuse.used.add(key)


def _key(value: Any, depth: int) -> Hashable:
    """`value` as a key: tagged with its type; containers, typing forms and dataclasses part by part.

    Part by part, so that the type of every value inside counts: `Annotated[int, Le(1)]` and
    `Annotated[int, Le(True)]` are equal (`==`) but not the same field. Other values are
    compared by `==` and by their repr: `Decimal("1.0") == Decimal("1.00")`, but a schema shows
    them apart.
    """
    if depth > MAX_DEPTH:
        raise _NotReusable("nested too deep")
    kind = type(value)
    if kind in _PLAIN:
        return (kind, value)
    if kind is float:
        return (kind, repr(value))
    if isinstance(value, dict):
        return (kind, tuple([(_key(k, depth + 1), _key(v, depth + 1)) for k, v in value.items()]))
    if isinstance(value, list | tuple):
        return (kind, tuple([_key(item, depth + 1) for item in value]))
    if isinstance(value, set | frozenset):
        return (kind, frozenset([_key(item, depth + 1) for item in value]))
    if isinstance(value, type):
        return (kind, value)  # identity; neither a typing form (`list[int]` is no type on 3.11+) nor a dataclass
    origin = typing.get_origin(value)
    if origin is not None:
        arguments = tuple([_key(argument, depth + 1) for argument in typing.get_args(value)])
        return (kind, _key(origin, depth + 1), arguments)
    if dataclasses.is_dataclass(value):
        return (kind, tuple([_key(getattr(value, field.name), depth + 1) for field in dataclasses.fields(value)]))
    hash(value)  # TypeError: not reusable
    return (kind, value, repr(value))


def _names(key: Hashable) -> list[Any]:
    """Every value a key holds that is not a plain value (classes, functions, other objects), once each."""
    found: dict[int, Any] = {}
    pending: list[Any] = [key]
    while pending:
        item = pending.pop()
        if type(item) is tuple or type(item) is frozenset:  # a key's own structure: `_key` made every container one
            pending.extend(item)
        elif type(item) not in _NAMES_NOTHING:
            found[id(item)] = item
    return list(found.values())


def still_named(value: Any, gone: frozenset[str], verdicts: dict[int, bool], depth: int = 0) -> bool:
    """Whether the kept modules still hold `value` by name (see `forget`); remembered in `verdicts` by id.

    Also route_contexts.forget's test of what a kept route context holds.
    """
    if type(value) in _NAMES_NOTHING:
        return True
    known = verdicts.get(id(value))
    if known is None:
        verdicts[id(value)] = False  # meanwhile: an object that holds itself (a cycle) is not kept, nor walked twice
        known = verdicts[id(value)] = _held_by_name(value, gone, verdicts, depth)
    return known


def _held_by_name(value: Any, gone: frozenset[str], verdicts: dict[int, bool], depth: int) -> bool:
    if depth > MAX_DEPTH:
        return False
    module = getattr(value, "__module__", None)  # a class's, a function's, an alias's; an instance's class's
    if isinstance(module, str) and (module in gone or module not in sys.modules):
        return False
    if isinstance(value, functools.partial):
        parts: Iterable[Any] = (value.func, *value.args, *value.keywords.values())
    elif isinstance(value, types.MethodType):
        parts = (value.__func__, value.__self__)
    elif isinstance(value, types.BuiltinFunctionType):  # made in C; a bound one (`TABLE.get`) holds its object
        owner = value.__self__
        return owner is None or isinstance(owner, types.ModuleType) or still_named(owner, gone, verdicts, depth + 1)
    elif isinstance(value, type):
        # Made in C (NoneType, int): holds no Python code of anyone's.
        return not value.__flags__ & _HEAP_TYPE or _found_by_name(value)
    elif isinstance(value, types.FunctionType):
        return _found_by_name(value)
    else:  # an instance: of a class held by name, holding only what is (a nested `Field(...)` holds its callables)
        parts = (type(value), *_state(value))
    return all(still_named(part, gone, verdicts, depth + 1) for part in parts)


def _state(value: Any) -> Iterable[Any]:
    """What an instance holds: a container's items, else its attributes (`__dict__` and slots)."""
    if isinstance(value, dict):
        return (*value.keys(), *value.values())
    if isinstance(value, list | tuple | set | frozenset):
        return value
    held = list(getattr(value, "__dict__", {}).values())
    for cls in type(value).__mro__:
        slots = cls.__dict__.get("__slots__", ())
        for name in (slots,) if isinstance(slots, str) else slots:
            if name not in ("__dict__", "__weakref__") and hasattr(value, name):
                held.append(getattr(value, name))
    return held


def _found_by_name(value: type | types.FunctionType) -> bool:
    """`value` is what its module holds at its qualified name (read from the namespaces, no `__getattr__` run)."""
    module = sys.modules.get(getattr(value, "__module__", None) or "")
    qualname = getattr(value, "__qualname__", None)
    if module is None or not isinstance(qualname, str):
        return False
    found: Any = module
    for part in qualname.split("."):
        namespace = getattr(found, "__dict__", None)
        if not isinstance(namespace, dict | types.MappingProxyType):
            return False
        found = namespace.get(part)
    if isinstance(found, classmethod | staticmethod):  # a method's function, as its class holds it
        found = found.__func__
    return found is value
