"""An incremental zygote takes the previous app's route contexts for the routes it kept.

In this process (real FastAPI, `route_contexts` installed for the test and taken out after it):
which inclusions take a kept context and which build their own, that a taken context answers
with the new app's dependency overrides, and that forgetting a dropped module's contexts lets
its code be freed. Under the real server: an incremental reload takes the kept module's contexts,
and its routes answer with the overrides the re-imported main module set.
"""

from __future__ import annotations

import re
import sys
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import APIRouter, Depends, FastAPI, HTTPException
from fastapi import routing as fastapi_routing
from fastapi.responses import PlainTextResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field

from conftest import (
    STATUS_ROUTES,
    Service,
    StartService,
    asgi_request,
    base_env,
    module_from_source,
    pypnm_command,
    reload_by_sighup,
    rewrite,
    supervisor_status,
    wait_until,
    write_app_package,
)
from pypnm.supervisor import reimport, route_contexts
from pypnm.supervisor.worker import build_routes

BUILDER = fastapi_routing._EffectiveRouteContext.__dict__["from_api_route"]


@pytest.fixture
def reuse(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Contexts reused in this process for one test; FastAPI's own builder back after it."""
    monkeypatch.setattr(fastapi_routing._EffectiveRouteContext, "from_api_route", BUILDER)
    monkeypatch.setattr(route_contexts, "_reuse", route_contexts._Reuse())
    assert route_contexts.install() is None  # this FastAPI is one pypnm knows
    yield
    route_contexts.end()


def database() -> str:
    return "the database"


def a_fake() -> str:
    return "a fake"


class Reading(BaseModel):
    channel: int = Field(ge=0, le=32)


def readings_router() -> APIRouter:
    router = APIRouter(prefix="/readings")

    @router.post("/")
    async def add(body: Reading, source: str = Depends(database)) -> dict[str, Any]:
        return {"channel": body.channel, "source": source}

    @router.get("/{channel}")
    async def one(channel: int, source: str = Depends(database)) -> dict[str, Any]:
        return {"channel": channel, "source": source}

    return router


def including(*routers: APIRouter) -> Callable[[FastAPI], None]:
    def include(app: FastAPI) -> None:
        for router in routers:
            app.include_router(router)

    return include


def built_app(include: Callable[[FastAPI], None]) -> tuple[FastAPI, tuple[int, int] | None]:
    """A new app, what `include` adds to it, its routes built as a zygote builds them: (app, (reused, built))."""
    route_contexts.begin()
    app = FastAPI()
    include(app)
    build_routes(app)
    return app, route_contexts.end()


def test_a_kept_routers_contexts_are_taken_and_answer_with_the_new_apps_overrides(reuse: None) -> None:
    router = readings_router()
    first, counts = built_app(lambda app: app.include_router(router, prefix="/v1"))
    assert counts == (0, 2)
    second, counts = built_app(lambda app: app.include_router(router, prefix="/v1"))
    assert counts == (2, 0)

    second.dependency_overrides[database] = a_fake
    assert asgi_request(second, "GET", "/v1/readings/7").json() == {"channel": 7, "source": "a fake"}
    assert asgi_request(first, "GET", "/v1/readings/7").json() == {"channel": 7, "source": "the database"}
    # The taken context's fields still validate: path, body, constraints.
    assert asgi_request(second, "GET", "/v1/readings/x").status_code == 422
    assert asgi_request(second, "POST", "/v1/readings/", json={"channel": 33}).status_code == 422
    answer = asgi_request(second, "POST", "/v1/readings/", json={"channel": 3})
    assert answer.json() == {"channel": 3, "source": "a fake"}


def test_the_same_router_included_twice_takes_each_inclusions_own_context(reuse: None) -> None:
    router = readings_router()

    def twice(app: FastAPI) -> None:  # not `including`: the prefixes differ
        app.include_router(router, prefix="/v1")
        app.include_router(router, prefix="/v2")

    built_app(twice)
    app, counts = built_app(twice)
    assert counts == (4, 0)
    assert asgi_request(app, "GET", "/v1/readings/1").status_code == 200
    assert asgi_request(app, "GET", "/v2/readings/2").json() == {"channel": 2, "source": "the database"}


def refuse() -> None:
    raise HTTPException(status_code=403, detail="refused")


@pytest.mark.parametrize(
    "change",
    ["prefix", "a dependency defined again", "a route attribute replaced"],
)
def test_what_changed_builds_its_contexts_anew(reuse: None, change: str) -> None:
    router = readings_router()
    built_app(lambda app: app.include_router(router, prefix="/v1", dependencies=[Depends(a_fake)]))
    if change == "prefix":
        app, counts = built_app(lambda app: app.include_router(router, prefix="/v9", dependencies=[Depends(a_fake)]))
        assert asgi_request(app, "GET", "/v9/readings/1").status_code == 200
    elif change == "a dependency defined again":  # a re-imported module's function of the same name: another one
        app, counts = built_app(lambda app: app.include_router(router, prefix="/v1", dependencies=[Depends(refuse)]))
        assert asgi_request(app, "GET", "/v1/readings/1").status_code == 403
    else:
        route = next(route for route in router.routes if isinstance(route, APIRoute) and route.name == "one")
        route.summary = "One reading"
        app, counts = built_app(lambda app: app.include_router(router, prefix="/v1", dependencies=[Depends(a_fake)]))
        assert app.openapi()["paths"]["/v1/readings/{channel}"]["get"]["summary"] == "One reading"
    assert counts is not None and counts[1] == (1 if change == "a route attribute replaced" else 2), counts


def test_a_router_attribute_set_since_builds_its_contexts_anew(reuse: None) -> None:
    """FastAPI reads the router's default response class into the context: a re-imported module may set it."""
    router = APIRouter()

    @router.get("/text")
    async def text() -> str:
        return "plain"

    built_app(lambda app: app.include_router(router))
    router.default_response_class = PlainTextResponse  # the app module, edited, sets it on the kept router
    app, counts = built_app(lambda app: app.include_router(router))
    answer = asgi_request(app, "GET", "/text")
    assert (counts, answer.text, answer.headers["content-type"]) == ((0, 1), "plain", "text/plain; charset=utf-8")


def modem_event() -> None:
    """What a modem's poll calls back: the endpoint a callback route documents."""


def test_a_callback_route_made_again_builds_anew(reuse: None) -> None:
    """Another route with the same path, endpoint and methods (Starlette's `==`) is another callback."""
    router = APIRouter()

    @router.post("/modems/{mac}/poll")
    async def poll(mac: str) -> dict[str, str]:
        return {"mac": mac}

    def with_callback(summary: str) -> Callable[[FastAPI], None]:
        callbacks = APIRouter()  # what a re-imported app module makes again, around a kept endpoint
        callbacks.add_api_route("{$callback_url}/event", modem_event, methods=["POST"], summary=summary)
        return lambda app: app.include_router(router, callbacks=callbacks.routes)

    def summary_of(app: FastAPI) -> str:
        (callback,) = app.openapi()["paths"]["/modems/{mac}/poll"]["post"]["callbacks"].values()
        return str(callback["{$callback_url}/event"]["post"]["summary"])

    first, _ = built_app(with_callback("Modem event v1"))
    second, counts = built_app(with_callback("Modem event v2"))
    assert counts == (0, 1)
    assert (summary_of(first), summary_of(second)) == ("Modem event v1", "Modem event v2")


class CountingRoute(APIRoute):
    """An integration that wraps the dependant's call as it builds the handler (counting the endpoint's calls)."""

    calls = 0

    def get_route_handler(self) -> Callable[..., Any]:
        context = fastapi_routing._effective_route_context_var.get()
        dependant = (context if context is not None else self).dependant
        inner = dependant.call
        assert inner is not None

        async def counted(**values: Any) -> Any:
            CountingRoute.calls += 1
            return await inner(**values)

        dependant.call = counted
        return super().get_route_handler()


def test_a_context_whose_call_an_integration_wrapped_is_built_each_time(reuse: None) -> None:
    router = APIRouter(route_class=CountingRoute)

    @router.get("/counted")
    async def counted() -> dict[str, str]:
        return {"status": "ok"}

    built_app(lambda app: app.include_router(router))
    app, counts = built_app(lambda app: app.include_router(router))
    assert counts == (0, 1)  # taken, its call would have been wrapped twice
    before = CountingRoute.calls
    assert asgi_request(app, "GET", "/counted").status_code == 200
    assert CountingRoute.calls == before + 1


def test_install_refuses_a_fastapi_where_a_taken_context_answers_with_the_previous_app(
    reuse: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As if FastAPI's handlers read the app from elsewhere than the context: the probe's override is not seen."""
    monkeypatch.setattr(fastapi_routing._EffectiveRouteContext, "from_api_route", BUILDER)
    monkeypatch.setattr(route_contexts, "_reuse", route_contexts._Reuse())
    copy = route_contexts._copy
    keeping_the_app = lambda context, app: copy(context, context.dependency_overrides_provider)  # noqa: E731
    monkeypatch.setattr(route_contexts, "_copy", keeping_the_app)
    reason = route_contexts.install()
    assert reason is not None and "does not answer as FastAPI's own" in reason, reason
    assert fastapi_routing._EffectiveRouteContext.__dict__["from_api_route"] is BUILDER
    assert route_contexts.end() is None


# A route module whose contexts are kept, with an inclusion dependency of its own module.
DROPPED = """from fastapi import APIRouter, Depends

router = APIRouter()


def verified() -> bool:
    return True


@router.get("/dropped")
async def dropped(ok: bool = Depends(verified)) -> bool:
    return ok
"""


@pytest.mark.parametrize("dropped", [True, False])
def test_a_release_forgets_the_dropped_modules_contexts_and_so_frees_their_code(reuse: None, dropped: bool) -> None:
    name = "routecontexts_dropped"
    module = module_from_source(name, DROPPED)
    closures = readings_router()
    app, _ = built_app(including(module.router, closures))
    gone, previous_app = weakref.ref(module.dropped), weakref.ref(app)
    del app
    if dropped:
        del module, sys.modules[name]  # what reimport.drop does
    try:
        # The kept contexts are the serving app's own; a release takes that app out of them before it collects.
        reimport.release(reimport.NOTHING_FROZEN, [name] if dropped else ["routecontexts_other"], [])
        assert previous_app() is None
        assert (gone() is None) is dropped  # held by its kept context unless forgotten
        # The readings router's endpoints are closures (no module holds them by name): forgotten too.
        app, counts = built_app(including(closures) if dropped else including(sys.modules[name].router, closures))
        assert counts == ((0, 2) if dropped else (1, 2)), counts
        if not dropped:
            assert asgi_request(app, "GET", "/dropped").json() is True
    finally:
        sys.modules.pop(name, None)


# Two kept modules: a router, and an app of its own including it, whose contexts are built as the zygote imports.
ROUTES = """from fastapi import APIRouter

router = APIRouter()


@router.get("/readings/{channel}")
async def one(channel: int) -> dict[str, int]:
    return {"channel": channel}
"""

ADMIN = """from fastapi import FastAPI

from routecontexts_routes import router

admin_app = FastAPI()
admin_app.include_router(router, prefix="/x")
LINK = admin_app.url_path_for("one", channel=1)  # builds admin_app's contexts at import
"""


def test_a_kept_modules_own_app_still_answers_after_a_release(reuse: None) -> None:
    """The release keeps copies of what it keeps: the contexts themselves may serve another app than the previous."""

    def import_main(app: FastAPI) -> None:  # the app module: imports the kept modules (the first time), mounts
        if "routecontexts_admin" not in sys.modules:
            module_from_source("routecontexts_routes", ROUTES)
            module_from_source("routecontexts_admin", ADMIN)
        app.mount("/admin", sys.modules["routecontexts_admin"].admin_app)

    try:
        for generation in (1, 2):
            if generation == 2:  # what the next zygote does first: only the app module changed
                reimport.release(reimport.NOTHING_FROZEN, ["routecontexts_main"], [])
            app, _ = built_app(import_main)
            answer = asgi_request(app, "GET", "/admin/x/readings/3")
            assert answer.json() == {"channel": 3}, (generation, answer.text)
    finally:
        sys.modules.pop("routecontexts_routes", None)
        sys.modules.pop("routecontexts_admin", None)


ITEMS = """from fastapi import APIRouter, Depends

router = APIRouter()


def database() -> str:
    return "the database"


@router.get("/item/{number}")
async def item(number: int, source: str = Depends(database)) -> dict[str, object]:
    return {"number": number, "source": source}
"""

MAIN = (
    """from fastapi import FastAPI

from shop import items

SOURCE = "the database"
app = FastAPI()
app.include_router(items.router, prefix="/shop")
app.dependency_overrides[items.database] = lambda: SOURCE
"""
    + STATUS_ROUTES
)


def test_an_incremental_reload_takes_the_kept_modules_contexts_with_the_new_apps_overrides(
    start_service: StartService, tmp_path: Path
) -> None:
    package = write_app_package(tmp_path, "shop", MAIN).parent
    (package / "items.py").write_text(ITEMS)
    env = base_env(PYPNM_RELOAD_IMPORT="incremental", PYPNM_RELOAD_MIN_INTERVAL="0")
    service = start_service(
        pypnm_command("--app", "shop.main:app", "--port", "{port}", "--workers", "1"), cwd=tmp_path, env=env
    )
    assert service.get("/shop/item/1").json() == {"number": 1, "source": "the database"}

    rewrite(package / "main.py", 'SOURCE = "the database"', 'SOURCE = "a fake"')
    status = reload_by_sighup(service, supervisor_status(service)["generation"])
    assert status["last_reload"]["import"] == {"mode": "incremental", "reimported": 1}  # shop.main

    assert service.get("/shop/item/2").json() == {"number": 2, "source": "a fake"}
    assert service.get("/shop/item/x").status_code == 422
    line = wait_until(lambda: re.search(r"zygote imported pid=\d+ generation=2 .*", service.output()))
    found = re.search(r"route contexts: (\d+) reused, (\d+) built", line.group(0))
    assert found is not None, line.group(0)
    assert int(found.group(1)) == 1, line.group(0)  # the kept module's one route


def contexts_of(service: Service, generation: int) -> tuple[int, int]:
    """(reused, built) in the line of the zygote of `generation`."""
    line = wait_until(lambda: re.search(rf"zygote imported pid=\d+ generation={generation} .*", service.output()))
    found = re.search(r"route contexts: (\d+) reused, (\d+) built", line.group(0))
    assert found is not None, line.group(0)
    return int(found.group(1)), int(found.group(2))


def test_a_reload_where_nothing_changed_keeps_the_contexts_for_the_next_one(
    start_service: StartService, tmp_path: Path
) -> None:
    main = MAIN.replace("from shop import items", "from shop import config, items")
    main = main.replace('SOURCE = "the database"', "SOURCE = config.SOURCE")
    package = write_app_package(tmp_path, "shop", main).parent
    (package / "items.py").write_text(ITEMS)
    (package / "config.py").write_text('SOURCE = "zero"\n')
    env = base_env(PYPNM_RELOAD_IMPORT="incremental", PYPNM_RELOAD_MIN_INTERVAL="0")
    service = start_service(
        pypnm_command("--app", "shop.main:app", "--port", "{port}", "--workers", "1"), cwd=tmp_path, env=env
    )
    generation = supervisor_status(service)["generation"]
    for source in ("one", None, "two"):  # None: a reload where nothing changed, between two that change config
        if source is not None:
            rewrite(package / "config.py", "SOURCE = ", f'SOURCE = "{source}"  # was ')
        status = reload_by_sighup(service, generation)
        generation = status["last_reload"]["generation"]
        if source is None:
            assert status["last_reload"]["import"] == {"mode": "incremental", "reimported": 0}
            continue
        assert service.get("/shop/item/1").json() == {"number": 1, "source": source}
        assert contexts_of(service, generation) == (1, 0)  # the kept module's one route: taken, also after the no-op
