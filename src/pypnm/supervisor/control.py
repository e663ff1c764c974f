"""The master's control channel: a Unix socket in its private runtime directory.

One request and one answer per connection, as protocol.py's "control" channel says. Workers find
the socket through the `PYPNM_SUPERVISOR` environment variable. A Unix socket in a
0700 directory is the access control: only the service's own user can reach it,
so the HTTP side decides who may ask and the channel just carries the request.
The wire format is deliberately tiny, because a worker running new code must keep
talking to a master that is still running the code it was started with (protocol.py's versions).

Every request carries a `deadline`: the moment its caller stops waiting for the answer,
on the system-wide CLOCK_MONOTONIC. Both ends are on one machine (a Unix socket) and in
one time namespace (the workers descend from the master), so their readings of that clock
compare, and unlike wall-clock time it does not jump when the clock is set. A handler
with side effects (a reload) drops a request read after its deadline: its caller has
already reported failure, so acting on it would be a surprise. The deadline falls
ANSWER_MARGIN before the caller's timeout, so an answer sent just before it still arrives
in time. A master that predates the field ignores it; a request without it never expires.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from pypnm.supervisor import protocol
from pypnm.supervisor.protocol import (
    ControlAnswer,
    ControlRequest,
    Refused,
    ReloadAccepted,
    StatusAnswer,
    UpgradeAccepted,
)
from pypnm.supervisor.timeouts import ANSWER_MARGIN, CONTROL_ASK, CONTROL_READ

logger = logging.getLogger("pypnm.supervisor.control")

Handler = Callable[[ControlRequest], Awaitable[ControlAnswer]]


class ControlError(RuntimeError):
    """The master refused the request or could not be asked."""


class ControlTimeout(ControlError):
    """The master did not answer in time; a request with side effects that it reads later is dropped."""

    def __init__(self, timeout: float) -> None:
        super().__init__(f"the supervisor did not answer within {timeout:g}s")
        self.timeout = timeout


def clock() -> float:
    """Seconds on CLOCK_MONOTONIC: the same clock in every process of the machine (see the module doc)."""
    return time.clock_gettime(time.CLOCK_MONOTONIC)


def expired_by(deadline: float | None, now: float | None = None) -> float | None:
    """How many seconds past `deadline` it is `now`, or None while its caller still waits (or set none)."""
    if deadline is None:
        return None
    late = (clock() if now is None else now) - deadline
    return late if late > 0 else None


Answer = TypeVar("Answer", ReloadAccepted, UpgradeAccepted, StatusAnswer)


async def ask(path: str, request: ControlRequest, expect: type[Answer], timeout: float = CONTROL_ASK) -> Answer:
    """Send one request to the master and return its answer, of type `expect`.

    ControlTimeout after `timeout` seconds; ControlError when it refuses or answers something else.
    """
    request = dataclasses.replace(request, deadline=clock() + max(timeout - ANSWER_MARGIN, timeout / 2))
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_unix_connection(path, limit=protocol.MAX_ANSWER)
            try:
                writer.write(protocol.encode_control(request))
                await writer.drain()
                line = await reader.readline()
            except ValueError:  # longer than MAX_ANSWER
                raise ControlError(f"the supervisor's answer is longer than {protocol.MAX_ANSWER} bytes") from None
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except TimeoutError:
        raise ControlTimeout(timeout) from None
    if not line:
        raise ControlError("the supervisor closed the control channel without answering")
    try:
        answer = protocol.decode_control(line)
    except protocol.ProtocolError as exc:
        raise ControlError(str(exc)) from None
    if isinstance(answer, Refused):
        raise ControlError(answer.error)
    if not isinstance(answer, expect):
        raise ControlError(f"the supervisor answered {type(answer).__name__} to {type(request).__name__}")
    return answer


async def listen(path: str, handler: Handler) -> asyncio.Server:
    """Answer requests on `path` with `handler` until the returned server is closed."""

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                line = await asyncio.wait_for(reader.readline(), CONTROL_READ)  # ValueError past MAX_MESSAGE
                request = protocol.decode_control(line)  # ProtocolError is a ValueError
                if not isinstance(request, ControlRequest):
                    raise ValueError(f"expected a request, got {request}")
                answer = await handler(request)
            except ValueError as exc:
                answer = Refused(f"bad control request: {exc}")
                logger.warning("control channel: %s", answer.error)  # a local process speaking nonsense
            writer.write(protocol.encode_control(answer))
            await writer.drain()
        except (TimeoutError, ConnectionError) as exc:
            logger.debug("control connection dropped: %s", exc)
        finally:
            writer.close()

    return await asyncio.start_unix_server(on_connection, path=path, limit=protocol.MAX_MESSAGE)
