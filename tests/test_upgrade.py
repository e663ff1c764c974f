"""Self-upgrade (issue 12.1): a new master in a fresh interpreter takes the listening sockets over.

Real processes on loopback. The new master runs in a session of its own, outside the group the
`start_service` fixture stops, so every test stops the masters it made by pid (`Masters`), and
checks that nothing of either master is left.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import (
    NotifySocket,
    Service,
    StartService,
    activation_command,
    asgi_request,
    assert_one_line_error,
    base_env,
    build_wheel,
    listening_inodes,
    make_venv,
    pid_alive,
    pip,
    process_tree,
    pypnm_command,
    rewrite,
    run_cli,
    serve_pypnm,
    wait_until,
)
from pypnm.api.app import create_app
from pypnm.identity import SUPERVISOR_ENV
from pypnm.settings import Settings
from pypnm.supervisor import protocol
from pypnm.supervisor.protocol import (
    ForwardedReload,
    HandoverComplete,
    HandoverFailed,
    HandoverOffer,
    HandoverServing,
)
from pypnm.supervisor.upgrade import PidFile

# ----- unit: the handover channel's messages and the pid file ------------------------------------


def test_every_handover_message_survives_its_encoding() -> None:
    messages: list[protocol.HandoverMessage] = [
        HandoverOffer("u1", "SIGUSR2", "2026-01-01T00:00:00.000Z", 10, "0.1.0", "127.0.0.1", 8000, activated=True),
        HandoverOffer("u2", "pypnm upgrade", "2026-01-01T00:00:00.000Z", 10, "0.1.0", "::1", 8000, generation=7),
        HandoverServing(11, "0.1.1"),
        HandoverFailed("the new master died: SyntaxError: invalid syntax"),
        HandoverComplete(),
        HandoverComplete(ForwardedReload("0123456789ab", "SIGHUP", "2026-01-01T00:00:01.000Z", coalesced=2)),
    ]
    for message in messages:
        assert protocol.decode_handover(protocol.encode_handover(message)) == message
    # An older master confirms with nothing held for the new one.
    assert protocol.decode_handover(b'{"handover": "complete", "v": 1}') == HandoverComplete()
    # An older pypnm's offer has no generation: the new master numbers its first one 1, as before.
    older = b'{"handover": "offer", "v": 1, "upgrade_id": "u3", "source": "SIGUSR2", "requested_at": "",'
    older += b' "pid": 10, "version": "0.1.0", "host": "127.0.0.1", "port": 8000}'
    assert protocol.decode_handover(older) == HandoverOffer("u3", "SIGUSR2", "", 10, "0.1.0", "127.0.0.1", 8000)


def test_a_handover_message_of_an_unknown_kind_or_version_is_refused_in_one_line() -> None:
    with pytest.raises(protocol.ProtocolError, match="handover channel: unknown message 'later'"):
        protocol.decode_handover(b'{"handover": "later", "v": 1}')
    with pytest.raises(protocol.ProtocolError, match="protocol version 99"):
        protocol.decode_handover(b'{"handover": "complete", "v": 99}')


def test_an_upgrade_request_and_its_answer_travel_the_control_channel() -> None:
    request = protocol.UpgradeRequest("http", "r1", 12.5)
    assert protocol.decode_control(protocol.encode_control(request)) == request
    answer = protocol.UpgradeAccepted("u1")
    assert protocol.decode_control(protocol.encode_control(answer)) == answer


def test_the_upgrade_endpoint_follows_the_access_rules_and_needs_a_supervisor(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SUPERVISOR_ENV, raising=False)
    app = create_app(Settings(trusted_networks=["127.0.0.1/32"]))
    refused = asgi_request(app, "GET", "/pypnm/system/webService/upgrade", peer="10.1.2.3")
    assert refused.status_code == 403
    unsupervised = asgi_request(app, "GET", "/pypnm/system/webService/upgrade", peer="127.0.0.1")
    assert unsupervised.status_code == 500
    assert "Failed to trigger upgrade: the service runs without the pypnm supervisor" in unsupervised.json()["detail"]


def test_the_pid_file_is_replaced_whole_and_removed_only_while_it_names_us(tmp_path: Path) -> None:
    first, second = tmp_path / "a.pid", tmp_path / "b.pid"
    pid_file = PidFile()
    pid_file.write(first)
    assert first.read_text() == f"{os.getpid()}\n"
    pid_file.write(second)  # a reload moved it: the old one is ours, so it goes
    assert not first.exists() and second.read_text() == f"{os.getpid()}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.pid"]  # no temporary file left
    second.write_text("1\n")  # a new master took it over
    pid_file.remove()
    assert second.read_text() == "1\n"


def test_the_pid_file_never_writes_through_a_planted_link(tmp_path: Path) -> None:
    """In a directory others may write to, a link under any name the temporary file could take is never followed."""
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    public = tmp_path / "public"
    public.mkdir()
    (public / f".pypnm.pid.{os.getpid()}.tmp").symlink_to(victim)  # the name a pid-derived temporary file had
    pid_file = PidFile()
    pid_file.write(public / "pypnm.pid")
    assert victim.read_text() == "precious\n"
    written = public / "pypnm.pid"
    assert not written.is_symlink() and written.read_text() == f"{os.getpid()}\n"
    created = tmp_path / "created"
    created.write_text("")  # as the umask makes any new file: the pid file is as readable, never writable by others
    assert stat.S_IMODE(written.stat().st_mode) == stat.S_IMODE(created.stat().st_mode) & 0o644
    assert sorted(p.name for p in public.iterdir()) == [f".pypnm.pid.{os.getpid()}.tmp", "pypnm.pid"]


# ----- real masters --------------------------------------------------------------------------------


class Masters:
    """The masters a test made (the first one and those its upgrades started), stopped by pid after it."""

    def __init__(self) -> None:
        self.pids: list[int] = []
        self.trees: set[int] = set()

    def track(self, pid: int) -> None:
        self.pids.append(pid)
        self.trees |= process_tree(pid)

    def stop(self, pid: int, timeout: float = 30.0) -> None:
        """SIGTERM to one master; wait until it and every process it had are gone."""
        tree = process_tree(pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        wait_until(lambda: not any(pid_alive(p) for p in tree), timeout=timeout, interval=0.1)

    def leftovers(self) -> list[int]:
        return sorted(p for p in self.trees if pid_alive(p))


@pytest.fixture
def masters() -> Iterator[Masters]:
    made = Masters()
    yield made
    for pid in made.pids:
        if pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while made.leftovers() and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in made.leftovers():  # the test already failed if any is left; do not leave it running
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


class Load:
    """Requests one after another from a thread, alternately on a keep-alive and on a fresh connection."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.failures: list[str] = []
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        with httpx.Client(base_url=self.base_url, timeout=10) as keep_alive:
            for i in range(200_000):  # bounded; the test stops it long before
                if self._stop.is_set():
                    return
                try:
                    fresh = i % 2 == 0  # a new connection for every other request
                    response = httpx.get(self.base_url + "/health", timeout=10) if fresh else keep_alive.get("/health")
                    if response.status_code != 200:
                        self.failures.append(f"request {i}: {response.status_code} {response.text[:200]}")
                except httpx.HTTPError as exc:
                    self.failures.append(f"request {i}: {type(exc).__name__}: {exc}")
                self.count += 1


