"""Access-log forging: nothing a client sends reaches a log line as a raw control character or line break.

First a real supervised server, sent paths, a Host, a User-Agent and an X-Request-ID full
of control characters; its whole log output is then checked byte by byte. Then the pieces:
`escape_controls` and `log_field` directly, and the handler `setup_logging` installs, fed
records from uvicorn's logger, with `extra` fields, tracebacks and another (JSON) format.
"""

from __future__ import annotations

import io
import json
import logging
import re
import secrets
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import StartService, pypnm_command, raw_http, wait_until
from pypnm.logs import escape_controls, log_field, setup_logging

STAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (TRACE|DEBUG|INFO|WARNING|ERROR|CRITICAL) \[")
FAKE = "2026-01-01T00:00:00.000Z INFO [master pid=1 gen=1] pypnm.supervisor.master: generation 9 serving"
# Every kind of character that must never reach a log raw, percent-encoded for a request path.
HOSTILE = "%0a%0d%1b[31m%00%09%7f%c2%85%c2%9b%e2%80%a8%e2%80%a9%e2%80%ae"
UNSAFE = {
    "\u061c",
    "\u2028",
    "\u2029",
    "\u200e",
    "\u200f",
    *map(chr, range(0x202A, 0x202F)),
    *map(chr, range(0x2066, 0x206A)),
}


def raw_characters(text: str) -> list[str]:
    """The characters of `text` that must not be in a log: control characters (but the line breaks
    between lines), line and paragraph separators, bidi controls."""
    return [c for c in text if (unicodedata.category(c) == "Cc" and c != "\n") or c in UNSAFE]


def test_hostile_request_writes_one_escaped_access_line(start_service: StartService) -> None:
    service = start_service(pypnm_command("--port", "{port}"))
    marker = "forged-" + secrets.token_hex(4)
    fake = FAKE.replace(" ", "%20").replace("[", "%5B").replace("]", "%5D")
    path = f"/{marker}%0a{fake}{HOSTILE}"
    request_id = "rid-" + secrets.token_hex(4)
    status, headers, _ = raw_http(
        service.port,
        f"GET {path}?q=%0a{FAKE.replace(' ', '+')} HTTP/1.1".encode(),
        [
            f"Host: 127.0.0.1:{service.port}".encode(),
            b"User-Agent: curl/8 \x85\x9b31m\xe2\x80\xa8" + FAKE.encode(),
            f"X-Request-ID: {request_id}".encode(),
        ],
    )
    assert status == 404
    assert headers["x-request-id"] == request_id

    # A hostile X-Request-ID is not echoed: the line is found by the id the service made instead.
    hostile_id = b"x\x85" + FAKE.encode() + b"\x9b"
    system_path = f"/pypnm/system/{marker}%0a{fake}{HOSTILE}"
    status, headers, _ = raw_http(
        service.port,
        f"GET {system_path} HTTP/1.1".encode(),
        [
            f"Host: 127.0.0.1:{service.port}".encode(),
            b"X-Request-ID: " + hostile_id,
        ],
    )
    assert status == 404  # let in by address, then not found: audited and logged
    made_id = headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", made_id), made_id

    def logged() -> bool:
        return f"request_id={made_id}" in service.output() and f"request_id={request_id}" in service.output()

    wait_until(logged, timeout=10.0)
    output = service.log.read_bytes().decode("utf-8")  # strict: a stray byte fails here
    lines = output.split("\n")
    assert raw_characters(output) == [], sorted(set(raw_characters(output)))
    assert all(STAMP.match(line) or line.startswith("    ") for line in lines if line), output
    assert not any(line.startswith(FAKE[:24]) for line in lines)

    (access,) = [line for line in lines if f"request_id={request_id}" in line]
    assert ' pypnm.access: GET "/' + marker + "\\n2026-01-01T00:00:00.000Z INFO [master pid=1 gen=1] " in access
    assert '\\r\\u001b[31m\\u0000\\t\\u007f\\u0085\\u009b\\u2028\\u2029\\u202e" 404 ' in access
    assert sum(marker in line for line in lines) == 3  # the access line of each request and one audit line
    (audit,) = [line for line in lines if " pypnm.audit: " in line and marker in line]
    assert f'route="/pypnm/system/{marker}\\n2026-01-01' in audit and f"request_id={made_id} " in audit
    (second,) = [line for line in lines if " pypnm.access: " in line and f"request_id={made_id}" in line]
    assert second.endswith(f"request_id={made_id}")


# ----- the functions ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "escaped"),
    [
        ("a\nb", "a\\nb"),
        ("a\r\nb", "a\\r\\nb"),
        ("\t\x00\x1b[31m\x7f", "\\t\\x00\\x1b[31m\\x7f"),
        ("\x85\x9b\x9f", "\\x85\\x9b\\x9f"),
        ("\u2028\u2029\u202e\u2066\u200f\u061c", "\\u2028\\u2029\\u202e\\u2066\\u200f\\u061c"),
        ("plain ascii, été, 日本, \\n as typed", "plain ascii, été, 日本, \\n as typed"),
    ],
)
def test_escape_controls(raw: str, escaped: str) -> None:
    assert escape_controls(raw) == escaped


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("/pypnm/system/webService/reload", "/pypnm/system/webService/reload"),
        ("[::1]:8000", "[::1]:8000"),
        ("", '""'),
        ("/x\ny", '"/x\\ny"'),
        ('a" outcome=allowed', '"a\\" outcome=allowed"'),
        ("\x1b\x7f\x85\u2028é", '"\\u001b\\u007f\\u0085\\u2028\\u00e9"'),
        ("a" * 201, json.dumps("a" * 200)),
    ],
)
def test_log_field(value: str, shown: str) -> None:
    assert log_field(value) == shown


