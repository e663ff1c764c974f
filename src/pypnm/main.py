"""`pypnm.main:app`, the ASGI app that uvicorn and the supervisor's workers serve.

Settings are read here, at import. A bad setting ends the import with one log line
and exit code 2 instead of a traceback; the SettingsError stays attached as the
SystemExit's context, which is where a supervisor's validation reads the reason.
"""

from __future__ import annotations

import logging

from pypnm.api.app import create_app
from pypnm.settings import SettingsError

try:
    app = create_app()
except SettingsError as exc:
    logger = logging.getLogger("pypnm")
    # Unconfigured (a plain import, or uvicorn, which configures only its own loggers), logging writes
    # the bare message: it names the program. A configured format (a pypnm worker's) names the logger.
    logger.error("%s%s", "" if logger.hasHandlers() else "pypnm: ", exc)
    raise SystemExit(2) from exc
