"""The previous app's route contexts, reused by an incremental zygote for the routes it kept.

Why: for each route of a router an app includes, FastAPI builds an effective context (the
route as that inclusion sees it: the prefixed path and its regex, the dependencies analysed
from the endpoint's signature, the response fields, the request handler), at the route's first
match (`worker.build_routes` makes that the zygote's, once per generation). An incremental
import re-runs the module that makes the app, so the new app includes the kept routers again
and builds every one of their contexts again, although nothing they are built from changed.
In the large benchmark app that was 420 contexts, 105-150 ms of CPU unloaded even with the
field adapters shared (field_adapters.py), and several times that while the serving workers
kept the cores busy: the largest step of an incremental reload. Reused, the step takes a
fifth of that.

What is reused. A context is a function of the route object and of the inclusion (the
include's prefix, dependencies, responses, tags, classes...: FastAPI's `_RouterIncludeContext`)
and of the app whose `dependency_overrides` it consults. So a context is kept with the route
(the same object: its module was kept), its and its router's attributes as they were (a
re-imported module that replaced one of them makes the route build anew), and the
inclusion's values but the app; a later inclusion of the same route whose values are equal
(`_same`: functions, classes and callback routes by identity, so a dependency a re-imported
module defines again is another one) takes a copy of it. The copy gets the new app, and a
request handler the route builds for it, as FastAPI builds one (`get_route_handler`, under
FastAPI's context variable), so no handler holds a previous app. What is kept is the serving
app's contexts themselves (no copies, no memory of their own); the next zygote, a fork, keeps
copies of them without that app and its handlers as its release begins (`forget`), before the
collection that frees the app. A context whose dependant's call is not its endpoint after it
was built (an integration that wraps the call while the handler is built) is not kept: built
twice, it would be wrapped twice.

When. Only while a zygote imports and builds its routes (`begin` to `end`, like the field
adapters), and only what the zygote it was forked from kept: an incremental import. A clean
import starts from the fork template, which keeps nothing, so production's default
(`reload_import = clean`) builds every context as FastAPI does. `end` keeps only the contexts
this import used, and `forget` (a release, before its collection) those whose endpoint, router
and inclusion values the kept modules still hold by name (field_adapters.still_named): a kept
context of a dropped module would keep the previous code alive.

Written here rather than taken from a library: none does this, and FastAPI has no hook for it.
It rests on FastAPI's private `_EffectiveRouteContext.from_api_route`; `install` wraps it only
after checking its shape and a probe: two apps including one router, the second one's context
taken from the first, must answer with each app's own dependency overrides. Another FastAPI,
where that does not hold, builds every context itself, as without pypnm, and the template's
log says so once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import inspect
import sys
from collections.abc import Callable, Collection
from typing import Any

from starlette.routing import BaseRoute

from pypnm.supervisor import field_adapters, worker

_BY_APP = "dependency_overrides_provider"  # the inclusion's and the context's field that is the app
_ROUTER = "included_router"  # the inclusion's field that is the router included


@dataclasses.dataclass
class _Kept:
    route: Any  # the APIRoute, held: its id is part of the key
    router: Any  # the router that holds it, as the inclusion names it
    state: tuple[tuple[str, ...], tuple[Any, ...]]  # the route's and the router's attributes when it was built
    inclusion: tuple[Any, ...]  # the inclusion's values but the app and the router
    context: Any  # the serving app's context; in the next zygote (`forget`), a copy without the app and handler


@dataclasses.dataclass
class _Reuse:
    """FastAPI's own builder and what it needs, whether contexts are reused now, the kept ones and their use."""

    original: Callable[..., Any] | None = None
    context_var: Any = None  # FastAPI's variable that tells a route's `get_route_handler` the context
    wrap: Callable[[Any, Any], Any] | None = None  # (route handler, max body size) -> the context's ASGI app
    inclusion: tuple[str, ...] = ()  # the inclusion's fields compared, in their order: all but the app and the router
    active: bool = False
    kept: dict[tuple[int, int, bool], list[_Kept]] = dataclasses.field(default_factory=dict)
    used: set[int] = dataclasses.field(default_factory=set)  # ids of the _Kept this import took or made
    names: dict[tuple[str, ...], tuple[str, ...]] = dataclasses.field(default_factory=dict)
    reused: int = 0
    built: int = 0


_reuse = _Reuse()


