"""Fuzzing, in-process: schemathesis over the OpenAPI document, and hypothesis over the access headers.

Both run against `create_app(...)` through ASGI, without a socket. The reload route of
an unsupervised app touches the route module file; here that attribute is pointed at
a file in a temporary directory (and `PYPNM_SUPERVISOR` is removed), so the fuzz never
touches `src/pypnm/api/web_service.py`: touching it would make every supervised pypnm
running from this checkout (other test runs, a developer's server) reload.

The 5xx the API documents are the seed's `500 {"detail": "Failed to trigger reload: ..."}`
of the reload route and its sibling `500 {"detail": "Failed to trigger upgrade: ..."}` of the
upgrade route (always, unsupervised); `no_undocumented_server_error` accepts those and nothing else.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import content_type_conformance, response_schema_conformance, status_code_conformance
from schemathesis.core.result import Ok

from conftest import RELOAD_PATH, STATUS_PATH, asgi_request
from pypnm.api import web_service
from pypnm.api.access import parse_forwarded_entry
from pypnm.api.app import create_app
from pypnm.identity import SUPERVISOR_ENV
from pypnm.settings import Settings

TOKEN = "fuzz-0123456789-abcdefghij"
LOG_DOWNLOAD = "/pypnm/system/log/download"
RUNTIME_PROFILE = "/pypnm/system/webService/runtimeProfile"
UPGRADE_PATH = "/pypnm/system/webService/upgrade"
DOCUMENTED_500_PREFIXES = {RELOAD_PATH: "Failed to trigger reload: ", UPGRADE_PATH: "Failed to trigger upgrade: "}
TRUSTED = [ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("10.9.0.0/16")]
FUZZ_SETTINGS: dict[str, Any] = {
    "trusted_networks": ["127.0.0.1/32", "10.9.0.0/16"],
    "forwarded_allow_ips": ["127.0.0.3/32"],
    "api_tokens": {"fuzz": TOKEN},
    "cors_origins": ["https://dash.example"],
}


@pytest.fixture(scope="module")
def fuzz_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FastAPI]:
    route_file = tmp_path_factory.mktemp("route") / "web_service.py"
    log_file = route_file.with_name("pypnm.log")  # what /pypnm/system/log/download sends
    log_file.write_text("2026-11-24T11:08:15.672Z INFO [worker pid=1 gen=1] pypnm.access: GET /health 200\n")
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv(SUPERVISOR_ENV, raising=False)
        patch.setattr(web_service, "ROUTE_MODULE_FILE", route_file)
        yield create_app(Settings(**FUZZ_SETTINGS, log_file=log_file))
    assert route_file.exists(), "the fuzz never reached the reload route"


def is_documented_server_error(path: str, status: int, body: Any) -> bool:
    return (
        path in DOCUMENTED_500_PREFIXES
        and status == 500
        and isinstance(body, dict)
        and set(body) == {"detail"}
        and str(body["detail"]).startswith(DOCUMENTED_500_PREFIXES[path])
    )


def no_undocumented_server_error(
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case[Any]
) -> bool | None:
    """A schemathesis check (passed explicitly, not registered globally): no 5xx but the documented one."""
    if response.status_code < 500:
        return None
    try:
        body = response.json()
    except ValueError:
        body = response.text
    if is_documented_server_error(case.path, response.status_code, body):
        return None
    raise AssertionError(f"undocumented {response.status_code} from {case.method} {case.path}: {body!r}")


def test_openapi_fuzz_finds_no_undocumented_5xx(fuzz_app: FastAPI) -> None:
    """Every operation of the OpenAPI document, with the conformance checks and the 5xx check.

    These routes take no parameters, so schemathesis finds only a few distinct cases;
    the hypothesis run below, over methods, paths, query strings and headers, is the bulk.
    """
    schema = schemathesis.openapi.from_asgi("/openapi.json", fuzz_app)
    operations = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), f"the OpenAPI document has an operation schemathesis cannot use: {result}"
        operations.append(result.ok())
    assert {op.path for op in operations} >= {"/health", RELOAD_PATH, STATUS_PATH}
    seen: dict[str, set[int]] = {}
    calls = 0

    for operation in operations:

        @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=operation.as_strategy())
        def fuzz(case: schemathesis.Case[Any]) -> None:
            # The ASGI test client's address is "testclient", not an IP: only the token lets it in.
            nonlocal calls
            calls += 1
            response = case.call(headers={"Authorization": f"Bearer {TOKEN}"})
            seen.setdefault(case.path, set()).add(response.status_code)
            case.validate_response(
                response,
                checks=[
                    no_undocumented_server_error,
                    status_code_conformance,
                    response_schema_conformance,
                    content_type_conformance,
                ],
            )

        fuzz()
    assert seen == {
        "/health": {200},
        "/ready": {200},
        RELOAD_PATH: {200},
        UPGRADE_PATH: {500},  # unsupervised: the documented "Failed to trigger upgrade: ..."
        STATUS_PATH: {200},
        LOG_DOWNLOAD: {200},
        RUNTIME_PROFILE: {200},
        "/metrics": {200},
    }
    assert calls >= len(operations)


# ----- the access headers, fuzzed ----------------------------------------------------------------

PEERS = ["127.0.0.1", "127.0.0.2", "127.0.0.3", "::1", "::ffff:127.0.0.1", "testclient"]
address = st.one_of(st.ip_addresses().map(str), st.sampled_from(["10.9.1.1", "127.0.0.1", "127.0.0.3", "unknown"]))
# Any byte a server accepts in a header value (latin-1, no control characters).
header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=40)
authorization = st.one_of(
    st.none(),
    st.just(f"Bearer {TOKEN}"),
    st.just(f"bearer {TOKEN}"),
    st.builds(lambda t: f"Bearer {t}", header_text),
    header_text,
)
# Browser headers are absent in most cases, so that the address and token rules get their share.
origin = st.one_of(
    *[st.none()] * 3,
    st.sampled_from(["http://127.0.0.1:8000", "https://dash.example", "http://evil.example", "null", "*"]),
    header_text,
)
fetch_site = st.one_of(
    *[st.none()] * 3, st.sampled_from(["cross-site", "same-site", "same-origin", "none"]), header_text
)
forwarded_for = st.one_of(st.none(), st.lists(address, min_size=1, max_size=4).map(", ".join), header_text)


def expected_client(peer: str, xff: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The X-Forwarded-For rule written out again for the oracle (127.0.0.3 is the only allowed proxy)."""
    proxy = ipaddress.ip_network("127.0.0.3/32")
    try:
        client: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(peer)
    except ValueError:
        return None
    if isinstance(client, ipaddress.IPv6Address) and client.ipv4_mapped is not None:
        client = client.ipv4_mapped
    if client not in proxy or not xff:
        return client
    for entry in reversed([e.strip() for e in xff.split(",") if e.strip()]):
        client = parse_forwarded_entry(entry)
        if client is None or client not in proxy:
            break
    return client


