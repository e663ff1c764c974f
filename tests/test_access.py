"""Who may call System Operations (`/pypnm/system/...`): addresses, tokens, browsers, proxies, audit.

The rules are tested against real supervised servers on 127.0.0.1, called from other
loopback addresses (127.0.0.2, 127.0.0.3, ...) by binding the client's socket to them.
The finer points of the policy (header parsing, odd peers, log escaping) are tested on
the ASGI app in-process, where any client address and header can be made up.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import secrets
import subprocess
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import (
    RELOAD_PATH,
    STATUS_PATH,
    Service,
    asgi_request,
    audit_line,
    base_env,
    client_from,
    pypnm_command,
    serving,
    wait_until,
)
from pypnm.api import access
from pypnm.api.app import create_app
from pypnm.settings import Settings
from pypnm.supervisor.status import log_access

# Fresh secrets for each run, so a match in a log can only come from this run's requests.
TOKEN = "ci-" + secrets.token_urlsafe(24)
FILE_TOKEN = "fl-" + secrets.token_urlsafe(24)
ENV_LABEL = "ci-runner"
FILE_LABEL = "deploy-bot"
UNKNOWN_PATH = "/pypnm/system/notARoute"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def audit_lines(service: Service) -> list[str]:
    return [line for line in service.output().splitlines() if " pypnm.audit: " in line]


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """Trusts 127.0.0.1 only; one token from the environment, one from a tokens file; debug logging."""
    directory = tmp_path_factory.mktemp("guarded")
    tokens_file = directory / "tokens"
    tokens_file.write_text(f"# label:token\n{FILE_LABEL}:{FILE_TOKEN}\n")
    env = base_env(
        PYPNM_TRUSTED_NETWORKS='["127.0.0.1/32"]',
        PYPNM_API_TOKENS=json.dumps({ENV_LABEL: TOKEN}),
        PYPNM_API_TOKENS_FILE=str(tokens_file),
        PYPNM_LOG_LEVEL="debug",
    )
    with serving(pypnm_command("--port", "{port}"), directory, env) as service:
        yield service


@pytest.fixture(scope="module")
def proxied(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """Behind "proxies" at 127.0.0.3 and 127.0.0.4 that pass on Host pypnm.example.net; trusts 127.0.0.1 and
    10.1.2.0/24; no token."""
    env = base_env(
        PYPNM_TRUSTED_NETWORKS='["127.0.0.1/32", "10.1.2.0/24"]',
        PYPNM_FORWARDED_ALLOW_IPS='["127.0.0.3/32", "127.0.0.4/32"]',
        PYPNM_ALLOWED_HOSTS='["pypnm.example.net"]',  # the public name the proxy passes on in Host
    )
    with serving(pypnm_command("--port", "{port}"), tmp_path_factory.mktemp("proxied"), env) as service:
        yield service


# ----- addresses and tokens --------------------------------------------------------------------


def http_reload_ids(service: Service, settle: bool = False) -> set[str]:
    """Ids of the reloads asked for over HTTP, queued ones included (after earlier ones settle)."""

    def idle() -> bool:
        status = service.status()
        return status["pending_reload"] is None and status["reload_state"] == "idle"

    if settle:
        wait_until(idle, timeout=30.0, interval=0.1)
    status = service.status()
    ids = {r["id"] for r in status["reloads"] if r["source"].startswith("http (request ")}
    return ids | ({status["pending_reload"]} if status["pending_reload"] else set())


def test_untrusted_address_without_token_gets_403(guarded: Service) -> None:
    before = http_reload_ids(guarded, settle=True)
    with client_from("127.0.0.2", base_url=guarded.base_url) as client:
        for path in (RELOAD_PATH, STATUS_PATH, UNKNOWN_PATH):
            response = client.get(path)
            assert response.status_code == 403, (path, response.text)
            detail = response.json()["detail"]
            assert "trusted_networks" in detail and "api_tokens" in detail and "Bearer" in detail
            assert "127.0.0.2" in detail  # the address the service saw, to debug proxies with
            assert "WWW-Authenticate" not in response.headers
    assert http_reload_ids(guarded) == before  # the refused reload was never asked of the master


def test_good_token_from_untrusted_address_gets_200(guarded: Service) -> None:
    with client_from("127.0.0.2", base_url=guarded.base_url) as client:
        status = client.get(STATUS_PATH, headers=bearer(TOKEN))
        assert status.status_code == 200, status.text
        assert status.json()["mode"] == "supervised"
        assert client.get(STATUS_PATH, headers=bearer(FILE_TOKEN)).status_code == 200  # from api_tokens_file
        assert client.get(STATUS_PATH, headers={"Authorization": f"bearer {TOKEN}"}).status_code == 200
        reload = client.get(RELOAD_PATH, headers=bearer(TOKEN))
        assert reload.status_code == 200
        assert reload.content == b'{"status":"reload triggered"}'
        assert reload.headers["X-Reload-Id"]
        assert client.get(UNKNOWN_PATH, headers=bearer(TOKEN)).status_code == 404  # let in, then routed


@pytest.mark.parametrize(
    "authorization",
    [
        "Bearer not-the-token-0123456789",
        f"Bearer {TOKEN[:-1]}",  # one character short
        f"Bearer {TOKEN}x",
        f"Basic {TOKEN}",
        "Bearer",
        f"Bearer {TOKEN} {TOKEN}",
        TOKEN,
    ],
    ids=["wrong", "prefix", "longer", "basic", "empty", "two-words", "no-scheme"],
)
def test_bad_or_malformed_token_gets_401(guarded: Service, authorization: str) -> None:
    # From an untrusted address and from a trusted one: a bad token is never ignored.
    for address in ("127.0.0.2", "127.0.0.1"):
        with client_from(address, base_url=guarded.base_url) as client:
            response = client.get(RELOAD_PATH, headers={"Authorization": authorization})
        assert response.status_code == 401, (address, response.text)
        assert response.headers["WWW-Authenticate"] == "Bearer"
        detail = response.json()["detail"]
        assert "api_tokens" in detail and "api_tokens_file" in detail
        for secret_or_label in (TOKEN, FILE_TOKEN, ENV_LABEL, FILE_LABEL):
            assert secret_or_label not in response.text


def test_two_authorization_headers_get_401(guarded: Service) -> None:
    with client_from("127.0.0.2", base_url=guarded.base_url) as client:
        response = client.get(STATUS_PATH, headers=[("Authorization", f"Bearer {TOKEN}")] * 2)
    assert response.status_code == 401
    assert response.json()["detail"].startswith("Malformed Authorization header")


def test_seed_curl_contract_is_unchanged_on_loopback(guarded: Service) -> None:
    """The seed's `curl -X GET http://127.0.0.1:PORT/pypnm/system/webService/reload`, byte for byte."""
    result = subprocess.run(
        ["curl", "-sS", "-i", "-X", "GET", f"{guarded.base_url}{RELOAD_PATH}"],
        capture_output=True,
        timeout=30,
        check=True,
    )
    head, _, body = result.stdout.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"content-type: application/json" in head.lower()
    assert body == b'{"status":"reload triggered"}'


