"""Log format and set-up shared by the master, the fork template and the workers.

Every line carries the role, pid and generation of the process that wrote it, so a
reload can be followed across processes in one stream (they all write to stderr).
"""

from __future__ import annotations

import logging
import os
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


class _UTCFormatter(logging.Formatter):
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


def set_level(level: str) -> None:
    """Apply a `log_level` setting to every logger of this process (`trace` is uvicorn's level 5)."""
    numeric = logging.getLevelName(level.upper()) if level != "trace" else 5
    logging.getLogger().setLevel(numeric if isinstance(numeric, int) else logging.INFO)


def setup_logging(role: str, level: str = "info") -> None:
    """Send all logging (ours and uvicorn's) to stderr, one line per event."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_ProcessContext(role))
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
