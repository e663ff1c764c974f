"""`pypnm reload` / `pypnm status` guard the token: TLS checked against the trust store, no token over plain http.

Real processes and sockets, loopback only: the CLI runs as `python -m pypnm`; the servers are
a recording HTTP(S) server in a thread of the test (it answers the reload route as pypnm does
and keeps every request's headers) and, once, the real `pypnm --ssl`. Each certificate is made
by the test. Every CLI process runs with a guard (a `sitecustomize` on its PYTHONPATH) that
refuses connections and name look-ups beyond loopback, so a test about a non-loopback URL can
send nothing off the machine even when the code under test is wrong.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from conftest import RELOAD_PATH, STATUS_PATH, Service, base_env, free_port, pypnm_command, run_cli, wait_until
from test_cli import assert_one_line_error

TOKEN = "tls-test-token-0123456789abcdef"

GUARD = '''"""Loaded by every Python process of the TLS tests: nothing may connect or look up beyond loopback."""
import ipaddress
import socket

PYPNM_TEST_GUARD = True
_connect, _connect_ex, _getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo


def _loopback(host):
    if host in (None, "localhost"):
        return True
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False


def _check(address):
    if isinstance(address, tuple) and not _loopback(address[0]):
        raise PermissionError(f"test guard: blocked a connection to {address[0]} (not loopback)")


def connect(self, address):
    _check(address)
    return _connect(self, address)


def connect_ex(self, address):
    _check(address)
    return _connect_ex(self, address)


def getaddrinfo(host, *args, **kwargs):
    if not _loopback(host.decode() if isinstance(host, bytes) else host):
        raise socket.gaierror(socket.EAI_NONAME, f"test guard: blocked a name look-up of {host}")
    return _getaddrinfo(host, *args, **kwargs)


socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = connect, connect_ex, getaddrinfo
'''


@pytest.fixture(scope="module")
def guarded_env(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., dict[str, str]]:
    """Environment for CLI processes with the loopback-only guard loaded (checked once, before any use)."""
    guard_dir = tmp_path_factory.mktemp("guard")
    (guard_dir / "sitecustomize.py").write_text(GUARD)

    def env(**extra: str) -> dict[str, str]:
        return base_env(PYTHONPATH=str(guard_dir), **extra)

    loaded = subprocess.run(
        [sys.executable, "-c",
         "import sys; sys.exit(0 if getattr(sys.modules.get('sitecustomize'), 'PYPNM_TEST_GUARD', 0) else 1)"],
        env=env(), timeout=30,
    )
    assert loaded.returncode == 0, "the guard is not loaded at start-up: refusing to run tests that name remote hosts"
    return env


# ----- a self-signed certificate and a recording server ---------------------------------------


@dataclass
class Certificate:
    cert: Path
    key: Path


def make_certificate(directory: Path, ip: str = "127.0.0.1") -> Certificate:
    """A self-signed server certificate for `ip` (in its SAN), valid for a day."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"pypnm test {ip}")])
    now = datetime.datetime.now(datetime.UTC)
    public = key.public_key()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return Certificate(cert_file, key_file)


@pytest.fixture
def certificate(tmp_path: Path) -> Certificate:
    return make_certificate(tmp_path / "tls")


class RecordingServer(ThreadingHTTPServer):
    """Keeps the path and headers of every request, and every failed TLS handshake; answers as pypnm does."""

    daemon_threads = True

    def __init__(self, tls: ssl.SSLContext | None) -> None:
        super().__init__(("127.0.0.1", 0), _RecordingHandler)
        self.tls = tls
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.handshake_failures: list[str] = []

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.server_address[1]}"

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = self.socket.accept()
        if self.tls is None:
            return sock, address
        sock.settimeout(10.0)  # a client that never says hello cannot hold the accept loop
        try:
            return self.tls.wrap_socket(sock, server_side=True), address
        except OSError as exc:
            self.handshake_failures.append(str(exc))
            sock.close()
            raise


class _RecordingHandler(BaseHTTPRequestHandler):
    server: RecordingServer

    def do_GET(self) -> None:
        self.server.requests.append((self.path, dict(self.headers.items())))
        if self.path == RELOAD_PATH:
            self._answer(200, {"status": "reload triggered"})
        elif self.path == STATUS_PATH:
            self._answer(200, {"pid": 1, "started_at": "2026-01-01T00:00:00Z", "version": "0.1.0",
                               "code_version": "0123456789abcdef", "mode": "unsupervised"})
        else:
            self._answer(404, {"detail": "Not Found"})

    def _answer(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body, separators=(",", ":")).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # keep the test output quiet
        pass