def install() -> str | None:
    """Wrap FastAPI's route context construction; the reason it is left alone, or None once wrapped."""
    if _reuse.original is not None:
        return None
    try:
        from fastapi import routing
    except ImportError as exc:
        return f"cannot import FastAPI's routing ({exc})"
    context_class = getattr(routing, "_EffectiveRouteContext", None)
    builder = getattr(context_class, "__dict__", {}).get("from_api_route")
    context_var = getattr(routing, "_effective_route_context_var", None)
    respond, limit = getattr(routing, "request_response", None), getattr(routing, "wrap_app_with_body_limit", None)
    inclusion_class = getattr(routing, "_RouterIncludeContext", None)
    inclusion_fields = _field_names(inclusion_class)
    if not (
        isinstance(builder, classmethod)
        and context_var is not None
        and callable(respond)
        and callable(limit)
        and {"original_route", "app", "dependant", "endpoint", "max_body_size", _BY_APP} <= _field_names(context_class)
        and {_ROUTER, _BY_APP} <= inclusion_fields
        and {"original_route", "include_context"} <= set(inspect.signature(builder.__func__).parameters)
    ):
        return "FastAPI builds its route contexts otherwise than the version pypnm knows"
    _reuse.original, _reuse.context_var = builder.__func__, context_var
    _reuse.wrap = lambda handler, most: limit(respond(handler), most)
    fields = dataclasses.fields(inclusion_class)  # type: ignore[arg-type]
    _reuse.inclusion = tuple(field.name for field in fields if field.name not in (_BY_APP, _ROUTER))
    context_class.from_api_route = classmethod(_from_api_route)  # type: ignore[union-attr]
    collecting = gc.isenabled()
    gc.disable()  # the probe's apps stay in the youngest generation: one cheap collection frees them after
    try:
        failed = _probe(_field_names(context_class))
    except Exception as exc:  # any other shape: FastAPI's own way
        failed = f"{type(exc).__name__}: {exc}"
    finally:
        _reuse.kept, _reuse.used, _reuse.names, _reuse.active = {}, set(), {}, False
        if collecting:
            gc.enable()
        gc.collect(0)  # or the template would freeze them (gc.freeze) in every process it forks
    if failed is not None:
        context_class.from_api_route = builder  # type: ignore[union-attr]
        _reuse.original = _reuse.context_var = _reuse.wrap = None
        return f"a route context taken from another app does not answer as FastAPI's own ({failed})"
    return None


def begin() -> None:
    """Hand out the kept contexts from now on (a zygote, before it imports the app)."""
    _reuse.active = _reuse.original is not None
    _reuse.used = set()
    _reuse.reused = _reuse.built = 0


def end() -> tuple[int, int] | None:
    """Stop handing them out and keep only what this import used; (reused, built), or None when not installed.

    A context this import did not use is one of a route that is gone, or of an inclusion that
    changed: no later import would find it either. An import that took and built none (a
    reload where nothing changed: the same app, its contexts built) keeps them all, for the next.
    """
    _reuse.active = False
    if _reuse.original is None:
        return None
    if _reuse.reused or _reuse.built:
        _keep_only(lambda kept: id(kept) in _reuse.used)
    _reuse.used = set()
    return _reuse.reused, _reuse.built


def forget(dropped: Collection[str]) -> None:
    """Keep only the contexts whose endpoint, router and inclusion the kept modules still hold by name.

    The endpoint as field_adapters.still_named finds a function; the router (an instance that
    holds every route) among its endpoint's module's names; the inclusion's values (its
    dependencies, responses, classes) each as still_named finds it. And keep of those a copy
    without the app and the handler: the previous app is what the release frees. A copy, not the
    context itself: another app that a kept module holds (a sub-app it mounts) serves its own.
    """
    gone = frozenset(dropped)
    verdicts: dict[int, bool] = {}  # by id: the same dependencies and classes recur in many inclusions
    _keep_only(lambda kept: _still_held(kept, gone, verdicts))
    for entries in _reuse.kept.values():
        for kept in entries:
            kept.context = _copy(kept.context, None)


def _keep_only(keep: Callable[[_Kept], bool]) -> None:
    kept_now: dict[tuple[int, int, bool], list[_Kept]] = {}
    for key, entries in _reuse.kept.items():
        if entries := [kept for kept in entries if keep(kept)]:
            kept_now[key] = entries
    _reuse.kept = kept_now


def _still_held(kept: _Kept, gone: frozenset[str], verdicts: dict[int, bool]) -> bool:
    endpoint = getattr(kept.route, "endpoint", None)
    if not field_adapters.still_named(endpoint, gone, verdicts):
        return False
    module = sys.modules.get(getattr(endpoint, "__module__", None) or "")
    if module is None or not any(value is kept.router for value in vars(module).values()):
        return False
    return all(field_adapters.still_named(value, gone, verdicts) for value in kept.inclusion)