def serve_old_master(
    start_service: StartService, pypnm_copy: Path, masters: Masters, *flags: str, graceful: str = "10", **env: str
) -> tuple[Service, int]:
    """pypnm serving `pypnm_copy`, the package a test changes for the new master; the service and its pid, tracked."""
    service = serve_pypnm(start_service, "--graceful-timeout", graceful, *flags, PYTHONPATH=str(pypnm_copy), **env)
    masters.track(service.proc.pid)
    return service, service.proc.pid


def upgrade_record(service: Service) -> dict[str, Any] | None:
    record = service.status().get("upgrade")
    return dict(record) if record else None


def wait_handed_over(service: Service, old_pid: int, pid_file: Path | None = None) -> dict[str, Any]:
    """The status once a new master serves alone: the old one has exited (and drained)."""

    def served_by_new() -> dict[str, Any] | None:
        status = service.status()
        if status["master"]["pid"] == old_pid or pid_alive(old_pid):
            return None
        if pid_file is not None and pid_file.read_text().strip() != str(status["master"]["pid"]):
            return None
        return status

    status: dict[str, Any] = wait_until(served_by_new, timeout=120, interval=0.2)
    return status


def test_sigusr2_hands_over_to_a_new_master_under_load_without_a_failed_request(
    start_service: StartService, pypnm_copy: Path, masters: Masters, tmp_path: Path
) -> None:
    pid_file = tmp_path / "run" / "pypnm.pid"
    pid_file.parent.mkdir()
    service = serve_pypnm(
        start_service,
        "--workers",
        "2",
        "--graceful-timeout",
        "10",
        "--pid-file",
        str(pid_file),
        PYTHONPATH=str(pypnm_copy),
    )
    old = service.proc.pid
    masters.track(old)
    old_tree = process_tree(old)  # the master, its fork template and its workers
    before = service.status()
    assert before["master"]["pid"] == old and before["master"]["version"] and before["upgrade"] is None
    assert pid_file.read_text() == f"{old}\n"

    with Load(service.base_url) as load:
        wait_until(lambda: load.count >= 20, timeout=20)
        service.signal(signal.SIGUSR2)
        status = wait_handed_over(service, old, pid_file)
        counted = load.count
        wait_until(lambda: load.count >= counted + 20, timeout=20)  # and it goes on serving

    assert load.failures == [], load.failures[:10]
    assert service.proc.wait(timeout=5) == 0, service.output()  # the old master exited cleanly
    new = status["master"]["pid"]
    masters.track(new)
    record = status["upgrade"]
    assert record["outcome"] == "succeeded" and record["source"] == "SIGUSR2", record
    assert record["from"] == {"pid": old, "version": before["master"]["version"]}
    assert record["to"] == {"pid": new, "version": before["master"]["version"]}
    # Generation numbers go on rising: the old master served generation 1, the new one serves 2.
    assert status["generation"] == 2 and all(w["generation"] == 2 for w in status["workers"])
    assert not [pid for pid in old_tree if pid_alive(pid)]  # the old master and all of its processes left
    output = service.output()
    assert f"upgrade {record['id']}: taking over from master pid={old} (pypnm {before['master']['version']})" in output
    assert f"upgrade {record['id']} succeeded: new master pid={new}" in output
    assert "Traceback" not in output

    masters.stop(new)
    assert not pid_file.exists()  # removed by the master it named, at its clean stop
    assert masters.leftovers() == []


