"""Settings applied by a reload: a good change takes effect, a bad file changes nothing.

Each test runs a supervised pypnm with `--config FILE` in its own temporary directory,
rewrites FILE (or the tokens file it names), triggers a reload over HTTP from 127.0.0.1
and reads the outcome from `/pypnm/system/webService/status`. The access settings make
the effect observable from outside: a request from 127.0.0.2 is let in or not.
"""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from conftest import STATUS_PATH, Service, StartService, client_from, run_cli, serve_pypnm, wait_until

TOKEN = "ci-" + secrets.token_urlsafe(24)
NEW_TOKEN = "ops-" + secrets.token_urlsafe(24)
INITIAL = f"""
trusted_networks = ["127.0.0.1/32"]

[api_tokens]
ci-runner = "{TOKEN}"
"""


def from_127_0_0_2(service: Service, path: str = STATUS_PATH, **headers: str) -> httpx.Response:
    with client_from("127.0.0.2", base_url=service.base_url) as client:
        return client.get(path, headers=headers)


def serving_workers(service: Service) -> set[int]:
    status = service.status()
    return {w["pid"] for w in status["workers"] if w["generation"] == status["generation"]}


@pytest.fixture
def configured(tmp_path: Path, start_service: StartService) -> Callable[..., tuple[Service, Path]]:
    """Start pypnm with a settings file holding `text`; returns the service and the file."""

    def start(text: str, **env: str) -> tuple[Service, Path]:
        config = tmp_path / "pypnm.toml"
        config.write_text(text)
        # These tests reload by hand; the settings-file watch (test_config_watch.py) would add reloads of its own.
        service = serve_pypnm(
            start_service, "--config", str(config), PYPNM_RELOAD_MIN_INTERVAL="0", PYPNM_WATCH_CONFIG="false", **env
        )
        return service, config

    return start


BROKEN = [
    pytest.param(
        'trusted_networks = ["127.0.0.1/32", "127.0.0.2/32"]\n[api_tokens]\nci-runner = "shortsecret"\n',
        [
            "invalid setting 'api_tokens' (PYPNM_API_TOKENS or 'api_tokens' in {config})",
            "token 'ci-runner' must be at least 16 characters",
        ],
        id="token-too-short",
    ),
    pytest.param(
        'trusted_networks = ["127.0.0.1/32", "127.0.0.2/32", "not-a-network"]\n',
        [
            "invalid setting 'trusted_networks'[2] (PYPNM_TRUSTED_NETWORKS or 'trusted_networks' in {config})",
            "'not-a-network' is not an IP address or network",
        ],
        id="bad-network",
    ),
    pytest.param(
        'trusted_networks = ["127.0.0.1/32", "127.0.0.2/32"]\nforwarded_allow_ip = ["127.0.0.3/32"]\n',
        ["unknown setting 'forwarded_allow_ip' in {config}: remove it or check its spelling"],
        id="unknown-setting",
    ),
    pytest.param(
        'trusted_networks = ["127.0.0.1/32", "127.0.0.2/32"\n',
        ["config file {config}: not valid TOML"],
        id="not-toml",
    ),
    pytest.param(
        'trusted_networks = ["127.0.0.1/32", "127.0.0.2/32"]\napi_tokens_file = "no-such-tokens-file"\n',
        ["api_tokens_file 'no-such-tokens-file'", "cannot read it"],
        id="missing-tokens-file",
    ),
]