def _from_api_route(cls: Any, *, original_route: Any, include_context: Any) -> Any:
    """_EffectiveRouteContext.from_api_route: a copy of a kept context while a zygote imports, else FastAPI's own."""
    build = _reuse.original
    assert build is not None
    if not _reuse.active:
        return build(cls, original_route=original_route, include_context=include_context)
    app, router = getattr(include_context, _BY_APP), getattr(include_context, _ROUTER)
    key = (id(original_route), id(router), app is None)  # ids of objects the entries hold: not reused meanwhile
    state = _state(original_route, router)
    inclusion = tuple(getattr(include_context, name) for name in _reuse.inclusion)
    for kept in _reuse.kept.get(key, ()):
        if kept.state[0] is state[0] and _same_state(kept.state[1], state[1]) and _same(kept.inclusion, inclusion):
            _reuse.reused += 1
            _reuse.used.add(id(kept))
            kept.context = _for_app(kept.context, app, original_route)  # the previous one is garbage now
            return kept.context
    context = build(cls, original_route=original_route, include_context=include_context)
    _reuse.built += 1
    # An integration that wraps the dependant's call while the handler is built would wrap a copy's twice.
    if getattr(context.dependant, "call", None) is context.endpoint:
        kept = _Kept(original_route, router, state, inclusion, context)
        _reuse.kept.setdefault(key, []).append(kept)
        _reuse.used.add(id(kept))
    return context


def _state(route: Any, router: Any) -> tuple[tuple[str, ...], tuple[Any, ...]]:
    """The route's and its router's attribute names (one tuple shared by all alike) and values.

    The router's too: FastAPI reads some of them into the context (its default response class,
    its operation ids' function), and a re-imported module may set them on a kept router.
    """
    names = (*vars(route), "", *vars(router))
    return _reuse.names.setdefault(names, names), (*vars(route).values(), *vars(router).values())


def _same_state(kept: tuple[Any, ...], now: tuple[Any, ...]) -> bool:
    """The attributes are the same objects: one replaced since (even by an equal one) builds anew."""
    return len(kept) == len(now) and all(before is after for before, after in zip(kept, now, strict=True))


def _same(kept: Any, now: Any, depth: int = 0) -> bool:
    """Whether an inclusion's value is what a kept one was: containers and dataclasses part by part.

    A route (a callback) by identity: a Starlette route's `==` compares only its path, endpoint
    and methods, not its summary or models. Anything else by its own `==`: a `Depends(check)`
    that a re-imported module makes again is equal when `check` is the same function, a class
    or function only to itself.
    """
    if kept is now:
        return True
    if type(kept) is not type(now) or depth > field_adapters.MAX_DEPTH or isinstance(now, BaseRoute):
        return False
    if isinstance(now, list | tuple):
        return len(kept) == len(now) and all(_same(a, b, depth + 1) for a, b in zip(kept, now, strict=True))
    if isinstance(now, dict):
        return list(kept) == list(now) and all(_same(kept[key], now[key], depth + 1) for key in now)
    if dataclasses.is_dataclass(now) and not isinstance(now, type):
        return all(
            _same(getattr(kept, field.name), getattr(now, field.name), depth + 1) for field in dataclasses.fields(now)
        )
    try:
        return bool(kept == now)
    except Exception:  # an `==` that raises (or answers an array): built anew
        return False


def _for_app(kept: Any, app: Any, route: Any) -> Any:
    """A copy of a kept context for `app`, with a handler the route builds for it, as FastAPI's own builder does."""
    assert _reuse.wrap is not None
    context = _copy(kept, app)
    token = _reuse.context_var.set(context)
    try:
        context.app = _reuse.wrap(route.get_route_handler(), context.max_body_size)
    finally:
        _reuse.context_var.reset(token)
    return context


def _copy(context: Any, app: Any) -> Any:
    """The context's fields, shared, with `app` as the app whose overrides it consults, and no handler yet.

    Not dataclasses.replace: that runs the 48 fields through `__init__`, most of the reuse's time.
    `install` checked that the fields are all a context holds.
    """
    copy = object.__new__(type(context))
    copy.__dict__.update(vars(context))
    setattr(copy, _BY_APP, app)
    copy.app = None
    return copy


def _field_names(cls: Any) -> set[str]:
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        return set()
    return {field.name for field in dataclasses.fields(cls)}


def _probe(context_fields: set[str]) -> str | None:
    """Two apps include one router; the second's context, taken from the first's, answers with its own overrides."""
    from fastapi import APIRouter, Depends, FastAPI

    def value() -> str:
        return "built"

    def overridden() -> str:
        return "overridden"

    router = APIRouter()

    @router.get("/probe")
    async def probe(got: str = Depends(value)) -> dict[str, str]:
        return {"got": got}

    apps, counts = [], []
    for _ in range(2):
        begin()
        app = FastAPI()
        app.include_router(router, prefix="/included")
        worker.build_routes(app)
        counts.append(end())
        apps.append(app)
    held = [set(vars(kept.context)) for entries in _reuse.kept.values() for kept in entries]
    if counts != [(0, 1), (1, 0)] or held != [context_fields]:
        return f"contexts (reused, built) {counts}, kept {len(held)}"
    apps[1].dependency_overrides[value] = overridden
    answers = [asyncio.run(worker.call_in_process(app, "/included/probe", {})) for app in apps]
    expected = [(200, b'{"got":"built"}'), (200, b'{"got":"overridden"}')]
    return None if answers == expected else f"answered {answers}"