def test_health_and_docs_stay_open(guarded: Service) -> None:
    with client_from("127.0.0.2", base_url=guarded.base_url) as client:
        assert client.get("/health").json()["status"] == "ok"
        assert client.get("/docs").status_code == 200
        schema = client.get("/openapi.json").json()
    reload = schema["paths"][RELOAD_PATH]["get"]
    assert {"200", "401", "403", "500"} <= set(reload["responses"])
    assert reload["security"] == [{}, {"bearerAuth": []}]  # optional: trusted networks need no token
    assert schema["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    assert "security" not in schema["paths"]["/health"]["get"]


# ----- browsers ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},  # another port or subdomain: still not this origin
        {"Origin": "http://evil.example"},
        {"Origin": "null"},
        {"Origin": "http://127.0.0.1:1"},  # same host, another port
        {"Sec-Fetch-Site": "cross-site", "Authorization": f"Bearer {TOKEN}"},  # a token does not excuse it
    ],
    ids=["cross-site", "same-site", "foreign-origin", "null-origin", "other-port", "cross-site-with-token"],
)
def test_cross_site_requests_get_403_from_loopback(guarded: Service, headers: dict[str, str]) -> None:
    before = http_reload_ids(guarded, settle=True)
    with client_from("127.0.0.1", base_url=guarded.base_url) as client:
        response = client.get(RELOAD_PATH, headers=headers)
    assert response.status_code == 403, response.text
    assert "cors_origins" in response.json()["detail"]
    assert "X-Reload-Id" not in response.headers
    assert http_reload_ids(guarded) == before