@pytest.mark.parametrize(("broken", "reason_has"), BROKEN)
def test_broken_settings_file_fails_reload_and_old_settings_stay(
    configured: Callable[..., tuple[Service, Path]], broken: str, reason_has: list[str]
) -> None:
    service, config = configured(INITIAL)
    assert from_127_0_0_2(service).status_code == 403
    generation, workers = service.status()["generation"], serving_workers(service)

    config.write_text(broken)  # every variant would let 127.0.0.2 in, were any of it applied
    record = service.reload_and_settle()

    assert record["outcome"] == "failed", record
    assert record["generation"] > generation  # a candidate was built, and discarded
    for part in reason_has:  # the setting, its problem, and the file as the operator knows it
        assert part.format(config=repr(str(config.resolve()))) in record["reason"], record["reason"]
    assert "/gen-" not in record["reason"]  # not the master's private copy of the file
    assert "shortsecret" not in record["reason"] and TOKEN not in record["reason"]
    status = service.status()
    assert status["last_reload"]["id"] == record["id"] and status["last_reload"]["reason"] == record["reason"]
    assert status["generation"] == generation and serving_workers(service) == workers
    # The old generation serves with the old settings.
    assert from_127_0_0_2(service).status_code == 403
    assert from_127_0_0_2(service, Authorization=f"Bearer {TOKEN}").status_code == 200
    assert f"reload {record['id']} failed: generation {record['generation']} discarded" in service.output()
    assert "pypnm: pypnm:" not in service.output()  # the candidate's line names its logger once


def test_reloadable_settings_change_takes_effect(configured: Callable[..., tuple[Service, Path]]) -> None:
    service, config = configured(INITIAL)
    cross_site = {"Origin": "https://dash.example", "Sec-Fetch-Site": "cross-site"}
    assert from_127_0_0_2(service).status_code == 403
    assert service.get(STATUS_PATH, headers=cross_site).status_code == 403
    generation = service.status()["generation"]

    config.write_text(
        'trusted_networks = ["127.0.0.1/32", "127.0.0.2/32"]\n'
        'cors_origins = ["https://dash.example"]\n'
        f'[api_tokens]\nops = "{NEW_TOKEN}"\n'
    )
    record = service.reload_and_settle()

    assert record["outcome"] == "succeeded", record
    assert record["warnings"] == []
    assert service.status()["generation"] == record["generation"] > generation
    assert from_127_0_0_2(service).status_code == 200  # trusted_networks grew
    assert service.get(STATUS_PATH, headers=cross_site).status_code == 200  # the origin is now listed
    assert from_127_0_0_2(service, Authorization=f"Bearer {TOKEN}").status_code == 401  # the old token is gone
    request_id = "rotated-" + secrets.token_hex(4)
    response = from_127_0_0_2(service, Authorization=f"Bearer {NEW_TOKEN}", **{"X-Request-ID": request_id})
    assert response.status_code == 200
    wait_until(lambda: f"token=ops request_id={request_id} " in service.output(), timeout=10.0)


def test_tokens_file_is_read_again_on_reload(tmp_path: Path, configured: Callable[..., tuple[Service, Path]]) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"deploy:{TOKEN}\n")
    service, _ = configured(f'trusted_networks = ["127.0.0.1/32"]\napi_tokens_file = "{tokens}"\n')
    assert from_127_0_0_2(service, Authorization=f"Bearer {TOKEN}").status_code == 200

    tokens.write_text(f"# rotated\ndeploy:{NEW_TOKEN}\n")
    assert service.reload_and_settle()["outcome"] == "succeeded"
    assert from_127_0_0_2(service, Authorization=f"Bearer {TOKEN}").status_code == 401
    assert from_127_0_0_2(service, Authorization=f"Bearer {NEW_TOKEN}").status_code == 200

    tokens.unlink()
    record = service.reload_and_settle()
    assert record["outcome"] == "failed"
    assert "api_tokens_file" in record["reason"] and "cannot read it" in record["reason"]
    assert from_127_0_0_2(service, Authorization=f"Bearer {NEW_TOKEN}").status_code == 200  # still the old set


def test_restart_only_changes_are_reported_not_applied(configured: Callable[..., tuple[Service, Path]]) -> None:
    service, config = configured(INITIAL)
    config.write_text(
        INITIAL.replace("trusted_networks", 'host = "127.0.0.5"\nlog_file_backups = 7\ntrusted_networks', 1)
    )
    record = service.reload_and_settle()

    assert record["outcome"] == "succeeded", record
    warnings = record["warnings"]
    assert len(warnings) == 2, warnings
    assert any(
        w.startswith("setting 'host' changed ('127.0.0.1' -> '127.0.0.5') but needs a restart") for w in warnings
    )
    assert any(w.startswith("setting 'log_file_backups' changed (5 -> 7) but needs a restart") for w in warnings)
    assert len(serving_workers(service)) == 1  # still serving on 127.0.0.1
    assert f"reload {record['id']}: setting 'log_file_backups' changed" in service.output()