def test_pypnm_upgrade_wait_serves_a_newly_installed_version(
    start_service: StartService, tmp_path: Path, masters: Masters
) -> None:
    wheels = {version: build_wheel(tmp_path, version) for version in ("0.1.1", "0.1.2")}
    python, _ = make_venv(tmp_path / "venv")
    pip(python, "install", str(wheels["0.1.1"]))
    env = base_env()
    env.pop("PYTHONPATH", None)
    service = start_service(
        [str(python), "-m", "pypnm", "--port", "{port}", "--workers", "2", "--graceful-timeout", "10"],
        env=env,
        cwd=tmp_path,
    )
    old = service.proc.pid
    masters.track(old)
    assert service.status()["master"]["version"] == "0.1.1"

    pip(python, "install", str(wheels["0.1.2"]))
    with Load(service.base_url) as load:
        result = run_cli("upgrade", "--wait", "--url", service.base_url, timeout=150)
        status = wait_handed_over(service, old)
    masters.track(status["master"]["pid"])

    assert result.returncode == 0, result.stdout + result.stderr
    new = status["master"]["pid"]
    assert f"master pid {old} (pypnm 0.1.1) -> pid {new} (pypnm 0.1.2)" in result.stdout
    assert load.failures == [], load.failures[:10]
    assert status["master"]["version"] == "0.1.2" and status["version"] == "0.1.2"  # master and workers
    assert status["upgrade"]["from"] == {"pid": old, "version": "0.1.1"}
    shown = run_cli("status", "--url", service.base_url)
    assert f"master:       pid {new} (pypnm 0.1.2)" in shown.stdout, shown.stdout
    assert "last upgrade:" in shown.stdout and "succeeded" in shown.stdout

    masters.stop(new)
    assert masters.leftovers() == []


