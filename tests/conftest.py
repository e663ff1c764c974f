"""Shared test helpers, in one place: real servers as subprocesses on 127.0.0.1, stopped by their PID,
and what the tests do with them (reloads, raw HTTP, certificates, copies of the code under test).

Every wait here is a bounded loop (count and time); nothing is killed by name. Test modules
import what they need from here (`from conftest import ...`); helpers used by one module only
stay in that module.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import io
import ipaddress
import json
import logging
import os
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import sysconfig
import threading
import time
import types
import uuid
import warnings
from collections.abc import Callable, Generator, Iterator, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol

import httpx
import pytest
from coverage import CoverageData
from coverage.exceptions import CoverageException, CoverageWarning
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
STATUS_PATH = "/pypnm/system/webService/status"
RELOAD_PATH = "/pypnm/system/webService/reload"
RELOAD_BODY = b'{"status":"reload triggered"}'  # the documented answer, byte for byte
MARKER_APP = "markerpkg.main:app"
SUPERVISOR_PATH = "/supervisor"  # markerpkg's relay of the master's status

# The routes a test app written by a test serves beside its own, appended to its source (which
# defines `app`): `/health`, which `start_service` waits for, and `/supervisor`, the master's
# status relayed as markerpkg does, which `supervisor_status` reads.
STATUS_ROUTES = """

@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@app.get("/supervisor")
async def supervisor() -> dict[str, object]:
    import os

    from pypnm.identity import SUPERVISOR_ENV
    from pypnm.supervisor import control
    from pypnm.supervisor.protocol import StatusAnswer, StatusRequest

    return (await control.ask(os.environ[SUPERVISOR_ENV], StatusRequest(), StatusAnswer)).status
"""


# Once `slow` exists in SLOW_DIR, its import writes its scheduling policy and nice value (file `policy`),
# says its pid (file `importing`) and waits for `go` there (serve_held_import, hold_next_import).
SLOW_IMPORT_APP = (
    '''"""A test app whose import can be held up, so that a test acts while a zygote imports it."""

import os
import time
from pathlib import Path

from fastapi import FastAPI

HERE = Path(os.environ["SLOW_DIR"])
if (HERE / "slow").exists():
    (HERE / "policy").write_text(f"{os.sched_getscheduler(0)} {os.getpriority(os.PRIO_PROCESS, 0)}")
    (HERE / "importing.tmp").write_text(str(os.getpid()))
    os.replace(HERE / "importing.tmp", HERE / "importing")
    deadline = time.monotonic() + 30
    while not (HERE / "go").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
if (HERE / "spin").exists():  # use this many seconds of CPU time, for at most 30 s
    spun, deadline = time.process_time() + float((HERE / "spin").read_text()), time.monotonic() + 30
    while time.process_time() < spun and time.monotonic() < deadline:
        pass

app = FastAPI()
'''
    + STATUS_ROUTES
)

# ----- coverage of the processes the tests start -----------------------------------------------
# The test command measures coverage in every pypnm process (pyproject.toml, [tool.coverage]). A process
# killed while it writes its data (the tests and the supervisor SIGKILL processes on purpose) leaves a
# file coverage cannot read: its data is lost either way, so combining skips it without a warning, and
# the session's end removes it instead of leaving it in the checkout.
UNREADABLE_DATA = r"Data file .* isn't a coverage data file"


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtestloop(session: pytest.Session) -> Generator[None, object, object]:
    # pytest-cov combines when the test loop ends, inside this wrapper (tryfirst: around its own). A filter
    # set when this module is imported would not hold then: pytest imports it under catch_warnings.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=UNREADABLE_DATA, category=CoverageWarning)
        return (yield)


def pytest_sessionfinish(session: pytest.Session) -> None:
    for path in REPO.glob(".coverage.*"):
        try:
            CoverageData(str(path)).read()
        except CoverageException:
            path.unlink(missing_ok=True)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05) -> Any:
    """Call `predicate` until it returns something truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    attempts = int(timeout / interval) + 1
    last: Any = None
    for _ in range(attempts):
        try:
            last = predicate()
        except (httpx.HTTPError, OSError) as exc:
            last = exc
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            break
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s (last: {last!r})")


