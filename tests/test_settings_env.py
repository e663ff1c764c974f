"""Lists and tables from environment variables: the comma form people type, JSON, and one-line errors.

Every case is a real process: `pypnm` serving (the values must take effect, not just parse),
`pypnm check`, `pypnm` refusing to start, and `python -c "import pypnm.main"`.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from conftest import (
    STATUS_PATH,
    Service,
    StartService,
    assert_one_line_error,
    base_env,
    client_from,
    free_port,
    pypnm_command,
    run_cli,
)

TOKEN = "ci-" + secrets.token_urlsafe(24)
OTHER_TOKEN = "ops-" + secrets.token_urlsafe(24) + ":x="  # a colon and '=' inside a token are fine

# Each form of the three settings the issue names, as an operator would write it.
FORMS = {
    "comma": {
        "PYPNM_TRUSTED_NETWORKS": "127.0.0.2/32, ::1/128",
        "PYPNM_API_TOKENS": f"ci:{TOKEN},ops:{OTHER_TOKEN}",
        "PYPNM_CORS_ORIGINS": "https://a.example,https://b.example",
    },
    "json": {
        "PYPNM_TRUSTED_NETWORKS": json.dumps(["127.0.0.2/32", "::1/128"]),
        "PYPNM_API_TOKENS": json.dumps({"ci": TOKEN, "ops": OTHER_TOKEN}),
        "PYPNM_CORS_ORIGINS": json.dumps(["https://a.example", "https://b.example"]),
    },
}

MALFORMED = {
    "PYPNM_TRUSTED_NETWORKS": ("127.0.0.1/32,not-a-network", "'trusted_networks'"),
    "PYPNM_API_TOKENS": (TOKEN, "'api_tokens'"),  # a token without its label
    "PYPNM_CORS_ORIGINS": ('["https://a.example",', "'cors_origins'"),  # broken JSON
}


def get_from(service: Service, address: str, path: str, **headers: str) -> httpx.Response:
    with client_from(address, base_url=service.base_url) as client:
        return client.get(path, headers=headers)


@pytest.mark.parametrize("form", sorted(FORMS))
def test_each_form_takes_effect_in_a_served_app(start_service: StartService, form: str) -> None:
    service = start_service(pypnm_command("--port", "{port}"), env=base_env(**FORMS[form]))

    # trusted_networks: 127.0.0.2 is trusted, 127.0.0.1 (the default's loopback) no longer is.
    assert get_from(service, "127.0.0.2", STATUS_PATH).status_code == 200
    refused = get_from(service, "127.0.0.1", STATUS_PATH)
    assert refused.status_code == 403, refused.text
    # api_tokens: both labels' tokens are accepted, whole (with the colon inside the second one).
    for token in (TOKEN, OTHER_TOKEN):
        allowed = get_from(service, "127.0.0.1", STATUS_PATH, Authorization=f"Bearer {token}")
        assert allowed.status_code == 200, allowed.text
    # cors_origins: both origins are allowed, another is not.
    for origin in ("https://a.example", "https://b.example"):
        answer = get_from(service, "127.0.0.1", "/health", Origin=origin)
        assert answer.headers.get("access-control-allow-origin") == origin
    assert (
        "access-control-allow-origin"
        not in get_from(service, "127.0.0.1", "/health", Origin="https://c.example").headers
    )
    assert "Traceback" not in service.output()


@pytest.mark.parametrize("form", sorted(FORMS))
@pytest.mark.parametrize("name", sorted(FORMS["comma"]))
def test_check_accepts_each_form(tmp_path: Path, form: str, name: str) -> None:
    result = run_cli("check", env=base_env(**{name: FORMS[form][name]}), cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok: "), result.stdout


@pytest.mark.parametrize(
    "list_setting",
    ["RELOAD_DIRS", "RELOAD_INCLUDES", "RELOAD_EXCLUDES", "CHECK_PATHS", "PRELOAD_MODULES", "FORWARDED_ALLOW_IPS"],
)
def test_every_list_setting_takes_the_comma_form(tmp_path: Path, list_setting: str) -> None:
    values = {
        "RELOAD_DIRS": f"{tmp_path}, {tmp_path}",
        "RELOAD_INCLUDES": "*.py,*.toml",
        "RELOAD_EXCLUDES": ".*,__pycache__",
        "CHECK_PATHS": "/health, /openapi.json",
        "PRELOAD_MODULES": "json,csv",
        "FORWARDED_ALLOW_IPS": "127.0.0.1,10.0.0.0/8",
    }
    result = run_cli("check", env=base_env(**{f"PYPNM_{list_setting}": values[list_setting]}), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    if list_setting == "CHECK_PATHS":  # the value really is the list: check names what it asked for
        assert "/health, /openapi.json" in result.stdout, result.stdout


def _import_main(env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "import pypnm.main"],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize("name", sorted(MALFORMED))
@pytest.mark.parametrize("entry", ["serve", "check", "import"])
def test_a_malformed_value_is_one_line_and_exit_2(tmp_path: Path, name: str, entry: str) -> None:
    value, setting = MALFORMED[name]
    env = base_env(**{name: value})
    if entry == "serve":  # a free port: were the value wrongly accepted, it would serve (and time out) there
        result = run_cli("--port", str(free_port()), env=env, cwd=tmp_path, timeout=30)
    elif entry == "check":
        result = run_cli("check", env=env, cwd=tmp_path, timeout=30)
    else:
        result = _import_main(env, tmp_path)
    line = assert_one_line_error(result, 2, setting, name)
    assert line.startswith("pypnm: "), line
    if name == "PYPNM_API_TOKENS":
        assert TOKEN not in result.stderr  # a token is never echoed, even a malformed one
