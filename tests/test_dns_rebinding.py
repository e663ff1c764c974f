"""DNS rebinding: a request admitted by its address must carry a Host that names the service.

A page on `evil.example` whose name is re-pointed at 127.0.0.1 reaches the service from
loopback with `Host: evil.example`; that must be refused, while the names and addresses
the service really has (loopback, the address it listens on, `allowed_hosts`) and every
request with a valid token keep working. Real servers on 127.0.0.1 first, then the finer
cases in-process (the address the connection came in on, the `host` setting).
"""

from __future__ import annotations

import json
import os
import re
import secrets
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import (
    RELOAD_BODY,
    RELOAD_PATH,
    STATUS_PATH,
    Service,
    StartService,
    asgi_request,
    audit_line,
    base_env,
    pypnm_command,
    raw_http,
)
from pypnm.api.app import create_app
from pypnm.settings import Settings, SettingsError, load_settings

TOKEN = "rb-" + secrets.token_urlsafe(24)
HOST_FIELD = re.compile(r" host=(\S+) ")


def raw_get(port: int, path: str, header_lines: list[bytes]) -> tuple[int, bytes]:
    """A GET written byte for byte (so Host can be missing, doubled or odd): status and body."""
    status, _, body = raw_http(port, f"GET {path} HTTP/1.1".encode(), header_lines)
    return status, body


def reload_ids(service: Service) -> set[str]:
    """Every reload the master has recorded or queued, for checking that a refusal asked for none."""
    status = service.get(STATUS_PATH, headers={"Authorization": f"Bearer {TOKEN}"}).json()
    return {r["id"] for r in status["reloads"]} | ({status["pending_reload"]} if status["pending_reload"] else set())


@pytest.fixture
def service(start_service: StartService) -> Service:
    """A supervised pypnm with default access settings (loopback trusted) and one token."""
    env = base_env(PYPNM_API_TOKENS=json.dumps({"ops": TOKEN}))
    return start_service(pypnm_command("--port", "{port}"), env=env)


def test_rebound_host_from_loopback_is_refused_and_a_token_still_works(service: Service) -> None:
    before = reload_ids(service)
    evil = f"evil.example:{service.port}"
    refused = service.get(RELOAD_PATH, headers={"Host": evil, "X-Request-ID": "rebind-1"})
    assert refused.status_code == 403, refused.text
    detail = refused.json()["detail"]
    assert f'Host "{evil}" is not a name of this service' in detail
    assert "allowed_hosts" in detail and "PYPNM_ALLOWED_HOSTS" in detail and "Bearer" in detail
    assert "X-Reload-Id" not in refused.headers
    line = audit_line(service, "rebind-1")
    assert f" host={evil} " in line and line.endswith("status=403 outcome=denied:unknown-host")
    assert reload_ids(service) == before  # the master was never asked

    with_token = service.get(
        RELOAD_PATH, headers={"Host": evil, "Authorization": f"Bearer {TOKEN}", "X-Request-ID": "rebind-2"}
    )
    assert with_token.status_code == 200
    assert with_token.content == RELOAD_BODY
    line = audit_line(service, "rebind-2")
    assert f" host={evil} token=ops " in line and line.endswith("status=200 outcome=allowed:token")


def test_loopback_names_and_addresses_are_admitted(service: Service) -> None:
    port = service.port
    for host in [
        f"localhost:{port}",
        f"LOCALHOST.:{port}",
        f"127.0.0.1:{port}",
        f"127.0.0.9:{port}",
        "[::1]",
        f"[::1]:{port}",
        "localhost",
        "127.0.0.1",
    ]:
        request_id = "loop-" + secrets.token_hex(4)
        response = service.get(STATUS_PATH, headers={"Host": host, "X-Request-ID": request_id})
        assert response.status_code == 200, (host, response.text)
        logged = HOST_FIELD.search(audit_line(service, request_id))
        assert logged is not None and logged[1] == host
    # The seed's curl example, from loopback without a token: 200, byte for byte.
    response = service.get(RELOAD_PATH)
    assert response.status_code == 200
    assert response.content == RELOAD_BODY