# ----- processes ----------------------------------------------------------------------------------


def process_stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state, ppid, ...), or None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); its state letter says it is gone.
    fields = process_stat(pid)
    return fields is not None and fields[0] != "Z"


def process_tree(root: int) -> set[int]:
    """`root` and its live (not zombie) descendants, read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := process_stat(int(entry.name))) is not None and fields[0] not in "ZX":
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = {root}, [root]
    while todo:  # bounded: each pid enters `todo` at most once
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYPNM_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def pypnm_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "pypnm", *args]


def run_cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """`python -m pypnm ARGS` to completion, output captured as text."""
    return subprocess.run(
        pypnm_command(*args),
        env=env or base_env(),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def start_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.Popen[str]:
    """`python -m pypnm ARGS` started, not waited for (the test acts meanwhile): output captured as text.

    The caller ends it: `communicate(timeout=...)`, and a kill in a `finally` if it is still running.
    """
    return subprocess.Popen(
        pypnm_command(*args),
        env=env or base_env(),
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int, *names: str) -> str:
    """Exit `code`, exactly one line on stderr naming each of `names`, and no traceback anywhere."""
    returncode, stdout, stderr = result.returncode, result.stdout, result.stderr
    assert "Traceback" not in stderr + stdout, stderr
    lines = stderr.splitlines()
    assert returncode == code, f"exit {returncode}, stderr:\n{stderr}"
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{stderr}"
    assert stderr.endswith("\n")
    for name in names:
        assert name in lines[0], f"{name!r} not named in: {lines[0]}"
    return lines[0]


# ----- a served pypnm (or uvicorn) ------------------------------------------------------------


class Service:
    """A pypnm (or uvicorn) process started by a test."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, log: Path, host: str = "127.0.0.1") -> None:
        self.proc = proc
        self.port = port
        self.log = log
        self.base_url = f"http://{host}:{port}"
        self.verify: ssl.SSLContext | bool = True  # a test of an HTTPS service sets base_url and this

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        kwargs.setdefault("timeout", 10.0)
        kwargs.setdefault("verify", self.verify)
        return httpx.request(method, self.base_url + path, **kwargs)

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", path, **kwargs)

    def status(self) -> dict[str, Any]:
        response = self.get(STATUS_PATH)
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()
        return result

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 30.0, path: str = "/health") -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            return self.get(path, timeout=1.0).status_code == 200

        wait_until(ready, timeout)

    def signal(self, signum: int) -> None:
        os.kill(self.proc.pid, signum)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM by PID, then SIGKILL of its process group if it does not leave in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        # Whatever the test did, leave no process of this group behind.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.returncode

    # ----- reloads, as the supervisor reports them

    def trigger_reload(self) -> str:
        """GET the reload endpoint, which must answer the documented 200; returns the reload's X-Reload-Id."""
        response = self.get(RELOAD_PATH)
        assert response.status_code == 200, response.text
        assert response.content == RELOAD_BODY, response.content
        return response.headers["X-Reload-Id"]

    def reload_record(self, reload_id: str) -> dict[str, Any] | None:
        """The reload with this id once it has an outcome; None while it runs (or is not known yet)."""
        record = next((r for r in self.status()["reloads"] if r["id"] == reload_id), None)
        return dict(record) if record and record["outcome"] else None

    def wait_reload(self, reload_id: str, timeout: float = 30.0) -> dict[str, Any]:
        """The record of a reload once it has an outcome (succeeded or failed)."""
        record: dict[str, Any] = wait_until(lambda: self.reload_record(reload_id), timeout=timeout, interval=0.1)
        return record

    def reload_and_settle(self, timeout: float = 60.0) -> dict[str, Any]:
        """Trigger a reload over HTTP; its record once it has an outcome and, if it succeeded, its workers alone serve.

        "succeeded" is recorded when the new generation accepts; the old one stops accepting a
        moment later (it is sent SIGTERM and drains), so wait until only the new one is left.
        """
        record = self.wait_reload(self.trigger_reload(), timeout=timeout)
        if record["outcome"] == "succeeded":

            def settled() -> bool:
                status = self.status()
                return status["reload_state"] == "idle" and all(
                    w["generation"] == record["generation"] for w in status["workers"]
                )

            wait_until(settled, timeout=30.0, interval=0.1)
        return record


