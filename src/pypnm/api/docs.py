"""The API docs, `/docs` (Swagger UI) and `/redoc` (ReDoc), working without internet access.

FastAPI's own doc pages load Swagger UI, ReDoc, Google fonts and the favicon from
public CDNs, so they are blank in a management network without internet. Here the
pages are FastAPI's own (`get_swagger_ui_html`, `get_redoc_html`) pointed at assets
that ship inside a wheel: the `fastapi-offline` package (pinned to an exact version in
pyproject.toml, which fixes the Swagger UI and ReDoc builds it carries) keeps
`swagger-ui-bundle.js`, `swagger-ui.css`, `redoc.standalone.js` and `favicon.png` in
its package directory, which StaticFiles serves under `/static/docs/`. Only its assets
are used, not its `FastAPIOffline` app factory, so that our pages can set the Swagger UI
options below and a Content-Security-Policy.

The Content-Security-Policy on both pages lets the browser load and call nothing but
this service: ReDoc's sidebar footer always asks its vendor's CDN for a logo, and a
Swagger UI validator badge would call an online validator (it is also switched off,
`validatorUrl: null`). The browser blocks such requests before any DNS lookup, so an
offline page neither waits for them nor tells anyone outside that it was opened.

Swagger UI's "Authorize" uses the bearer scheme that `access.document_access` declares
on System Operations; `persistAuthorization` keeps the token across page loads (in the
browser's local storage of this origin). The pages are open to everyone, like
`/openapi.json`: they show nothing the schema does not.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.staticfiles import StaticFiles
from starlette.responses import HTMLResponse

DOCS_PATH = "/docs"
REDOC_PATH = "/redoc"
ASSETS_PATH = "/static/docs"
# fastapi-offline's package data: the Swagger UI and ReDoc bundles it ships.
ASSETS_DIR = Path(str(files("fastapi_offline").joinpath("static")))

# 'unsafe-inline' scripts: FastAPI's page starts Swagger UI from an inline <script>; both
# UIs set inline styles. blob: workers: ReDoc runs its search index in one.
CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self' 'unsafe-inline'",
        "style-src 'self' 'unsafe-inline'",
        "img-src 'self' data:",
        "font-src 'self' data:",
        "connect-src 'self'",
        "worker-src 'self' blob:",
        "base-uri 'self'",
        "form-action 'self'",
        "frame-ancestors 'self'",
    )
)
SWAGGER_UI_PARAMETERS = {"persistAuthorization": True, "validatorUrl": None}


def add_offline_docs(app: FastAPI) -> None:
    """Serve `/docs`, `/docs/oauth2-redirect` and `/redoc` from local assets (create `app` with docs_url=None)."""
    app.mount(ASSETS_PATH, StaticFiles(directory=ASSETS_DIR), name="docs-assets")
    redirect_path = app.swagger_ui_oauth2_redirect_url or f"{DOCS_PATH}/oauth2-redirect"
    openapi_path = app.openapi_url or "/openapi.json"

    @app.get(DOCS_PATH, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        page = get_swagger_ui_html(
            openapi_url=root + openapi_path,
            title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=root + redirect_path,
            swagger_js_url=f"{root}{ASSETS_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS_PATH}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS_PATH}/favicon.png",
            swagger_ui_parameters=SWAGGER_UI_PARAMETERS,
        )
        return _confined(page)

    @app.get(redirect_path, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return _confined(get_swagger_ui_oauth2_redirect_html())

    @app.get(REDOC_PATH, include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        page = get_redoc_html(
            openapi_url=root + openapi_path,
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{ASSETS_PATH}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{ASSETS_PATH}/favicon.png",
            with_google_fonts=False,
        )
        return _confined(page)


def _confined(page: HTMLResponse) -> HTMLResponse:
    page.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    return page
