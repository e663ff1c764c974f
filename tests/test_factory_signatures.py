"""pydantic reads the signature of a class built into C once per process; of anything else, each time.

In this process, with real pydantic: `factory_signatures` installed for each test and taken out
after it. Under the real server: the fork template installs it, and its workers have it.
"""

from __future__ import annotations

import _io
import inspect
import io
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict, Field
from pydantic._internal import _fields, _typing_extra

from conftest import STATUS_ROUTES, StartService, base_env, pypnm_command, write_app_package
from pypnm.supervisor import factory_signatures


@pytest.fixture
def kept(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The signatures kept in this process for one test; pydantic's own reading back after it."""
    monkeypatch.setattr(_typing_extra, "signature_no_eval", _typing_extra.signature_no_eval)
    monkeypatch.setattr(factory_signatures, "_original", None)
    monkeypatch.setattr(factory_signatures, "_kept", {})
    assert factory_signatures.install() is None  # this pydantic is one pypnm knows
    yield


def test_a_built_in_class_is_read_once_and_each_field_still_gets_its_own_value(kept: None) -> None:
    class Readings(BaseModel):
        values: list[float] = Field(default_factory=list)
        offset: Decimal = Field(default_factory=Decimal)

    class Channels(BaseModel):
        ids: list[int] = Field(default_factory=list, max_length=4)

    assert list in factory_signatures.kept()
    read = _typing_extra.signature_no_eval
    assert read(list) is read(list)  # one Signature handed out, not parsed again
    assert read(list) == inspect.signature(list)
    first, second = Readings(), Readings()
    first.values.append(1.5)
    assert second.values == [] and second.offset == Decimal(0)  # the factory still runs per instance
    assert Channels().ids == [] and Channels(ids=[1, 2]).ids == [1, 2]


def test_a_class_of_the_app_and_a_function_are_read_each_time(kept: None) -> None:
    class Bag:
        def __init__(self) -> None:
            self.data: dict[str, Any] | None = None

    def plain() -> list[int]:
        return [0]

    class Before(BaseModel):
        model_config = ConfigDict(arbitrary_types_allowed=True)
        name: str = "x"
        bag: Bag = Field(default_factory=Bag)
        numbers: list[int] = Field(default_factory=plain)

    assert Before().bag.data is None  # called without the data: its __init__ takes none

    def init_with_data(self: Bag, data: dict[str, Any]) -> None:
        self.data = data

    Bag.__init__ = init_with_data  # type: ignore[method-assign,assignment]  # an app's class can change

    def with_data(data: dict[str, Any]) -> list[int]:
        return [len(data["name"])]

    plain.__signature__ = inspect.signature(with_data)  # type: ignore[attr-defined]  # and so can a function's signature
    plain.__code__ = with_data.__code__

    class After(BaseModel):
        model_config = ConfigDict(arbitrary_types_allowed=True)
        name: str = "x"
        bag: Bag = Field(default_factory=Bag)
        numbers: list[int] = Field(default_factory=plain)

    after = After(name="cm-1")
    assert after.bag.data is not None and after.bag.data["name"] == "cm-1"  # the new __init__ was read
    assert after.numbers == [4]  # and the function's new signature: both get the validated data
    assert Bag not in factory_signatures.kept()
    assert plain not in factory_signatures.kept()


def test_a_class_made_at_run_time_from_a_built_in_one_is_not_kept(kept: None) -> None:
    class Fifo(list[int]):
        pass

    class Queue(BaseModel):
        model_config = ConfigDict(arbitrary_types_allowed=True)
        items: Fifo = Field(default_factory=Fifo)

    assert isinstance(Queue().items, Fifo)
    assert Fifo not in factory_signatures.kept()


def test_install_leaves_alone_a_pydantic_that_reads_signatures_another_way(monkeypatch: pytest.MonkeyPatch) -> None:
    original = _typing_extra.signature_no_eval
    monkeypatch.setattr(factory_signatures, "_original", None)
    monkeypatch.setattr(factory_signatures, "_kept", {})

    def reads_directly(factory: Callable[..., Any]) -> bool:  # not through _typing_extra.signature_no_eval
        parameters = list(inspect.signature(factory).parameters.values())
        return len(parameters) == 1 and parameters[0].default is inspect.Parameter.empty

    monkeypatch.setattr(_fields, "takes_validated_data_argument", reads_directly)
    reason = factory_signatures.install()
    assert reason is not None and "pydantic" in reason
    assert _typing_extra.signature_no_eval is original  # put back
    assert factory_signatures.kept() == []


def test_a_built_in_class_whose_text_names_a_default_is_read_each_time(
    kept: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    read = _typing_extra.signature_no_eval
    size = read(io.BufferedReader).parameters["buffer_size"].default
    monkeypatch.setattr(_io, "DEFAULT_BUFFER_SIZE", size * 2)  # `inspect` looks the name up in the module
    assert read(io.BufferedReader).parameters["buffer_size"].default == size * 2
    assert io.BufferedReader not in factory_signatures.kept()


@pytest.mark.parametrize("shape", ["missing", "wrapped"])
def test_install_leaves_alone_a_pydantic_without_the_function_or_with_another_librarys_wrapper(
    monkeypatch: pytest.MonkeyPatch, shape: str
) -> None:
    monkeypatch.setattr(factory_signatures, "_original", None)
    monkeypatch.setattr(factory_signatures, "_kept", {})
    if shape == "missing":  # an older pydantic
        monkeypatch.delattr(_typing_extra, "signature_no_eval")
    else:
        original = _typing_extra.signature_no_eval

        def wrapper(f: Callable[..., Any]) -> inspect.Signature:  # another library's, whose answers may change
            return original(f)

        monkeypatch.setattr(_typing_extra, "signature_no_eval", wrapper)
    reason = factory_signatures.install()
    assert reason is not None and "pydantic" in reason
    assert getattr(_typing_extra, "signature_no_eval", None) is (None if shape == "missing" else wrapper)
    assert factory_signatures.kept() == []


APP = (
    """from fastapi import FastAPI
from pydantic import BaseModel, Field
from pydantic._internal import _typing_extra

from pypnm.supervisor import factory_signatures


class Tags(BaseModel):
    names: list[str] = Field(default_factory=list)


app = FastAPI()


@app.get("/hook")
def hook() -> dict[str, object]:
    return {
        "reader": _typing_extra.signature_no_eval.__module__,
        "kept": [cls.__name__ for cls in factory_signatures.kept()],
        "fresh": [Tags().names, Tags().names is not Tags().names],
    }
"""
    + STATUS_ROUTES
)


def test_the_fork_templates_workers_read_built_in_signatures_through_the_hook(
    start_service: StartService, tmp_path: Path
) -> None:
    write_app_package(tmp_path, "tagged", APP)
    service = start_service(pypnm_command("--app", "tagged.main:app", "--port", "{port}"), cwd=tmp_path, env=base_env())
    answer = service.get("/hook").json()
    assert answer["reader"] == factory_signatures.__name__  # the template installed it; the worker inherited it
    assert "list" in answer["kept"]
    assert answer["fresh"] == [[], True]
    assert "default factories' signatures are not kept" not in service.output()