def launch(
    command: list[str],
    *,
    log: Path,
    port: int,
    cwd: Path,
    env: dict[str, str],
    host: str = "127.0.0.1",
    stdin: int = subprocess.DEVNULL,
) -> Service:
    """Start a server process in a session of its own (so that its whole group can be stopped), output to `log`.

    `command` may contain "{port}", replaced by `port`. `stdin`: a descriptor to read from (a terminal's).
    """
    with log.open("wb") as output:
        proc = subprocess.Popen(
            [part.replace("{port}", str(port)) for part in command],
            cwd=cwd,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            stdin=stdin,
            start_new_session=True,
        )
    return Service(proc, port, log, host)


@contextlib.contextmanager
def serving(command: list[str], directory: Path, env: dict[str, str], timeout: float = 30.0) -> Iterator[Service]:
    """A server for a module-scoped fixture: started in `directory` on a free port, ready, stopped by PID after."""
    service = launch(command, log=directory / "server.log", port=free_port(), cwd=directory, env=env)
    try:
        service.wait_ready(timeout)
        yield service
    finally:
        service.stop()


class StartService(Protocol):
    """The `start_service` fixture."""

    def __call__(
        self,
        command: list[str],
        *,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
        wait: bool = True,
        ready_path: str = "/health",
        timeout: float = 30.0,
        port: int | None = None,
    ) -> Service: ...


@pytest.fixture
def start_service(tmp_path: Path) -> Iterator[StartService]:
    """Start a server command with a free port; every one started is stopped after the test.

    `command` may contain "{port}", replaced by the chosen port. Output goes to a log
    file in tmp_path (read it with `service.output()`).
    """
    started: list[Service] = []

    def start(
        command: list[str],
        *,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
        wait: bool = True,
        ready_path: str = "/health",
        timeout: float = 30.0,
        port: int | None = None,
    ) -> Service:
        service = launch(
            command,
            log=tmp_path / f"server-{len(started)}.log",
            port=port or free_port(),
            cwd=cwd or tmp_path,
            env=env or base_env(),
        )
        started.append(service)
        if wait:
            service.wait_ready(timeout, ready_path)
        return service

    yield start
    for service in started:
        service.stop()


def serve_pypnm(start_service: StartService, *flags: str, **env: str) -> Service:
    """`pypnm --port {port} FLAGS` with the test's environment plus `env`."""
    return start_service(pypnm_command("--port", "{port}", *flags), env=base_env(**env))


def serve_marker(
    start_service: StartService,
    app_dir: Path,
    *flags: str,
    workers: int = 1,
    graceful_timeout: float | None = 10,
    **env: str,
) -> Service:
    """`pypnm --app markerpkg.main:app` from a copy of the marker app; reloads may follow each other at once."""
    env.setdefault("PYPNM_RELOAD_MIN_INTERVAL", "0")
    graceful = ["--graceful-timeout", f"{graceful_timeout:g}"] if graceful_timeout is not None else []
    return start_service(
        pypnm_command("--app", MARKER_APP, "--port", "{port}", "--workers", str(workers), *graceful, *flags),
        cwd=app_dir,
        env=base_env(**env),
    )