def test_requests_from_the_service_own_pages_are_allowed(guarded: Service) -> None:
    own = guarded.base_url  # http://127.0.0.1:PORT, the scheme and Host of the request
    with client_from("127.0.0.1", base_url=guarded.base_url) as client:
        for headers in (
            {"Origin": own, "Sec-Fetch-Site": "same-origin"},  # e.g. the /docs page
            {"Sec-Fetch-Site": "none"},  # typed into the address bar
            {"Sec-Fetch-Site": "same-origin"},
        ):
            assert client.get(STATUS_PATH, headers=headers).status_code == 200, headers


# ----- proxies -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("peer", "forwarded_for", "expected", "client"),
    [
        ("127.0.0.3", "10.1.2.3", 200, "10.1.2.3"),  # an allowed proxy vouches for a trusted client
        ("127.0.0.3", "203.0.113.7", 403, "203.0.113.7"),  # ... or for an untrusted one
        ("127.0.0.3", None, 403, "127.0.0.3"),  # the proxy itself is not trusted
        ("127.0.0.3", "203.0.113.7, 10.1.2.3", 200, "10.1.2.3"),  # the right-most entry counts
        ("127.0.0.3", "10.1.2.3, 203.0.113.7", 403, "203.0.113.7"),  # a forged left entry does not help
        ("127.0.0.3", "10.1.2.3, 127.0.0.4", 200, "10.1.2.3"),  # through two allowed proxies
        ("127.0.0.3", "unknown", 403, "unknown"),  # not an address: never trusted by address
        ("127.0.0.2", "10.1.2.3", 403, "127.0.0.2"),  # not an allowed proxy: header ignored
        ("127.0.0.1", "203.0.113.7", 200, "127.0.0.1"),  # trusted peer, not a proxy: header ignored
    ],
)
def test_forwarded_for_honoured_only_from_allowed_proxies(
    proxied: Service, peer: str, forwarded_for: str | None, expected: int, client: str
) -> None:
    request_id = "xff-" + secrets.token_hex(6)
    headers = {"X-Request-ID": request_id}
    if forwarded_for is not None:
        headers["X-Forwarded-For"] = forwarded_for
    with client_from(peer, base_url=proxied.base_url) as http:
        response = http.get(STATUS_PATH, headers=headers)
    assert response.status_code == expected, response.text
    line = audit_line(proxied, request_id)
    assert f" client={client} peer={peer} " in line


def test_forwarded_for_in_two_header_lines(proxied: Service) -> None:
    headers = [("X-Forwarded-For", "203.0.113.7"), ("X-Forwarded-For", "10.1.2.3")]
    with client_from("127.0.0.3", base_url=proxied.base_url) as client:
        assert client.get(STATUS_PATH, headers=headers).status_code == 200


def test_forwarded_proto_from_proxy_decides_own_origin(proxied: Service) -> None:
    """Behind a TLS-terminating proxy the page's origin is https://Host; only an allowed proxy can say so."""
    headers = {
        "Host": "pypnm.example.net",
        "Origin": "https://pypnm.example.net",
        "Sec-Fetch-Site": "same-origin",
        "X-Forwarded-Proto": "https",
        "X-Forwarded-For": "10.1.2.3",
    }
    with client_from("127.0.0.3", base_url=proxied.base_url) as client:
        assert client.get(STATUS_PATH, headers=headers).status_code == 200
    with client_from("127.0.0.1", base_url=proxied.base_url) as client:  # trusted, but not a proxy
        response = client.get(STATUS_PATH, headers=headers)
    assert response.status_code == 403
    assert response.json()["detail"].startswith("Cross-site request refused")


