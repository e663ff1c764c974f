"""`pypnm reload` / `pypnm status` guard the token: TLS checked against the trust store, no token over plain http.

Real processes and sockets, loopback only: the CLI runs as `python -m pypnm`; the servers are
a recording HTTP(S) server in a thread of the test (it answers the reload route as pypnm does
and keeps every request's headers) and, once, the real `pypnm --ssl`. Each certificate is made
by the test. Every CLI process runs with a guard (a `sitecustomize` on its PYTHONPATH) that
refuses connections and name look-ups beyond loopback, so a test about a non-loopback URL can
send nothing off the machine even when the code under test is wrong.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from conftest import (
    RELOAD_PATH,
    Certificate,
    RecordingServer,
    StartService,
    assert_one_line_error,
    base_env,
    free_port,
    guarded_environment,
    make_certificate,
    pypnm_command,
    run_cli,
    wait_until,
)

TOKEN = "tls-test-token-0123456789abcdef"


@pytest.fixture(scope="module")
def guarded_env(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., dict[str, str]]:
    """Environment for CLI processes with the loopback-only guard loaded (checked once, before any use)."""
    return guarded_environment(tmp_path_factory.mktemp("guard"))


@pytest.fixture
def certificate(tmp_path: Path) -> Certificate:
    return make_certificate(tmp_path / "tls", ip="127.0.0.1")


def authorizations(server: RecordingServer) -> list[str | None]:
    return [headers.get("Authorization") for _, headers in server.requests]


# ----- certificate checks -----------------------------------------------------------------------


@pytest.mark.parametrize("command", ["reload", "status"])
def test_self_signed_server_gets_no_token_and_the_cli_names_the_problem(
    recording_server: Callable[[Certificate | None], RecordingServer],
    certificate: Certificate,
    guarded_env: Callable[..., dict[str, str]],
    tmp_path: Path,
    command: str,
) -> None:
    server = recording_server(certificate)
    result = run_cli(command, "--url", server.url, env=guarded_env(PYPNM_TOKEN=TOKEN), cwd=tmp_path, timeout=30)
    assert authorizations(server) == [], "the server received a request over an unverified connection"
    line = assert_one_line_error(result, 2, "certificate verify failed", "self-signed certificate", "--cacert")
    assert server.url in line
    assert server.handshake_failures, "the CLI never tried the TLS handshake"
    assert TOKEN not in result.stdout + result.stderr


def test_a_certificate_for_another_address_is_refused(
    recording_server: Callable[[Certificate | None], RecordingServer],
    tmp_path: Path,
    guarded_env: Callable[..., dict[str, str]],
) -> None:
    """Trusted issuer, wrong name: the certificate is for 127.0.0.2, the server is reached as 127.0.0.1."""
    other = make_certificate(tmp_path / "other", ip="127.0.0.2")
    server = recording_server(other)
    result = run_cli(
        "reload",
        "--url",
        server.url,
        "--cacert",
        str(other.cert),
        env=guarded_env(PYPNM_TOKEN=TOKEN),
        cwd=tmp_path,
        timeout=30,
    )
    assert_one_line_error(result, 2, "certificate verify failed", "mismatch", "127.0.0.1")
    assert server.requests == []


def test_cacert_for_that_certificate_sends_the_token(
    recording_server: Callable[[Certificate | None], RecordingServer],
    certificate: Certificate,
    guarded_env: Callable[..., dict[str, str]],
    tmp_path: Path,
) -> None:
    server = recording_server(certificate)
    result = run_cli(
        "reload",
        "--url",
        server.url,
        "--cacert",
        str(certificate.cert),
        env=guarded_env(PYPNM_TOKEN=TOKEN),
        cwd=tmp_path,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "reload triggered\n"
    assert result.stderr == ""
    assert [path for path, _ in server.requests] == [RELOAD_PATH]
    assert authorizations(server) == [f"Bearer {TOKEN}"]


def test_cacert_from_the_environment(
    recording_server: Callable[[Certificate | None], RecordingServer],
    certificate: Certificate,
    guarded_env: Callable[..., dict[str, str]],
    tmp_path: Path,
) -> None:
    server = recording_server(certificate)
    result = run_cli(
        "status",
        "--url",
        server.url,
        "--token",
        TOKEN,
        env=guarded_env(PYPNM_CACERT=str(certificate.cert)),
        cwd=tmp_path,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert "mode:         unsupervised" in result.stdout
    assert authorizations(server) == [f"Bearer {TOKEN}"]


def test_cacert_that_cannot_be_used(tmp_path: Path, guarded_env: Callable[..., dict[str, str]]) -> None:
    url = f"https://127.0.0.1:{free_port()}"
    missing = tmp_path / "absent.pem"
    result = run_cli("reload", "--url", url, "--cacert", str(missing), env=guarded_env(), cwd=tmp_path, timeout=30)
    assert_one_line_error(result, 2, "--cacert", str(missing), "No such file or directory")
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello\n")
    result = run_cli("status", "--url", url, env=guarded_env(PYPNM_CACERT=str(not_pem)), cwd=tmp_path, timeout=30)
    assert_one_line_error(result, 2, "PYPNM_CACERT", str(not_pem))


def test_insecure_skips_the_check_and_warns(
    recording_server: Callable[[Certificate | None], RecordingServer],
    certificate: Certificate,
    guarded_env: Callable[..., dict[str, str]],
    tmp_path: Path,
) -> None:
    server = recording_server(certificate)
    result = run_cli(
        "reload", "--url", server.url, "--insecure", env=guarded_env(PYPNM_TOKEN=TOKEN), cwd=tmp_path, timeout=30
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "reload triggered\n"
    warning = result.stderr.splitlines()
    assert len(warning) == 1, result.stderr
    assert warning[0].startswith("pypnm: warning: --insecure") and "not checked" in warning[0]
    assert authorizations(server) == [f"Bearer {TOKEN}"]


def test_insecure_and_cacert_together_are_a_usage_error(
    tmp_path: Path,
    certificate: Certificate,
    guarded_env: Callable[..., dict[str, str]],
) -> None:
    result = run_cli(
        "reload",
        "--url",
        f"https://127.0.0.1:{free_port()}",
        "--insecure",
        "--cacert",
        str(certificate.cert),
        env=guarded_env(),
        cwd=tmp_path,
        timeout=30,
    )
    assert_one_line_error(result, 2, "--cacert", "--insecure")


def test_reload_wait_and_status_against_the_real_service_over_tls(
    start_service: StartService,
    certificate: Certificate,
    guarded_env: Callable[..., dict[str, str]],
    tmp_path: Path,
) -> None:
    service = start_service(
        pypnm_command("--port", "{port}", "--ssl", "--cert", str(certificate.cert), "--key", str(certificate.key)),
        env=base_env(PYPNM_API_TOKENS=json.dumps({"tls-test": TOKEN}), PYPNM_ROLLBACK_WINDOW="1"),
        wait=False,
    )
    url = f"https://127.0.0.1:{service.port}"
    trust = ssl.create_default_context(cafile=str(certificate.cert))

    def ready() -> bool:
        assert service.proc.poll() is None, service.output()
        return httpx.get(f"{url}/health", verify=trust, timeout=1.0).status_code == 200

    wait_until(ready, 30)
    env = guarded_env(PYPNM_TOKEN=TOKEN, PYPNM_CACERT=str(certificate.cert))
    reloaded = run_cli("reload", "--url", url, "--wait", "--timeout", "30", env=env, cwd=tmp_path, timeout=60)
    assert reloaded.returncode == 0, reloaded.stderr
    assert "succeeded: generation 2 serving" in reloaded.stdout
    status = run_cli("status", "--url", url, env=env, cwd=tmp_path, timeout=30)
    assert status.returncode == 0, status.stderr
    assert "generation:   2" in status.stdout
    assert "token=tls-test" in service.output()  # the service saw the token, so the CLI sent it


# ----- no token over plain http to a host that is not loopback --------------------------------


@pytest.mark.parametrize(
    ("url", "host"),
    [
        ("http://192.0.2.1:9", "192.0.2.1"),
        ("http://[2001:db8::1]:9", "2001:db8::1"),
        ("http://pypnm.example.net:9", "pypnm.example.net"),
    ],
    ids=["ipv4", "ipv6", "name"],
)
@pytest.mark.parametrize("command", ["reload", "status"])
def test_token_over_http_to_a_remote_host_is_refused_before_connecting(
    guarded_env: Callable[..., dict[str, str]],
    tmp_path: Path,
    url: str,
    host: str,
    command: str,
) -> None:
    result = run_cli(command, "--url", url, "--token", TOKEN, env=guarded_env(), cwd=tmp_path, timeout=30)
    line = assert_one_line_error(result, 2, "refusing to send the token over plain http://", host, "--allow-http-token")
    assert "test guard" not in line  # refused by the CLI, not stopped by the guard while connecting


def test_token_from_the_environment_is_refused_too(guarded_env: Callable[..., dict[str, str]], tmp_path: Path) -> None:
    result = run_cli("reload", "--url", "http://192.0.2.1:9", env=guarded_env(PYPNM_TOKEN=TOKEN), cwd=tmp_path)
    assert_one_line_error(result, 2, "refusing to send the token", "--allow-http-token")


def test_allow_http_token_lifts_the_refusal(guarded_env: Callable[..., dict[str, str]], tmp_path: Path) -> None:
    """With the flag the CLI goes on to connect, and the guard (not the network) stops it."""
    result = run_cli(
        "reload",
        "--url",
        "http://192.0.2.1:9",
        "--token",
        TOKEN,
        "--allow-http-token",
        env=guarded_env(),
        cwd=tmp_path,
        timeout=30,
    )
    line = assert_one_line_error(result, 2, "cannot reach http://192.0.2.1:9", "test guard: blocked")
    assert "refusing" not in line


def test_no_token_no_refusal(guarded_env: Callable[..., dict[str, str]], tmp_path: Path) -> None:
    result = run_cli("status", "--url", "http://192.0.2.1:9", env=guarded_env(), cwd=tmp_path, timeout=30)
    assert_one_line_error(result, 2, "cannot reach", "test guard: blocked")


@pytest.mark.parametrize("host", ["127.0.0.1", "127.45.6.7", "localhost", "[::1]"])
def test_token_over_http_to_loopback_is_sent(
    guarded_env: Callable[..., dict[str, str]],
    tmp_path: Path,
    host: str,
) -> None:
    """Loopback (127.0.0.0/8, ::1, localhost) needs no flag: the CLI tries to connect (nothing listens there)."""
    url = f"http://{host}:{free_port()}"
    result = run_cli("reload", "--url", url, "--token", TOKEN, env=guarded_env(), cwd=tmp_path, timeout=30)
    line = assert_one_line_error(result, 2, "cannot reach", url)
    assert "refusing" not in line and "test guard" not in line


def test_token_over_http_to_loopback_reaches_the_server(
    recording_server: Callable[[Certificate | None], RecordingServer],
    guarded_env: Callable[..., dict[str, str]],
    tmp_path: Path,
) -> None:
    server = recording_server(None)
    result = run_cli("reload", "--url", server.url, env=guarded_env(PYPNM_TOKEN=TOKEN), cwd=tmp_path, timeout=30)
    assert result.returncode == 0, result.stderr
    assert authorizations(server) == [f"Bearer {TOKEN}"]
