"""`pypnm reload` and `pypnm status` across instances, and the progress of `pypnm reload --wait`.

Three real instances run for the whole module, each `pypnm serve` of its own copy of the pypnm
package on its own loopback address (127.0.0.1, .2, .3) and one common port, as the pods behind
a Kubernetes headless Service do. Tests break or slow down one instance's copy (a SyntaxError, or
an import that waits for a gate file the test creates) and restore it afterwards.

The CLI runs as a real process with a guard on its PYTHONPATH (a `sitecustomize`) that answers
name look-ups of the test's own names with loopback addresses and refuses every connection and
look-up beyond loopback, so `--dns` is exercised through the real `socket.getaddrinfo` call and
nothing can leave the machine. No test asserts on timing: slow phases are made observable with
gate files, never with sleeps.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import pty
import queue
import re
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conftest import (
    SRC,
    STATUS_PATH,
    Certificate,
    RecordingServer,
    Service,
    assert_one_line_error,
    base_env,
    copy_package,
    guarded_environment,
    launch,
    make_certificate,
    pypnm_command,
    run_cli,
    start_cli,
    wait_until,
)

ADDRESSES = ("127.0.0.1", "127.0.0.2", "127.0.0.3")
FLEET_NAME = "fleet.pypnm.test"  # the guard resolves it, in a scrambled order, to ADDRESSES
TLS_NAME = "tls.pypnm.test"  # the guard resolves it to 127.0.0.1
RELOAD_ID = r"[0-9a-f]{12}"


def succeeded(generation: int | str = r"\d+") -> str:
    """The pattern of the outcome line of a reload that succeeded (after "reload ")."""
    return (
        rf"{RELOAD_ID} succeeded: generation {generation} serving \(\d+ ms: validating \d+ ms, swapping \d+ ms\)"
        r", stable for 1 s"  # the fleet's rollback_window: `--wait` waits it out
    )


# ----- the fleet ---------------------------------------------------------------------------------


@dataclass
class Instance:
    service: Service
    copy: Path  # holds the `pypnm/` package this instance serves

    @property
    def url(self) -> str:
        return self.service.base_url

    @property
    def health_module(self) -> Path:
        return self.copy / "pypnm" / "api" / "health.py"

    def status(self) -> dict[str, Any]:
        return self.service.status()

    def settled(self) -> dict[str, Any]:
        """The status once no reload runs or waits and every worker of the serving generation serves."""

        def idle() -> dict[str, Any] | None:
            status = self.status()
            quiet = status["reload_state"] == "idle" and status["pending_reload"] is None
            serving = [w for w in status["workers"] if w["generation"] == status["generation"]]
            return status if quiet and serving and all(w["state"] == "serving" for w in serving) else None

        result: dict[str, Any] = wait_until(idle, timeout=30)
        return result


def port_free_on_every_address() -> int:
    for _ in range(50):
        with contextlib.ExitStack() as stack:
            first = stack.enter_context(socket.socket())
            first.bind((ADDRESSES[0], 0))
            port = int(first.getsockname()[1])
            try:
                for address in ADDRESSES[1:]:
                    stack.enter_context(socket.socket()).bind((address, port))
            except OSError:
                continue
            return port
    raise AssertionError("no port free on every test address")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Instance]]:
    root = tmp_path_factory.mktemp("fleet")
    port = port_free_on_every_address()
    instances: list[Instance] = []
    try:
        for number, address in enumerate(ADDRESSES, 1):  # all start at once; then each is waited for
            copy = root / f"instance-{number}"
            copy_package(SRC / "pypnm", copy)
            # The fleet's name is one of the service's names (as a headless Service's is), so
            # the DNS-rebinding guard admits requests addressed to it from trusted addresses.
            env = base_env(
                PYTHONPATH=str(copy),
                PYPNM_RELOAD_MIN_INTERVAL="0",
                PYPNM_ALLOWED_HOSTS=FLEET_NAME,
                PYPNM_ROLLBACK_WINDOW="1",
            )
            service = launch(
                pypnm_command("serve", "--host", address, "--port", "{port}", "--graceful-timeout", "5"),
                log=root / f"instance-{number}.log",
                port=port,
                cwd=copy,
                env=env,
                host=address,
            )
            instances.append(Instance(service, copy))
        for instance in instances:
            instance.service.wait_ready(60)
            served = Path(instance.status()["master"]["route_module_file"])
            assert served.is_relative_to(instance.copy), f"{instance.url} serves {served}, not its copy"
        yield instances
    finally:
        for instance in instances:
            instance.service.stop()


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., dict[str, str]]:
    """Environment for CLI processes with the guard loaded: the test's names resolve to loopback, nothing leaves.

    FLEET_NAME resolves to ADDRESSES in a scrambled order, TLS_NAME to 127.0.0.1.
    """
    names = {FLEET_NAME: ["127.0.0.3", "127.0.0.1", "127.0.0.2"], TLS_NAME: ["127.0.0.1"]}
    return guarded_environment(tmp_path_factory.mktemp("guard"), names)


@contextlib.contextmanager
def broken(instance: Instance) -> Iterator[int]:
    """The instance's copy with a SyntaxError in health.py while inside; yields the bad line's number."""
    original = instance.health_module.read_text()
    instance.health_module.write_text(original + "\ndef broken(:\n    pass\n")
    try:
        yield original.count("\n") + 2
    finally:
        instance.health_module.write_text(original)


@contextlib.contextmanager
def gated(instance: Instance, gate: Path) -> Iterator[None]:
    """While inside, a new generation of the instance waits at import until `gate` exists (bounded: 20 s)."""
    original = instance.health_module.read_text()
    instance.health_module.write_text(
        original
        + "\nimport os as _os\nimport time as _time\n\n"
        + f"for _ in range(400):  # the test's gate; bounded\n    if _os.path.exists({str(gate)!r}):\n"
        + "        break\n    _time.sleep(0.05)\n"
    )
    try:
        yield
    finally:
        gate.touch()  # whatever happened, nothing stays blocked
        instance.health_module.write_text(original)


def new_generation(line: str) -> int:
    """The generation an outcome line says serves now."""
    found = re.search(r" generation (\d+) serving ", line)
    assert found, line
    return int(found[1])


def reload_ids(status: dict[str, Any]) -> list[str]:
    return [record["id"] for record in status["reloads"]]


class LineReader:
    """The stdout lines of a running CLI process, read in a thread so that the test can wait for one, bounded."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        self._stdout = proc.stdout
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self._stdout:
            self.lines.put(line)

    def wait_for(self, pattern: str, timeout: float = 30) -> str:
        def match() -> str | None:
            with contextlib.suppress(queue.Empty):
                self.seen.append(self.lines.get(timeout=0.5))
            return next((line for line in self.seen if re.search(pattern, line)), None)

        found: str = wait_until(match, timeout=timeout, interval=0.01)
        return found


