"""/docs and /redoc work offline: every asset comes from the service, checked in a real browser.

One supervised service for the module, with no trusted network and one bearer token, so
that a System Operation answers 200 only when Swagger UI's "Authorize" sent the token.
The browser resolves no host but 127.0.0.1; its NetLog lists what the page requested.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from browser import devtools, is_png, render
from conftest import RELOAD_PATH, STATUS_PATH, Service, base_env, pypnm_command, serving

TOKEN_LABEL = "docs"
TOKEN = "docs-token-0123456789abcdef"
ASSET_PATHS = {
    "/docs": ["/static/docs/swagger-ui.css", "/static/docs/favicon.png", "/static/docs/swagger-ui-bundle.js"],
    "/redoc": ["/static/docs/favicon.png", "/static/docs/redoc.standalone.js"],
}


@pytest.fixture(scope="module")
def docs_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    env = base_env(PYPNM_TRUSTED_NETWORKS="[]", PYPNM_API_TOKENS=json.dumps({TOKEN_LABEL: TOKEN}))
    with serving(pypnm_command("serve", "--port", "{port}"), tmp_path_factory.mktemp("docs-service"), env) as service:
        yield service


class _Elements(HTMLParser):
    """Every element of a document with its attributes and the classes of its ancestors."""

    VOID = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"})

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[tuple[str, set[str]]] = []
        self.elements: list[tuple[str, dict[str, str], set[str]]] = []  # tag, attributes, ancestors' classes

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {name: value or "" for name, value in attrs}
        ancestors = set().union(*(classes for _, classes in self.stack))
        self.elements.append((tag, attributes, ancestors))
        if tag not in self.VOID:
            self.stack.append((tag, set(attributes.get("class", "").split())))

    def handle_endtag(self, tag: str) -> None:
        for index in range(len(self.stack) - 1, -1, -1):  # tolerate unclosed elements
            if self.stack[index][0] == tag:
                del self.stack[index:]
                break


def elements(html: str) -> list[tuple[str, dict[str, str], set[str]]]:
    parser = _Elements()
    parser.feed(html)
    return parser.elements


def assert_only_our_requests(service: Service, requests: list[str], expected: list[str]) -> None:
    """The page asked for nothing but this service, and got each asset from it with a 200."""
    assert requests, "the NetLog shows no request of the page"
    foreign = [url for url in requests if urlsplit(url).netloc != f"127.0.0.1:{service.port}"]
    assert foreign == [], f"the page requested other hosts: {foreign}"
    asked = {urlsplit(url).path for url in requests}
    assert set(expected) | {"/openapi.json"} <= asked
    log = service.output()
    for path in [*expected, "/openapi.json"]:
        assert re.search(rf"pypnm\.access: GET {re.escape(path)} 200 ", log), f"{path} was not answered 200:\n{log}"


def test_doc_pages_name_no_other_host_and_their_assets_are_served(docs_service: Service) -> None:
    for page, assets in ASSET_PATHS.items():
        response = docs_service.get(page)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/html")
        assert re.findall(r"(?:https?:)?//[^\s'\"<>]+", response.text) == [], "the page names another host"
        policy = response.headers["content-security-policy"]
        assert "default-src 'self'" in policy and "img-src 'self' data:" in policy
        referenced = [
            ref
            for tag, attrs, _ in elements(response.text)
            if tag in ("script", "link") and (ref := attrs.get("src") or attrs.get("href"))
        ]
        assert sorted(referenced) == sorted(assets)
        for asset in assets:
            served = docs_service.get(asset)
            assert served.status_code == 200 and len(served.content) > 1000, asset
    redirect = docs_service.get("/docs/oauth2-redirect")
    assert redirect.status_code == 200 and "swaggerUIRedirectOauth2" in redirect.text
    # Open to everyone: no token, no trusted network, still 200; System Operations are not.
    assert docs_service.get("/openapi.json").status_code == 200
    assert docs_service.get(STATUS_PATH).status_code == 403


def test_swagger_ui_renders_offline(docs_service: Service, tmp_path: Path) -> None:
    page = render(f"{docs_service.base_url}/docs", tmp_path, "docs")

    rendered_paths = {
        attrs.get("data-path")
        for _, attrs, ancestors in elements(page.dom)
        if "opblock-summary-path" in attrs.get("class", "").split() and "opblock" in ancestors
    }
    assert RELOAD_PATH in rendered_paths, f"no rendered operation block for the reload in:\n{page.dom[:3000]}"
    assert {"/health", "/ready", STATUS_PATH} <= rendered_paths
    assert is_png(page.screenshot) and page.screenshot.stat().st_size > 20_000
    assert_only_our_requests(docs_service, page.requests, ASSET_PATHS["/docs"])


def test_redoc_renders_offline(docs_service: Service, tmp_path: Path) -> None:
    page = render(f"{docs_service.base_url}/redoc", tmp_path, "redoc")

    # ReDoc's endpoint box: an HTTP verb badge followed by the operation's path.
    endpoint = re.search(
        r'class="[^"]*\bhttp-verb get\b[^"]*">get</span><span[^>]*>' + re.escape(RELOAD_PATH) + "</span>", page.dom
    )
    assert endpoint, f"no rendered ReDoc operation for the reload in:\n{page.dom[:3000]}"
    operation_ids = {attrs.get("id", "") for _, attrs, _ in elements(page.dom)}
    assert any(i.startswith("operation/") and "webService_reload" in i for i in operation_ids)
    assert is_png(page.screenshot) and page.screenshot.stat().st_size > 20_000
    # ReDoc's sidebar asks its vendor's CDN for a logo; the page's CSP keeps that request from being made.
    assert_only_our_requests(docs_service, page.requests, ASSET_PATHS["/redoc"])


# Clicks through Swagger UI as a person would: Authorize, paste the token, then "Try it out" and
# "Execute" on the status operation. Every wait is bounded (200 times 50 ms).
AUTHORIZE_AND_EXECUTE = """
(async () => {
  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
  const waitFor = async (find, what) => {
    for (let i = 0; i < 200; i++) {
      const found = find();
      if (found) return found;
      await sleep(50);
    }
    throw new Error("not found: " + what);
  };
  (await waitFor(() => document.querySelector(".auth-wrapper .authorize"), "Authorize button")).click();
  const input = await waitFor(() => document.querySelector(".modal-ux input"), "token input");
  Object.getOwnPropertyDescriptor(HTMLInputElement.prototype, "value").set.call(input, TOKEN);
  input.dispatchEvent(new Event("input", { bubbles: true }));
  (await waitFor(() => document.querySelector(".modal-ux .auth-btn-wrapper .authorize"), "modal Authorize")).click();
  (await waitFor(() => document.querySelector(".modal-ux .btn-done"), "Close")).click();
  const block = await waitFor(() => [...document.querySelectorAll(".opblock")].find(
    (b) => b.querySelector('[data-path="STATUS_PATH"]')), "status operation");
  block.querySelector(".opblock-summary-control").click();
  (await waitFor(() => block.querySelector(".try-out__btn"), "Try it out")).click();
  (await waitFor(() => block.querySelector(".execute"), "Execute")).click();
  const status = await waitFor(
    () => block.querySelector(".live-responses-table tbody .response-col_status"), "response status");
  return { status: status.textContent.trim(), persisted: localStorage.getItem("authorized") };
})()
"""


def test_swagger_ui_authorize_sends_the_bearer_token(docs_service: Service, tmp_path: Path) -> None:
    audit_before = docs_service.output().count(f"token={TOKEN_LABEL} ")
    script = AUTHORIZE_AND_EXECUTE.replace("TOKEN", json.dumps(TOKEN)).replace("STATUS_PATH", STATUS_PATH)
    with devtools(f"{docs_service.base_url}/docs", tmp_path / "profile") as page:
        result = page.evaluate(script)

    assert result["status"] == "200", result  # without the token this client gets 403
    assert json.loads(result["persisted"])["bearerAuth"]["value"] == TOKEN  # persistAuthorization
    log = docs_service.output()
    assert log.count(f"token={TOKEN_LABEL} ") == audit_before + 1
    assert re.search(rf"token={TOKEN_LABEL} .*route={re.escape(STATUS_PATH)} status=200 outcome=allowed:token", log)
    assert httpx.get(docs_service.base_url + STATUS_PATH, timeout=10).status_code == 403