# ----- audit and secrets -------------------------------------------------------------------------


AUDIT_LINE = re.compile(
    r"^(?P<stamp>\S+) (?P<level>INFO|WARNING) \[worker pid=\d+ gen=\d+\] pypnm\.audit: "
    r"time=(?P<time>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) client=(?P<client>\S+) peer=(?P<peer>\S+) "
    r"host=(?P<host>\S+) token=(?P<token>\S+) request_id=(?P<request_id>\S+) method=(?P<method>[A-Z]+) "
    r"route=(?P<route>\S+) status=(?P<status>\d{3}) outcome=(?P<outcome>\S+)$"
)


def test_every_system_operations_call_writes_one_audit_line(guarded: Service) -> None:
    calls: list[tuple[str, dict[str, str], str, dict[str, str]]] = [
        (
            "127.0.0.2",
            bearer(TOKEN),
            STATUS_PATH,
            {"token": ENV_LABEL, "status": "200", "outcome": "allowed:token", "level": "INFO"},
        ),
        (
            "127.0.0.2",
            bearer(FILE_TOKEN),
            STATUS_PATH,
            {"token": FILE_LABEL, "status": "200", "outcome": "allowed:token", "level": "INFO"},
        ),
        (
            "127.0.0.1",
            {},
            STATUS_PATH,
            {"token": "-", "status": "200", "outcome": "allowed:trusted-network", "level": "INFO"},
        ),
        (
            "127.0.0.2",
            {},
            RELOAD_PATH,
            {"token": "-", "status": "403", "outcome": "denied:untrusted-client", "level": "WARNING"},
        ),
        (
            "127.0.0.2",
            bearer("wrong-token-0123456789"),
            RELOAD_PATH,
            {"token": "-", "status": "401", "outcome": "denied:bad-token", "level": "WARNING"},
        ),
        (
            "127.0.0.1",
            {"Sec-Fetch-Site": "cross-site"},
            RELOAD_PATH,
            {"token": "-", "status": "403", "outcome": "denied:cross-site", "level": "WARNING"},
        ),
        (
            "127.0.0.1",
            {},
            UNKNOWN_PATH,
            {"token": "-", "status": "404", "outcome": "allowed:trusted-network", "level": "INFO"},
        ),
    ]
    for address, headers, path, expected in calls:
        request_id = "audit-" + secrets.token_hex(6)
        with client_from(address, base_url=guarded.base_url) as client:
            response = client.get(path, headers={**headers, "X-Request-ID": request_id})
        assert str(response.status_code) == expected["status"]
        match = AUDIT_LINE.match(audit_line(guarded, request_id))
        assert match is not None, audit_line(guarded, request_id)
        fields = match.groupdict()
        assert {k: fields[k] for k in expected} == expected
        assert (fields["client"], fields["peer"], fields["method"], fields["route"]) == (address, address, "GET", path)
        assert fields["host"] == f"127.0.0.1:{guarded.port}"
    with client_from("127.0.0.2", base_url=guarded.base_url) as client:
        request_id = "audit-health-" + secrets.token_hex(4)
        client.get("/health", headers={"X-Request-ID": request_id})
    wait_until(lambda: f"request_id={request_id}" in guarded.output(), timeout=10.0)  # the access log line
    assert not any(f"request_id={request_id}" in line for line in audit_lines(guarded))


def test_tokens_never_appear_in_logs_or_answers(guarded: Service) -> None:
    near_miss = TOKEN[:-2] + "zz"
    answers = []
    with client_from("127.0.0.2", base_url=guarded.base_url) as client:
        for token in (TOKEN, FILE_TOKEN, near_miss):
            for path in (STATUS_PATH, RELOAD_PATH, "/health"):
                response = client.get(path, headers=bearer(token))
                answers.append(response.text + str(response.headers))
        last = "secrets-" + secrets.token_hex(6)
        client.get(STATUS_PATH, headers={**bearer(near_miss), "X-Request-ID": last})
    audit_line(guarded, last)  # everything before it has been logged by now
    output = guarded.output()
    assert "pypnm.audit" in output and "DEBUG" in output  # the log ran at debug level
    for secret in (TOKEN, FILE_TOKEN, near_miss):
        assert secret not in output
        assert not any(secret in answer for answer in answers)