# (Host header lines, how the refusal starts, how the audit line shows the Host)
ODD_HOSTS: list[tuple[list[bytes], str, str]] = [
    ([], "No Host header", "-"),
    (
        [b"Host: 127.0.0.1", b"Host: evil.example"],
        '2 Host headers ("127.0.0.1", "evil.example"), one expected',
        '"127.0.0.1, evil.example"',
    ),
    ([b"Host: 127.0.0.1, evil.example"], 'Host "127.0.0.1, evil.example" is not a name', '"127.0.0.1, evil.example"'),
    ([b"Host: http://127.0.0.1/"], 'Host "http://127.0.0.1/" is not a name', "http://127.0.0.1/"),
    ([b"Host: 127.0.0.1@evil.example"], 'Host "127.0.0.1@evil.example" is not a name', "127.0.0.1@evil.example"),
    ([b"Host: [127.0.0.1]"], 'Host "[127.0.0.1]" is not a name', "[127.0.0.1]"),
    ([b"Host: evil\x9b31m.example"], 'Host "evil\\u009b31m.example" is not a name', '"evil\\u009b31m.example"'),
]


def test_missing_repeated_or_malformed_host_is_refused(service: Service) -> None:
    for lines, detail_start, shown in ODD_HOSTS:
        request_id = "odd-" + secrets.token_hex(4)
        status, body = raw_get(service.port, STATUS_PATH, [*lines, f"X-Request-ID: {request_id}".encode()])
        assert status == 403, (lines, body)
        detail = json.loads(body)["detail"]
        assert detail.startswith(detail_start), detail
        assert "allowed_hosts (PYPNM_ALLOWED_HOSTS)" in detail
        line = audit_line(service, request_id)
        assert f" host={shown} " in line and line.endswith("outcome=denied:unknown-host"), line
        # With a token the same request is let in: the Host rule binds only address-admitted requests.
        token = f"Authorization: Bearer {TOKEN}".encode()
        assert raw_get(service.port, STATUS_PATH, [*lines, token])[0] == 200, lines


def test_allowed_hosts_patterns_from_the_settings_file(start_service: StartService, tmp_path: Path) -> None:
    config = tmp_path / "pypnm.toml"
    config.write_text('allowed_hosts = ["*.example.net", "Admin.Example.ORG."]\n')
    service = start_service(pypnm_command("--port", "{port}", "--config", str(config)))
    for host, expected in [
        ("pypnm.example.net", 200),
        (f"pypnm.example.net:{service.port}", 200),
        ("a.b.example.net.", 200),
        ("admin.example.org:443", 200),
        ("example.net", 403),  # the pattern covers names under it, not the domain itself
        ("example.net.evil.com", 403),
        ("pypnm.example.net.evil.com", 403),
        ("evilexample.net", 403),
        ("www.admin.example.org", 403),
    ]:
        response = service.get(STATUS_PATH, headers={"Host": host})
        assert response.status_code == expected, (host, response.text)
        if expected == 403:
            assert f'Host "{host}" is not a name of this service' in response.json()["detail"]


def test_allowed_hosts_from_the_environment(start_service: StartService) -> None:
    env = base_env(PYPNM_ALLOWED_HOSTS='["*.example.net"]')
    service = start_service(pypnm_command("--port", "{port}"), env=env)
    assert service.get(STATUS_PATH, headers={"Host": "pypnm.example.net"}).status_code == 200
    assert service.get(STATUS_PATH, headers={"Host": "example.net.evil.com"}).status_code == 403


# ----- settings ------------------------------------------------------------------------------------


def test_allowed_hosts_entries_are_normalised() -> None:
    settings = Settings(allowed_hosts=["*.Example.NET", "Pypnm.example.org.", "[::1]", "::FFFF:10.0.0.1", "10.0.0.2"])
    assert settings.allowed_hosts == ["*.example.net", "pypnm.example.org", "::1", "10.0.0.1", "10.0.0.2"]