# ----- rolling reload ----------------------------------------------------------------------------


def test_rolling_reload_stops_at_the_first_failure(
    fleet: list[Instance], cli_env: Callable[..., dict[str, str]], tmp_path: Path
) -> None:
    first, bad, last = fleet
    before = [instance.settled() for instance in fleet]

    with broken(bad) as bad_line:
        result = run_cli(
            "reload",
            "--url",
            first.url,
            "--url",
            bad.url,
            "--url",
            last.url,
            "--wait",
            "--timeout",
            "30",
            env=cli_env(),
            cwd=tmp_path,
        )

    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr == ""
    expected = (
        rf"{re.escape(first.url)}: reload {succeeded()}\n"
        rf"{re.escape(bad.url)}: reload (?P<bad_id>{RELOAD_ID}) failed: (?P<reason>[^\n]+)\n"
        rf"rolling reload stopped at {re.escape(bad.url)}: reload (?P=bad_id) failed: (?P=reason)\n"
        rf"reloaded \(1\): {re.escape(first.url)}\n"
        rf"failed \(1\): {re.escape(bad.url)}\n"
        rf"not attempted \(1\): {re.escape(last.url)}\n"
    )
    output = re.fullmatch(expected, result.stdout)
    assert output, result.stdout
    for part in ("SyntaxError", str(bad.health_module), f"line {bad_line}"):
        assert part in output["reason"], (part, output["reason"])

    after = [instance.settled() for instance in fleet]
    assert after[0]["generation"] == new_generation(result.stdout.splitlines()[0]) > before[0]["generation"]
    assert after[0]["last_reload"]["outcome"] == "succeeded"
    assert after[0]["last_reload"]["id"] in result.stdout.splitlines()[0]
    assert after[1]["generation"] == before[1]["generation"], "the broken instance must keep serving"
    assert after[1]["last_reload"]["id"] == output["bad_id"]
    assert after[1]["last_reload"]["outcome"] == "failed" and "SyntaxError" in after[1]["last_reload"]["reason"]
    assert after[2]["generation"] == before[2]["generation"], "the instance after the failure must be untouched"
    assert reload_ids(after[2]) == reload_ids(before[2]), "the instance after the failure got a reload"