def supervisor_status(service: Service) -> dict[str, Any]:
    """The master's status, through whichever app is served (markerpkg relays it at /supervisor)."""
    response = service.get(SUPERVISOR_PATH)
    if response.status_code == 404:
        return service.status()
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def worker_pids(service: Service) -> set[int]:
    """The pids of the workers that serve now."""
    status = supervisor_status(service)
    return {w["pid"] for w in status["workers"] if w["state"] == "serving"}


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of a /metrics text; AssertionError when it is not there."""
    wanted = ",".join(f'{key}="{value}"' for key, value in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{wanted}}} "):
            return float(line.split()[-1])
    raise AssertionError(f"{name}{{{wanted}}} not in /metrics")


def reload_by_sighup(service: Service, generation_before: int, timeout: float = 30.0) -> dict[str, Any]:
    """SIGHUP the master; the status once the reload after `generation_before` has an outcome."""
    service.signal(signal.SIGHUP)
    return reload_finished(service, generation_before, timeout)


def reload_finished(service: Service, generation_before: int, timeout: float = 30.0) -> dict[str, Any]:
    """The status once a reload after `generation_before` has an outcome."""

    def finished() -> dict[str, Any] | None:
        status = supervisor_status(service)
        last = status["last_reload"]
        return status if last and last["generation"] > generation_before and last["outcome"] else None

    status: dict[str, Any] = wait_until(finished, timeout=timeout)
    return status


def audit_line(service: Service, request_id: str) -> str:
    """The single audit line of one request (waits for it to be written)."""

    def find() -> list[str]:
        return [
            line
            for line in service.output().splitlines()
            if " pypnm.audit: " in line and f" request_id={request_id} " in line
        ]

    found: list[str] = wait_until(find, timeout=10.0)
    assert len(found) == 1, found
    return found[0]


def client_from(address: str, **kwargs: Any) -> httpx.Client:
    """An HTTP client whose connections leave from `address` (a loopback address)."""
    return httpx.Client(transport=httpx.HTTPTransport(local_address=address), timeout=10.0, **kwargs)


def asgi_request(
    app: Any,
    method: str,
    path: str,
    *,
    peer: str = "127.0.0.1",
    base_url: str = "http://127.0.0.1:8000",
    headers: Mapping[str, str] | Mapping[bytes, bytes] | None = None,
    params: Mapping[str, str] | None = None,
    json: Any = None,
) -> httpx.Response:
    """One request through an ASGI app in-process, from any client address (`peer`); scope["server"] is base_url's.

    Header values that are not ASCII (any latin-1 byte a server accepts) go as bytes, names and all.
    """

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, client=(peer, 50000))
        async with httpx.AsyncClient(transport=transport, base_url=base_url) as client:
            return await client.request(method, path, params=params, headers=headers, json=json)

    return asyncio.run(go())


# ----- raw HTTP over a socket ------------------------------------------------------------------


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    """The status and the headers (names lower-cased) of a response head, without its blank line."""
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    return int(status_line.split(" ", 2)[1]), headers


def read_until_closed(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Everything the server sends until it closes the connection; fails if it is still open after `timeout`."""
    deadline = time.monotonic() + timeout
    data = bytearray()
    for _ in range(10_000):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        if not chunk:
            return bytes(data)
        data += chunk
    raise AssertionError(f"the server did not close the connection within {timeout}s; got {bytes(data)!r}")


def raw_http(port: int, request_line: bytes, header_lines: list[bytes]) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request written byte for byte to 127.0.0.1 (any header, any byte): status, headers, body."""
    request = b"".join(
        [request_line, b"\r\n", *(line + b"\r\n" for line in header_lines), b"Connection: close\r\n\r\n"]
    )
    with socket.create_connection(("127.0.0.1", port), timeout=10.0) as sock:
        sock.sendall(request)
        head, _, body = read_until_closed(sock).partition(b"\r\n\r\n")
    status, headers = parse_head(head)
    return status, headers, body


# ----- TLS: certificates, a loopback-only guard, a recording server ----------------------------


@dataclass
class Certificate:
    cert: Path
    key: Path


def make_certificate(
    directory: Path,
    *,
    ip: str | None = None,
    dns_name: str | None = None,
    not_before: datetime.timedelta = datetime.timedelta(minutes=-5),
    not_after: datetime.timedelta = datetime.timedelta(days=1),
) -> Certificate:
    """A self-signed server certificate for an address or a name (its only SAN), valid for a day.

    `not_before` and `not_after` are its validity, relative to now (negative: in the past).
    """
    if (ip is None) == (dns_name is None):
        raise ValueError("a certificate for an ip or a dns_name")
    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"pypnm test {ip or dns_name}")])
    san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(ip)) if ip else x509.DNSName(str(dns_name))
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + not_before)
        .not_valid_after(now + not_after)
        .add_extension(x509.SubjectAlternativeName([san]), critical=False)
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
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return Certificate(cert_file, key_file)


_GUARD = '''"""Loaded by every Python process of a test that names hosts: nothing may connect or look up beyond
loopback, and the test's own names (NAMES) resolve to the loopback addresses it gave them."""
import io
import ipaddress
import json
import logging
import socket

