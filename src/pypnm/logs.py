"""Log format and set-up shared by the master, the fork template and the workers.

Every line carries the role, pid and generation of the process that wrote it, so a
reload can be followed across processes in one stream: stderr, or the `log_file`
(pypnm.supervisor.logfile), which then takes every line and stderr none.

Two formats (`log_format`), one for every process: `text`, a line as shown in the
README, and `json`, one object per line (python-json-logger, a maintained formatter
that also turns a record's `extra` fields into keys): `time`, `level`, `logger`,
`message`, `role`, `pid`, `generation`, then `request_id` (lines logged while a request
runs, in its worker), `reload_id` (master lines while a reload runs), `exc_info` and
`stack_info` when there is one, and the record's `extra` fields. The master decides the
output (`setup_logging(..., output)`) and hands it to the template and the workers in
the environment (`LOG_OUTPUT_ENV`), so they all write the same way to the same place.

The request id reaches a record through a record factory rather than a filter reading a
context variable: in a worker, the app's modules (this one too) are imported again from
the generation's snapshot, so the middleware sets the variable of that copy while the
handler belongs to the copy the worker started with. The record factory belongs to
`logging` itself, which both copies share; each copy installs one that stamps its own
variable's value.

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

import contextvars
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

if TYPE_CHECKING:
    from pypnm.settings import Settings

# Where the master tells the processes it starts how to log (a LogOutput as JSON).
LOG_OUTPUT_ENV = "PYPNM_SUPERVISOR_LOG"

_generation = "-"
_reload_id_source: Callable[[], str | None] | None = None
_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("pypnm_request_id", default=None)


def set_generation(number: int | None) -> None:
    """The generation this process's lines are stamped with (the serving one, for the master)."""
    global _generation
    _generation = "-" if number is None else str(number)


def set_reload_id_source(source: Callable[[], str | None] | None) -> None:
    """Where this process reads the id of the reload running now (the master), stamped as `reload_id`."""
    global _reload_id_source
    _reload_id_source = source


def bind_request_id(request_id: str) -> contextvars.Token[str | None]:
    """Records made from now on in this context (the request's task) carry `request_id`; undo with the token."""
    return _request_id.set(request_id)


def unbind_request_id(token: contextvars.Token[str | None]) -> None:
    _request_id.reset(token)


def _stamping_request_id(make_record: Callable[..., logging.LogRecord]) -> Callable[..., logging.LogRecord]:
    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        request_id = _request_id.get()
        if request_id is not None:  # only then: an outer copy's empty variable must not hide an inner one's id
            record.pypnm_request_id = request_id
        return record

    return factory


logging.setLogRecordFactory(_stamping_request_id(logging.getLogRecordFactory()))


class _ProcessContext(logging.Filter):
    """Stamps each record with the process's role, pid, generation and running reload (read at emit time)."""

    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def filter(self, record: logging.LogRecord) -> bool:
        record.role = self.role
        record.pid = os.getpid()
        record.generation = _generation
        reload_id = _reload_id_source() if _reload_id_source is not None else None
        if reload_id:
            record.pypnm_reload_id = reload_id
        return True