@pytest.fixture
def recording_server() -> Iterator[Callable[[Certificate | None], RecordingServer]]:
    """Start recording servers (HTTPS with the given certificate, or plain HTTP); all are stopped afterwards."""
    running: list[tuple[RecordingServer, threading.Thread]] = []

    def start(cert: Certificate | None) -> RecordingServer:
        tls = None
        if cert is not None:
            tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            tls.load_cert_chain(cert.cert, cert.key)
        server = RecordingServer(tls)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        running.append((server, thread))
        return server

    yield start
    for server, thread in running:
        server.shutdown()
        server.server_close()
        thread.join(5)


def authorizations(server: RecordingServer) -> list[str | None]:
    return [headers.get("Authorization") for _, headers in server.requests]


# ----- certificate checks -----------------------------------------------------------------------


@pytest.mark.parametrize("command", ["reload", "status"])
def test_self_signed_server_gets_no_token_and_the_cli_names_the_problem(
    recording_server: Callable[[Certificate | None], RecordingServer], certificate: Certificate,
    guarded_env: Callable[..., dict[str, str]], tmp_path: Path, command: str,
) -> None:
    server = recording_server(certificate)
    result = run_cli(command, "--url", server.url, env=guarded_env(PYPNM_TOKEN=TOKEN), cwd=tmp_path, timeout=30)
    assert authorizations(server) == [], "the server received a request over an unverified connection"
    line = assert_one_line_error(result, 2, "certificate verify failed", "self-signed certificate", "--cacert")
    assert server.url in line
    assert server.handshake_failures, "the CLI never tried the TLS handshake"
    assert TOKEN not in result.stdout + result.stderr


def test_a_certificate_for_another_address_is_refused(
    recording_server: Callable[[Certificate | None], RecordingServer], tmp_path: Path,
    guarded_env: Callable[..., dict[str, str]],
) -> None:
    """Trusted issuer, wrong name: the certificate is for 127.0.0.2, the server is reached as 127.0.0.1."""
    other = make_certificate(tmp_path / "other", ip="127.0.0.2")
    server = recording_server(other)
    result = run_cli("reload", "--url", server.url, "--cacert", str(other.cert),
                     env=guarded_env(PYPNM_TOKEN=TOKEN), cwd=tmp_path, timeout=30)
    assert_one_line_error(result, 2, "certificate verify failed", "mismatch", "127.0.0.1")
    assert server.requests == []