@pytest.mark.parametrize(
    "entry",
    [
        "*",
        "https://pypnm.example.net",
        "pypnm.example.net:8000",
        "pypnm.example.net/x",
        "*.*.example.net",
        "example.*",
        "*.10.0.0.1",
        "a..b",
        "-a.example",
        "",
        "[10.0.0.1]",
        "127.1",  # a browser's IPv4 address, no name; not one `ipaddress` takes either
        "999.1.1.1",
        "pypnm.0x7f",
    ],
)
def test_bad_allowed_hosts_entry_is_a_settings_error(monkeypatch: pytest.MonkeyPatch, entry: str) -> None:
    for name in [n for n in os.environ if n.startswith("PYPNM_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("PYPNM_ALLOWED_HOSTS", json.dumps(["ok.example", entry]))
    with pytest.raises(SettingsError) as caught:
        load_settings()
    message = str(caught.value)
    assert "'allowed_hosts'" in message and "PYPNM_ALLOWED_HOSTS" in message and repr(entry) in message
    assert "\n" not in message


# ----- in-process: the address the connection came in on, and the host setting ---------------------


def call(
    app: Any, host: str, base_url: str = "http://127.0.0.1:8000", peer: str = "127.0.0.1", path: str = STATUS_PATH
) -> httpx.Response:
    return asgi_request(app, "GET", path, peer=peer, base_url=base_url, headers={"Host": host})


@pytest.mark.parametrize(
    ("settings", "base_url", "host", "expected"),
    [
        ({}, "http://10.0.0.5:8000", "10.0.0.5:8000", 200),  # the address the connection came in on
        ({}, "http://10.0.0.5:8000", "10.0.0.5", 200),
        ({}, "http://10.0.0.5:8000", "10.0.0.6:8000", 403),
        ({}, "http://[fd00::5]:8000", "[fd00::5]:8000", 200),
        ({}, "http://[fd00::5]:8000", "[fd00::6]:8000", 403),
        ({}, "http://127.0.0.1:8000", "[::ffff:127.0.0.1]:8000", 200),
        ({"host": "10.0.0.7"}, "http://127.0.0.1:8000", "10.0.0.7:8000", 200),  # the host setting
        ({"host": "pypnm.lan"}, "http://127.0.0.1:8000", "PYPNM.lan:8000", 200),
        ({"host": "0.0.0.0"}, "http://127.0.0.1:8000", "0.0.0.0:8000", 403),  # a wildcard names nothing
        ({"host": "::"}, "http://127.0.0.1:8000", "[::]:8000", 403),
        ({"allowed_hosts": ["192.0.2.1"]}, "http://127.0.0.1:8000", "192.0.2.1:80", 200),
        ({"allowed_hosts": ["*.example.net"]}, "http://127.0.0.1:8000", "x.example.net:8000", 200),
        ({"allowed_hosts": ["*.example.net"]}, "http://127.0.0.1:8000", "x.example.net:http", 403),
        ({}, "http://127.0.0.1:8000", "localhost:8000:8000", 403),
        ({}, "http://127.0.0.1:8000", "", 403),
        # Neither a name nor an address: refused as an unknown host, not a server error
        ({}, "http://127.0.0.1:8000", "127.1:8000", 403),
        ({}, "http://127.0.0.1:8000", "999.1.1.1", 403),
        ({}, "http://127.0.0.1:8000", "1.2.3.4.5", 403),
        ({}, "http://127.0.0.1:8000", "0x7f.1", 403),
        ({}, "http://127.0.0.1:8000", "10", 403),
        ({"host": "127.1"}, "http://127.0.0.1:8000", "127.0.0.1:8000", 200),  # such a host setting names nothing
    ],
)
def test_host_rule_in_process(settings: dict[str, Any], base_url: str, host: str, expected: int) -> None:
    app = create_app(Settings(trusted_networks=["127.0.0.0/8", "::1/128"], **settings))
    response = call(app, host, base_url)
    assert response.status_code == expected, response.text


def test_untrusted_address_is_refused_for_its_address_and_open_routes_ignore_host() -> None:
    app = create_app(Settings())
    refused = call(app, "evil.example", peer="192.0.2.9")
    assert refused.status_code == 403
    assert refused.json()["detail"].startswith("System Operations are open only to clients in trusted_networks")
    assert call(app, "evil.example", path="/health").status_code == 200