def test_a_log_file_the_next_start_cannot_open_is_said_in_the_warning(
    tmp_path: Path, configured: Callable[..., tuple[Service, Path]]
) -> None:
    """A restart-only log_file passes the reload, but a start stops at a file it cannot open: say so now."""
    service, config = configured(INITIAL)
    unusable = "/proc/nonexistent/pypnm.log"
    config.write_text(f'log_file = "{unusable}"\n' + INITIAL)
    record = service.reload_and_settle()
    assert record["outcome"] == "succeeded", record
    assert record["warnings"] == [
        f"setting 'log_file' changed (None -> {unusable!r}) but needs a restart; still using None; the next start "
        f"with these settings would fail: cannot open log_file {unusable!r}: No such file or directory: create its "
        "directory or fix the setting"
    ], record

    usable = tmp_path / "pypnm.log"
    config.write_text(f'log_file = "{usable}"\n' + INITIAL)
    record = service.reload_and_settle()
    assert record["warnings"] == [
        f"setting 'log_file' changed (None -> {str(usable)!r}) but needs a restart; still using None"
    ], record
    assert not usable.exists()  # tried, and not left behind


def test_a_pid_file_moved_where_it_cannot_be_written_is_a_warning_and_tried_again(
    tmp_path: Path, configured: Callable[..., tuple[Service, Path]]
) -> None:
    first, second = tmp_path / "first.pid", tmp_path / "run" / "second.pid"
    service, config = configured(f'pid_file = "{first}"\n' + INITIAL)
    master = str(service.status()["master"]["pid"])
    assert first.read_text().strip() == master

    config.write_text(f'pid_file = "{second}"\n' + INITIAL)  # its directory does not exist
    record = service.reload_and_settle()
    assert record["outcome"] == "succeeded", record  # the code serves: only the pid file could not move
    assert record["warnings"] == [
        f"cannot write pid_file {second}: No such file or directory; {first} stays in force, and the next start "
        "with these settings would fail: create its directory or fix the setting"
    ]
    assert first.read_text().strip() == master

    second.parent.mkdir()
    record = service.reload_and_settle()  # the same settings: the move is tried again, and now it works
    assert record["outcome"] == "succeeded" and record["warnings"] == [], record
    assert second.read_text().strip() == master
    assert not first.exists()


def test_environment_outranks_the_file_on_reload(configured: Callable[..., tuple[Service, Path]]) -> None:
    service, config = configured(INITIAL, PYPNM_TRUSTED_NETWORKS='["127.0.0.1/32"]')
    config.write_text(INITIAL.replace('["127.0.0.1/32"]', '["127.0.0.1/32", "127.0.0.2/32"]'))
    assert service.reload_and_settle()["outcome"] == "succeeded"
    assert from_127_0_0_2(service).status_code == 403  # PYPNM_TRUSTED_NETWORKS still decides
    assert from_127_0_0_2(service, Authorization=f"Bearer {TOKEN}").status_code == 200  # the file's token


def test_pypnm_check_validates_a_settings_file_offline(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('trusted_networks = ["10.0.0.0/33"]\n')
    good = tmp_path / "good.toml"
    good.write_text(INITIAL)

    def check(config: Path) -> subprocess.CompletedProcess[str]:
        return run_cli("check", "--config", str(config), cwd=tmp_path)

    failed = check(bad)
    assert failed.returncode == 2, failed.stderr  # a settings error, as `pypnm` says it
    assert failed.stderr.startswith("pypnm: check failed: invalid setting 'trusted_networks'[0]")
    assert str(bad) in failed.stderr
    passed = check(good)
    assert passed.returncode == 0, passed.stderr
    assert passed.stdout.startswith("ok: pypnm.main:app imports, starts and answers /health, /openapi.json")
    assert TOKEN not in passed.stdout + passed.stderr