def test_cacert_for_that_certificate_sends_the_token(
    recording_server: Callable[[Certificate | None], RecordingServer], certificate: Certificate,
    guarded_env: Callable[..., dict[str, str]], tmp_path: Path,
) -> None:
    server = recording_server(certificate)
    result = run_cli("reload", "--url", server.url, "--cacert", str(certificate.cert),
                     env=guarded_env(PYPNM_TOKEN=TOKEN), cwd=tmp_path, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "reload triggered\n"
    assert result.stderr == ""
    assert [path for path, _ in server.requests] == [RELOAD_PATH]
    assert authorizations(server) == [f"Bearer {TOKEN}"]


def test_cacert_from_the_environment(
    recording_server: Callable[[Certificate | None], RecordingServer], certificate: Certificate,
    guarded_env: Callable[..., dict[str, str]], tmp_path: Path,
) -> None:
    server = recording_server(certificate)
    result = run_cli("status", "--url", server.url, "--token", TOKEN,
                     env=guarded_env(PYPNM_CACERT=str(certificate.cert)), cwd=tmp_path, timeout=30)
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
    recording_server: Callable[[Certificate | None], RecordingServer], certificate: Certificate,
    guarded_env: Callable[..., dict[str, str]], tmp_path: Path,
) -> None:
    server = recording_server(certificate)
    result = run_cli("reload", "--url", server.url, "--insecure", env=guarded_env(PYPNM_TOKEN=TOKEN),
                     cwd=tmp_path, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "reload triggered\n"
    warning = result.stderr.splitlines()
    assert len(warning) == 1, result.stderr
    assert warning[0].startswith("pypnm: warning: --insecure") and "not checked" in warning[0]
    assert authorizations(server) == [f"Bearer {TOKEN}"]


def test_insecure_and_cacert_together_are_a_usage_error(
    tmp_path: Path, certificate: Certificate, guarded_env: Callable[..., dict[str, str]],
) -> None:
    result = run_cli("reload", "--url", f"https://127.0.0.1:{free_port()}", "--insecure", "--cacert",
                     str(certificate.cert), env=guarded_env(), cwd=tmp_path, timeout=30)
    assert_one_line_error(result, 2, "--cacert", "--insecure")


def test_reload_wait_and_status_against_the_real_service_over_tls(
    start_service: Callable[..., Service], certificate: Certificate,
    guarded_env: Callable[..., dict[str, str]], tmp_path: Path,
) -> None:
    service = start_service(
        pypnm_command("--port", "{port}", "--ssl", "--cert", str(certificate.cert), "--key", str(certificate.key)),
        env=base_env(PYPNM_API_TOKENS=json.dumps({"tls-test": TOKEN})), wait=False,
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
    [("http://192.0.2.1:9", "192.0.2.1"), ("http://[2001:db8::1]:9", "2001:db8::1"),
     ("http://pypnm.example.net:9", "pypnm.example.net")],
    ids=["ipv4", "ipv6", "name"],
)
@pytest.mark.parametrize("command", ["reload", "status"])
def test_token_over_http_to_a_remote_host_is_refused_before_connecting(
    guarded_env: Callable[..., dict[str, str]], tmp_path: Path, url: str, host: str, command: str,
) -> None:
    result = run_cli(command, "--url", url, "--token", TOKEN, env=guarded_env(), cwd=tmp_path, timeout=30)
    line = assert_one_line_error(result, 2, "refusing to send the token over plain http://", host, "--allow-http-token")
    assert "test guard" not in line  # refused by the CLI, not stopped by the guard while connecting


def test_token_from_the_environment_is_refused_too(guarded_env: Callable[..., dict[str, str]], tmp_path: Path) -> None:
    result = run_cli("reload", "--url", "http://192.0.2.1:9", env=guarded_env(PYPNM_TOKEN=TOKEN), cwd=tmp_path)
    assert_one_line_error(result, 2, "refusing to send the token", "--allow-http-token")


def test_allow_http_token_lifts_the_refusal(guarded_env: Callable[..., dict[str, str]], tmp_path: Path) -> None:
    """With the flag the CLI goes on to connect, and the guard (not the network) stops it."""
    result = run_cli("reload", "--url", "http://192.0.2.1:9", "--token", TOKEN, "--allow-http-token",
                     env=guarded_env(), cwd=tmp_path, timeout=30)
    line = assert_one_line_error(result, 2, "cannot reach http://192.0.2.1:9", "test guard: blocked")
    assert "refusing" not in line


def test_no_token_no_refusal(guarded_env: Callable[..., dict[str, str]], tmp_path: Path) -> None:
    result = run_cli("status", "--url", "http://192.0.2.1:9", env=guarded_env(), cwd=tmp_path, timeout=30)
    assert_one_line_error(result, 2, "cannot reach", "test guard: blocked")


@pytest.mark.parametrize("host", ["127.0.0.1", "127.45.6.7", "localhost", "[::1]"])
def test_token_over_http_to_loopback_is_sent(
    guarded_env: Callable[..., dict[str, str]], tmp_path: Path, host: str,
) -> None:
    """Loopback (127.0.0.0/8, ::1, localhost) needs no flag: the CLI tries to connect (nothing listens there)."""
    url = f"http://{host}:{free_port()}"
    result = run_cli("reload", "--url", url, "--token", TOKEN, env=guarded_env(), cwd=tmp_path, timeout=30)
    line = assert_one_line_error(result, 2, "cannot reach", url)
    assert "refusing" not in line and "test guard" not in line


def test_token_over_http_to_loopback_reaches_the_server(
    recording_server: Callable[[Certificate | None], RecordingServer],
    guarded_env: Callable[..., dict[str, str]], tmp_path: Path,
) -> None:
    server = recording_server(None)
    result = run_cli("reload", "--url", server.url, env=guarded_env(PYPNM_TOKEN=TOKEN), cwd=tmp_path, timeout=30)
    assert result.returncode == 0, result.stderr
    assert authorizations(server) == [f"Bearer {TOKEN}"]
