"""A zygote builds one pydantic adapter per distinct FastAPI field, and an incremental one keeps its parent's.

In this process (real FastAPI and pydantic, `field_adapters` installed for the test and taken
out after it): which fields share an adapter, which build their own, and that forgetting a
dropped module's adapters lets its classes be freed. Under the real server: an incremental
reload reuses the kept modules' adapters, and the changed module's new constraints are the ones
that validate and that the OpenAPI schema shows.
"""

from __future__ import annotations

import re
import sys
import weakref
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from fastapi import APIRouter, FastAPI, Query
from fastapi._compat import v2
from pydantic import BaseModel, Field
from pydantic.fields import FieldInfo

from conftest import (
    STATUS_ROUTES,
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
from pypnm.supervisor import field_adapters, reimport
from pypnm.supervisor.worker import build_routes


@pytest.fixture
def reuse(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Adapters reused in this process for one test; FastAPI's own field construction back after it."""
    monkeypatch.setattr(v2.ModelField, "__post_init__", v2.ModelField.__post_init__)
    monkeypatch.setattr(field_adapters, "_reuse", field_adapters._Reuse())
    assert field_adapters.install() is None  # this FastAPI is one pypnm knows
    field_adapters.begin()
    yield
    field_adapters.end()


class Reading(BaseModel):
    channel: int = Field(ge=0, le=32)


def router_with(name: str, most: int) -> APIRouter:
    router = APIRouter(prefix=f"/{name}")

    @router.post("/reading")
    async def reading(body: Reading) -> Reading:
        return body

    @router.get("/page")
    async def page(size: int = Query(5, le=most)) -> dict[str, int]:
        return {"size": size}

    return router


def adapter(field: Any) -> Any:
    return field._type_adapter


def test_equal_fields_share_one_adapter_and_others_build_their_own(reuse: None) -> None:
    app = FastAPI()
    app.include_router(router_with("a", most=10))
    app.include_router(router_with("b", most=10))
    app.include_router(router_with("c", most=3))
    build_routes(app)
    counts = field_adapters.end()
    assert counts is not None
    reused, built = counts
    assert reused > built > 0, counts

    # The Reading bodies and responses of every router, and the page sizes up to 10, share theirs;
    # the page size up to 3 is a field of its own, and it validates as such.
    assert asgi_request(app, "GET", "/a/page", params={"size": "7"}).status_code == 200
    assert asgi_request(app, "GET", "/b/page", params={"size": "7"}).status_code == 200
    assert asgi_request(app, "GET", "/c/page", params={"size": "7"}).status_code == 422
    assert asgi_request(app, "POST", "/a/reading", json={"channel": 33}).status_code == 422
    assert asgi_request(app, "POST", "/c/reading", json={"channel": 3}).json() == {"channel": 3}


def test_fields_built_outside_begin_and_end_are_fastapis_own(reuse: None) -> None:
    first = v2.ModelField(field_info=FieldInfo(annotation=Reading), name="first")
    again = v2.ModelField(field_info=FieldInfo(annotation=Reading), name="again")
    assert adapter(first) is adapter(again)
    field_adapters.end()
    after = v2.ModelField(field_info=FieldInfo(annotation=Reading), name="after")
    assert adapter(after) is not adapter(first)
    assert field_adapters.end() == (1, 1)  # counted while on: `again` reused what `first` built


class Unhashable:
    __hash__ = None  # type: ignore[assignment]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Unhashable)


def test_a_field_that_cannot_be_a_key_builds_its_own_adapter(reuse: None) -> None:
    one = v2.ModelField(field_info=FieldInfo(annotation=list[int], default=Unhashable()), name="one")
    two = v2.ModelField(field_info=FieldInfo(annotation=list[int], default=Unhashable()), name="two")
    assert adapter(one) is not adapter(two)
    # Values equal but of other types are other keys, also inside a constraint: Le(1), Le(True), Le(1.0).
    ones = [v2.ModelField(field_info=FieldInfo(annotation=int, le=limit), name="n") for limit in (1, True, 1.0)]
    assert len({id(adapter(field)) for field in ones}) == 3
    assert field_adapters.end() == (0, 5)


def test_values_equal_but_shown_apart_are_other_keys(reuse: None) -> None:
    """`==` is not enough where the schema or an error message shows the value: 1.0 and 1.00, 0.0 and -0.0."""
    decimals = [
        v2.ModelField(field_info=FieldInfo(annotation=Decimal, le=Decimal(text)), name="d") for text in ("1.0", "1.00")
    ]
    zeros = [v2.ModelField(field_info=FieldInfo(annotation=float, default=zero), name="z") for zero in (0.0, -0.0)]
    assert adapter(decimals[0]) is not adapter(decimals[1])
    assert adapter(zeros[0]) is not adapter(zeros[1])
    assert field_adapters.end() == (0, 4)


# Each route's fields hold the module's code another way than by naming one of its classes at the top.
DROPPED = """from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel, BeforeValidator, Field


class Dropped(BaseModel):
    value: int

    def doubled(self) -> int:
        return self.value * 2


def check(schema: dict) -> None:
    schema["x-checked"] = True


TABLE = {"a": Dropped}
router = APIRouter()


@router.post("/two")
async def two(a: Dropped, b: Dropped) -> Dropped:  # two bodies: FastAPI makes a model of its own for them
    return a


@router.get("/nested")  # a Field inside the annotation, holding a function of the module
async def nested(q: Annotated[list[Annotated[int, Field(json_schema_extra=check)]], Query()] = []) -> int:
    return len(q)


@router.get("/table")  # a validator bound to a dict of the module
async def table(q: Annotated[str, BeforeValidator(TABLE.get), Query()] = "a") -> str:
    return q
"""


@pytest.mark.parametrize("dropped", [True, False])
def test_a_release_forgets_the_dropped_modules_adapters_and_so_frees_their_classes(reuse: None, dropped: bool) -> None:
    name = "fieldadapters_dropped"
    module = module_from_source(name, DROPPED)
    app = FastAPI()
    app.include_router(module.router)
    app.include_router(router_with("kept", most=10))
    build_routes(app)
    field_adapters.end()  # as the zygote does before it forks the next one
    gone = weakref.ref(module.Dropped)
    del app, module
    if dropped:
        del sys.modules[name]  # what reimport.drop does
    # What an incremental zygote's release does (typing's and FastAPI's caches cleared, then a collection),
    # for this module or, as a control, for another one.
    try:
        reimport.release(reimport.NOTHING_FROZEN, [name] if dropped else ["fieldadapters_other"], [])
        # Held by its adapters (its own fields', the model FastAPI made for the two bodies) unless forgotten.
        assert (gone() is None) is dropped
    finally:
        sys.modules.pop(name, None)
    field_adapters.begin()
    again = FastAPI()
    again.include_router(router_with("kept", most=10))
    build_routes(again)
    counts = field_adapters.end()
    assert counts is not None and counts[0] > 0 and counts[1] == 0, counts  # the kept router's fields: all kept


def test_an_import_that_built_no_field_keeps_the_adapters_for_the_next(reuse: None) -> None:
    """A reload where nothing changed imports nothing: the next one still takes what the one before built."""
    app = FastAPI()
    app.include_router(router_with("a", most=10))
    build_routes(app)
    field_adapters.end()
    field_adapters.begin()
    build_routes(app)  # the same app, its routes built: no field is made
    assert field_adapters.end() == (0, 0)
    field_adapters.begin()
    again = FastAPI()
    again.include_router(router_with("a", most=10))
    build_routes(again)
    counts = field_adapters.end()
    assert counts is not None and counts[0] > 0 and counts[1] == 0, counts


def test_what_an_import_did_not_use_is_not_kept(reuse: None) -> None:
    """Fields never equal to a later one (a model FastAPI makes per app, a pattern constraint) do not pile up."""
    router = APIRouter()

    @router.post("/pair")
    async def pair(a: Reading, b: Reading, q: str = Query("a", pattern="^a+$")) -> Reading:
        return a

    kept = []
    for _ in range(4):
        field_adapters.begin()
        app = FastAPI()
        app.include_router(router)
        build_routes(app)
        field_adapters.end()
        kept.append(len(field_adapters._reuse.adapters))
        field_adapters.forget([])  # a release that drops none of it
    assert kept == [kept[0]] * 4, kept


ORDERS = """from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

MOST = 10
router = APIRouter()


class Order(BaseModel):
    quantity: int = Field(ge=1, le=10)


@router.post("/order")
async def order(body: Order) -> Order:
    return body


@router.get("/page")
async def page(size: int = Query(1, le=MOST)) -> dict[str, int]:
    return {"size": size}
"""

ITEMS = """from fastapi import APIRouter
from pydantic import BaseModel, Field

router = APIRouter()


class Item(BaseModel):
    name: str = Field(max_length=3)


@router.post("/item")
async def item(body: Item) -> Item:
    return body
"""

MAIN = (
    """from fastapi import FastAPI

from shop import items, orders

app = FastAPI()
app.include_router(orders.router)
app.include_router(items.router)
"""
    + STATUS_ROUTES
)


def test_an_incremental_reload_reuses_kept_adapters_and_validates_with_the_changed_ones(
    start_service: StartService, tmp_path: Path
) -> None:
    package = write_app_package(tmp_path, "shop", MAIN).parent
    (package / "orders.py").write_text(ORDERS)
    (package / "items.py").write_text(ITEMS)
    env = base_env(PYPNM_RELOAD_IMPORT="incremental", PYPNM_RELOAD_MIN_INTERVAL="0")
    service = start_service(
        pypnm_command("--app", "shop.main:app", "--port", "{port}", "--workers", "1"), cwd=tmp_path, env=env
    )
    assert service.post("/order", json={"quantity": 7}).status_code == 200
    assert service.get("/page", params={"size": 7}).status_code == 200

    rewrite(package / "orders.py", "le=10)", "le=5)")
    rewrite(package / "orders.py", "MOST = 10", "MOST = 5")
    status = reload_by_sighup(service, supervisor_status(service)["generation"])
    assert status["last_reload"]["import"] == {"mode": "incremental", "reimported": 2}  # shop.orders, shop.main

    # The changed module's fields have adapters of their own, built from the new constraints ...
    assert service.post("/order", json={"quantity": 7}).status_code == 422
    assert service.post("/order", json={"quantity": 5}).json() == {"quantity": 5}
    assert service.get("/page", params={"size": 7}).status_code == 422
    schema = service.get("/openapi.json").json()
    assert schema["components"]["schemas"]["Order"]["properties"]["quantity"]["maximum"] == 5
    # ... and the kept module's fields took the ones the previous zygote built, and still validate.
    assert service.post("/item", json={"name": "abcd"}).status_code == 422
    assert service.post("/item", json={"name": "abc"}).json() == {"name": "abc"}
    line = wait_until(lambda: re.search(r"zygote imported pid=\d+ generation=2 .*", service.output()))
    found = re.search(r"field adapters: (\d+) reused, (\d+) built", line.group(0))
    assert found is not None, line.group(0)
    reused, built = int(found.group(1)), int(found.group(2))
    assert reused > 0 and built > 0, line.group(0)