def test_a_broken_install_fails_the_upgrade_and_the_old_master_serves_on(
    start_service: StartService, pypnm_copy: Path, masters: Masters
) -> None:
    service, old = serve_old_master(start_service, pypnm_copy, masters)

    # A module the new master imports (after the CLI started) no longer compiles.
    lifecycle = pypnm_copy / "pypnm" / "supervisor" / "lifecycle.py"
    good = lifecycle.read_text()
    lifecycle.write_text(good + "\ndef broken(:\n    pass\n")
    result = run_cli("upgrade", "--wait", "--url", service.base_url, timeout=150)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "failed: the new master died: SyntaxError" in result.stdout, result.stdout
    assert f"master pid {old} keeps serving" in result.stdout
    record = upgrade_record(service)
    assert record is not None and record["outcome"] == "failed" and "SyntaxError" in record["reason"]
    assert record["to"] is not None and not pid_alive(record["to"]["pid"])  # the new master is gone
    assert service.status()["master"]["pid"] == old and service.get("/health").status_code == 200

    # An app that fails validation: the new master's first generation fails, as a reload's would.
    lifecycle.write_text(good)
    health = pypnm_copy / "pypnm" / "api" / "health.py"
    rewrite(
        health,
        "from __future__ import annotations\n",
        "from __future__ import annotations\n\nraise RuntimeError('no health today')\n",
    )
    service.signal(signal.SIGUSR2)

    def failed_again() -> dict[str, Any] | None:
        latest = upgrade_record(service)
        return latest if latest and latest["id"] != record["id"] and latest["outcome"] else None

    second: dict[str, Any] = wait_until(failed_again, timeout=120, interval=0.2)
    assert second["outcome"] == "failed" and second["source"] == "SIGUSR2"
    assert "the new master's generation failed" in second["reason"] and "no health today" in second["reason"], second
    assert not pid_alive(second["to"]["pid"])
    assert service.status()["master"]["pid"] == old and service.get("/health").status_code == 200
    assert f"upgrade {second['id']} failed:" in service.output()

    service.stop()
    assert service.proc.returncode == 0
    assert masters.leftovers() == []


def test_a_new_port_in_the_settings_file_takes_effect_on_an_upgrade(
    start_service: StartService, pypnm_copy: Path, masters: Masters, tmp_path: Path
) -> None:
    first, second = free_ports(2)
    config = tmp_path / "pypnm.toml"
    config.write_text(f"port = {first}\ngraceful_timeout = 10\n")
    env = base_env(PYTHONPATH=str(pypnm_copy))
    service = start_service(pypnm_command("--config", str(config)), env=env, port=first)
    old = service.proc.pid
    masters.track(old)

    config.write_text(f"port = {second}\ngraceful_timeout = 10\n")
    # --wait follows the service at the address it asks; with a new port it says where to look instead.
    result = run_cli("upgrade", "--wait", "--url", service.base_url, timeout=150)
    if result.returncode != 0:  # the old address closed before an answer carried the outcome
        assert result.returncode == 2 and "if host or port changed" in result.stderr, result.stdout + result.stderr
    moved = Service(service.proc, second, service.log)
    status = wait_handed_over(moved, old)
    masters.track(status["master"]["pid"])
    assert status["upgrade"]["outcome"] == "succeeded"
    with pytest.raises(httpx.ConnectError):  # the old address closed with the old master
        httpx.get(f"http://127.0.0.1:{first}/health", timeout=2)
    assert "host/port changed" in service.output()

    masters.stop(status["master"]["pid"])
    assert masters.leftovers() == []


