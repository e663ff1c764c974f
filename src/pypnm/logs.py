"""Log format and set-up shared by the master, the fork template and the workers.

Every line carries the role, pid and generation of the process that wrote it, so a
reload can be followed across processes in one stream (they all write to stderr).

No log line can be forged or carry a terminal escape, whichever logger writes it
(pypnm's, uvicorn's, a library's) and whatever a client sent:

- `_SafeRecord`, a filter on the one handler every process logs through, renders each
  record's message and writes every control character in it (C0, DEL, C1), the Unicode
  line and paragraph separators and the bidirectional-text controls as a visible escape
  (`\\n`, `\\x1b`, `\\u2028`), and does the same to every other string on the record
  (`extra` fields). The traceback (`exc_info`) and stack (`stack_info`) texts are escaped
  line by line: their line breaks stay, so tracebacks stay readable. The filter works on
  the record before any formatter runs, so another format (JSON, say) that replaces
  the formatter gets clean records too, as long as it reads the message with
  `getMessage()` and the traceback from `record.exc_text` (set here).
- The text formatter indents every line after a record's first (traceback lines), so
  only a record's own first line starts with a time stamp.
- Code that logs values a client controls (path, method, request id, Host, ...) also
  writes them with `log_field`: quoted when they are not plain, so that they cannot pass
  for another `key=value` field, and safe under a logging set-up that is not ours
  (plain `uvicorn pypnm.main:app`), where the filter is not installed.

Hand-written: the standard library has no such filter, and it is a translation table.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time

_generation = "-"


def set_generation(number: int | None) -> None:
    """The generation this process's lines are stamped with (the serving one, for the master)."""
    global _generation
    _generation = "-" if number is None else str(number)


class _ProcessContext(logging.Filter):
    """Stamps each record with the process's role, pid and generation (read at emit time)."""

    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def filter(self, record: logging.LogRecord) -> bool:
        record.role = self.role
        record.pid = os.getpid()
        record.generation = _generation
        return True


# Control characters (C0, DEL, C1), line/paragraph separators, bidirectional-text controls.
_ESCAPES: dict[int, str] = {
    **{code: f"\\x{code:02x}" for code in (*range(0x00, 0x20), *range(0x7F, 0xA0))},
    **{ord("\t"): "\\t", ord("\n"): "\\n", ord("\r"): "\\r"},
    **{
        code: f"\\u{code:04x}"
        for code in (0x200E, 0x200F, 0x2028, 0x2029, *range(0x202A, 0x202F), *range(0x2066, 0x206A))
    },
}
_UNSAFE = re.compile("[" + re.escape("".join(map(chr, _ESCAPES))) + "]")
_PLAIN_FIELD = re.compile(r"[A-Za-z0-9._:/\[\]%@+-]+")
_TRACEBACKS = logging.Formatter()  # the standard traceback text, whatever formatter prints it later


def escape_controls(text: str) -> str:
    """`text` with each control character, line separator and bidi control written as an escape (`\\n`)."""
    return text.translate(_ESCAPES) if _UNSAFE.search(text) else text


def log_field(value: str, limit: int = 200) -> str:
    """A client-controlled value for a one-line `key=value` log: as it is when plain, else JSON-quoted.

    JSON-quoted means in double quotes, with `"`, `\\`, every control character and every
    non-ASCII character escaped, and cut to its first `limit` characters.
    """
    if len(value) <= limit and _PLAIN_FIELD.fullmatch(value):
        return value
    return json.dumps(value[:limit])


def _escape_lines(text: str) -> str:
    return "\n".join(escape_controls(line) for line in text.split("\n"))


class _SafeRecord(logging.Filter):
    """Leaves no raw control character on a record: message, extra fields, traceback and stack lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format/argument pair: report it here, as one escaped line
            message = f"{record.msg!r} % {record.args!r} (log call whose arguments do not fit its format)"
        record.msg, record.args = message, None
        if record.exc_info and not record.exc_text:
            record.exc_text = _TRACEBACKS.formatException(record.exc_info)
        fields = vars(record)
        for name, value in fields.items():
            if isinstance(value, str):
                fields[name] = _escape_lines(value) if name in ("exc_text", "stack_info") else escape_controls(value)
        return True


class _UTCFormatter(logging.Formatter):
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        # Lines after the first (a traceback) are indented: none can pass for a record of its own.
        return super().format(record).replace("\n", "\n    ")


def set_level(level: str) -> None:
    """Apply a `log_level` setting to every logger of this process (`trace` is uvicorn's level 5)."""
    numeric = logging.getLevelName(level.upper()) if level != "trace" else 5
    logging.getLogger().setLevel(numeric if isinstance(numeric, int) else logging.INFO)


def setup_logging(role: str, level: str = "info") -> None:
    """Send all logging (ours and uvicorn's) to stderr, one line per event."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_ProcessContext(role))
    handler.addFilter(_SafeRecord())  # on the handler, so it holds for any formatter set on it
    handler.setFormatter(
        _UTCFormatter("%(asctime)s %(levelname)s [%(role)s pid=%(pid)s gen=%(generation)s] %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    set_level(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        # uvicorn's own handlers would print a second, differently shaped line.
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
