"""The uvicorn internals pypnm builds on, checked for shape so that an upgrade fails here, clearly.

`GenerationServer` (supervisor/worker.py) replaces `uvicorn.Server.startup` and reads the
server's lifespan and state; `LimitedHttpToolsProtocol` and `DrainingHttpToolsProtocol`
(supervisor/http_limits.py, worker.py) subclass uvicorn's httptools protocol. None of that
is uvicorn's public API, so pyproject.toml bounds uvicorn to the versions tested, and these
checks say what changed when a new version is tried, instead of a reload test timing out.
"""

from __future__ import annotations

import inspect
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from pypnm.supervisor.http_limits import LimitedHttpToolsProtocol
from pypnm.supervisor.worker import DrainingHttpToolsProtocol, GenerationServer

CHANGED = f"uvicorn {uvicorn.__version__} changed an internal pypnm relies on: "


async def _app(scope: Any, receive: Any, send: Any) -> None:
    raise AssertionError("never called")


def parameters(function: Any) -> list[str]:
    return list(inspect.signature(function).parameters)


def test_server_startup_is_the_step_generation_server_replaces() -> None:
    # uvicorn's Server._serve awaits self.startup(sockets=...) between loading and its main loop.
    assert inspect.iscoroutinefunction(uvicorn.Server.startup), CHANGED + "Server.startup is no coroutine"
    assert parameters(uvicorn.Server.startup) == ["self", "sockets"], CHANGED + "Server.startup(sockets)"
    assert "self.startup(sockets=sockets)" in inspect.getsource(uvicorn.Server._serve), (
        CHANGED + "Server._serve no longer calls self.startup(sockets=sockets)"
    )
    assert "self.lifespan = " in inspect.getsource(uvicorn.Server._serve), CHANGED + "Server.lifespan is made elsewhere"
    assert GenerationServer.startup is not uvicorn.Server.startup
    assert parameters(uvicorn.Server.handle_exit) == ["self", "sig", "frame"], CHANGED + "Server.handle_exit"


def test_server_state_has_what_a_worker_reads() -> None:
    server = uvicorn.Server(uvicorn.Config(_app))
    assert isinstance(server.server_state, ServerState), CHANGED + "Server.server_state"
    for name in ("connections", "tasks", "default_headers", "total_requests"):
        assert hasattr(server.server_state, name), CHANGED + f"ServerState.{name}"
    for name in ("should_exit", "started", "force_exit"):
        assert hasattr(server, name), CHANGED + f"Server.{name}"


def test_config_takes_what_make_server_passes() -> None:
    accepted = set(parameters(uvicorn.Config.__init__))
    used = {
        "app", "lifespan", "http", "log_config", "access_log", "proxy_headers", "timeout_graceful_shutdown",
        "limit_concurrency", "ssl_certfile", "ssl_keyfile", "log_level", "backlog",
    }
    assert used <= accepted, CHANGED + f"Config() no longer takes {sorted(used - accepted)}"
    config = uvicorn.Config(_app, http=DrainingHttpToolsProtocol, lifespan="on")
    config.load()
    assert config.http_protocol_class is DrainingHttpToolsProtocol, CHANGED + "Config(http=<class>)"
    for name in ("loaded_app", "ssl", "backlog", "lifespan_class"):
        assert hasattr(config, name), CHANGED + f"Config.{name}"


def test_the_httptools_protocol_is_still_the_one_pypnm_subclasses() -> None:
    assert parameters(HttpToolsProtocol.__init__) == ["self", "config", "server_state", "app_state", "_loop"], (
        CHANGED + "HttpToolsProtocol.__init__(config, server_state, app_state, _loop)"
    )
    for name in (
        "connection_made", "connection_lost", "data_received", "on_headers_complete", "on_message_complete",
        "on_body", "shutdown",
    ):
        assert callable(getattr(HttpToolsProtocol, name, None)), CHANGED + f"HttpToolsProtocol.{name}"
    source = inspect.getsource(HttpToolsProtocol)
    for attribute in ("self.cycle", "self.transport", "self.loop", "self.parser", "self.server_state"):
        assert attribute in source, CHANGED + f"HttpToolsProtocol no longer has {attribute}"
    assert "response_complete" in source and "keep_alive" in source, CHANGED + "RequestResponseCycle fields"
    assert isinstance(STATUS_LINE, dict) and STATUS_LINE[431].startswith(b"HTTP/1.1 431"), CHANGED + "STATUS_LINE"
    assert issubclass(DrainingHttpToolsProtocol, LimitedHttpToolsProtocol)
    assert issubclass(LimitedHttpToolsProtocol, HttpToolsProtocol)