# Control characters (C0, DEL, C1), line/paragraph separators, bidirectional-text controls (Unicode's Bidi_Control).
_ESCAPES: dict[int, str] = {
    **{code: f"\\x{code:02x}" for code in (*range(0x00, 0x20), *range(0x7F, 0xA0))},
    **{ord("\t"): "\\t", ord("\n"): "\\n", ord("\r"): "\\r"},
    **{
        code: f"\\u{code:04x}"
        for code in (0x061C, 0x200E, 0x200F, 0x2028, 0x2029, *range(0x202A, 0x202F), *range(0x2066, 0x206A))
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


def _utc_time(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


class _UTCFormatter(logging.Formatter):
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return _utc_time(record)

    def format(self, record: logging.LogRecord) -> str:
        # Lines after the first (a traceback) are indented: none can pass for a record of its own.
        return super().format(record).replace("\n", "\n    ")


class _JSONFormatter(JsonFormatter):
    """One JSON object per record; the traceback is the `exc_info` string, line breaks as `\\n`."""

    def __init__(self) -> None:
        super().__init__(
            "%(asctime)s %(levelname)s %(name)s %(message)s %(role)s %(pid)s %(generation)s",
            rename_fields={
                "asctime": "time",
                "levelname": "level",
                "name": "logger",
                "pypnm_request_id": "request_id",
                "pypnm_reload_id": "reload_id",
            },
            # uvicorn's `color_message` repeats the message with terminal colours.
            reserved_attrs=[*RESERVED_ATTRS, "color_message"],
        )

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return _utc_time(record)

    def formatException(self, ei: Any) -> str:
        # The same text and escapes as the text format's traceback (_SafeRecord's record.exc_text).
        return _escape_lines(_TRACEBACKS.formatException(ei))

    def process_log_record(self, log_data: dict[str, Any]) -> dict[str, Any]:
        generation = log_data.get("generation")
        log_data["generation"] = int(generation) if isinstance(generation, str) and generation.isdigit() else None
        return log_data


@dataclass(frozen=True)
class LogOutput:
    """How and where every process of one service logs: the log_* settings, as the master applies them."""

    format: Literal["text", "json"] = "text"
    file: Path | None = None  # None: stderr
    max_bytes: int = 0
    backups: int = 1

    @classmethod
    def from_settings(cls, settings: Settings) -> LogOutput:
        # Absolute: the master's working directory decides, whoever opens it later.
        file = settings.log_file.absolute() if settings.log_file is not None else None
        return cls(settings.log_format, file, settings.log_file_max_bytes, settings.log_file_backups)

    @classmethod
    def from_env(cls) -> LogOutput | None:
        """The master's choice, in a process it started; None elsewhere (or when unreadable)."""
        try:
            fields = json.loads(os.environ[LOG_OUTPUT_ENV])
            return cls(
                fields["format"],
                Path(fields["file"]) if fields["file"] else None,
                int(fields["max_bytes"]),
                int(fields["backups"]),
            )
        except (KeyError, TypeError, ValueError):
            return None

    def to_env(self) -> str:
        return json.dumps({**asdict(self), "file": str(self.file) if self.file else None})


def log_file_in_use(settings: Settings) -> Path | None:
    """The file this service logs to: the master's choice under the supervisor, else the `log_file` setting.

    They differ after a reload that changed `log_file`, which applies at the next restart only.
    """
    chosen = LogOutput.from_env()
    if chosen is not None:
        return chosen.file
    return LogOutput.from_settings(settings).file


def set_level(level: str) -> None:
    """Apply a `log_level` setting to every logger of this process (`trace` is uvicorn's level 5)."""
    numeric = logging.getLevelName(level.upper()) if level != "trace" else 5
    logging.getLogger().setLevel(numeric if isinstance(numeric, int) else logging.INFO)


def setup_logging(role: str, level: str = "info", output: LogOutput | None = None) -> None:
    """Send all logging (ours and uvicorn's) to one handler, one line per event.

    `output` is the master's decision; it opens the log file now (LogFileError, one line, when
    it cannot) and is handed to the processes started from here on. Without it a process
    follows the master that started it, or logs text to stderr.
    """
    from pypnm.supervisor.logfile import LogFile, LogFileError, LogFileHandler, activate

    decided = output is not None
    output = output or LogOutput.from_env() or LogOutput()
    file = LogFile(output.file, output.max_bytes, output.backups) if output.file is not None else None
    if file is not None:
        try:
            file.open()  # now, so that a SIGUSR1 finds every process with the file open, logging or not
        except LogFileError:
            if decided:
                raise
            # A process the master started: each line tries again, and goes to stderr, saying why, meanwhile.
    if decided:
        os.environ[LOG_OUTPUT_ENV] = output.to_env()
    handler: logging.Handler = LogFileHandler(file) if file is not None else logging.StreamHandler(sys.stderr)
    handler.addFilter(_ProcessContext(role))
    handler.addFilter(_SafeRecord())  # on the handler, so it holds for any formatter set on it
    handler.setFormatter(
        _JSONFormatter()
        if output.format == "json"
        else _UTCFormatter("%(asctime)s %(levelname)s [%(role)s pid=%(pid)s gen=%(generation)s] %(name)s: %(message)s")
    )
    root = logging.getLogger()
    for old in root.handlers:
        # E.g. the zygote's, inherited by a worker: its copy of the file is not ours. Every one, not
        # only LogFileHandlers: the zygote's may be of another copy of this module (the app's
        # import replaced pypnm's modules with the snapshot's), and closing a stream handler
        # leaves its stream open.
        old.close()
    root.handlers[:] = [handler]
    activate(file)
    set_level(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        # uvicorn's own handlers would print a second, differently shaped line.
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    # watchfiles says "N changes detected" at INFO for every batch; pypnm logs what it does about
    # them (a reload, and why). Left at INFO, output redirected into a watched directory (such as
    # the settings file's) would feed itself: each line a change, each change a line.
    logging.getLogger("watchfiles").setLevel(logging.WARNING)
