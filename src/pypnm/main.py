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
    logging.getLogger("pypnm").error("pypnm: %s", exc)
    raise SystemExit(2) from exc
