"""The warm-up request: one request through a worker's own HTTP stack before the worker accepts.

Why: a forked worker's first request costs several times the CPU of its later ones (measured
with the reload benchmark's large app: ~5.5 ms against ~1 ms, and ~1000 minor page faults
against a handful). Nearly all of it is copy-on-write: the worker shares the zygote's pages,
and the first pass of a code path writes to the objects it touches (reference counts,
CPython 3.11's in-place bytecode specialisation), so each page they are on is copied then.
Taken by the first client after the swap, that is the reload window's slowest requests.
The worker takes what it can of it itself, before it reports ready and while it is still
niced (priority.py): the walk over the app's routes (the largest part, `build_routes`,
worker.py) and, here, uvicorn's own path: parser, request cycle, response, transport.

The request goes over a socketpair handed to the worker's event loop as an accepted
connection, so it is parsed, dispatched and answered by the same protocol class, transport
and event loop as a client's request. It is answered by a stand-in ASGI app, never by the
project's app: nothing of the app runs, so nothing of the app's (logs, metrics, state)
sees it. The app's own handlers and middleware are warmed only by the smoke requests
(`check_paths`), which call the app in-process before.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

PATH = "/.pypnm-warm-up"
REQUEST = (f"GET {PATH} HTTP/1.1\r\nhost: localhost\r\nuser-agent: pypnm-warm-up\r\nconnection: close\r\n\r\n").encode()
BODY = b'{"warm_up":"ok"}'


async def answer(scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
    """The stand-in app: a small JSON 200, sent the way an app sends one (start, then body)."""
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": BODY})


async def warm_up(make_protocol: Callable[[], HttpToolsProtocol], timeout: float) -> int:
    """Send one request through a protocol from `make_protocol` (with `answer` as its app); the status read back.

    Raises OSError or TimeoutError when the request could not be made or was not answered in time.
    """
    loop = asyncio.get_running_loop()
    server_end, client_end = socket.socketpair()

    def protocol() -> HttpToolsProtocol:
        made = make_protocol()
        made.app = answer  # uvicorn's protocol calls whatever app it holds
        return made

    server: asyncio.BaseTransport | None = None
    client: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            server, _ = await loop.connect_accepted_socket(protocol, sock=server_end)
            reader, client = await asyncio.open_connection(sock=client_end)
            client.write(REQUEST)
            response = await reader.read()  # to end-of-file: the request said connection: close
    finally:
        # Each end is closed by the transport that owns it, once there is one (closing twice is harmless).
        if server is not None:
            server.close()
        else:
            server_end.close()
        if client is not None:
            client.close()
        else:
            client_end.close()
    status_line = response.split(b"\r\n", 1)[0].split()
    return int(status_line[1]) if len(status_line) > 1 and status_line[1].isdigit() else 0
