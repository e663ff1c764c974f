"""`markerpkg.main:app`: answers carry the marker and the pid of the worker that answered.

`/supervisor` relays the master's status over its control socket, so tests of a
non-pypnm `--app` can see generations and worker pids.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from markerpkg.marker import MARKER
from pypnm.api.metrics import add_metrics
from pypnm.identity import SUPERVISOR_ENV, ProcessIdentity
from pypnm.supervisor import control
from pypnm.supervisor.protocol import StatusAnswer, StatusRequest

app = FastAPI(title="markerpkg")
app.state.identity = ProcessIdentity(version="test", code_version=MARKER)  # pypnm_build_info
add_metrics(app)  # GET /metrics: the master's counters (worker restarts by reason) included
_in_flight = 0  # /slow requests this worker is answering now
_held: list[bytes] = []  # what /allocate keeps: this worker's memory grows until it ends


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@app.get("/marker")
async def marker() -> dict[str, Any]:
    return {"marker": MARKER, "pid": os.getpid()}


@app.get("/slow")
async def slow(seconds: float = 3.0) -> dict[str, Any]:
    global _in_flight
    _in_flight += 1
    try:
        await asyncio.sleep(min(seconds, 30.0))
    finally:
        _in_flight -= 1
    return {"marker": MARKER, "pid": os.getpid(), "slept": seconds}


@app.get("/stream")
async def stream(seconds: float = 60.0) -> StreamingResponse:
    """A long-lived response (like SSE): the worker's pid and generation's marker first, then a dot every 0.5 s."""

    async def chunks() -> AsyncIterator[bytes]:
        yield f"{os.getpid()} {MARKER}\n".encode()
        for _ in range(int(min(seconds, 60.0) / 0.5)):
            await asyncio.sleep(0.5)
            yield b".\n"

    return StreamingResponse(chunks(), media_type="text/plain")


@app.get("/in-flight")
async def in_flight() -> dict[str, int]:
    return {"slow": _in_flight, "pid": os.getpid()}


@app.get("/supervisor")
async def supervisor() -> dict[str, Any]:
    answer = await control.ask(os.environ[SUPERVISOR_ENV], StatusRequest(), StatusAnswer)
    status = answer.status
    status["control_socket"] = os.environ[SUPERVISOR_ENV]  # in the master's runtime directory
    return status


@app.get("/block")
async def block(seconds: float = 10.0, touch: str = "") -> dict[str, Any]:
    """Blocks this worker's event loop (a sync call in an async handler): what a hung worker looks like.

    `touch`: a file created just before, so a test knows the loop is blocked from then on.
    """
    if touch:
        Path(touch).touch()
    time.sleep(min(seconds, 60.0))
    return {"pid": os.getpid()}


@app.get("/exit")
async def exit_now(code: int = 3) -> dict[str, Any]:
    """Ends this worker at once with `code`, as a crashing extension or a sys.exit in a handler would."""
    os._exit(code)


@app.get("/allocate")
async def allocate(mib: int = 100) -> dict[str, Any]:
    """Keeps `mib` MiB more (written, so resident) for the worker's life: a worker that grows."""
    _held.append(b"x" * (min(mib, 1024) * 1024 * 1024))
    return {"pid": os.getpid(), "held_mib": sum(map(len, _held)) // (1024 * 1024)}