def test_rolling_reload_from_a_targets_file(
    fleet: list[Instance], cli_env: Callable[..., dict[str, str]], tmp_path: Path
) -> None:
    order = [fleet[2], fleet[0], fleet[1]]  # the file's order, not the addresses'
    targets = tmp_path / "fleet.txt"
    targets.write_text(
        "# the pypnm fleet\n\n"
        + "".join(f"{instance.url}/\n" if n == 1 else f"  {instance.url}\n" for n, instance in enumerate(order))
        + "   # the end\n"
    )
    before = [instance.settled() for instance in order]

    result = run_cli("reload", "--targets", str(targets), "--timeout", "30", env=cli_env(), cwd=tmp_path)

    assert result.returncode == 0, result.stdout + result.stderr
    expected = "".join(rf"{re.escape(instance.url)}: reload {succeeded()}\n" for instance in order) + (
        r"rolling reload done: 3 of 3 instances reloaded\n"
        rf"reloaded \(3\): {', '.join(re.escape(instance.url) for instance in order)}\n"
        r"failed \(0\): -\n"
        r"not attempted \(0\): -\n"
    )
    assert re.fullmatch(expected, result.stdout), result.stdout
    for instance, status, line in zip(order, before, result.stdout.splitlines(), strict=False):
        now = instance.settled()
        assert now["generation"] == new_generation(line) > status["generation"]
        assert now["last_reload"]["id"] in line


def test_rolling_reload_of_every_address_of_a_name(
    fleet: list[Instance], cli_env: Callable[..., dict[str, str]], tmp_path: Path
) -> None:
    port = fleet[0].service.port
    before = [instance.settled() for instance in fleet]

    result = run_cli("reload", "--dns", f"{FLEET_NAME}:{port}", "--timeout", "30", env=cli_env(), cwd=tmp_path)

    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    # The name resolves in a scrambled order; the roll goes by address, so two runs go alike.
    assert [line.split(": reload ")[0] for line in lines[:3]] == [f"http://{a}:{port}" for a in ADDRESSES]
    assert lines[3] == "rolling reload done: 3 of 3 instances reloaded"
    for instance, status in zip(fleet, before, strict=True):
        assert instance.settled()["generation"] > status["generation"]


