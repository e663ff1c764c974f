"""The `pypnm` command line: bad input ends in one line on stderr and exit 2; `check`; the HTTP clients.

Every case runs `python -m pypnm` as a real process with a time limit, so a command
that wrongly starts serving fails the test (by timing out) instead of hanging it.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from conftest import StartService, assert_one_line_error, base_env, free_port, pypnm_command, run_cli, set_marker

# ----- serve: bad settings and flags --------------------------------------------------------


def test_bad_setting_in_environment(tmp_path: Path) -> None:
    result = run_cli(env=base_env(PYPNM_PORT="notanumber"), cwd=tmp_path, timeout=30)
    line = assert_one_line_error(result, 2, "'port'", "PYPNM_PORT")
    assert line.startswith("pypnm: ")


@pytest.mark.parametrize(
    ("content", "names"),
    [
        ('workers = "many"\n', ["'workers'", "PYPNM_WORKERS", "settings.toml"]),
        ("graceful_timeout = -1\n", ["'graceful_timeout'", "settings.toml"]),
        ("prot = 8080\n", ["unknown setting 'prot'", "settings.toml"]),
        ("port = \n", ["settings.toml", "not valid TOML"]),
    ],
    ids=["bad-value", "out-of-range", "unknown-key", "not-toml"],
)
def test_bad_config_file(tmp_path: Path, content: str, names: list[str]) -> None:
    config = tmp_path / "settings.toml"
    config.write_text(content)
    # --port given so that, were the file wrongly accepted, nothing would collide on the default port.
    result = run_cli("--config", str(config), "--port", str(free_port()), cwd=tmp_path, timeout=30)
    assert_one_line_error(result, 2, *names)


@pytest.mark.parametrize(
    ("content", "names"),
    [
        (b"ci:abcdefghijklmnop\xff\xfeqrstuvwxyz\n", ["api_tokens_file", "tokens", "not UTF-8 text (byte 19"]),
        ("ci:abcdefghijklmnopäöü\n".encode(), ["api_tokens_file", "line 1", "printable ASCII"]),
    ],
    ids=["not-utf-8", "not-ascii"],
)
def test_bad_tokens_file_ends_the_start_in_one_line(tmp_path: Path, content: bytes, names: list[str]) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_bytes(content)
    config = tmp_path / "settings.toml"
    config.write_text(f'api_tokens_file = "{tokens}"\n')
    result = run_cli("--config", str(config), "--port", str(free_port()), cwd=tmp_path, timeout=30)
    assert_one_line_error(result, 2, *names)


def test_missing_config_file(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "settings.toml"
    result = run_cli("serve", "--config", str(missing), "--port", str(free_port()), cwd=tmp_path, timeout=30)
    assert_one_line_error(result, 2, str(missing), "No such file or directory")


def test_missing_config_file_from_environment(tmp_path: Path) -> None:
    missing = tmp_path / "absent.toml"
    result = run_cli("--port", str(free_port()), env=base_env(PYPNM_CONFIG=str(missing)), cwd=tmp_path, timeout=30)
    assert_one_line_error(result, 2, str(missing))


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["--prot", "1"], ["--prot"]),
        (["--port", "abc"], ["--port", "'abc'"]),
        (["serve", "--workers", "two"], ["--workers", "'two'"]),
        (["--log-level", "loud"], ["--log-level", "'loud'"]),
    ],
    ids=["unknown-flag", "port-not-int", "workers-not-int", "bad-choice"],
)
def test_bad_flags(tmp_path: Path, args: list[str], names: list[str]) -> None:
    result = run_cli(*args, cwd=tmp_path, timeout=30)
    assert_one_line_error(result, 2, *names)


def test_port_out_of_range_flag(tmp_path: Path) -> None:
    result = run_cli("--port", "70000", cwd=tmp_path, timeout=30)
    assert_one_line_error(result, 2, "'port'")


def test_port_already_in_use(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("--port", str(port), cwd=tmp_path, timeout=30)
    line = assert_one_line_error(result, 2, f"127.0.0.1:{port}")
    assert "in use" in line, line


# ----- check -------------------------------------------------------------------------------


def test_check_ok_on_the_real_package(tmp_path: Path) -> None:
    result = run_cli("check", cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok: pypnm.main:app"), result.stdout
    assert "/health" in result.stdout and "/openapi.json" in result.stdout
    assert "Traceback" not in result.stderr


def test_check_fails_on_a_bad_config_value(tmp_path: Path) -> None:
    config = tmp_path / "settings.toml"
    config.write_text("gzip_minimum_size = -5\n")
    result = run_cli("check", "--config", str(config), cwd=tmp_path, timeout=60)
    line = assert_one_line_error(result, 2, "check failed", "'gzip_minimum_size'")  # 2: settings, as `pypnm`
    assert result.stdout == ""
    assert line.startswith("pypnm: check failed: ")


def test_check_fails_on_a_log_file_or_pid_file_that_serve_would_stop_at(tmp_path: Path) -> None:
    """Valid values that `pypnm serve` cannot use at start: a check that passed them would pass a
    reload too, and every later start would fail. A usable pair leaves no file behind."""
    config = tmp_path / "settings.toml"
    unusable = [
        ('log_file = "/proc/nonexistent/pypnm.log"\n', "cannot open log_file '/proc/nonexistent/pypnm.log'"),
        (f'pid_file = "{tmp_path / "missing" / "pypnm.pid"}"\n', f"cannot write pid_file {tmp_path / 'missing'}"),
    ]
    for text, reason in unusable:
        config.write_text(text)
        result = run_cli("check", "--config", str(config), cwd=tmp_path, timeout=60)
        line = assert_one_line_error(result, 1, "check failed", reason, "No such file or directory")
        assert line.startswith("pypnm: check failed: ") and result.stdout == ""

        serve = run_cli("serve", "--config", str(config), "--port", "0", cwd=tmp_path, timeout=60)
        assert_one_line_error(serve, 2, reason)  # what the check said is what a start stops at

    before = sorted(tmp_path.iterdir())
    config.write_text(f'log_file = "{tmp_path / "pypnm.log"}"\npid_file = "{tmp_path / "pypnm.pid"}"\n')
    result = run_cli("check", "--config", str(config), cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr
    assert sorted(tmp_path.iterdir()) == before  # neither file, nor the pid file's temporary one


def test_check_fails_on_an_app_with_a_syntax_error(marker_app: Path) -> None:
    ok = run_cli("check", "--app", "markerpkg.main:app", cwd=marker_app, timeout=60)
    assert ok.returncode == 0, ok.stderr
    set_marker(marker_app, 'v1" +')  # MARKER = "v1" +"  -> a syntax error on line 3
    result = run_cli("check", "--app", "markerpkg.main:app", cwd=marker_app, timeout=60)
    assert_one_line_error(result, 1, "check failed", "SyntaxError", "marker.py", "line 3")


# ----- reload and status clients -------------------------------------------------------------


def test_reload_and_status_clients_when_nothing_listens(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    for args in (["reload", "--url", url, "--wait", "--timeout", "5"], ["status", "--url", url]):
        result = run_cli(*args, cwd=tmp_path, timeout=30)
        assert_one_line_error(result, 2, "cannot reach", url)


def test_status_client_against_a_running_service(start_service: StartService, tmp_path: Path) -> None:
    service = start_service(pypnm_command("--port", "{port}"), env=base_env())
    as_json = run_cli("status", "--url", service.base_url, "--json", cwd=tmp_path, timeout=30)
    assert as_json.returncode == 0, as_json.stderr
    assert '"mode": "supervised"' in as_json.stdout
    readable = run_cli("status", "--url", service.base_url, cwd=tmp_path, timeout=30)
    assert readable.returncode == 0, readable.stderr
    assert "mode:         supervised" in readable.stdout
    assert "generation:   1" in readable.stdout
