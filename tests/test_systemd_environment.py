"""What the master makes of systemd's environment and its notify socket, in-process: the variables
it ignores (with a warning saying why), the ones it refuses, and notifications that cannot be sent.

tests/test_systemd.py drives a real master under the same variables; these are the cases that
never get as far as serving, and the notifier's behaviour when the receiver is gone or full.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import NotifySocket
from pypnm.supervisor import systemd
from pypnm.supervisor.systemd import STATUS_MAX_BYTES, ActivationError, Notifier, activated_listeners, take_notifier

LOGGER = "pypnm.supervisor.systemd"


@dataclass
class Reload:
    id: str
    source: str
    outcome: str | None
    reason: str | None = None


@pytest.fixture
def systemd_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """A test process environment without any of systemd's variables; set them with the yielded monkeypatch."""
    for name in (*systemd.NOTIFY_ENV, *systemd.LISTEN_ENV):
        monkeypatch.delenv(name, raising=False)
    yield monkeypatch


def warnings_in(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait(10)
    return child.pid


# ----- NOTIFY_SOCKET and WATCHDOG_* ---------------------------------------------------------------


def test_a_notify_socket_that_is_no_unix_address_is_ignored_with_a_warning(
    systemd_env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    systemd_env.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    systemd_env.setenv("WATCHDOG_USEC", "1000000")
    with caplog.at_level(logging.INFO, logger=LOGGER):
        notifier = take_notifier()
    assert not notifier.enabled and notifier.watchdog_usec is None
    assert warnings_in(caplog) == [
        "NOTIFY_SOCKET=vsock:2:1234 is neither a path nor an @abstract name: not notifying systemd"
    ]
    assert "NOTIFY_SOCKET" not in os.environ and "WATCHDOG_USEC" not in os.environ  # the workers never see them
    notifier.reload_finished(Reload("r1", "signal", "succeeded"), 1)  # a no-op, not an error


def test_a_watchdog_usec_that_is_no_number_notifies_without_pings(
    systemd_env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, abstract_notify_socket: NotifySocket
) -> None:
    systemd_env.setenv("NOTIFY_SOCKET", abstract_notify_socket.env)
    systemd_env.setenv("WATCHDOG_USEC", "30s")
    with caplog.at_level(logging.INFO, logger=LOGGER):
        notifier = take_notifier()
    assert notifier.enabled and notifier.watchdog_usec is None
    assert warnings_in(caplog) == ["WATCHDOG_USEC=30s is not a number of microseconds: no watchdog pings"]
    notifier.reload_finished(Reload("start", "start", "succeeded"), 1)
    assert abstract_notify_socket.next(timeout=5) == {
        "READY": "1",
        "MAINPID": str(os.getpid()),
        "STATUS": "generation 1 serving",
    }


def test_a_watchdog_for_this_process_is_pinged_at_half_its_interval(
    systemd_env: pytest.MonkeyPatch, notify_socket: NotifySocket
) -> None:
    systemd_env.setenv("NOTIFY_SOCKET", notify_socket.env)
    systemd_env.setenv("WATCHDOG_USEC", "4000000")
    systemd_env.setenv("WATCHDOG_PID", str(os.getpid()))
    notifier = take_notifier()
    assert notifier.enabled and notifier.watchdog_usec == 4_000_000
    assert not any(name in os.environ for name in systemd.NOTIFY_ENV)


# ----- what is sent -----------------------------------------------------------------------------


def test_a_long_status_is_cut_to_one_line_systemd_accepts(notify_socket: NotifySocket) -> None:
    notifier = Notifier(notify_socket.env)
    notifier.reload_finished(Reload("start", "start", "succeeded"), 1)
    notify_socket.next(timeout=5)
    reason = "line one\nline two\x7f" + "é" * 3000  # multi-byte characters across the cut
    notifier.reload_finished(Reload("r2", "api", "failed", reason), 1)
    message = notify_socket.next(timeout=5)
    status = message["STATUS"]
    assert message["READY"] == "1"
    assert status.startswith("generation 1 serving; reload r2 failed: line one line two ")
    assert status.endswith("é...") and "\n" not in status
    assert len(status.encode("utf-8")) <= STATUS_MAX_BYTES


def test_a_receiver_that_is_gone_costs_one_warning_and_sending_resumes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    address = str(tmp_path / "later.sock")
    notifier = Notifier(address)
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        notifier.reload_finished(Reload("start", "start", "succeeded"), 1)  # nobody listens yet
        notifier.reload_started(Reload("r2", "signal", None), 1)
    dropped = [r for r in caplog.records if r.name == LOGGER and "cannot notify systemd" in r.getMessage()]
    assert [r.levelno for r in dropped] == [logging.WARNING, logging.DEBUG]  # one warning for a run of failures
    assert "dropped: READY=1" in dropped[0].getMessage()

    receiver = NotifySocket(address)
    try:
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger=LOGGER):
            notifier.reload_finished(Reload("r2", "signal", "succeeded"), 2)
        assert receiver.next(timeout=5) == {"READY": "1", "STATUS": "generation 2 serving; reload r2 succeeded"}
        assert not [r for r in caplog.records if "cannot notify systemd" in r.getMessage()]
    finally:
        receiver.close()
    os.unlink(address)
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        notifier.stopping(2)
    assert "cannot notify systemd" in warnings_in(caplog)[-1]  # a new run of failures warns again


def test_a_full_receiver_without_an_event_loop_drops_what_waits(abstract_notify_socket: NotifySocket) -> None:
    # Outside the master's loop (it has ended), nothing could send the waiting changes later.
    filler = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    filler.setblocking(False)
    address = "\0" + abstract_notify_socket.env[1:]
    try:
        for _ in range(100_000):
            try:
                filler.sendto(b"FILLER=1", address)
            except BlockingIOError:
                break
        else:
            pytest.fail("the receiver's queue never filled")
    finally:
        filler.close()
    notifier = Notifier(address)  # as take_notifier passes an @name: in the abstract namespace
    notifier.reload_finished(Reload("start", "start", "succeeded"), 1)  # waits for room, with no loop to retry
    queued = abstract_notify_socket.pending()
    assert queued and all(m == {"FILLER": "1"} for m in queued)
    notifier.reload_started(Reload("r2", "api", None), 1)  # the dropped change holds nothing up
    message = abstract_notify_socket.next(timeout=5)
    assert message["RELOADING"] == "1" and message["STATUS"].endswith("(reload r2, requested by api)")


# ----- LISTEN_PID and LISTEN_FDS ----------------------------------------------------------------


def test_listen_fds_without_listen_pid_is_not_socket_activation(
    systemd_env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    systemd_env.setenv("LISTEN_FDS", "1")
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert activated_listeners() is None
    assert warnings_in(caplog) == ["LISTEN_FDS is set without LISTEN_PID: ignored (not socket activation)"]
    assert "LISTEN_FDS" not in os.environ


def test_sockets_passed_to_another_process_are_left_alone(
    systemd_env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    other = dead_pid()
    systemd_env.setenv("LISTEN_PID", str(other))
    systemd_env.setenv("LISTEN_FDS", "1")
    systemd_env.setenv("LISTEN_FDNAMES", "http")
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert activated_listeners() is None
    assert warnings_in(caplog) == [
        f"LISTEN_PID={other} is not this process ({os.getpid()}): the passed sockets are not ours; ignored"
    ]
    assert not any(name in os.environ for name in systemd.LISTEN_ENV)


def test_listen_pid_alone_passes_no_socket(systemd_env: pytest.MonkeyPatch) -> None:
    systemd_env.setenv("LISTEN_PID", str(os.getpid()))
    assert activated_listeners() is None
    assert "LISTEN_PID" not in os.environ


def test_a_listen_pid_that_is_no_process_id_is_refused(systemd_env: pytest.MonkeyPatch) -> None:
    systemd_env.setenv("LISTEN_PID", "self")
    systemd_env.setenv("LISTEN_FDS", "1")
    with pytest.raises(ActivationError, match=r"^socket activation: LISTEN_PID='self' is not a process id$"):
        activated_listeners()
    assert not any(name in os.environ for name in systemd.LISTEN_ENV)
