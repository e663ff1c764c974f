"""The uvicorn internals pypnm builds on still have the shape it relies on; a change fails here, by name.

pypnm's worker subclasses `uvicorn.Server` (its own `startup`: validate, report, wait for
"serve") and uvicorn's `HttpToolsProtocol` (request-head limits, draining), and passes
`uvicorn.Config` keyword arguments. None of that is uvicorn's public API, so pyproject.toml
pins uvicorn below its next minor version, and this module says what moved when a newer
uvicorn is tried:

- what pypnm uses is read from its own source (src/pypnm), not listed by hand: every class
  deriving from `uvicorn.Server` or `HttpToolsProtocol`, the methods it overrides, the
  `self.` attributes it reads but does not set, the `super()` calls it makes, the keyword
  arguments of every `uvicorn.Config(...)` and the names it imports from uvicorn. So the
  checks follow the code when it moves between modules;
- each is checked against the installed uvicorn with `inspect.signature` and attribute
  look-ups on real uvicorn objects (a loaded `Config`, a `ServerState`, an `HttpToolsProtocol`
  that parsed a request, the lifespan of a running `Server`);
- the behaviour pypnm's `startup` depends on is exercised in-process: how `Server` calls
  `startup`, `main_loop` and `shutdown`, that shutdown closes `servers` and shuts every open
  connection down, and that httptools calls the parser callbacks pypnm adds.

Every failure message names the uvicorn (or httptools) version, the changed piece, and the
pypnm file and line that relies on it.
"""

from __future__ import annotations

import ast
import asyncio
import importlib
import importlib.metadata
import inspect
import signal
import tomllib
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import httptools
import pytest
import uvicorn
from packaging.requirements import Requirement
from packaging.version import Version
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from conftest import REPO, SRC

UVICORN = importlib.metadata.version("uvicorn")
HTTPTOOLS = importlib.metadata.version("httptools")
SERVER = "uvicorn.server.Server"
PROTOCOL = "uvicorn.protocols.http.httptools_impl.HttpToolsProtocol"
BASES: dict[str, type[Any]] = {SERVER: uvicorn.Server, PROTOCOL: HttpToolsProtocol}
ALIASES = {"uvicorn.Server": SERVER, "uvicorn.Config": "uvicorn.config.Config"}  # re-exports, as pypnm spells them
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]


# ----- what pypnm uses, read from its source ----------------------------------------------------


@dataclass
class PypnmClass:
    """A class of src/pypnm, with what its methods do to `self`."""

    qualname: str
    where: str  # path:line, relative to the repository
    bases: list[str]  # qualified names of the base classes
    methods: dict[str, ast.FunctionDef | ast.AsyncFunctionDef] = field(default_factory=dict)
    sets: set[str] = field(default_factory=set)  # methods, class attributes, self.X = ...
    reads: dict[str, str] = field(default_factory=dict)  # self.X read -> where
    chains: dict[tuple[str, str], str] = field(default_factory=dict)  # self.X.Y read -> where
    super_calls: list[tuple[str, ast.Call, str]] = field(default_factory=list)  # super().X(...) -> where

    @property
    def name(self) -> str:
        return self.qualname.rsplit(".", 1)[1]


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")


def where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(REPO)}:{getattr(node, 'lineno', 0)}"