# ----- start-up messages -------------------------------------------------------------------------


def test_startup_says_who_may_use_system_operations(guarded: Service) -> None:
    output = guarded.output()
    assert "System Operations (/pypnm/system/) are open to trusted_networks 127.0.0.1/32 and to 2 bearer token(s)" in (
        output
    )
    assert "not loopback" not in output


@pytest.mark.parametrize(
    ("overrides", "warning"),
    [
        ({"host": "0.0.0.0"}, "only loopback clients can use System Operations"),
        ({"host": "192.0.2.10", "trusted_networks": ["127.0.0.0/8", "10.0.0.0/8"]}, "only clients in trusted_networks"),
        ({"host": "::", "trusted_networks": []}, "no api token configured: no client can use"),
        ({"host": "0.0.0.0", "api_tokens": {"ops": "x" * 20}}, None),
        ({"host": "127.0.0.1"}, None),
        ({"host": "localhost"}, None),
        ({"host": "::1"}, None),
    ],
)
def test_master_warns_when_listening_beyond_loopback_without_a_token(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, overrides: dict[str, Any], warning: str | None
) -> None:
    # The master's start-up message, without binding any socket: only its settings are read.
    for name in [n for n in os.environ if n.startswith("PYPNM_")]:
        monkeypatch.delenv(name)
    with caplog.at_level(logging.INFO, logger="pypnm.supervisor.master"):
        log_access(Settings(**overrides))
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("bearer token(s)" in message for message in infos)
    if warning is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 and warning in warnings[0], warnings
        assert "api_tokens" in warnings[0]


# ----- the policy in-process: odd peers, headers and paths ------------------------------------


def asgi_app(**overrides: Any) -> Any:
    settings: dict[str, Any] = {
        "trusted_networks": ["127.0.0.1/32"],
        "forwarded_allow_ips": ["127.0.0.3/32"],
        "api_tokens": {"ops": TOKEN},
        "cors_origins": ["https://dash.example", "*"],
    }
    return create_app(Settings(**{**settings, **overrides}))


def call(app: Any, peer: str, path: str = STATUS_PATH, method: str = "GET", **headers: str) -> httpx.Response:
    """`Header_Name=value` keywords are sent as `Header-Name: value`."""
    return asgi_request(app, method, path, peer=peer, headers={k.replace("_", "-"): v for k, v in headers.items()})


@pytest.mark.parametrize(
    ("peer", "headers", "expected"),
    [
        ("::ffff:127.0.0.1", {}, 200),  # IPv4-mapped IPv6 (a dual-stack listener) is read as IPv4
        ("::1", {}, 403),  # not in this trusted_networks
        ("testclient", {}, 403),  # a peer that is not an address is never trusted by address
        ("testclient", {"Authorization": f"Bearer {TOKEN}"}, 200),
        ("127.0.0.3", {"X_Forwarded_For": "127.0.0.1:5555"}, 200),  # IPv4 with a port
        ("127.0.0.3", {"X_Forwarded_For": "[::ffff:127.0.0.1]:80"}, 200),  # bracketed IPv6 with a port
        ("127.0.0.3", {"X_Forwarded_For": "127.0.0.1, garbage"}, 403),
        ("127.0.0.3", {"X_Forwarded_For": "127.0.0.3, 127.0.0.3"}, 403),  # all proxies: the left-most one
        ("127.0.0.1", {"Origin": "https://dash.example", "Sec_Fetch_Site": "cross-site"}, 200),  # listed
        ("127.0.0.1", {"Origin": "https://DASH.example:443/", "Sec_Fetch_Site": "cross-site"}, 200),
        ("127.0.0.1", {"Origin": "https://evil.example", "Sec_Fetch_Site": "cross-site"}, 403),  # '*' admits none
        ("127.0.0.1", {"Origin": "http://127.0.0.1:8000"}, 200),
        ("127.0.0.1", {"Origin": "http://127.0.0.1:8000", "Sec_Fetch_Site": "cross-site"}, 403),
        ("127.0.0.1", {"Origin": "https://127.0.0.1:8000"}, 403),  # another scheme
        ("127.0.0.1", {"Sec_Fetch_Site": "CROSS-SITE"}, 403),
        ("127.0.0.1", {"Sec_Fetch_Site": "something-new"}, 403),
        ("127.0.0.1", {"Authorization": "Bearer "}, 401),
        ("127.0.0.2", {"Authorization": f"Bearer  {TOKEN} "}, 200),
    ],
)
def test_policy_cases(peer: str, headers: dict[str, str], expected: int) -> None:
    response = call(asgi_app(), peer, **headers)
    assert response.status_code == expected, response.text


