"""The master's control channel: a Unix socket in its private runtime directory.

One JSON object per line, one request and one answer per connection. Workers find
the socket through the `PYPNM_SUPERVISOR` environment variable. A Unix socket in a
0700 directory is the access control: only the service's own user can reach it,
so the HTTP side decides who may ask and the channel just carries the request.
The wire format is deliberately tiny, because a worker running new code must keep
talking to a master that is still running the code it was started with.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

logger = logging.getLogger("pypnm.supervisor.control")

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
MAX_LINE = 64 * 1024


class ControlError(RuntimeError):
    """The master refused the request or could not be asked."""


async def ask(path: str, request: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """Send one request to the master and return its answer."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_unix_connection(path, limit=MAX_LINE)
        try:
            writer.write(json.dumps(request).encode() + b"\n")
            await writer.drain()
            line = await reader.readline()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    if not line:
        raise ControlError("the supervisor closed the control channel without answering")
    answer: dict[str, Any] = json.loads(line)
    if "error" in answer:
        raise ControlError(str(answer["error"]))
    return answer


async def serve(path: str, handler: Handler) -> asyncio.Server:
    """Answer requests on `path` with `handler` until the returned server is closed."""

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                line = await asyncio.wait_for(reader.readline(), 5.0)  # ValueError past MAX_LINE
                request = json.loads(line)
                if not isinstance(request, dict):
                    raise ValueError("a request is a JSON object")
                answer = await handler(request)
            except (ValueError, KeyError) as exc:
                answer = {"error": f"bad control request: {exc}"}
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        except (TimeoutError, ConnectionError) as exc:
            logger.debug("control connection dropped: %s", exc)
        finally:
            writer.close()

    return await asyncio.start_unix_server(on_connection, path=path, limit=MAX_LINE)