def imported_names(tree: ast.Module, module: str) -> dict[str, str]:
    """Local name -> qualified name, for the imports of a module (and its own top-level classes)."""
    names = {node.name: f"{module}.{node.name}" for node in tree.body if isinstance(node, ast.ClassDef)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:  # `import a.b` binds `a`; `import a.b as c` binds `c` to a.b
                top = alias.name.split(".")[0]
                names[alias.asname or top] = alias.name if alias.asname else top
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def qualify(expression: ast.expr, names: dict[str, str]) -> str:
    text = ast.unparse(expression)
    head, _, rest = text.partition(".")
    qualified = names.get(head, head) + (f".{rest}" if rest else "")
    return ALIASES.get(qualified, qualified)


def is_self(node: ast.expr) -> bool:
    return isinstance(node, ast.Name) and node.id == "self"


def read_class(path: Path, node: ast.ClassDef, names: dict[str, str]) -> PypnmClass:
    found = PypnmClass(f"{module_name(path)}.{node.name}", where(path, node), [qualify(b, names) for b in node.bases])
    for item in node.body:
        if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
            found.methods[item.name] = item
            found.sets.add(item.name)
        elif isinstance(item, ast.Assign):
            found.sets.update(t.id for t in item.targets if isinstance(t, ast.Name))
        elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
            found.sets.add(item.target.id)
    for sub in ast.walk(node):
        if isinstance(sub, ast.Attribute) and is_self(sub.value):
            if isinstance(sub.ctx, ast.Store):
                found.sets.add(sub.attr)
            else:
                found.reads.setdefault(sub.attr, where(path, sub))
        elif isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Attribute) and is_self(sub.value.value):
            found.chains.setdefault((sub.value.attr, sub.attr), where(path, sub))
        elif (
            isinstance(sub, ast.Call)
            and isinstance(sub.func, ast.Attribute)
            and isinstance(sub.func.value, ast.Call)
            and ast.unparse(sub.func.value) == "super()"
        ):
            found.super_calls.append((sub.func.attr, sub, where(path, sub)))
    return found


