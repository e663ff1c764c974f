"""The HTTP sub-commands against services that answer what pypnm would not: one line, never a traceback.

Each test runs the CLI as a real process against a small HTTP server on 127.0.0.1 that a test
scripts path by path (`FakeService`): a status that is not pypnm's, a status that refuses the
credentials that just triggered a reload, a redirect, a reload request that is never answered.
"""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from conftest import (
    RELOAD_PATH,
    STATUS_PATH,
    assert_one_line_error,
    free_port,
    run_cli,
    start_cli,
    wait_until,
)

RELOAD_ID = "0123456789ab"


@dataclass
class Answer:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] | None = None
    hang: bool = False  # never answer (until the server stops)


def json_answer(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Answer:
    return Answer(status, json.dumps(body).encode(), {"Content-Type": "application/json", **(headers or {})})


class FakeService(ThreadingHTTPServer):
    """Answers each path as `answers` says; counts the requests to each."""

    daemon_threads = True

    def __init__(self, answers: dict[str, Answer]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.answers = answers
        self.asked: dict[str, int] = {}
        self.released = threading.Event()  # ends the hanging answers

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: FakeService

    def do_GET(self) -> None:
        self.server.asked[self.path] = self.server.asked.get(self.path, 0) + 1
        answer = self.server.answers.get(self.path, json_answer({"detail": "Not Found"}, 404))
        if answer.hang:
            self.server.released.wait(60)
            return
        self.send_response(answer.status)
        for name, value in (answer.headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(answer.body)))
        self.end_headers()
        self.wfile.write(answer.body)

    def log_message(self, format: str, *args: Any) -> None:  # keep the test output quiet
        pass


@pytest.fixture
def fake() -> Iterator[Callable[[dict[str, Answer]], FakeService]]:
    started: list[FakeService] = []

    def start(answers: dict[str, Answer]) -> FakeService:
        server = FakeService(answers)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.released.set()
        server.shutdown()
        server.server_close()


TRIGGERED = json_answer({"status": "reload triggered"}, headers={"X-Reload-Id": RELOAD_ID})


def supervised(**fields: Any) -> dict[str, Any]:
    return {"mode": "supervised", "generation": 1, "reload_state": "idle", "reloads": [], "workers": [], **fields}


# ----- the instance to talk to ---------------------------------------------------------------------


def test_settings_that_cannot_be_read_are_said_not_stepped_over(tmp_path: Path) -> None:
    """The settings name the instance: with them broken, falling back to 127.0.0.1:8000 could reload another."""
    config = tmp_path / "pypnm.toml"
    config.write_text(f'port = {free_port()}\nlog_levle = "info"\n')
    for command in ("reload", "status"):
        result = run_cli(command, "--config", str(config), cwd=tmp_path, timeout=30)
        assert_one_line_error(result, 2, "unknown setting 'log_levle'", "give --url")
        assert "8000" not in result.stderr


def test_the_settings_name_the_instance_without_reading_the_tokens_file(
    fake: Callable[[dict[str, Answer]], FakeService], tmp_path: Path
) -> None:
    """Only where the service listens is needed: a tokens file the client's user cannot read does not matter."""
    service = fake({STATUS_PATH: json_answer(supervised())})
    config = tmp_path / "pypnm.toml"
    config.write_text(f'port = {service.server_address[1]}\napi_tokens_file = "{tmp_path / "not-readable-here"}"\n')
    result = run_cli("status", "--config", str(config), timeout=30)
    assert result.returncode == 0, result.stderr
    assert service.asked[STATUS_PATH] == 1


def test_each_instance_once_however_it_was_named(fake: Callable[[dict[str, Answer]], FakeService]) -> None:
    service = fake({STATUS_PATH: json_answer(supervised())})
    port = service.server_address[1]
    result = run_cli("status", "--url", service.url, "--dns", f"127.0.0.1:{port}", timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(service.url) == 1, result.stdout
    assert service.asked[STATUS_PATH] == 1
    # A scheme's default port named or not: one instance (port 80 refuses here: one error row).
    result = run_cli("status", "--url", "http://127.0.0.1", "--url", "http://127.0.0.1:80", timeout=30)
    rows = [line for line in result.stdout.splitlines() if line.startswith("http://127.0.0.1")]
    assert len(rows) == 1, result.stdout


def test_dns_takes_a_port_that_is_its_scheme_s_default() -> None:
    """httpx drops :80 from an http:// URL; the port is read from the text as given."""
    result = run_cli("status", "--dns", "127.0.0.1:80", timeout=30)
    assert "give it as NAME:PORT" not in result.stderr, result.stderr
    assert "http://127.0.0.1:80" in result.stdout, result.stdout  # its row, whatever port 80 answers


# ----- what is sent ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("token", "names"),
    [
        ("abcdefghijklmnop\r", ["'\\r' at position 17", "line ending"]),
        ("abcdefgh ijklmnop", ["' ' at position 9", "printable ASCII"]),
        ("abcdefghijklmnopäöü", ["'ä' at position 17", "printable ASCII"]),
    ],
    ids=["carriage-return", "space", "not-ascii"],
)
def test_a_token_a_header_cannot_carry_is_refused_before_anything_is_sent(
    fake: Callable[[dict[str, Answer]], FakeService], token: str, names: list[str]
) -> None:
    service = fake({RELOAD_PATH: TRIGGERED})
    result = run_cli("reload", "--url", service.url, "--token", token, timeout=30)
    assert_one_line_error(result, 2, "the token (--token or $PYPNM_TOKEN)", *names)
    assert service.asked == {}


@pytest.mark.parametrize("value", ["0", "-5", "nan", "inf", "soon"])
def test_timeout_is_a_positive_number_of_seconds(value: str) -> None:
    for command in ("reload", "upgrade"):
        result = run_cli(command, "--url", "http://127.0.0.1:9", "--timeout", value, timeout=30)
        assert_one_line_error(result, 2, "--timeout", repr(value))


# ----- what comes back -------------------------------------------------------------------------------


def test_a_reload_request_left_unanswered_is_not_called_unreachable(
    fake: Callable[[dict[str, Answer]], FakeService],
) -> None:
    service = fake({RELOAD_PATH: Answer(hang=True)})
    result = run_cli("reload", "--url", service.url, "--wait", "--timeout", "1", timeout=30)
    line = assert_one_line_error(result, 2, "no answer to the reload request within 1s", "may have started")
    assert "cannot reach" not in line


def test_a_redirect_says_where_it_leads(fake: Callable[[dict[str, Answer]], FakeService]) -> None:
    service = fake({RELOAD_PATH: Answer(302, b"", {"Location": "https://login.example/sso"})})
    result = run_cli("reload", "--url", service.url, timeout=30)
    assert_one_line_error(result, 1, "reload refused (302)", "redirected to https://login.example/sso")


def test_credentials_a_reload_took_away_are_said_with_what_was_triggered(
    fake: Callable[[dict[str, Answer]], FakeService],
) -> None:
    """The reload rotated the tokens: it was triggered, and only its outcome cannot be read."""
    refused = json_answer({"detail": "Invalid bearer token"}, 401)
    service = fake({RELOAD_PATH: TRIGGERED, STATUS_PATH: refused})
    result = run_cli("reload", "--url", service.url, "--wait", timeout=30)
    assert_one_line_error(
        result, 2, f"reload {RELOAD_ID} was triggered", "refuses these credentials (401: Invalid bearer token)"
    )


def test_a_status_that_never_comes_says_why_at_the_end(fake: Callable[[dict[str, Answer]], FakeService]) -> None:
    service = fake({RELOAD_PATH: TRIGGERED, STATUS_PATH: Answer(503, b"upstream down")})
    result = run_cli("reload", "--url", service.url, "--wait", "--timeout", "1", timeout=30)
    assert_one_line_error(result, 2, f"reload {RELOAD_ID} had no outcome within 1s", "answered 503")


def test_a_404_is_a_service_that_is_not_pypnm_not_a_refusal(fake: Callable[[dict[str, Answer]], FakeService]) -> None:
    """Another app on the port (FastAPI's own 404 for a path it lacks), or the wrong path prefix: exit 2."""
    service = fake({})  # every path: FastAPI's {"detail": "Not Found"}, 404
    for command in (["reload"], ["reload", "--wait"], ["status"], ["upgrade"]):
        result = run_cli(*command, "--url", service.url, timeout=30)
        line = assert_one_line_error(result, 2, service.url, "does not serve pypnm's System Operations (404")
        assert "refused" not in line and "path prefix" in line, line


NOT_PYPNM = [
    pytest.param(Answer(200, b"<html>proxy login</html>", {"Content-Type": "text/html"}), id="html"),
    pytest.param(json_answer(["a", "list"]), id="a-list"),
    pytest.param(json_answer(supervised(workers=["pid 1"])), id="workers-of-strings"),
    pytest.param(json_answer(supervised(last_reload="yesterday")), id="last-reload-a-string"),
]


@pytest.mark.parametrize("answer", NOT_PYPNM)
def test_a_status_that_is_not_pypnm_s_is_one_line(
    fake: Callable[[dict[str, Answer]], FakeService], answer: Answer
) -> None:
    service = fake({STATUS_PATH: answer})
    result = run_cli("status", "--url", service.url, timeout=30)
    assert_one_line_error(result, 2, service.url, "is pypnm serving there?")

    several = run_cli("status", "--url", service.url, "--url", "http://127.0.0.1:9", timeout=30)
    assert several.returncode == 2 and "Traceback" not in several.stderr, several.stderr
    row = next(line for line in several.stdout.splitlines() if line.startswith(service.url))
    assert "error:" in row and "is pypnm serving there?" in row


@pytest.mark.parametrize(
    "record",
    [
        pytest.param("a string", id="record-a-string"),
        pytest.param({"id": RELOAD_ID, "outcome": "succeeded", "validated_ms": "soon"}, id="validated-not-a-number"),
        pytest.param(
            {"id": RELOAD_ID, "started_at": "x", "stability": "watching", "rollback_window": None}, id="window-null"
        ),
    ],
)
def test_a_reload_record_that_is_not_pypnm_s_is_one_line(
    fake: Callable[[dict[str, Answer]], FakeService], record: Any
) -> None:
    service = fake({RELOAD_PATH: TRIGGERED, STATUS_PATH: json_answer(supervised(reloads=[record]))})
    result = run_cli("reload", "--url", service.url, "--wait", "--timeout", "5", timeout=30)
    assert_one_line_error(result, 2, service.url, "is pypnm serving there?")


# ----- a roll that is interrupted --------------------------------------------------------------------


def test_an_interrupted_roll_says_what_it_did(fake: Callable[[dict[str, Answer]], FakeService]) -> None:
    """Ctrl-C while the first instance's outcome is awaited: which were triggered, which were not."""
    first = fake({RELOAD_PATH: TRIGGERED, STATUS_PATH: json_answer(supervised())})  # no outcome, ever
    second = fake({RELOAD_PATH: TRIGGERED})
    process = start_cli("reload", "--url", first.url, "--url", second.url, "--timeout", "60")
    try:
        wait_until(lambda: first.asked.get(STATUS_PATH, 0) >= 2, timeout=30)  # it is waiting for the outcome
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr, stderr
    assert "rolling reload interrupted: 0 of 2 instances reloaded" in stdout, stdout
    assert f"interrupted, outcome unknown (1): {first.url}" in stdout, stdout
    assert f"not attempted (1): {second.url}" in stdout, stdout
    assert second.asked == {}


def test_a_reload_that_timed_out_is_not_called_failed(fake: Callable[[dict[str, Answer]], FakeService]) -> None:
    """No outcome within --timeout: the reload may still be running and succeed, so it is filed as unknown."""
    first = fake({RELOAD_PATH: TRIGGERED, STATUS_PATH: json_answer(supervised())})  # no outcome, ever
    second = fake({RELOAD_PATH: TRIGGERED})
    result = run_cli("reload", "--url", first.url, "--url", second.url, "--timeout", "1", timeout=30)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    lines = result.stdout.splitlines()
    assert f"rolling reload stopped at {first.url}: reload {RELOAD_ID} had no outcome within 1s" in lines, lines
    assert "failed (0): -" in lines, lines
    unknown = next(line for line in lines if line.startswith("timed out, outcome unknown"))
    assert unknown.endswith(f"(1): {first.url}") and "pypnm status" in unknown, unknown
    assert f"not attempted (1): {second.url}" in lines, lines
    assert second.asked == {}
