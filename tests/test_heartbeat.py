"""Hung workers and workers' exit statuses (issue 12 item 6), with real processes on loopback.

A worker whose event loop is blocked stops answering the master's heartbeats: after
`worker_timeout` it is replaced (the new worker first), then killed, and counted as `hung`.
Every report of a worker's end names how it ended: its exit code or the signal.
The protocol part: heartbeats are a new optional kind, asked only of workers that announce them.
"""

from __future__ import annotations

import os
import re
import signal
import threading
from pathlib import Path

import httpx
import pytest

from conftest import (
    StartService,
    metric,
    pid_alive,
    reload_by_sighup,
    serve_marker,
    supervisor_status,
    wait_until,
    worker_pids,
)
from pypnm.supervisor import protocol
from pypnm.supervisor.generation import describe_exit
from pypnm.supervisor.protocol import Heartbeat, HeartbeatAnswer, WorkerExited, WorkerReady

# ----- protocol: an additive change of version 1 --------------------------------------------------


def test_heartbeat_messages_round_trip() -> None:
    for message in (Heartbeat(), HeartbeatAnswer(), WorkerReady(None, heartbeat=True)):
        assert protocol.decode_worker(protocol.encode_worker(message)) == message
    exited = WorkerExited(pid=42, status=9)
    assert protocol.decode_template(protocol.encode_template(exited)) == exited


def test_a_ready_event_of_an_older_worker_announces_no_heartbeat() -> None:
    # Exactly what a worker of before this change sends: it is never asked, so never taken for hung.
    assert protocol.decode_worker(b'{"event": "ready", "restart_only": null}\n') == WorkerReady(None, heartbeat=False)
    # And a ready event without heartbeats is encoded as before, without the new field.
    assert b"heartbeat" not in protocol.encode_worker(WorkerReady())


def test_exit_statuses_in_words() -> None:
    assert describe_exit(3 << 8) == "exit code 3"
    assert describe_exit(signal.SIGKILL) == "killed by SIGKILL (killed, out of memory?)"
    assert describe_exit(signal.SIGKILL, killed_by_master=True) == "killed by SIGKILL (by the master)"
    assert describe_exit(signal.SIGSEGV) == "killed by SIGSEGV"
    assert describe_exit(signal.SIGRTMIN + 2) == f"killed by signal {signal.SIGRTMIN + 2}"  # no name in Python
    assert describe_exit(None) == "exit status unknown"


# ----- real processes -------------------------------------------------------------------------------


def test_a_worker_whose_event_loop_blocks_is_replaced_while_the_other_keeps_answering(
    start_service: StartService, marker_app: Path
) -> None:
    service = serve_marker(start_service, marker_app, workers=2, PYPNM_WORKER_TIMEOUT="2")
    before = wait_until(lambda: pids if len(pids := worker_pids(service)) == 2 else None)

    outcome: list[int | httpx.HTTPError] = []

    def block() -> None:
        try:
            outcome.append(
                service.get("/block", params={"seconds": 60, "touch": str(blocking)}, timeout=70).status_code
            )
        except httpx.HTTPError as exc:
            outcome.append(exc)

    blocking = marker_app / "blocking"
    blocked_request = threading.Thread(target=block, daemon=True)
    blocked_request.start()
    # From here on the blocked worker accepts nothing: every request below goes to the other one.
    wait_until(blocking.exists)
    hung = re.compile(r"worker hung pid=(\d+) generation=1: event loop blocked for (\d+) s")
    # Until the master says which worker hung, and then until it is killed and replaced, every
    # request is answered: by the other worker (the blocked one accepts nothing), then by either.
    answered_by: set[int] = set()
    killed: re.Match[str] | None = None
    for _ in range(600):
        response = service.get("/marker")
        assert response.status_code == 200, response.text
        answered_by.add(response.json()["pid"])
        killed = re.search(
            r"worker killed pid=(\d+) generation=1 \(([^)]*)\): (.*); replaced by pid=(\d+)", service.output()
        )
        if killed:
            break
    assert killed is not None, service.output()
    match = hung.search(service.output())
    assert match is not None, service.output()
    blocked, replacement = int(match.group(1)), int(killed.group(4))
    assert int(killed.group(1)) == blocked and blocked in before and replacement not in before
    assert int(match.group(2)) >= 2
    assert "killed by SIGKILL (by the master)" in killed.group(3)
    assert answered_by <= before | {replacement}

    # The new worker serves beside the other one; the blocked one is gone.
    wait_until(lambda: worker_pids(service) == (before - {blocked}) | {replacement})
    assert not pid_alive(blocked)
    wait_until(lambda: service.get("/marker").json()["pid"] == replacement, timeout=20, interval=0.01)
    blocked_request.join(10)
    assert outcome and isinstance(outcome[0], httpx.HTTPError)  # the killed worker's own request was cut

    [entry] = supervisor_status(service)["worker_exits"]
    assert (entry["pid"], entry["reason"]) == (blocked, "hung")
    assert entry["ended"].startswith("event loop blocked for ")
    metrics = service.get("/metrics").text
    assert metric(metrics, "pypnm_worker_restarts_total", reason="hung") == 1
    assert metric(metrics, "pypnm_worker_restarts_total", reason="crash") == 0


def test_a_worker_ends_are_reported_with_its_signal_or_exit_code(start_service: StartService, marker_app: Path) -> None:
    service = serve_marker(start_service, marker_app, workers=1)
    [first] = wait_until(lambda: worker_pids(service) or None)

    os.kill(first, signal.SIGKILL)  # what the kernel's OOM killer does
    wait_until(
        lambda: (
            f"worker exited pid={first} generation=1 (killed by SIGKILL (killed, out of memory?))" in service.output()
        )
    )
    [second] = wait_until(lambda: (pids := worker_pids(service) - {first}) and pids)

    with pytest.raises(httpx.HTTPError):
        service.get("/exit?code=7")
    wait_until(lambda: f"worker exited pid={second} generation=1 (exit code 7)" in service.output())
    wait_until(lambda: worker_pids(service) - {first, second} or None)
    assert service.get("/marker").status_code == 200
    exits = [(e["pid"], e["generation"], e["reason"], e["ended"]) for e in supervisor_status(service)["worker_exits"]]
    assert exits == [
        (second, 1, "crash", "exit code 7"),
        (first, 1, "crash", "killed by SIGKILL (killed, out of memory?)"),
    ]


def test_a_candidate_that_dies_fails_the_reload_with_its_exit_code(
    start_service: StartService, marker_app: Path
) -> None:
    service = serve_marker(start_service, marker_app, workers=1)
    # Dies as it is imported: in the generation's zygote, which reports it like a worker.
    (marker_app / "markerpkg" / "marker.py").write_text("import os\n\nos._exit(5)\n")
    status = reload_by_sighup(service, 1)
    assert status["last_reload"]["outcome"] == "failed"
    assert "the zygote exited while importing the app (exit code 5" in status["last_reload"]["reason"]
    assert service.get("/marker").status_code == 200  # generation 1 keeps serving
    # Dies after the fork, in its lifespan startup: the worker's own exit.
    main = marker_app / "markerpkg" / "main.py"
    main.write_text(main.read_text() + '\n\n@app.on_event("startup")\nasync def _die() -> None:\n    os._exit(6)\n')
    (marker_app / "markerpkg" / "marker.py").write_text('MARKER = "v1"\n')
    status = reload_by_sighup(service, 2)
    assert status["last_reload"]["outcome"] == "failed"
    assert "a worker exited before it was ready (exit code 6" in status["last_reload"]["reason"]
    assert service.get("/marker").status_code == 200
