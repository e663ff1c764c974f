"""TLS certificates checked and reloadable, and the worker count changed by a reload (issue 12.2, 12.3).

The served certificate is read the way a client sees it: a TLS handshake with 127.0.0.1 and the
peer's certificate (DER) compared with the file's. Certificates come from `make_certificate`
(conftest.py) with the validity each test needs. The pair check itself (`check_pair`) is also
run in-process for the problems a served test would only repeat.
"""

from __future__ import annotations

import datetime
import os
import signal
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from conftest import (
    SLOW_IMPORT_APP,
    Certificate,
    Service,
    StartService,
    assert_one_line_error,
    base_env,
    make_certificate,
    pypnm_command,
    reload_by_sighup,
    run_cli,
    serve_pypnm,
    supervisor_status,
    wait_until,
    write_app_package,
)
from pypnm.supervisor.tls import TLSError, check_pair

DAY = datetime.timedelta(days=1)


def certificate(directory: Path, *, days: float = 90, starts: float = -1) -> Certificate:
    """A certificate for 127.0.0.1, valid from `starts` days from now until `days` days from now."""
    return make_certificate(directory, ip="127.0.0.1", not_before=starts * DAY, not_after=days * DAY)


def served_certificate(port: int) -> bytes:
    """The DER certificate a new TLS client gets from 127.0.0.1:port."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the test compares the certificate itself, whichever it is
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def der_of(cert: Certificate) -> bytes:
    return der_of_file(cert.cert)


def der_of_file(path: Path) -> bytes:
    return x509.load_pem_x509_certificate(path.read_bytes()).public_bytes(serialization.Encoding.DER)


def settings_text(cert: Certificate, key: Path | None = None) -> str:
    return f'ssl = true\nssl_certfile = "{cert.cert}"\nssl_keyfile = "{key or cert.key}"\n'


def worker_count(service: Service) -> int:
    status = service.status()
    return sum(1 for w in status["workers"] if w["generation"] == status["generation"])


@pytest.fixture
def tls_service(tmp_path: Path, start_service: StartService) -> Callable[..., tuple[Service, Path]]:
    """pypnm serving HTTPS with the pair named in its settings file; returns the service and the file.

    `watch=True` leaves `watch_config` on (the default); the tests turn it off unless they watch.
    """

    def start(cert: Certificate, watch: bool = False) -> tuple[Service, Path]:
        config = tmp_path / "pypnm.toml"
        config.write_text(settings_text(cert))
        env = base_env(PYPNM_RELOAD_MIN_INTERVAL="0", PYPNM_WATCH_CONFIG=str(watch).lower())
        service = start_service(
            pypnm_command("--config", str(config), "--port", "{port}", "--graceful-timeout", "5"), env=env, wait=False
        )
        service.base_url = f"https://127.0.0.1:{service.port}"
        service.verify = False  # the certificate changes under the test; served_certificate says which one
        service.wait_ready()
        return service, config

    return start


# ----- served: reloads -------------------------------------------------------------------------


def test_new_certificate_paths_are_served_after_a_reload(
    tmp_path: Path, tls_service: Callable[..., tuple[Service, Path]]
) -> None:
    first, second = certificate(tmp_path / "first"), certificate(tmp_path / "second")
    service, config = tls_service(first)
    assert served_certificate(service.port) == der_of(first)

    config.write_text(settings_text(second))
    record = service.reload_and_settle()
    assert record["outcome"] == "succeeded", record
    assert record["warnings"] == []
    assert served_certificate(service.port) == der_of(second)


def test_switching_ssl_by_a_reload_warns_that_the_old_scheme_now_fails(
    tmp_path: Path, tls_service: Callable[..., tuple[Service, Path]]
) -> None:
    """The switch applies in place; whoever still speaks the old scheme (a Kubernetes probe) now fails."""
    service, config = tls_service(certificate(tmp_path / "cert"))
    config.write_text("ssl = false\n")
    reload_id = service.trigger_reload()
    service.base_url, service.verify = f"http://127.0.0.1:{service.port}", True  # plain HTTP once it swapped
    record = wait_until(lambda: service.reload_record(reload_id), timeout=60)
    assert record["outcome"] == "succeeded", record
    assert record["warnings"] == [
        "setting 'ssl' changed (True -> False): the service now answers http:// only; clients and health checks "
        "that used https:// now fail (a Kubernetes probe needs scheme: HTTP); change them too, or set ssl back "
        "and reload"
    ], record


def test_a_renewed_certificate_is_served_without_a_reload_by_hand(
    tmp_path: Path, tls_service: Callable[..., tuple[Service, Path]]
) -> None:
    """certbot or cert-manager renews the pair in place: the watch reloads, new connections get the new one."""
    first, renewed = certificate(tmp_path / "first"), certificate(tmp_path / "renewed", days=180)
    service, config = tls_service(first, watch=True)
    assert served_certificate(service.port) == der_of(first)
    generation = service.status()["generation"]
    watched = service.status()["master"]["watching_config"]
    assert watched == [str(config), str(first.cert), str(first.key)], watched

    # A new pair under the same names, swapped in by renames (as certbot's and the kubelet's updates are).
    for source, target in ((renewed.key, first.key), (renewed.cert, first.cert)):
        os.replace(source, target)
    wait_until(lambda: served_certificate(service.port) == der_of_file(first.cert), timeout=30)
    record = service.status()["last_reload"]
    assert record["generation"] > generation and record["outcome"] == "succeeded", record
    assert record["source"].startswith("file change: ") and str(first.cert) in record["source"], record


def test_a_pair_renewed_while_the_first_generation_imports_is_served(
    tmp_path: Path, start_service: StartService
) -> None:
    """The watch compares with the pair the start copied, not with what it finds once the first generation serves."""
    first, renewed = certificate(tmp_path / "first"), certificate(tmp_path / "renewed", days=180)
    write_app_package(tmp_path / "app", "slowapp", SLOW_IMPORT_APP)
    config = tmp_path / "pypnm.toml"
    config.write_text(settings_text(first))
    (tmp_path / "slow").touch()  # the first import waits for `go`
    env = base_env(PYPNM_RELOAD_MIN_INTERVAL="0", SLOW_DIR=str(tmp_path))
    command = pypnm_command("--app", "slowapp.main:app", "--config", str(config), "--port", "{port}", "--workers", "1")
    service = start_service(command, cwd=tmp_path / "app", env=env, wait=False)
    wait_until(lambda: (tmp_path / "importing").exists(), timeout=30)
    for source, target in ((renewed.key, first.key), (renewed.cert, first.cert)):  # certbot, meanwhile
        os.replace(source, target)
    (tmp_path / "slow").unlink()  # the reload's import does not wait
    (tmp_path / "go").touch()
    service.base_url, service.verify = f"https://127.0.0.1:{service.port}", False
    service.wait_ready()
    wait_until(lambda: served_certificate(service.port) == der_of_file(first.cert), timeout=30)
    assert supervisor_status(service)["last_reload"]["source"].startswith("file change: ")


def test_a_reload_by_hand_that_served_a_renewal_is_not_followed_by_a_second_one(
    tmp_path: Path, start_service: StartService
) -> None:
    """The watch compares the TLS pair with the copy the last reload serves, not with what it read before that."""
    # The pair is reached through a directory symlink outside the watched directories, so that the
    # switch below sends no event: the watch sees it only at its next comparison, after the reload.
    store = tmp_path / "store"
    first, renewed = certificate(store / "v1"), certificate(store / "v2", days=180)
    (store / "current").symlink_to("v1")
    live = tmp_path / "live"
    live.mkdir()
    for name in ("cert.pem", "key.pem"):
        (live / name).symlink_to(Path("..") / "store" / "current" / name)
    etc = tmp_path / "etc"  # away from the service's log, which the test's directory holds
    etc.mkdir()
    config = etc / "pypnm.toml"
    config.write_text(settings_text(Certificate(live / "cert.pem", live / "key.pem")) + "watch_config = true\n")
    command = pypnm_command("--config", str(config), "--port", "{port}", "--workers", "1")
    service = start_service(command, env=base_env(PYPNM_RELOAD_MIN_INTERVAL="0"), wait=False)
    service.base_url, service.verify = f"https://127.0.0.1:{service.port}", False
    service.wait_ready()
    wait_until(lambda: "watching the content of" in service.output(), timeout=30)
    assert served_certificate(service.port) == der_of(first)

    # An event naming the certificate makes the watch compare now, and not again for 5 s.
    os.utime(live / "cert.pem", follow_symlinks=False)
    time.sleep(0.5)
    (store / "next").symlink_to("v2")
    os.replace(store / "next", store / "current")  # the renewal, and at once a reload by hand
    status = reload_by_sighup(service, 1)
    assert status["last_reload"]["source"] == "SIGHUP" and status["last_reload"]["outcome"] == "succeeded"
    assert served_certificate(service.port) == der_of(renewed)

    # The next comparison: the watch now follows the file in v2 and says so once it has compared.
    after = len(service.output())
    os.utime(live / "cert.pem", follow_symlinks=False)
    wait_until(lambda: str(store / "v2") in service.output()[after:], timeout=15)
    time.sleep(1)
    assert "reload requested by file change" not in service.output()[after:], service.output()[after:]
    assert supervisor_status(service)["generation"] == 2


def test_a_tls_handshake_is_held_to_the_request_head_timeout(tmp_path: Path, start_service: StartService) -> None:
    """A connection that never completes its handshake is closed after timeout_request_header (asyncio: 60 s)."""
    config = tmp_path / "pypnm.toml"
    config.write_text(settings_text(certificate(tmp_path / "cert")))
    command = pypnm_command("--config", str(config), "--port", "{port}", "--workers", "1")
    service = start_service(command, env=base_env(PYPNM_TIMEOUT_REQUEST_HEADER="1"), wait=False)
    service.base_url, service.verify = f"https://127.0.0.1:{service.port}", False
    service.wait_ready()
    with socket.create_connection(("127.0.0.1", service.port), timeout=30) as silent:
        began = time.monotonic()
        try:
            data = silent.recv(1024)  # nothing sent: no ClientHello
        except ConnectionResetError:
            data = b""
        waited = time.monotonic() - began
    assert data == b"" and waited < 10, (data, waited)
    assert service.get("/health").status_code == 200


def test_bad_pairs_fail_the_reload_and_the_old_certificate_keeps_serving(
    tmp_path: Path, tls_service: Callable[..., tuple[Service, Path]]
) -> None:
    good = certificate(tmp_path / "good")
    expired = certificate(tmp_path / "expired", starts=-30, days=-1)
    other = certificate(tmp_path / "other")
    service, config = tls_service(good)

    config.write_text(settings_text(expired))
    record = service.reload_and_settle()
    assert record["outcome"] == "failed", record
    assert f"ssl_certfile {str(expired.cert)!r} has expired" in record["reason"]
    assert served_certificate(service.port) == der_of(good)

    config.write_text(settings_text(good, key=other.key))  # the key of another certificate
    record = service.reload_and_settle()
    assert record["outcome"] == "failed", record
    assert f"ssl_keyfile {str(other.key)!r} does not match ssl_certfile {str(good.cert)!r}" in record["reason"]
    assert served_certificate(service.port) == der_of(good)
    assert service.status()["generation"] == 1  # nothing was swapped in
    assert f"reload {record['id']} failed: generation 3 discarded, generation 1 keeps serving" in service.output()


def test_a_certificate_expiring_within_14_days_is_served_with_a_warning(
    tmp_path: Path, tls_service: Callable[..., tuple[Service, Path]]
) -> None:
    service, config = tls_service(certificate(tmp_path / "first"))
    soon = certificate(tmp_path / "soon", days=5)
    config.write_text(settings_text(soon))
    record = service.reload_and_settle()
    assert record["outcome"] == "succeeded", record
    [warning] = record["warnings"]
    assert warning.startswith(f"ssl_certfile {str(soon.cert)!r} expires in 5.0 days"), warning
    assert f"reload {record['id']}: {warning}" in service.output()
    assert served_certificate(service.port) == der_of(soon)


def test_a_respawned_worker_serves_the_pair_its_generation_checked(
    tmp_path: Path, tls_service: Callable[..., tuple[Service, Path]]
) -> None:
    first = certificate(tmp_path / "first")
    served = der_of(first)
    service, _ = tls_service(first)
    [worker] = service.status()["workers"]

    # Another pair copied over the same paths, and no reload: the worker that replaces a dead one
    # serves its generation's frozen copy, not the files.
    other = certificate(tmp_path / "other")
    first.cert.write_bytes(other.cert.read_bytes())
    first.key.write_bytes(other.key.read_bytes())
    os.kill(worker["pid"], signal.SIGKILL)

    def respawned() -> bool:
        workers = service.status()["workers"]
        return bool(workers) and all(w["pid"] != worker["pid"] for w in workers)

    wait_until(respawned, timeout=30.0, interval=0.1)
    assert served_certificate(service.port) == served

    record = service.reload_and_settle()  # a reload reads the files again
    assert record["outcome"] == "succeeded", record
    assert served_certificate(service.port) == der_of(other)


def test_an_expired_certificate_stops_the_start(tmp_path: Path, start_service: StartService) -> None:
    expired = certificate(tmp_path / "expired", starts=-30, days=-1)
    config = tmp_path / "pypnm.toml"
    config.write_text(settings_text(expired))
    service = start_service(pypnm_command("--config", str(config), "--port", "{port}"), wait=False)
    assert service.proc.wait(timeout=60) == 1
    assert f"cannot start: ssl_certfile {str(expired.cert)!r} has expired" in service.output()


def test_check_makes_the_certificate_check_of_a_reload(tmp_path: Path) -> None:
    expired = certificate(tmp_path / "expired", starts=-30, days=-1)
    config = tmp_path / "pypnm.toml"
    config.write_text(settings_text(expired))
    result = run_cli("check", "--config", str(config), cwd=tmp_path, timeout=60)
    assert_one_line_error(result, 1, "check failed: ssl_certfile", str(expired.cert), "has expired")

    config.write_text(settings_text(certificate(tmp_path / "soon", days=5)))
    result = run_cli("check", "--config", str(config), cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "pypnm: warning: ssl_certfile" in result.stderr and "expires in" in result.stderr


# ----- served: the worker count ----------------------------------------------------------------


def test_the_worker_count_follows_the_settings_file_on_reload(tmp_path: Path, start_service: StartService) -> None:
    config = tmp_path / "pypnm.toml"
    config.write_text("workers = 1\n")
    service = serve_pypnm(
        start_service, "--config", str(config), PYPNM_RELOAD_MIN_INTERVAL="0", PYPNM_WATCH_CONFIG="false"
    )
    assert worker_count(service) == 1
    for workers in (3, 1):
        config.write_text(f"workers = {workers}\n")
        record = service.reload_and_settle()
        assert record["outcome"] == "succeeded", record
        assert record["warnings"] == []
        assert worker_count(service) == workers


def test_the_workers_flag_outranks_the_settings_file(tmp_path: Path, start_service: StartService) -> None:
    config = tmp_path / "pypnm.toml"
    config.write_text("workers = 3\n")
    service = serve_pypnm(
        start_service,
        "--config",
        str(config),
        "--workers",
        "2",
        PYPNM_RELOAD_MIN_INTERVAL="0",
        PYPNM_WATCH_CONFIG="false",
    )
    assert worker_count(service) == 2
    config.write_text("workers = 1\n")
    assert service.reload_and_settle()["outcome"] == "succeeded"
    assert worker_count(service) == 2


# ----- the check, in-process -------------------------------------------------------------------


def check(cert: Certificate, key: Path | None = None) -> list[str]:
    return check_pair(cert.cert, key or cert.key, shown_cert="CERT", shown_key="KEY")


def test_check_pair_accepts_a_good_pair_and_warns_before_expiry(tmp_path: Path) -> None:
    assert check(certificate(tmp_path / "good")) == []
    [warning] = check(certificate(tmp_path / "soon", days=13.9))
    assert warning.startswith("ssl_certfile 'CERT' expires in 13.9 days")


@pytest.mark.parametrize(
    ("starts", "days", "problem"),
    [(-30, -1, "has expired: valid until "), (1, 30, "is not valid yet: valid from ")],
)
def test_check_pair_refuses_a_certificate_not_valid_now(
    tmp_path: Path, starts: float, days: float, problem: str
) -> None:
    with pytest.raises(TLSError, match=f"^ssl_certfile 'CERT' {problem}"):
        check(certificate(tmp_path, starts=starts, days=days))


def test_check_pair_checks_every_certificate_of_a_chain(tmp_path: Path) -> None:
    leaf = certificate(tmp_path / "leaf")
    expired = certificate(tmp_path / "expired", starts=-30, days=-1)
    leaf.cert.write_bytes(leaf.cert.read_bytes() + expired.cert.read_bytes())
    with pytest.raises(TLSError, match=r"^ssl_certfile 'CERT' \(certificate 2 in the file\) has expired"):
        check(leaf)


def test_check_pair_names_the_file_and_the_problem(tmp_path: Path) -> None:
    good = certificate(tmp_path / "good")
    with pytest.raises(TLSError, match=r"^ssl_certfile 'CERT': cannot read it"):
        check(Certificate(tmp_path / "missing.pem", good.key))
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    with pytest.raises(TLSError, match=r"^ssl_certfile 'CERT': not a PEM certificate"):
        check(Certificate(tmp_path / "junk.pem", good.key))
    with pytest.raises(TLSError, match=r"^ssl_keyfile 'KEY': cannot read it"):
        check(good, tmp_path / "missing.key")
    with pytest.raises(TLSError, match=r"^ssl_keyfile 'KEY' does not match ssl_certfile 'CERT'"):
        check(good, certificate(tmp_path / "other").key)

    encrypted = tmp_path / "encrypted.key"
    key = serialization.load_pem_private_key(good.key.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(TLSError, match=r"^ssl_keyfile 'KEY': the key is encrypted"):
        check(good, encrypted)
