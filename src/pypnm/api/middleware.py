"""Request logging with a request id: one line per request, `X-Request-ID` echoed or made.

A plain ASGI middleware rather than `BaseHTTPMiddleware`, so streaming responses
pass through untouched and the timing covers the whole response. The values a client
controls (method, path, client address, request id) are written with `log_field`, so a
path such as `/x%0a<a fake line>` stays one quoted field on one line. While a request
runs, its id is bound for logging (`bind_request_id`): every line logged meanwhile, the
access line included, carries it as `request_id` in the JSON format.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pypnm.logs import bind_request_id, log_field, unbind_request_id

logger = logging.getLogger("pypnm.access")

REQUEST_ID_HEADER = "x-request-id"
# Echo a caller's id only when it is short and harmless in a log line and a header.
_SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def request_id_of(scope: Scope) -> str:
    """The id of this request: set by RequestLogMiddleware, readable by any inner code."""
    return str(scope.get("state", {}).get("request_id", "-"))


class StatusRecorder:
    """A `send` that passes every message on and remembers the status of the response.

    The status stays 500 until the app answers: that is what the client gets if the app fails
    first. Shared by the middlewares that log, audit or count requests by status.
    """

    def __init__(self, send: Send) -> None:
        self.status = 500
        self._send = send

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        await self._send(message)


class RequestLogMiddleware:
    def __init__(self, app: ASGIApp, access_log: bool = True) -> None:
        self.app = app
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(REQUEST_ID_HEADER.encode(), b"").decode("latin-1")
        request_id = given if _SAFE_REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        bound = bind_request_id(request_id)  # every line logged while it runs carries it (JSON `request_id`)
        started = time.perf_counter()
        recorder = StatusRecorder(send)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((REQUEST_ID_HEADER.encode(), request_id.encode()))
                message = {**message, "headers": headers}
            await recorder(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if self.access_log:
                client = scope.get("client")
                logger.info(
                    "%s %s %d %.1fms client=%s request_id=%s",
                    log_field(scope["method"]),
                    log_field(scope["path"]),
                    recorder.status,
                    (time.perf_counter() - started) * 1000,
                    log_field(f"{client[0]}:{client[1]}") if client else "-",
                    log_field(request_id),
                )
            unbind_request_id(bound)