def test_allowed_cors_origin_gets_cors_headers_on_refusals_and_preflights() -> None:
    app = asgi_app(cors_origins=["https://dash.example"])
    refused = call(app, "127.0.0.2", Origin="https://dash.example")
    assert refused.status_code == 403
    assert refused.headers["Access-Control-Allow-Origin"] == "https://dash.example"  # the page can read why
    preflight = call(
        app,
        "127.0.0.2",
        method="OPTIONS",
        Origin="https://dash.example",
        Access_Control_Request_Method="GET",
        Access_Control_Request_Headers="authorization",
    )
    assert preflight.status_code == 200  # answered by CORS; the real request then carries the token
    with_token = call(
        app, "127.0.0.2", Origin="https://dash.example", Sec_Fetch_Site="cross-site", Authorization=f"Bearer {TOKEN}"
    )
    assert with_token.status_code == 200


@pytest.mark.parametrize(
    ("path", "root_path", "guarded"),
    [
        ("/pypnm/system/webService/reload", "", True),
        ("/pypnm/system", "", True),
        ("//pypnm//system/webService/reload", "", True),
        ("/api/pypnm/system/webService/status", "/api", True),
        ("/pypnm/systemd", "", False),
        ("/health", "", False),
        ("/docs", "", False),
        ("/api/health", "/api", False),
    ],
)
def test_which_paths_are_system_operations(path: str, root_path: str, guarded: bool) -> None:
    assert access.is_system_operation({"path": path, "root_path": root_path}) is guarded


def test_websocket_under_the_prefix_is_closed_for_untrusted_clients() -> None:
    policy = access.AccessPolicy.from_settings(Settings(trusted_networks=["127.0.0.1/32"]))
    reached: list[str] = []
    sent: list[MutableMapping[str, Any]] = []

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        reached.append(scope["path"])

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    async def receive() -> MutableMapping[str, Any]:
        return {"type": "websocket.connect"}

    guard = access.SystemOperationsGuard(inner, policy)
    # A Host that names the service: a trusted client without one is refused too (DNS rebinding rule).
    headers = [(b"host", b"127.0.0.1:8000")]
    scope = {"type": "websocket", "path": "/pypnm/system/ws", "headers": headers, "client": ("127.0.0.2", 1)}
    asyncio.run(guard(scope, receive, send))
    assert reached == [] and sent == [{"type": "websocket.close", "code": 1008}]
    asyncio.run(guard({**scope, "client": ("127.0.0.1", 1)}, receive, send))
    assert reached == ["/pypnm/system/ws"]


def test_audit_line_escapes_what_a_client_controls(caplog: pytest.LogCaptureFixture) -> None:
    app = asgi_app()
    with caplog.at_level(logging.INFO, logger="pypnm.audit"):
        call(app, "127.0.0.2", path="/pypnm/system/x%0Aforged=1 outcome=allowed")
    (record,) = [r for r in caplog.records if r.name == "pypnm.audit"]
    message = record.getMessage()
    assert "\n" not in message
    assert 'route="/pypnm/system/x\\nforged=1 outcome=allowed"' in message
    assert message.endswith("status=403 outcome=denied:untrusted-client")


def test_token_file_problems_stop_the_app_build(tmp_path: Path) -> None:
    from pypnm.settings import SettingsError

    tokens = tmp_path / "tokens"
    tokens.write_text("ops:short\n")
    with pytest.raises(SettingsError, match=r"line 1: token 'ops' must be at least 16 characters"):
        create_app(Settings(api_tokens_file=tokens))