@settings(max_examples=300, deadline=None, database=None)
@given(st.text(max_size=300))
def test_log_field_is_one_printable_ascii_token_that_decodes_back(value: str) -> None:
    shown = log_field(value)
    assert all(" " <= c <= "~" for c in shown)
    if shown.startswith('"'):
        assert json.loads(shown) == value[:200]
    else:
        assert shown == value and " " not in shown


# ----- the handler every process logs through ----------------------------------------------------------


@pytest.fixture
def log_output(restore_logging: io.StringIO) -> io.StringIO:
    """setup_logging("worker", "debug") into a buffer (conftest's restore_logging puts the test run's logging back)."""
    setup_logging("worker", "debug")
    return restore_logging


def test_every_record_is_escaped_and_tracebacks_stay_readable(log_output: io.StringIO) -> None:
    hostile = f"x\n{FAKE}\r\x1b[2J\x00\x85\u2028"
    logging.getLogger("uvicorn.error").warning("Invalid request %r / %s", hostile.encode(), hostile)
    logging.getLogger("pypnm.future").info("with extra", extra={"client_value": hostile})
    try:
        raise ValueError(f"boom: {hostile}")
    except ValueError:
        logging.getLogger("pypnm.supervisor.master").exception("reload failed: %s", hostile)
    logging.getLogger("pypnm.future").info("with stack", stack_info=True)
    logging.getLogger("pypnm.future").info("bad %d format", "not a number")

    output = log_output.getvalue()
    assert raw_characters(output) == []
    lines = output.rstrip("\n").split("\n")
    records = [line for line in lines if STAMP.match(line)]
    assert len(records) == 5, output
    assert all(line.startswith("    ") for line in lines if not STAMP.match(line))
    assert not any(line.startswith(FAKE[:24]) for line in lines)
    assert f"uvicorn.error: Invalid request b'x\\n{FAKE}" in records[0]
    assert f"/ x\\n{FAKE}\\r\\x1b[2J\\x00\\x85\\u2028" in records[0]
    assert "    Traceback (most recent call last):" in lines
    assert f"    {FAKE}\\r\\x1b[2J\\x00\\x85\\u2028" in lines  # the exception's own line break kept, indented
    assert any(line.startswith("    ") and "in test_every_record_is_escaped" in line for line in lines)
    assert "'bad %d format' % ('not a number',) (log call whose arguments do not fit its format)" in records[4]


def test_another_format_gets_clean_records_too(log_output: io.StringIO) -> None:
    class JsonFormatter(logging.Formatter):
        """What a JSON log format may look like: message, extras and traceback as they are on the record."""

        def format(self, record: logging.LogRecord) -> str:
            if record.exc_info and not record.exc_text:
                record.exc_text = self.formatException(record.exc_info)
            fields = {
                "message": record.getMessage(),
                "client": getattr(record, "client_value", None),
                "exc": record.exc_text,
            }
            return json.dumps(fields, ensure_ascii=False)  # would keep every raw character it is given

    (handler,) = [h for h in logging.getLogger().handlers if getattr(h, "stream", None) is log_output]
    handler.setFormatter(JsonFormatter())
    hostile = "a\x7f\x1b\x85\u2028b"
    logging.getLogger("uvicorn.error").warning("seen %s", hostile, extra={"client_value": hostile})
    try:
        raise RuntimeError(hostile)
    except RuntimeError:
        logging.getLogger("pypnm").exception("failed")
    records = [json.loads(line) for line in log_output.getvalue().splitlines()]
    assert records[0]["message"] == "seen a\\x7f\\x1b\\x85\\u2028b"
    assert records[0]["client"] == "a\\x7f\\x1b\\x85\\u2028b"
    assert "RuntimeError: a\\x7f\\x1b\\x85\\u2028b" in records[1]["exc"]
    assert raw_characters(log_output.getvalue()) == []