PYPNM_TEST_GUARD = True
NAMES = json.loads(%r)
_connect, _connect_ex, _getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo


def _loopback(host):
    if host in (None, "localhost"):
        return True
    try:
        return ipaddress.ip_address(str(host).split("%%")[0]).is_loopback
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


def getaddrinfo(host, port, *args, **kwargs):
    name = host.decode() if isinstance(host, bytes) else host
    if name in NAMES:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, int(port))) for address in NAMES[name]]
    if not _loopback(name):
        raise socket.gaierror(socket.EAI_NONAME, f"test guard: blocked a name look-up of {host}")
    return _getaddrinfo(host, port, *args, **kwargs)


socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = connect, connect_ex, getaddrinfo
'''


def guarded_environment(directory: Path, names: dict[str, list[str]] | None = None) -> Callable[..., dict[str, str]]:
    """Environments for processes that must not reach beyond loopback: a `sitecustomize` guard on their PYTHONPATH.

    Returns `env(**extra)`. The guard is checked to load before any test uses it.
    """
    (directory / "sitecustomize.py").write_text(_GUARD % json.dumps(names or {}))

    def env(**extra: str) -> dict[str, str]:
        return base_env(PYTHONPATH=str(directory), **extra)

    loaded = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; sys.exit(0 if getattr(sys.modules.get('sitecustomize'), 'PYPNM_TEST_GUARD', 0) else 1)",
        ],
        env=env(),
        timeout=30,
    )
    assert loaded.returncode == 0, "the guard is not loaded at start-up: refusing to run tests that name remote hosts"
    return env


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
            self._answer(
                200,
                {
                    "pid": 1,
                    "started_at": "2026-01-01T00:00:00Z",
                    "version": "0.1.0",
                    "code_version": "0123456789abcdef",
                    "mode": "unsupervised",
                },
            )
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


# ----- copies of the code under test (the reload and supervisor tests edit them) -----------------

APPS = Path(__file__).resolve().parent / "apps"
_IGNORE_BUILD = shutil.ignore_patterns("__pycache__", "*.pyc")


def copy_package(source: Path, parent: Path) -> Path:
    """Copy a package directory (no bytecode) into `parent`; returns the copy."""
    parent.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copytree(source, parent / source.name, ignore=_IGNORE_BUILD))


def project_copy(root: Path) -> Path:
    """What building pypnm needs (pyproject.toml, README.md, src/pypnm) copied into `root`; returns `root`."""
    copy_package(SRC / "pypnm", root / "src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, root / name)
    return root


@pytest.fixture
def pypnm_copy(tmp_path: Path) -> Path:
    """A private copy of `src/pypnm`: returns the directory to put on PYTHONPATH (it holds `pypnm/`).

    Tests edit and touch the copy, never the repository's files.
    """
    root = tmp_path / "pypnm-copy"
    copy_package(SRC / "pypnm", root)
    return root


@pytest.fixture
def marker_app(tmp_path: Path) -> Path:
    """A copy of `tests/apps/markerpkg` in its own directory: run `--app markerpkg.main:app` from it."""
    root = tmp_path / "marker-app"
    copy_package(APPS / "markerpkg", root)
    return root


def write_app_package(directory: Path, name: str, main: str) -> Path:
    """A package `name` in `directory` whose `main.py` holds `main` (an app a test serves); returns main.py."""
    package = directory / name
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "main.py").write_text(main)
    return (package / "main.py").resolve()


def module_from_source(name: str, source: str) -> types.ModuleType:
    """A module `name` run from `source` and put in sys.modules, as if imported from a file (the test removes it)."""
    module = types.ModuleType(name)
    sys.modules[name] = module
    exec(source, module.__dict__)
    return module


def rewrite(path: Path, old: str, new: str) -> None:
    """Replace `old` (which must be there) with `new` in a file; bumps the mtime forward."""
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    before = path.stat().st_mtime_ns
    path.write_text(text.replace(old, new, 1))
    if path.stat().st_mtime_ns <= before:  # coarse clocks: make the change visible to mtime checks
        os.utime(path, ns=(before + 1_000_000, before + 1_000_000))


def set_marker(app_dir: Path, marker: str) -> None:
    path = app_dir / "markerpkg" / "marker.py"
    text = path.read_text()
    start = text.index('MARKER = "')
    end = text.index('"', start + len('MARKER = "'))
    path.write_text(text[:start] + f'MARKER = "{marker}"' + text[end + 1 :])


def serve_held_import(start_service: StartService, directory: Path, **env: str) -> Service:
    """SLOW_IMPORT_APP with one worker, from `directory`, whose next import `hold_next_import` holds up."""
    write_app_package(directory / "app", "slowapp", SLOW_IMPORT_APP)
    command = pypnm_command("--app", "slowapp.main:app", "--port", "{port}", "--workers", "1")
    env = base_env(PYPNM_RELOAD_MIN_INTERVAL="0", SLOW_DIR=str(directory), **env)
    return start_service(command, cwd=directory / "app", env=env)


def hold_next_import(service: Service, directory: Path) -> int:
    """SIGHUP; the pid of that reload's zygote once it waits inside the app's import (file `go` lets it go on)."""
    (directory / "slow").touch()
    service.signal(signal.SIGHUP)
    importing = directory / "importing"
    return int(wait_until(lambda: importing.exists() and importing.read_text()))


# ----- logging set up inside the test process ------------------------------------------------------


@pytest.fixture
def restore_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    """Let a test call pypnm.logs.setup_logging in this process, writing what goes to stderr into the
    yielded buffer; the test run's own logging set-up (root and uvicorn loggers, the SIGUSR1 handler)
    is put back afterwards."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    names = ("uvicorn", "uvicorn.error", "uvicorn.access")
    saved_loggers = {name: (logging.getLogger(name).handlers[:], logging.getLogger(name).propagate) for name in names}
    saved_usr1 = signal.getsignal(signal.SIGUSR1)
    monkeypatch.setenv("PYPNM_SUPERVISOR_LOG", "")  # no master's choice here; and put back afterwards
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    try:
        yield stream
    finally:
        for handler in root.handlers:
            if handler not in saved[0]:
                handler.close()
        root.handlers[:], level = saved
        root.setLevel(level)
        for name, (handlers, propagate) in saved_loggers.items():
            logging.getLogger(name).handlers[:] = handlers
            logging.getLogger(name).propagate = propagate
        signal.signal(signal.SIGUSR1, saved_usr1)


# ----- systemd's end of NOTIFY_SOCKET -----------------------------------------------------------

Message = dict[str, str]


class NotifySocket:
    """The test's end of NOTIFY_SOCKET: one parsed datagram (`KEY=VALUE` lines) at a time, and who sent it.

    The sender's pid comes from SO_PASSCRED, as systemd sees it (NotifyAccess=main checks it).
    """

    def __init__(self, address: str) -> None:
        self.env = address  # as NOTIFY_SOCKET says it
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.seen: list[Message] = []

    def next(self, timeout: float = 20.0, watchdog: bool = False) -> Message:
        """The next datagram (WATCHDOG=1 pings skipped unless `watchdog`); fails after `timeout`."""
        return self.next_from(timeout, watchdog)[1]

    def next_from(self, timeout: float = 20.0, watchdog: bool = False) -> tuple[int, Message]:
        """`next`, with the pid of the process that sent it."""
        deadline = time.monotonic() + timeout
        for _ in range(100_000):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self.sock.settimeout(left)
            try:
                sender, message = self._receive()
            except TimeoutError:
                break
            if watchdog or message != {"WATCHDOG": "1"}:
                return sender, message
        raise AssertionError(f"no notification within {timeout}s; seen so far: {self.seen}")

    def pending(self) -> list[Message]:
        """Whatever has arrived and was not read yet, without waiting."""
        messages: list[Message] = []
        self.sock.setblocking(False)
        try:
            for _ in range(100_000):
                try:
                    messages.append(self._receive()[1])
                except BlockingIOError:
                    break
        finally:
            self.sock.setblocking(True)
        return messages

    def _receive(self) -> tuple[int, Message]:
        size = struct.calcsize("3i")  # struct ucred: pid, uid, gid
        data, ancillary, _, _ = self.sock.recvmsg(65536, socket.CMSG_SPACE(size))
        sender = next(
            struct.unpack("3i", cdata[:size])[0]
            for level, kind, cdata in ancillary
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS
        )
        message = dict(line.split("=", 1) for line in data.decode().split("\n"))
        self.seen.append(message)
        return sender, message

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    listener = NotifySocket(str(tmp_path / "notify.sock"))
    yield listener
    listener.close()


@pytest.fixture
def abstract_notify_socket() -> Iterator[NotifySocket]:
    listener = NotifySocket(f"@pypnm-test-{uuid.uuid4().hex}")
    yield listener
    listener.close()


# ----- installs of pypnm: wheels of a given version, a virtual environment --------------------------


def pip(python: Path, *args: str) -> None:
    """pip of the test environment, run by `python`, so it installs into `python`'s environment; offline."""
    env = base_env(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [str(python), "-m", "pip", *args, "--no-index", "--no-deps", "--no-build-isolation", "-q"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, f"pip {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"


def versioned_copy(parent: Path, version: str) -> Path:
    """The project (pyproject, README, src/pypnm) with `__version__ = version`."""
    root = project_copy(parent / f"pypnm-{version}")
    init = root / "src" / "pypnm" / "__init__.py"
    text = init.read_text()
    assert '__version__ = "' in text
    start = text.index('__version__ = "')
    end = text.index('"', start + len('__version__ = "'))
    init.write_text(text[:start] + f'__version__ = "{version}"' + text[end + 1 :])
    return root


def build_wheel(parent: Path, version: str) -> Path:
    """A wheel of the project at `version`, built by hatchling (the [test] extra) in this environment."""
    source = versioned_copy(parent / "sources", version)
    pip(Path(sys.executable), "wheel", "-w", str(parent / "wheels"), str(source))
    (wheel,) = (parent / "wheels").glob(f"pypnm-{version}-*.whl")
    return wheel


def make_venv(root: Path) -> tuple[Path, Path]:
    """A venv that sees the test environment's packages (after its own); returns (python, site-packages)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=60)
    python = root / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout.strip()
    )
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    # Processed after the venv's own `.pth` files (names sort after '_'), so an editable install comes first.
    (site / "zz-test-environment.pth").write_text("".join(f"{path}\n" for path in sorted(ours)))
    return python, site


# ----- systemd's socket activation: a socket passed as fd 3 ------------------------------------------

WRAPPER = (
    "import json, os, sys\n"
    "os.dup2(int(sys.argv[1]), 3)\n"
    "os.environ.update(json.loads(sys.argv[2]), LISTEN_PID=str(os.getpid()))\n"
    "os.environ.setdefault('WATCHDOG_PID', os.environ['LISTEN_PID'])\n"
    "os.execv(sys.executable, [sys.executable, '-m', 'pypnm', *sys.argv[3:]])\n"
)


def activation_command(fd: int, env: dict[str, str], *args: str) -> list[str]:
    return [sys.executable, "-c", WRAPPER, str(fd), json.dumps(env), *args]


def listening_inodes(pid: int) -> dict[int, int]:
    """Listening TCP sockets the process holds: inode -> local port (/proc/net/tcp and tcp6)."""
    held = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                held.add(int(target[8:-1]))
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[9]) in held:  # 0A: LISTEN
                    found[int(fields[9])] = int(fields[1].rsplit(":", 1)[1], 16)
    return found