def is_good_token(auth: str | None) -> bool:
    if auth is None:
        return False
    scheme, _, token = auth.strip().partition(" ")
    return scheme.lower() == "bearer" and token.strip() == TOKEN


path_text = st.text(st.sampled_from("abcXYZ019/-._~"), max_size=20)
request_path = st.one_of(
    st.sampled_from(
        [RELOAD_PATH, STATUS_PATH, "/health", RELOAD_PATH + "/", "//pypnm/system/webService/reload", "/pypnm/system"]
    ),
    path_text.map(lambda text: "/pypnm/system/" + text),
)
query = st.dictionaries(st.text(st.sampled_from("abcdefxyz_"), min_size=1, max_size=8), header_text, max_size=3)
host = st.one_of(st.none(), st.sampled_from(["127.0.0.1:8000", "localhost:8000", "evil.example"]), header_text)


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(
    peer=st.sampled_from(PEERS),
    method=st.sampled_from(["GET", "GET", "GET", "HEAD", "POST", "OPTIONS", "DELETE"]),
    path=request_path,
    params=query,
    auth=authorization,
    origin_header=origin,
    site=fetch_site,
    xff=forwarded_for,
    host_header=host,
)
def test_routes_fuzz_with_access_headers(
    fuzz_app: FastAPI,
    peer: str,
    method: str,
    path: str,
    params: dict[str, str],
    auth: str | None,
    origin_header: str | None,
    site: str | None,
    xff: str | None,
    host_header: str | None,
) -> None:
    """Any method, path, query and access headers: no 5xx but the documented one, and the rules hold."""
    headers = {
        name.encode(): value.encode("latin-1")
        for name, value in {
            "Authorization": auth,
            "Origin": origin_header,
            "Sec-Fetch-Site": site,
            "X-Forwarded-For": xff,
            "Host": host_header,
        }.items()
        if value is not None
    }

    response = asgi_request(fuzz_app, method, path, peer=peer, headers=headers, params=params)
    sent_path = response.request.url.path
    assert response.status_code < 500 or is_documented_server_error(sent_path, response.status_code, response.json())
    assert TOKEN not in response.text and TOKEN not in str(response.headers)
    if not re.sub("/+", "/", sent_path).startswith("/pypnm/system"):
        assert response.status_code in (200, 404, 405), response.text  # /health and the rest: never guarded
        return
    assert response.status_code in (200, 307, 401, 403, 404, 405), response.text
    if response.status_code == 401:
        assert response.headers["WWW-Authenticate"] == "Bearer"
    if auth is not None and not is_good_token(auth):
        assert response.status_code in (401, 403)  # a bad token never gets in, even from a trusted address
    if is_good_token(auth) and origin_header is None and site in (None, "same-origin", "none"):
        assert response.status_code not in (401, 403), response.text  # a good token gets in from anywhere
    if site == "cross-site" and origin_header != "https://dash.example":
        assert response.status_code == 403
    if origin_header == "http://evil.example" and host_header != "evil.example":  # same host: same origin
        assert response.status_code == 403
    if response.status_code not in (401, 403) and auth is None:
        client = expected_client(peer, xff)
        assert client is not None and any(client in network for network in TRUSTED), (peer, xff)


def test_documented_500_is_the_only_5xx_the_checks_accept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reload route's real failure passes the fuzz's 5xx check; any other 5xx does not."""
    monkeypatch.delenv(SUPERVISOR_ENV, raising=False)
    monkeypatch.setattr(web_service, "ROUTE_MODULE_FILE", tmp_path / "missing-dir" / "web_service.py")
    app = create_app(Settings(**FUZZ_SETTINGS))

    response = asgi_request(app, "GET", RELOAD_PATH)
    assert response.status_code == 500
    assert is_documented_server_error(RELOAD_PATH, 500, response.json())
    assert not is_documented_server_error(STATUS_PATH, 500, response.json())
    assert not is_documented_server_error(RELOAD_PATH, 502, response.json())
    assert not is_documented_server_error(RELOAD_PATH, 500, {"detail": "Internal Server Error"})
