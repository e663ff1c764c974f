"""The app factory: one settings object in, the complete FastAPI app out."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.middleware.gzip import GZipMiddleware

import pypnm
from pypnm.api import health, system_log, web_service
from pypnm.api.access import AccessPolicy, SystemOperationsGuard, document_access
from pypnm.api.docs import add_offline_docs
from pypnm.api.metrics import add_metrics
from pypnm.api.middleware import RequestLogMiddleware
from pypnm.identity import ProcessIdentity, code_version
from pypnm.settings import Settings, load_settings

PACKAGE_DIR = Path(pypnm.__file__).resolve().parent


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings if settings is not None else load_settings()
    access = AccessPolicy.from_settings(settings)  # tokens are read here, once (SettingsError if unusable)
    app = FastAPI(
        title="PyPNM",
        version=pypnm.__version__,
        description="PyPNM web service.",
        docs_url=None,  # FastAPI's pages load their assets from CDNs; add_offline_docs serves them locally
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.identity = ProcessIdentity(version=pypnm.__version__, code_version=code_version(PACKAGE_DIR))

    app.include_router(health.router)
    app.include_router(web_service.router)
    app.include_router(system_log.router)  # GET /pypnm/system/log/download
    document_access(app)
    add_offline_docs(app)

    # Added innermost first: the request log wraps everything, so it sees every answer.
    app.add_middleware(GZipMiddleware, minimum_size=settings.gzip_minimum_size)
    # Inside CORS (preflights are CORS's; refusals get CORS headers), inside the log (request id).
    app.add_middleware(SystemOperationsGuard, policy=access)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_credentials=settings.cors_allow_credentials,
            allow_methods=["GET"],
            allow_headers=["Authorization", "X-Request-ID"],
            expose_headers=["X-Request-ID", "X-Reload-Id"],
        )
    app.add_middleware(RequestLogMiddleware, access_log=settings.access_log)
    if settings.metrics_enabled:
        add_metrics(app)  # outermost: counts and times every answer, refusals included; serves GET /metrics
    return app