def test_upgrade_without_a_supervisor_or_for_a_fleet_is_refused_with_a_reason(
    start_service: StartService, tmp_path: Path
) -> None:
    service = start_service(
        [sys.executable, "-m", "uvicorn", "pypnm.main:app", "--port", "{port}"], env=base_env(), cwd=tmp_path
    )
    result = run_cli("upgrade", "--url", service.base_url)
    assert result.returncode == 1 and "without the pypnm supervisor" in result.stderr, result.stderr
    result = run_cli("upgrade", "--url", service.base_url, "--url", "http://127.0.0.1:1")
    assert result.returncode == 2 and "one instance" in result.stderr, result.stderr


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def test_under_systemd_the_old_master_names_the_new_main_pid_and_the_activated_socket_is_kept(
    tmp_path: Path, masters: Masters
) -> None:
    """NotifyAccess=main: each notification comes from the main pid of the moment; fd 3's socket is kept."""
    notify = NotifySocket(str(tmp_path / "notify.sock"))
    passed = socket.create_server(("127.0.0.1", 0))
    port = passed.getsockname()[1]
    inode = os.fstat(passed.fileno()).st_ino
    configured = free_ports(1)[0]  # the port setting: not used under activation, an upgrade keeps it so
    env = {"LISTEN_FDS": "1", "NOTIFY_SOCKET": notify.env, "WATCHDOG_USEC": "2000000"}
    log = tmp_path / "server.log"
    proc = subprocess.Popen(
        activation_command(passed.fileno(), env, "serve", "--port", str(configured), "--graceful-timeout", "10"),
        pass_fds=[passed.fileno()],
        env=base_env(PYPNM_RELOAD_MIN_INTERVAL="0"),
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    passed.close()
    old = proc.pid
    masters.track(old)
    service = Service(proc, port, log)
    try:
        service.wait_ready()
        sender, ready = notify.next_from(60)
        assert (sender, ready["READY"], ready["MAINPID"]) == (old, "1", str(old))

        service.signal(signal.SIGUSR2)
        sender, handed = notify.next_from(60)
        new = int(handed["MAINPID"])
        masters.track(new)
        assert sender == old and new != old and handed["STATUS"].startswith(f"upgraded: pid {new}"), handed
        sender, ready = notify.next_from(60)
        assert sender == new and ready["READY"] == "1" and f"upgraded from pid {old}" in ready["STATUS"], ready
        status = wait_handed_over(service, old)
        assert status["master"]["pid"] == new
        assert listening_inodes(new) == {inode: port}  # systemd's socket, nothing bound on the port setting

        assert service.get("/pypnm/system/webService/reload").status_code == 200  # the new master reloads
        sender, reloading = notify.next_from(60)
        assert sender == new and reloading["RELOADING"] == "1"
        assert notify.next_from(60)[0] == new
    finally:
        for pid in masters.pids[1:]:
            masters.stop(pid)
        service.stop()
        notify.sock.close()
    assert masters.leftovers() == []


def test_a_master_stopped_during_its_upgrade_takes_the_new_master_with_it(
    start_service: StartService, pypnm_copy: Path, masters: Masters
) -> None:
    service, _ = serve_old_master(start_service, pypnm_copy, masters, graceful="5")
    # The new master's workers take long to import the app: the upgrade is still running when the stop comes.
    health = pypnm_copy / "pypnm" / "api" / "health.py"
    future = "from __future__ import annotations\n"
    rewrite(health, future, future + "\nimport time\n\ntime.sleep(60)\n")
    service.signal(signal.SIGUSR2)
    first = wait_until(lambda: (upgrade_record(service) or {}).get("to"), timeout=30)
    new = int(first["pid"])
    wait_until(lambda: len(process_tree(new)) > 2, timeout=60)  # its fork template and a worker
    masters.track(new)
    second = run_cli("upgrade", "--url", service.base_url)  # joins the running one
    assert second.returncode == 0 and (upgrade_record(service) or {})["id"] in second.stdout, second.stdout

    assert service.stop() == 0
    assert "upgrade aborted: this master stops; stopping the new master" in service.output()
    wait_until(lambda: masters.leftovers() == [], timeout=30)


@pytest.mark.parametrize("takes_reload", [True, False], ids=["new-master-takes-it", "older-new-master"])
def test_a_reload_asked_for_during_an_upgrade_is_run_by_the_new_master_under_its_id(
    start_service: StartService, pypnm_copy: Path, masters: Masters, tmp_path: Path, takes_reload: bool
) -> None:
    """Held by the old master, handed over with HandoverComplete: no two generations share a number.
    A new master that does not say it takes such a reload (an older pypnm) gets none: the old master
    records it as failed, in so many words, rather than dropping it unsaid."""
    service, old = serve_old_master(start_service, pypnm_copy, masters, PYPNM_RELOAD_MIN_INTERVAL="0")
    gate = tmp_path / "gate"  # the new master's first generation imports until it exists
    future = "from __future__ import annotations\n"
    wait = (
        "import os as _os, time as _time\n"
        f"for _ in range(1200):\n    if _os.path.exists({str(gate)!r}):\n        break\n    _time.sleep(0.05)\n"
    )
    rewrite(pypnm_copy / "pypnm" / "api" / "health.py", future, future + wait)
    if not takes_reload:
        rewrite(pypnm_copy / "pypnm" / "supervisor" / "upgrade.py", "takes_reload=True", "takes_reload=False")
    service.signal(signal.SIGUSR2)
    started = wait_until(lambda: (upgrade_record(service) or {}).get("to"), timeout=30)
    masters.track(int(started["pid"]))

    reload_id = service.trigger_reload()  # answered by the old master's worker: the documented 200
    held = service.status()
    assert held["pending_reload"] == reload_id and held["generation"] == 1, held
    assert held["reload_state"] == "idle"  # held: it waits for the upgrade's end
    gate.touch()

    status = wait_handed_over(service, old)
    new = status["master"]["pid"]
    masters.track(new)
    if not takes_reload:
        assert f"reload {reload_id} failed: asked for during upgrade" in service.output()
        assert all(r["id"] != reload_id for r in service.status()["reloads"])
        masters.stop(new)
        assert masters.leftovers() == []
        return

    def ran() -> dict[str, Any] | None:
        record = next((r for r in service.status()["reloads"] if r["id"] == reload_id), None)
        return record if record and record["outcome"] else None

    record: dict[str, Any] = wait_until(ran, timeout=60, interval=0.2)
    assert record["outcome"] == "succeeded", record
    first = next(r for r in service.status()["reloads"] if r["source"] == "start")
    assert (first["generation"], record["generation"]) == (2, 3)  # the old master built none meanwhile
    output = service.output()
    assert f"reload {reload_id}: handed to the new master" in output
    assert f"reload {reload_id} queued" in output
    assert service.proc.wait(timeout=30) == 0
    masters.stop(new)
    assert masters.leftovers() == []


def test_a_new_master_the_old_one_refuses_claims_nothing_and_stops(
    start_service: StartService, pypnm_copy: Path, masters: Masters, tmp_path: Path
) -> None:
    """The old master cannot read HandoverServing (a protocol version it does not speak): it serves on,
    and the new master, whose workers already accept, must neither take the pid file nor stay."""
    pid_file = tmp_path / "pypnm.pid"
    service, old = serve_old_master(start_service, pypnm_copy, masters, "--pid-file", str(pid_file))
    rewrite(pypnm_copy / "pypnm" / "supervisor" / "protocol.py", "PROTOCOL_VERSION = 1\n", "PROTOCOL_VERSION = 2\n")
    service.signal(signal.SIGUSR2)

    def refused() -> dict[str, Any] | None:
        record = upgrade_record(service)
        return record if record and record["outcome"] and record["to"] else None

    record: dict[str, Any] = wait_until(refused, timeout=120, interval=0.2)
    new = int(record["to"]["pid"])
    masters.track(new)
    assert record["outcome"] == "failed" and "protocol version 2" in record["reason"], record
    wait_until(lambda: not pid_alive(new), timeout=30)
    output = service.output()
    assert f"the old master pid={old} did not let go" in output and "this master stops" in output, output
    assert "took over from" not in output
    assert pid_file.read_text() == f"{old}\n"  # never rewritten, nor removed by the new master's stop
    assert service.status()["master"]["pid"] == old and service.get("/health").status_code == 200
    assert service.stop() == 0
    assert masters.leftovers() == []


def test_an_old_master_that_answers_after_the_new_one_gave_up_keeps_serving(
    start_service: StartService, pypnm_copy: Path, masters: Masters
) -> None:
    """The old master is stopped (SIGSTOP) past the new one's wait for its confirmation: the new one
    gives up and stops; the old one, let go on, sees it gone and must not hand over to it."""
    service, old = serve_old_master(start_service, pypnm_copy, masters)
    service.signal(signal.SIGUSR2)
    wait_until(lambda: "taking over from master" in service.output(), timeout=60)
    os.kill(old, signal.SIGSTOP)
    try:
        wait_until(lambda: "did not let go (no answer within" in service.output(), timeout=120, interval=0.2)
    finally:
        os.kill(old, signal.SIGCONT)
    record: dict[str, Any] = wait_until(
        lambda: (r := upgrade_record(service)) and r["outcome"] and r, timeout=60, interval=0.2
    )
    masters.track(int(record["to"]["pid"]))
    assert record["outcome"] == "failed" and "left before the handover completed" in record["reason"], record
    wait_until(lambda: not pid_alive(int(record["to"]["pid"])), timeout=60)
    assert service.status()["master"]["pid"] == old and service.get("/health").status_code == 200
    assert "stops accepting and drains" not in service.output()
    assert service.stop() == 0
    assert masters.leftovers() == []


def test_a_new_master_that_cannot_read_the_offer_says_why(
    start_service: StartService, pypnm_copy: Path, masters: Masters
) -> None:
    """A new pypnm that dropped the old master's protocol version: the upgrade's reason says so."""
    service, old = serve_old_master(start_service, pypnm_copy, masters)
    protocol_file = pypnm_copy / "pypnm" / "supervisor" / "protocol.py"
    rewrite(protocol_file, "PROTOCOL_VERSION = 1\n", "PROTOCOL_VERSION = 2\n")
    rewrite(protocol_file, "MIN_PROTOCOL_VERSION = 1\n", "MIN_PROTOCOL_VERSION = 2\n")
    result = run_cli("upgrade", "--wait", "--url", service.base_url, timeout=150)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "protocol version" in result.stdout and "exit code" not in result.stdout, result.stdout
    record = upgrade_record(service)
    assert record is not None and record["to"] is not None
    masters.track(int(record["to"]["pid"]))
    assert service.status()["master"]["pid"] == old and service.get("/health").status_code == 200
    assert service.stop() == 0
    wait_until(lambda: masters.leftovers() == [], timeout=30)


def test_a_pid_file_that_cannot_be_written_ends_the_start_in_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir" / "pypnm.pid"
    result = run_cli("serve", "--port", str(free_ports(1)[0]), "--pid-file", str(missing), timeout=60)
    assert_one_line_error(result, 2, "cannot write pid_file", str(missing))


def test_a_reload_moves_the_pid_file(start_service: StartService, tmp_path: Path) -> None:
    first, second = tmp_path / "first.pid", tmp_path / "second.pid"
    config = tmp_path / "pypnm.toml"
    config.write_text(f'pid_file = "{first}"\n')
    service = start_service(
        pypnm_command("--port", "{port}", "--config", str(config)), env=base_env(PYPNM_RELOAD_MIN_INTERVAL="0")
    )
    assert first.read_text() == f"{service.proc.pid}\n"
    config.write_text(f'pid_file = "{second}"\n')
    wait_until(lambda: second.exists() and not first.exists(), timeout=30)  # the settings file is watched
    assert second.read_text() == f"{service.proc.pid}\n"
    assert service.stop() == 0
    assert not second.exists()