def test_parallel_starts_nothing_new_after_a_failure(
    fleet: list[Instance], cli_env: Callable[..., dict[str, str]], tmp_path: Path
) -> None:
    slow, bad, last = fleet
    before = [instance.settled() for instance in fleet]
    gate = tmp_path / "gate"

    with gated(slow, gate), broken(bad):
        proc = subprocess.Popen(
            pypnm_command(
                "reload", "--url", slow.url, "--url", bad.url, "--url", last.url, "--parallel", "2", "--timeout", "30"
            ),
            env=cli_env(),
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            stdin=subprocess.DEVNULL,
        )
        try:
            reader = LineReader(proc)
            failure = reader.wait_for(rf"^{re.escape(bad.url)}: reload {RELOAD_ID} failed: .*SyntaxError")
            # The slow instance is still validating (it waits for the gate), so a slot is free:
            # without the stop, the last instance would start now.
            assert slow.status()["reload_state"] == "validating"
            gate.touch()
            reader.wait_for(rf"^{re.escape(slow.url)}: reload {succeeded()}$")
            assert proc.wait(30) == 1
            reader.wait_for(r"^not attempted")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    summary = reader.seen[-4:]
    assert summary == [
        f"rolling reload stopped at {failure}",
        f"reloaded (1): {slow.url}\n",
        f"failed (1): {bad.url}\n",
        f"not attempted (1): {last.url}\n",
    ], summary
    after = [instance.settled() for instance in fleet]
    assert after[0]["generation"] > before[0]["generation"], "the reload in flight must run to its outcome"
    assert after[1]["generation"] == before[1]["generation"]
    assert after[2]["generation"] == before[2]["generation"]
    assert reload_ids(after[2]) == reload_ids(before[2]), "a reload was started after the failure"


# ----- status of several instances ---------------------------------------------------------------


def test_status_of_several_instances(
    fleet: list[Instance], cli_env: Callable[..., dict[str, str]], tmp_path: Path
) -> None:
    port = fleet[0].service.port
    resolved = [str(info[4][0]) for info in socket.getaddrinfo("localhost", port, type=socket.SOCK_STREAM)]
    assert resolved and all(ipaddress.ip_address(a).is_loopback for a in resolved), resolved  # never beyond loopback
    by_localhost = sorted(set(resolved), key=lambda a: (ipaddress.ip_address(a).version, ipaddress.ip_address(a)))
    down = f"http://127.0.0.4:{port}"  # nothing listens there
    urls = [
        *(f"http://[{a}]:{port}" if ":" in a else f"http://{a}:{port}" for a in by_localhost),
        fleet[1].url,
        fleet[2].url,
        down,
    ]
    args = ["status", "--url", fleet[1].url, "--url", fleet[2].url, "--url", down, "--dns", f"localhost:{port}"]
    statuses = {instance.url: instance.settled() for instance in fleet}

    table = run_cli(*args, env=cli_env(), cwd=tmp_path, timeout=30)
    as_json = run_cli(*args, "--json", env=cli_env(), cwd=tmp_path, timeout=30)

    assert table.returncode == 2, table.stdout + table.stderr  # one instance did not answer
    assert as_json.returncode == 2, as_json.stdout + as_json.stderr
    rows = [line.split() for line in table.stdout.splitlines()]
    assert rows[0] == ["INSTANCE", "GENERATION", "CODE_VERSION", "LAST_RELOAD", "WORKERS", "STATE"]
    # --url first, in their order, then the addresses of the name
    assert [row[0] for row in rows[1:]] == [fleet[1].url, fleet[2].url, down, *urls[: len(by_localhost)]]
    listed = json.loads(as_json.stdout)
    assert [entry["url"] for entry in listed] == [row[0] for row in rows[1:]]
    for row, entry in zip(rows[1:], listed, strict=True):
        status = statuses.get(row[0])
        if status is None:  # the address that is down, and ::1 if localhost names it (nothing serves there)
            assert row[1:5] == ["-", "-", "-", "-"] and row[5] == "error:", row
            assert "cannot reach" in " ".join(row) and "cannot reach" in entry["error"], (row, entry)
            continue
        assert row[1:] == [
            str(status["generation"]),
            status["generation_code_version"],
            status["last_reload"]["outcome"],
            "1",
            "idle",
        ], row
        assert entry["generation"] == status["generation"]
        assert entry["generation_code_version"] == status["generation_code_version"]
        assert entry["master"]["pid"] == status["master"]["pid"]
    assert sum(entry.get("error") is not None for entry in listed) == 1 + sum(":" in a for a in by_localhost)


