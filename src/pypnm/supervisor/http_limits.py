"""Bounds on what one client connection can make a worker hold: the size of a request head and its time.

uvicorn's httptools protocol reads a request head of any size (its only head limit,
`h11_max_incomplete_event_size`, is for the h11 protocol, and httptools has none) and
waits for it as long as the client likes. `LimitedHttpToolsProtocol` adds, per connection:

- a limit per line of the head (the request line or one header line) and one for the
  whole head. Bytes are measured as they arrive, *before* the parser buffers them, so a
  head that passes a limit is refused with 431 at once, never read whole first;
- a deadline for the head: from the connection's start, or from the first byte of the
  next request on a keep-alive connection, until the end of its headers. Past it the
  connection is closed, with 408 first when part of a request had arrived. (The idle
  time between requests stays uvicorn's `timeout_keep_alive`.)

Hand-written because neither uvicorn nor httptools offers either for this protocol. It
hooks only `data_received` and the parser callbacks that mark where a head starts and
ends; the rest is uvicorn's. The head is fed to the parser in pieces that end at short
lines (where a head may end), so the parser itself says exactly where each head ends
and the next one begins. A body of known length (`Content-Length`) is fed up to its last
byte, so a request pipelined behind it in the same read is measured like any other. A
chunked body is fed whole: only where one ends can the parser tell, so the head of a
request pipelined behind a chunked body in the same read is not counted (at most one read
beyond the limits; from the next read on it is measured again).
The trailer fields of a chunked body, which httptools buffers like headers, are held to
the head's total size too (counted per read, after parsing: at most one read more).

A refused connection answers, half-closes, and discards what the client still sends for
a moment (bounded in bytes and time) before closing: closing with unread data would reset
the connection and the client would never read the answer.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from pypnm.supervisor.timeouts import LINGER

logger = logging.getLogger("pypnm.supervisor.http_limits")


@dataclass(frozen=True)
class HeadLimits:
    """The limits of one generation, from its settings (see the README's Limits part)."""

    line_size: int  # limit_request_line_size: bytes of one line of the head, its CRLF included
    header_size: int  # limit_request_header_size: bytes of the whole head, request line to blank line
    timeout: float  # timeout_request_header: seconds to send the whole head


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a size limit and a deadline on every request head."""

    def __init__(self, *args: Any, limits: HeadLimits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self._head_size: int | None = 0  # bytes of the head read so far; None while a head is not being read
        self._line_size = 0  # bytes of the head's current, unfinished line
        self._body_left: int | None = None  # bytes of a Content-Length body still to come; None for chunked or none
        self._head_timer: asyncio.TimerHandle | None = None
        self._trailer_size: int | None = None  # bytes after a chunk header with no chunk data yet (trailers)
        self._chunk_events = 0  # chunk headers, chunk data and chunk ends seen: tells a trailer-only read
        self._refused = False
        self._discarded = 0
        self._linger_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_head_clock()

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._head_timer, self._linger_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._linger_timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            self._discard(len(data))
            return
        if self._head_size is not None and self._head_timer is None and self._idle():
            self._start_head_clock()  # the first bytes of the next request on a keep-alive connection
        start = 0
        while start < len(data):
            if self._head_size is not None:
                end = self._head_piece_end(data, start)
                if end is None:
                    return  # refused
                self._head_size += end - start
                super().data_received(data[start:end])
            else:
                end = self._body_piece_end(data, start)
                piece = data[start:end] if start or end < len(data) else data
                trailer, events = self._trailer_size, self._chunk_events
                super().data_received(piece)
                if trailer is not None and events == self._chunk_events and not self.transport.is_closing():
                    self._count_trailer(trailer + len(piece))
            if self.transport.is_closing() or self.parser.should_upgrade():
                return  # a bad request (400) or an upgrade: uvicorn does not read on either
            start = end

    def _body_piece_end(self, data: bytes, start: int) -> int:
        """Where the next piece of a body to feed ends: its last byte when its length is known, else the read's end."""
        if self._body_left:
            return min(len(data), start + self._body_left)
        return len(data)  # chunked (or a state the parser ends on its own): the whole read, as uvicorn would

    def _head_piece_end(self, data: bytes, start: int) -> int | None:
        """Where the next piece of the head to feed ends: after a short line, where the head may end.

        Measures each line on the way; refuses the request (and returns None) as soon as a
        line or the head passes its limit, before any of it reaches the parser.
        """
        assert self._head_size is not None
        line = self._line_size
        position = start
        while True:
            newline = data.find(b"\n", position)
            end = len(data) if newline < 0 else newline + 1
            line += end - position
            if line > self.limits.line_size:
                self._refuse_too_large("limit_request_line_size", self.limits.line_size, "one line of the request head")
                return None
            if self._head_size + end - start > self.limits.header_size:
                self._refuse_too_large(
                    "limit_request_header_size", self.limits.header_size, "the request line and headers together"
                )
                return None
            if newline < 0:
                self._line_size = line
                return end
            if line <= 2:  # an empty line ("\r\n"): the head may end here, so the parser must see it alone
                self._line_size = 0
                return end
            line = 0
            position = end

    # ----- parser callbacks: where a head starts and ends -------------------------------------

    def on_headers_complete(self) -> None:
        self._head_size = None
        self._body_left = _content_length(self.headers)
        self._stop_head_clock()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._head_size = 0  # what follows is the next request's head
        self._line_size = 0
        self._body_left = None
        self._trailer_size = None
        super().on_message_complete()

    def on_chunk_header(self) -> None:
        self._chunk_events += 1
        self._trailer_size = 0  # what follows is the chunk's data or, after the last chunk, trailer fields

    def on_body(self, body: bytes) -> None:
        self._chunk_events += 1
        self._trailer_size = None
        if self._body_left is not None:
            self._body_left -= len(body)
        super().on_body(body)

    def on_chunk_complete(self) -> None:
        self._chunk_events += 1
        self._trailer_size = None

    def _count_trailer(self, size: int) -> None:
        self._trailer_size = size
        if size > self.limits.header_size:
            # The request is already with the app, which may be answering: no 431 can be sent any more.
            logger.warning(
                "closed the connection from %s: chunked trailer fields over limit_request_header_size (%d bytes)",
                self._peer(),
                self.limits.header_size,
            )
            self.transport.close()

    # ----- the deadline ----------------------------------------------------------------------

    def _idle(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _start_head_clock(self) -> None:
        self._head_timer = self.loop.call_later(self.limits.timeout, self._head_timed_out)

    def _stop_head_clock(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if not self._head_size:
            # Nothing of a request arrived (an idle new connection): nobody to tell.
            logger.debug("closed a connection from %s: no request within timeout_request_header", self._peer())
            self.transport.close()
            return
        self._refuse(
            408,
            f"Request header timeout: the request line and headers must arrive within {self.limits.timeout:g} "
            "seconds (timeout_request_header); send the whole request head at once",
            f"request head not complete within timeout_request_header ({self.limits.timeout:g}s)",
            logging.INFO,  # a slow or vanished client, not a problem of this service
        )

    # ----- refusing --------------------------------------------------------------------------

    def _refuse_too_large(self, setting: str, limit: int, what: str) -> None:
        self._refuse(
            431,
            f"Request header too large: {what} may be at most {limit} bytes ({setting}); send fewer or shorter headers",
            f"request head over {setting} ({limit} bytes)",
            logging.WARNING,
        )

    def _refuse(self, status: int, detail: str, log_reason: str, level: int) -> None:
        """Answer `status` with a JSON detail, stop reading requests, and close the connection."""
        self._refused = True
        self._stop_head_clock()
        logger.log(level, "refused a request from %s with %d: %s", self._peer(), status, log_reason)
        body = json.dumps({"detail": detail}).encode()
        response = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            response += [name, b": ", value, b"\r\n"]
        response += [
            b"content-type: application/json\r\n",
            b"content-length: " + str(len(body)).encode() + b"\r\n",
            b"connection: close\r\n\r\n",
            body,
        ]
        self.transport.write(b"".join(response))
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self._linger_timer = self.loop.call_later(LINGER, self.transport.close)
        else:
            self.transport.close()

    def _discard(self, size: int) -> None:
        """Drop what a refused client still sends; close once it sends more than a head's worth."""
        self._discarded += size
        if self._discarded > self.limits.header_size:
            self.transport.close()

    def _peer(self) -> str:
        return f"{self.client[0]}:{self.client[1]}" if self.client else "unknown client"


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    """The body's length when the head gives it and the body is not chunked (httptools has checked the value)."""
    length = None
    for name, value in headers:
        if name == b"transfer-encoding":
            return None  # chunked: the chunks say where the body ends, not a length
        if name == b"content-length":
            try:
                length = int(value)
            except ValueError:
                return None
    return length
