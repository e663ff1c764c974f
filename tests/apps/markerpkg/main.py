"""`markerpkg.main:app`: answers carry the marker and the pid of the worker that answered.

`/supervisor` relays the master's status over its control socket, so tests of a
non-pypnm `--app` can see generations and worker pids.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from markerpkg.marker import MARKER
from pypnm.identity import SUPERVISOR_ENV
from pypnm.supervisor import control
from pypnm.supervisor.protocol import StatusAnswer, StatusRequest

app = FastAPI(title="markerpkg")
_in_flight = 0  # /slow requests this worker is answering now


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
    answer = await control.ask(os.environ[SUPERVISOR_ENV], StatusRequest())
    assert isinstance(answer, StatusAnswer)
    status = answer.status
    status["control_socket"] = os.environ[SUPERVISOR_ENV]  # in the master's runtime directory
    return status