@cache
def pypnm_source() -> tuple[dict[str, PypnmClass], list[tuple[str, ast.Call, str]], list[tuple[str, str, str]]]:
    """Every class of src/pypnm; every call with its qualified callee; every `from uvicorn... import`."""
    classes: dict[str, PypnmClass] = {}
    calls: list[tuple[str, ast.Call, str]] = []
    imports: list[tuple[str, str, str]] = []
    for path in sorted((SRC / "pypnm").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        names = imported_names(tree, module_name(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                found = read_class(path, node, names)
                classes[found.qualname] = found
            elif isinstance(node, ast.Call):
                calls.append((qualify(node.func, names), node, where(path, node)))
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "uvicorn":
                imports.extend((str(node.module), alias.name, where(path, node)) for alias in node.names)
    return classes, calls, imports


def lineage(cls: PypnmClass) -> list[PypnmClass]:
    """The class and its pypnm ancestors, nearest first."""
    classes = pypnm_source()[0]
    chain = [cls]
    for base in cls.bases:
        if base in classes:
            chain += lineage(classes[base])
    return chain


def uvicorn_base(cls: PypnmClass) -> str | None:
    """SERVER or PROTOCOL when the class derives (through pypnm classes) from it."""
    for ancestor in lineage(cls):
        for base in ancestor.bases:
            if base in BASES:
                return base
    return None


def subclasses(base: str) -> list[PypnmClass]:
    return [cls for cls in pypnm_source()[0].values() if uvicorn_base(cls) == base]


def own_names(cls: PypnmClass) -> set[str]:
    return set().union(*(ancestor.sets for ancestor in lineage(cls)))


def signature_text(function: Callable[..., Any]) -> str:
    try:
        return str(inspect.signature(function))
    except (TypeError, ValueError):
        return "(?)"


def parameters(node: ast.FunctionDef | ast.AsyncFunctionDef) -> list[tuple[str, inspect._ParameterKind]]:
    args = node.args
    found: list[tuple[str, inspect._ParameterKind]] = [
        (a.arg, inspect.Parameter.POSITIONAL_ONLY) for a in args.posonlyargs
    ]
    found += [(a.arg, inspect.Parameter.POSITIONAL_OR_KEYWORD) for a in args.args]
    if args.vararg:
        found.append((args.vararg.arg, inspect.Parameter.VAR_POSITIONAL))
    found += [(a.arg, inspect.Parameter.KEYWORD_ONLY) for a in args.kwonlyargs]
    if args.kwarg:
        found.append((args.kwarg.arg, inspect.Parameter.VAR_KEYWORD))
    return found


def bind_call(function: Callable[..., Any], call: ast.Call, leading: int = 0) -> str | None:
    """Why `call` (as written in pypnm) no longer fits `function`'s signature, or None when it does.

    Starred arguments are passed on from pypnm's own callers and cannot be checked here; the rest is.
    """
    if any(isinstance(a, ast.Starred) for a in call.args) or any(k.arg is None for k in call.keywords):
        return None
    try:
        inspect.signature(function).bind(*range(leading + len(call.args)), **{k.arg: 0 for k in call.keywords if k.arg})
    except TypeError as exc:
        return str(exc)
    return None


def uvicorn_changed(what: str, then: str) -> str:
    return f"uvicorn {UVICORN} changed {what}: {then}"


# ----- real uvicorn objects to check against ------------------------------------------------------


async def asgi_app(
    scope: Scope, receive: Callable[[], Awaitable[Message]], send: Callable[[Message], Awaitable[None]]
) -> None:
    """The least ASGI app: completes the lifespan, answers every request 200 "ok"."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


class Transport(asyncio.Transport):
    """A connection from 127.0.0.1:50000 to 127.0.0.1:8000 that keeps what is written to it."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def config(**kwargs: Any) -> uvicorn.Config:
    loaded = uvicorn.Config(asgi_app, log_config=None, **kwargs)
    loaded.load()
    return loaded


@dataclass
class ParsedRequest:
    protocol: HttpToolsProtocol
    transport: Transport


@cache
def parsed_request() -> ParsedRequest:
    """uvicorn's protocol after it parsed and answered one request, as a worker's connection is."""

    async def serve_one() -> ParsedRequest:
        protocol = HttpToolsProtocol(
            config=config(lifespan="off"), server_state=ServerState(), app_state={}, _loop=asyncio.get_running_loop()
        )
        transport = Transport()
        protocol.connection_made(transport)
        protocol.data_received(b"GET /x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        await asyncio.wait_for(asyncio.gather(*protocol.tasks), 10)
        return ParsedRequest(protocol, transport)

    return asyncio.run(serve_one())


def probes() -> dict[str, object]:
    """For `self.X.Y` reads: the uvicorn object X is, so that Y can be looked up on it."""
    request = parsed_request()
    lifespan_config = config(lifespan="on")
    return {
        "config": lifespan_config,
        "server_state": ServerState(),
        "lifespan": lifespan_config.lifespan_class(lifespan_config),
        "cycle": request.protocol.cycle,
        "parser": request.protocol.parser,
    }


# ----- the checks --------------------------------------------------------------------------------


def test_the_installed_uvicorn_is_in_the_range_pyproject_pins() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    (requirement,) = [Requirement(r) for r in pyproject["project"]["dependencies"] if Requirement(r).name == "uvicorn"]
    assert requirement.specifier.contains(Version(UVICORN)), (
        f"uvicorn {UVICORN} is installed, outside {requirement.specifier} (pyproject.toml): the tests cover that "
        "range only; run this module against the new version, adapt pypnm's worker, then move the bound"
    )
    upper = [spec for spec in requirement.specifier if spec.operator == "<"]
    assert upper, f"uvicorn is not capped in pyproject.toml ({requirement}): pypnm subclasses its internals"


@pytest.mark.parametrize("base", [SERVER, PROTOCOL])
def test_pypnm_still_subclasses_what_this_module_checks(base: str) -> None:
    assert subclasses(base), (
        f"no class in src/pypnm derives from {base} any more: this module reads pypnm's use of it from "
        "there; check that the new way of using uvicorn is covered here"
    )


@pytest.mark.parametrize("base", [SERVER, PROTOCOL])
def test_overridden_methods_keep_their_signature(base: str) -> None:
    uvicorn_class = BASES[base]
    problems = []
    for cls in subclasses(base):
        for name, node in cls.methods.items():
            original = getattr(uvicorn_class, name, None)
            if name == "__init__" or not callable(original):
                continue  # __init__ is checked through its callers; new methods are not overrides
            ours = parameters(node)
            theirs = [(p.name, p.kind) for p in inspect.signature(original).parameters.values()]
            if ours != theirs:
                problems.append(
                    uvicorn_changed(
                        f"{uvicorn_class.__name__}.{name}{signature_text(original)}",
                        f"pypnm's {cls.name} overrides it as {name}({', '.join(n for n, _ in ours)}); "
                        f"see {where_of(cls, node)}",
                    )
                )
            if (is_async := inspect.iscoroutinefunction(original)) != isinstance(node, ast.AsyncFunctionDef):
                problems.append(
                    uvicorn_changed(
                        f"{uvicorn_class.__name__}.{name} to {'async' if is_async else 'sync'}",
                        f"pypnm's {cls.name} overrides it; see {where_of(cls, node)}",
                    )
                )
    assert not problems, "\n".join(problems)


def where_of(cls: PypnmClass, node: ast.AST) -> str:
    return f"{cls.where.rsplit(':', 1)[0]}:{getattr(node, 'lineno', 0)}"


def test_super_calls_fit_uvicorn() -> None:
    problems = []
    for base in BASES:
        uvicorn_class = BASES[base]
        for cls in subclasses(base):
            for name, call, at in cls.super_calls:
                ancestors_with_it = [a for a in lineage(cls)[1:] if name in a.methods]
                if ancestors_with_it:
                    continue  # a pypnm class answers the call; its own super() calls are checked in turn
                original = getattr(uvicorn_class, name, None)
                if original is None:
                    problems.append(
                        uvicorn_changed(
                            f"{uvicorn_class.__name__}: it has no {name}() any more",
                            f"pypnm's {cls.name} calls super().{name}() at {at}",
                        )
                    )
                elif (why := bind_call(original, call, leading=1)) is not None:
                    problems.append(
                        uvicorn_changed(
                            f"{uvicorn_class.__name__}.{name}{signature_text(original)}",
                            f"pypnm's {cls.name} calls super().{name}(...) at {at}: {why}",
                        )
                    )
    assert not problems, "\n".join(problems)


def test_the_protocols_are_built_with_arguments_uvicorn_takes() -> None:
    """pypnm builds its protocol itself (its startup makes the servers): the keywords past its own go to uvicorn."""
    classes, calls, _ = pypnm_source()
    problems = []
    checked = 0
    for callee, call, at in calls:
        cls = classes.get(callee)
        if cls is None or uvicorn_base(cls) != PROTOCOL:
            continue
        init = next((a.methods["__init__"] for a in lineage(cls) if "__init__" in a.methods), None)
        consumed = {name for name, _ in parameters(init)} if init is not None else set()
        passes_on = init is None or any(kind is inspect.Parameter.VAR_KEYWORD for _, kind in parameters(init))
        if not passes_on:
            continue
        forwarded = ast.Call(call.func, [], [k for k in call.keywords if k.arg not in consumed])
        checked += 1
        if (why := bind_call(HttpToolsProtocol.__init__, forwarded, leading=1)) is not None:
            problems.append(
                uvicorn_changed(
                    f"HttpToolsProtocol.__init__{signature_text(HttpToolsProtocol.__init__)}",
                    f"pypnm builds {callee.rsplit('.', 1)[1]} with "
                    f"{', '.join(f'{k.arg}=' for k in forwarded.keywords)} at {at}: {why}",
                )
            )
    assert checked, "pypnm builds no HttpToolsProtocol subclass with keywords any more: update this test"
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("base", [SERVER, PROTOCOL])
def test_attributes_pypnm_reads_from_uvicorn_are_there(base: str) -> None:
    """Every `self.X` a pypnm subclass reads but never sets is uvicorn's, and so is `self.X.Y` for X uvicorn's."""
    instance = running_server_attributes() if base == SERVER else set(dir(parsed_request().protocol))
    objects = probes()
    problems = []
    for cls in subclasses(base):
        own = own_names(cls)
        for name, at in cls.reads.items():
            if name not in own and name not in instance:
                problems.append(
                    uvicorn_changed(
                        f"{BASES[base].__name__}: a running one has no attribute {name!r} any more",
                        f"pypnm's {cls.name} reads self.{name} at {at}",
                    )
                )
        for (holder, name), at in cls.chains.items():
            if holder in own or holder not in objects:
                continue  # pypnm's own object, or a standard library one (transport, loop)
            if not hasattr(objects[holder], name):
                problems.append(
                    uvicorn_changed(
                        f"{type(objects[holder]).__name__} (self.{holder} of {BASES[base].__name__}): "
                        f"it has no attribute {name!r} any more",
                        f"pypnm's {cls.name} reads self.{holder}.{name} at {at}",
                    )
                )
    assert not problems, "\n".join(problems)


def test_config_keywords_pypnm_passes_are_taken() -> None:
    _, calls, _ = pypnm_source()
    made = [(call, at) for callee, call, at in calls if callee == "uvicorn.config.Config"]
    assert made, "pypnm makes no uvicorn.Config any more: update this test"
    problems = [
        uvicorn_changed(
            f"uvicorn.Config{signature_text(uvicorn.Config)}", f"pypnm's uvicorn.Config(...) at {at}: {why}"
        )
        for call, at in made
        if (why := bind_call(uvicorn.Config, call)) is not None
    ]
    assert not problems, "\n".join(problems)


def test_a_protocol_class_given_as_http_is_the_one_uvicorn_uses() -> None:
    """pypnm passes its protocol class itself as `http=` (worker.make_server), not a name uvicorn looks up."""

    class Probe(HttpToolsProtocol):
        pass

    assert config(lifespan="off", http=Probe).http_protocol_class is Probe, uvicorn_changed(
        "Config(http=<a protocol class>)",
        "it no longer uses the class given; pypnm's worker passes "
        "DrainingHttpToolsProtocol that way (src/pypnm/supervisor/worker.py, make_server)",
    )


def test_names_pypnm_imports_from_uvicorn_exist() -> None:
    _, _, imports = pypnm_source()
    assert imports, "pypnm imports nothing from uvicorn's modules any more: update this test"
    missing = [
        uvicorn_changed(f"{module}: it has no {name!r} any more", f"pypnm imports it at {at}")
        for module, name, at in imports
        if not hasattr(importlib.import_module(module), name)
    ]
    assert not missing, "\n".join(missing)


def test_status_lines_pypnm_writes_itself() -> None:
    """http_limits writes its 408 and 431 answers with uvicorn's STATUS_LINE."""
    from uvicorn.protocols.http.httptools_impl import STATUS_LINE

    for status in (408, 431):
        assert STATUS_LINE.get(status, b"").startswith(f"HTTP/1.1 {status} ".encode()), uvicorn_changed(
            f"httptools_impl.STATUS_LINE[{status}] to {STATUS_LINE.get(status)!r}",
            "pypnm's request-head limits answer with it; see src/pypnm/supervisor/http_limits.py (_refuse)",
        )


# ----- behaviour pypnm's worker builds on ---------------------------------------------------------


class Listener:
    """Stands for an asyncio server in `Server.servers`: records what uvicorn does to it."""

    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    def close(self) -> None:
        self.calls.append("servers closed")

    async def wait_closed(self) -> None:
        self.calls.append("servers waited for")


class Connection:
    """Stands for an open connection in `server_state.connections`; leaves the set when told to shut down."""

    def __init__(self, state: ServerState, calls: list[str]) -> None:
        self.state, self.calls = state, calls

    def shutdown(self) -> None:
        self.calls.append("connection shut down")
        self.state.connections.discard(self)


class ProbeServer(uvicorn.Server):
    """A Server whose startup does what pypnm's GenerationServer.startup does, and records how it is driven."""

    def __init__(self, refuse: bool) -> None:
        super().__init__(config(lifespan="on"))
        self.refuse = refuse
        self.calls: list[str] = []
        self.attributes: set[str] = set()

    async def startup(self, sockets: list[Any] | None = None) -> None:
        self.calls.append("startup")
        self.attributes = set(dir(self))
        await self.lifespan.startup()
        assert not self.lifespan.should_exit and isinstance(self.lifespan.state, dict)
        if self.refuse:  # validation failed: pypnm shuts the lifespan down itself and leaves before serving
            self.should_exit = True
            await self.lifespan.shutdown()
            return
        self.servers = [Listener(self.calls)]  # type: ignore[list-item]
        self.server_state.connections.add(Connection(self.server_state, self.calls))  # type: ignore[arg-type]
        self.started = True
        asyncio.get_running_loop().call_later(0.05, setattr, self, "should_exit", True)  # "drain"

    async def main_loop(self) -> None:
        self.calls.append("main_loop")
        await super().main_loop()

    async def shutdown(self, sockets: list[Any] | None = None) -> None:
        self.calls.append("shutdown")
        await super().shutdown(sockets=sockets)


@cache
def running_server_attributes() -> frozenset[str]:
    """The attributes of a uvicorn Server as its startup sees them (uvicorn sets `lifespan` just before)."""
    server = ProbeServer(refuse=True)
    server.run(sockets=[])
    return frozenset(server.attributes)


def test_a_startup_that_refuses_is_followed_by_neither_main_loop_nor_shutdown() -> None:
    server = ProbeServer(refuse=True)
    server.run(sockets=[])
    assert server.calls == ["startup"], uvicorn_changed(
        f"how Server drives startup (calls: {server.calls})",
        "after a startup that set should_exit and did not set started, it must call neither main_loop nor "
        "shutdown: GenerationServer.startup returns so when the candidate fails validation, with no servers "
        "(src/pypnm/supervisor/worker.py)",
    )


def test_a_started_server_runs_its_loop_then_closes_servers_and_shuts_connections_down() -> None:
    server = ProbeServer(refuse=False)
    server.run(sockets=[])
    expected = ["startup", "main_loop", "shutdown", "connection shut down", "servers closed", "servers waited for"]
    assert sorted(server.calls) == sorted(expected) and server.calls[:3] == expected[:3], uvicorn_changed(
        f"how Server runs and shuts down (calls: {server.calls})",
        "pypnm's GenerationServer.startup sets started and servers itself, relies on main_loop running until "
        "should_exit, and on shutdown closing `servers` and calling shutdown() on every open connection "
        "(DrainingHttpToolsProtocol.shutdown keeps idle connections for one last request); "
        "see src/pypnm/supervisor/worker.py",
    )


def test_handle_exit_asks_the_server_to_exit() -> None:
    server = uvicorn.Server(config(lifespan="off"))
    server.handle_exit(signal.SIGTERM, None)
    assert server.should_exit, uvicorn_changed(
        "Server.handle_exit(SIGTERM)",
        "it no longer sets should_exit; GenerationServer.handle_exit marks the "
        "worker stopping and relies on it for the graceful exit (src/pypnm/supervisor/worker.py)",
    )


def test_the_protocol_parses_with_itself_as_the_callbacks() -> None:
    """pypnm's protocol overrides parser callbacks (on_headers_complete, ...): uvicorn's parser must call them on it."""
    request = parsed_request()
    assert request.transport.written.startswith(b"HTTP/1.1 200 "), uvicorn_changed(
        "HttpToolsProtocol: a request fed to data_received got no answer",
        f"pypnm's protocols rely on it; written: {bytes(request.transport.written)[:200]!r}",
    )
    assert isinstance(request.protocol.parser, httptools.HttpRequestParser), uvicorn_changed(
        f"HttpToolsProtocol.parser to {type(request.protocol.parser).__name__}",
        "pypnm's request-head limits feed it and read should_upgrade(); see src/pypnm/supervisor/http_limits.py",
    )


def callbacks_httptools_makes() -> Iterator[str]:
    """The parser callbacks httptools calls for a chunked request with trailer fields."""
    called: list[str] = []

    class Recorder:
        def __getattr__(self, name: str) -> Callable[..., None]:
            if not name.startswith("on_"):
                raise AttributeError(name)
            return lambda *args: called.append(name)

    parser = httptools.HttpRequestParser(Recorder())
    parser.feed_data(
        b"POST /x HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\nX-Trailer: 1\r\n\r\n"
    )
    yield from dict.fromkeys(called)


def test_httptools_calls_the_callbacks_pypnm_adds() -> None:
    """Callbacks uvicorn's protocol does not define, that pypnm adds: httptools must still call them."""
    made = set(callbacks_httptools_makes())
    problems = [
        f"httptools {HTTPTOOLS} no longer calls {name}() on its protocol (it calls {sorted(made)}): pypnm's "
        f"{cls.name} counts chunked trailer fields with it; see {where_of(cls, node)}"
        for cls in subclasses(PROTOCOL)
        for name, node in cls.methods.items()
        if name.startswith("on_") and not hasattr(HttpToolsProtocol, name) and name not in made
    ]
    assert not problems, "\n".join(problems)
