"""`GET /health` and `GET /ready`: cheap answers for probes, load balancers and the PyPNM WebUI.

`/health` is liveness plus the fields upstream PyPNM's WebUI shows on its Health page
(`service`, `uptime`, `memory`), and the generation that answered; the reload's smoke
check asks it too. `/ready` says whether this process should get new requests: 503
once its worker has been told to drain or stop, so that a load balancer takes the
instance out while it finishes what it has.

Both are open to everyone and do no I/O beyond reading `/proc`: no control-socket round
trip, nothing that can hang. The worker's generation and whether it is stopping come
from the dict a supervised worker puts into the ASGI lifespan state under
`WORKER_STATE_KEY` (see `pypnm.supervisor.worker`); every request's `scope["state"]` is
a shallow copy of that state, so it sees the worker's updates. Under a plain uvicorn
there is no such dict: `generation` is null and `/ready` answers 200 while the process runs.

Memory is read from `/proc/self/statm` and `/proc/meminfo` by hand rather than with
psutil: three numbers from two small kernel files do not justify a compiled dependency
in every install. Where `/proc` is missing (not Linux) they are null.
"""

from __future__ import annotations

import contextlib
import time
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from pypnm import __version__
from pypnm.identity import WORKER_STATE_KEY, ProcessIdentity
from pypnm.profile import resident_bytes

router = APIRouter(tags=["Health"])

SERVICE_NAME = "pypnm"


class ServiceInfo(BaseModel):
    name: str = Field(description='Always "pypnm"')
    version: str


class Uptime(BaseModel):
    starttime: float = Field(description="When this process built its app, Unix epoch seconds")
    uptime: int = Field(description="Whole seconds since starttime")


class Memory(BaseModel):
    rss_bytes: int | None = Field(description="Resident memory of the process that answered")
    total_bytes: int | None = Field(description="The host's memory (MemTotal)")
    available_bytes: int | None = Field(description="The host's memory available to new work (MemAvailable)")


class Health(BaseModel):
    status: str
    version: str
    service: ServiceInfo
    uptime: Uptime
    memory: Memory
    generation: int | None = Field(description="Generation of the worker that answered; null without the supervisor")


class Readiness(BaseModel):
    status: str = Field(description='"ready", or "stopping" with status code 503')
    generation: int | None
    detail: str | None = None


def worker_state(request: Request) -> dict[str, Any]:
    """What the supervised worker says about itself (empty without the supervisor)."""
    state = request.scope.get("state") or {}
    value = state.get(WORKER_STATE_KEY)
    return value if isinstance(value, dict) else {}


def read_memory() -> Memory:
    """The process's resident memory and the host's total and available memory, from /proc."""
    rss = resident_bytes()
    host: dict[str, int] = {}
    with contextlib.suppress(OSError, IndexError, ValueError), open("/proc/meminfo") as meminfo:
        for line in meminfo:  # "MemTotal:  16303412 kB"; the two we want are near the top
            name, _, value = line.partition(":")
            if name in ("MemTotal", "MemAvailable"):
                host[name] = int(value.split()[0]) * 1024
                if len(host) == 2:
                    break
    return Memory(rss_bytes=rss, total_bytes=host.get("MemTotal"), available_bytes=host.get("MemAvailable"))


@router.get("/health", response_model=Health, summary="Liveness, version, uptime and memory")
async def health(request: Request) -> Health:
    identity: ProcessIdentity = request.app.state.identity
    # The same instant as `started_at` in /pypnm/system/webService/status.
    started = datetime.fromisoformat(identity.started_at).timestamp()
    generation = worker_state(request).get("generation")
    return Health(
        status="ok",
        version=__version__,
        service=ServiceInfo(name=SERVICE_NAME, version=__version__),
        uptime=Uptime(starttime=started, uptime=max(0, int(time.time() - started))),
        memory=read_memory(),
        generation=generation if isinstance(generation, int) else None,
    )


@router.get(
    "/ready",
    response_model=Readiness,
    summary="Readiness: 200 while serving, 503 once stopping",
    responses={503: {"model": Readiness, "description": "This worker is draining or stopping"}},
)
async def ready(request: Request) -> JSONResponse:
    state = worker_state(request)
    generation = state.get("generation") if isinstance(state.get("generation"), int) else None
    if state.get("stopping"):
        answer = Readiness(
            status="stopping",
            generation=generation,
            detail="this worker is draining or stopping: send new requests to another instance, "
            "or retry on a new connection (a reload's new generation takes them)",
        )
        return JSONResponse(answer.model_dump(), status_code=503)
    return JSONResponse(Readiness(status="ready", generation=generation).model_dump(exclude={"detail"}))