@pytest.mark.parametrize("certificate_name", [TLS_NAME, "other.pypnm.test"])
def test_https_instances_by_name_are_verified_against_the_name(
    cli_env: Callable[..., dict[str, str]],
    recording_server: Callable[[Certificate | None], RecordingServer],
    tmp_path: Path,
    certificate_name: str,
) -> None:
    """--dns https://NAME:PORT connects to each address, but asks for and checks NAME's certificate."""
    certificate = make_certificate(tmp_path / "tls", dns_name=certificate_name)
    server = recording_server(certificate)
    port = server.server_address[1]
    result = run_cli(
        "status",
        "--dns",
        f"https://{TLS_NAME}:{port}",
        "--cacert",
        str(certificate.cert),
        env=cli_env(PYPNM_TOKEN="fleet-test-token-0123456789"),
        cwd=tmp_path,
        timeout=30,
    )

    row = result.stdout.splitlines()[1]
    assert row.startswith(f"https://127.0.0.1:{port} "), result.stdout
    if certificate_name == TLS_NAME:
        assert result.returncode == 0, result.stdout + result.stderr
        assert row.split()[1:] == ["-", "0123456789abcdef", "-", "-", "unsupervised"], row
        [(path, headers)] = server.requests
        assert path == STATUS_PATH
        assert headers["Host"] == f"{TLS_NAME}:{port}"
        assert headers["Authorization"] == "Bearer fleet-test-token-0123456789"
    else:
        assert result.returncode == 2, result.stdout + result.stderr
        assert "certificate verify failed" in row and "nothing was sent" in row, row
        assert server.requests == [], "a request went over a connection whose certificate names another host"


def test_a_token_refused_for_one_instance_stops_the_roll_before_it_starts(
    cli_env: Callable[..., dict[str, str]],
    recording_server: Callable[[Certificate | None], RecordingServer],
    tmp_path: Path,
) -> None:
    """Plain http:// to a host that is not loopback gets no token: decided for every URL before the first request."""
    server = recording_server(None)  # plain http on 127.0.0.1: it would be the first instance reloaded
    result = run_cli(
        "reload",
        "--url",
        server.url,
        "--url",
        "http://192.0.2.10:8000",
        env=cli_env(PYPNM_TOKEN="fleet-test-token-0123456789"),
        cwd=tmp_path,
        timeout=30,
    )
    assert_one_line_error(result, 2, "refusing to send the token", "192.0.2.10", "--allow-http-token")
    assert server.requests == [], "an instance was reloaded before the refusal"


# ----- bad targets: one line, exit 2, nothing contacted ----------------------------------------


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["--dns", "fleet.pypnm.test"], ["--dns fleet.pypnm.test", "NAME:PORT"]),
        (["--dns", "ftp://fleet.pypnm.test:21"], ["--dns ftp://fleet.pypnm.test:21", "NAME:PORT"]),
        (["--dns", "nowhere.invalid:8000"], ["--dns nowhere.invalid:8000", "cannot resolve nowhere.invalid"]),
        (["--targets", "{tmp}/absent.txt"], ["--targets", "absent.txt", "No such file or directory"]),
        (["--targets", "{tmp}/bad.txt"], ["bad.txt line 3", "127.0.0.1:9", "http://HOST:PORT"]),
        (["--targets", "{tmp}/empty.txt"], ["no instance", "--targets"]),
        (["--url", "http://127.0.0.1:9", "--parallel", "0"], ["--parallel", "at least 1"]),
    ],
    ids=[
        "dns-no-port",
        "dns-bad-scheme",
        "dns-unresolvable",
        "targets-missing",
        "targets-bad-line",
        "targets-empty",
        "parallel-zero",
    ],
)
def test_bad_targets(cli_env: Callable[..., dict[str, str]], tmp_path: Path, args: list[str], names: list[str]) -> None:
    (tmp_path / "bad.txt").write_text("http://127.0.0.1:9\n# comment\n127.0.0.1:9\n")
    (tmp_path / "empty.txt").write_text("# nothing yet\n\n")
    argv = [arg.replace("{tmp}", str(tmp_path)) for arg in args]
    result = run_cli("reload", *argv, env=cli_env(), cwd=tmp_path, timeout=30)
    assert_one_line_error(result, 2, *names)
    assert result.stdout == ""


# ----- progress of one reload --------------------------------------------------------------------


def test_wait_without_a_terminal_prints_one_line(
    fleet: list[Instance], cli_env: Callable[..., dict[str, str]], tmp_path: Path
) -> None:
    instance = fleet[0]
    before = instance.settled()
    gate = tmp_path / "gate"
    with gated(instance, gate):
        proc = start_cli("reload", "--url", instance.url, "--wait", "--timeout", "30", env=cli_env(), cwd=tmp_path)
        try:
            # The CLI polls the whole time the candidate validates: nothing may come of it on stdout.
            wait_until(lambda: instance.status()["reload_state"] == "validating", timeout=20)
            gate.touch()
            stdout, stderr = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)

    assert proc.returncode == 0, stdout + stderr
    assert stderr == ""
    assert re.fullmatch(rf"reload {succeeded()}\n", stdout), stdout
    after = instance.settled()
    assert after["generation"] == new_generation(stdout) > before["generation"]
    assert after["last_reload"]["id"] in stdout


def test_wait_on_a_terminal_shows_the_phases(
    fleet: list[Instance], cli_env: Callable[..., dict[str, str]], tmp_path: Path
) -> None:
    instance = fleet[0]
    before = instance.settled()
    gate = tmp_path / "gate"
    controller, terminal = pty.openpty()
    received: list[bytes] = []

    def read() -> None:
        for _ in range(100_000):  # bounded; ends at the CLI's exit (EOF, or EIO once the terminal is gone)
            try:
                data = os.read(controller, 4096)
            except OSError:
                return
            if not data:
                return
            received.append(data)

    def screen() -> str:
        return b"".join(received).decode(errors="replace")

    with gated(instance, gate):
        proc = subprocess.Popen(
            pypnm_command("reload", "--url", instance.url, "--wait", "--timeout", "30"),
            env=cli_env(COLUMNS="200"),
            cwd=tmp_path,
            stdout=terminal,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        os.close(terminal)
        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            # The status line shows the phase while it lasts, before the outcome is known.
            validating = wait_until(lambda: re.search(r": validating generation (\d+) \(", screen()), timeout=20)
            assert "succeeded" not in screen()
            gate.touch()
            assert proc.wait(30) == 0
            reader.join(10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            os.close(controller)

    output = screen()
    generation = int(validating[1])
    assert generation > before["generation"]
    assert instance.settled()["generation"] == generation
    frames = output.split("\r")
    progress = [frame for frame in frames if re.match(rf"reload {RELOAD_ID}: ", frame)]
    assert progress, output
    phase = (
        rf"(queued|(validating \d+ ms -> swapping|validating) generation {generation}"
        rf"|generation {generation} serving, watched for crashes for 1 s \(rollback_window\), 0 so far)"
    )
    assert all(re.fullmatch(rf"reload {RELOAD_ID}: {phase} \(\d+\.\d s\) *", frame) for frame in progress), progress
    assert any("watched for crashes" in frame for frame in progress), progress  # --wait waits out rollback_window
    outcome = re.search(rf"reload {succeeded(generation)}\r?\n", output)
    assert outcome, output
    # Drawn in place: the outcome replaces the status line, which was blanked first.
    before_outcome = output[: outcome.start()]
    assert before_outcome.endswith("\r") and before_outcome.rstrip("\r").endswith(" "), repr(output[-400:])
    assert "\x1b" not in output and "\n" not in before_outcome
