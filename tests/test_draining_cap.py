"""Long-lived responses cannot pile up old generations: `max_draining_generations` caps them.

Real processes: the marker app under `pypnm --workers 2`, a stream held open on every
generation, ten reloads. The service's processes (master, fork template, workers) are
counted from /proc the whole time, by a thread that walks the master's descendants.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import (
    Service,
    StartService,
    pid_alive,
    process_tree,
    reload_by_sighup,
    serve_marker,
    supervisor_status,
    wait_until,
)

WORKERS = 2
CAP = 2  # the default of max_draining_generations
RELOADS = 10
# serving + candidate + CAP draining generations, each with its zygote; master, template
BOUND = (WORKERS + 1) * (2 + CAP) + 2
STOPPED = re.compile(
    r"generation (\d+) stopped early \(.*?\): closing (\d+) connection\(s\), (\d+) request\(s\) still in progress"
)


class ProcessPeak(threading.Thread):
    """Counts the service's processes every 20 ms (for at most 120 s) and keeps the largest set seen."""

    def __init__(self, master_pid: int) -> None:
        super().__init__(daemon=True)
        self.master_pid = master_pid
        self.peak: set[int] = set()
        self.samples = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        for _ in range(6000):
            pids = process_tree(self.master_pid)
            self.samples += 1
            if len(pids) > len(self.peak):
                self.peak = pids
            if self._stop_event.wait(0.02):
                return

    def stop(self) -> None:
        self._stop_event.set()
        self.join(10)


def reload(service: Service, generation_before: int) -> dict[str, Any]:
    """SIGHUP the master; return its status once the next generation serves."""
    status = reload_by_sighup(service, generation_before)
    assert status["last_reload"]["outcome"] == "succeeded", status["last_reload"]
    return status


class Stream:
    """One /stream response held open; `lines` goes on where the first line was read."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.lines = response.iter_lines()
        pid, _marker = next(self.lines).split()
        self.pid = int(pid)


@pytest.fixture
def streams() -> Iterator[Callable[[Service], Stream]]:
    """Open long-lived /stream responses; every one is closed after the test, whatever happened."""
    with contextlib.ExitStack() as stack:
        client = stack.enter_context(
            httpx.Client(timeout=10.0, limits=httpx.Limits(max_connections=100, max_keepalive_connections=0))
        )

        def open_stream(service: Service) -> Stream:
            return Stream(stack.enter_context(client.stream("GET", service.base_url + "/stream?seconds=60")))

        yield open_stream


def hold_streams_on(
    service: Service, status: dict[str, Any], open_stream: Callable[[Service], Stream], held: Counter[int]
) -> list[Stream]:
    """Open streams until every worker of the serving generation holds one (at most 8 tries)."""
    pids = {w["pid"] for w in status["workers"] if w["generation"] == status["generation"]}
    opened: list[Stream] = []
    for _ in range(8):
        stream = open_stream(service)
        assert stream.pid in pids, (stream.pid, status["workers"])
        opened.append(stream)
        held[status["generation"]] += 1
        if pids <= {s.pid for s in opened}:
            break
    return opened


def test_draining_generations_are_capped_and_the_oldest_is_closed_with_its_count(
    start_service: StartService, marker_app: Path, streams: Callable[[Service], Stream]
) -> None:
    service = serve_marker(start_service, marker_app, workers=WORKERS, graceful_timeout=60)
    status = supervisor_status(service)
    held: Counter[int] = Counter()  # generation -> streams the test holds on it
    by_generation = {status["generation"]: hold_streams_on(service, status, streams, held)}
    peak = ProcessPeak(service.proc.pid)
    peak.start()
    try:
        for _ in range(RELOADS):
            status = reload(service, status["generation"])
            by_generation[status["generation"]] = hold_streams_on(service, status, streams, held)
        last = status["generation"]
        oldest_kept = last - CAP  # generations last-CAP .. last-1 may still drain
        # The close of the last generation over the cap runs after the swap: wait for its line.
        wait_until(lambda: f"generation {oldest_kept - 1} stopped early" in service.output(), timeout=15)
        status = supervisor_status(service)
    finally:
        peak.stop()

    assert peak.samples > 0
    assert len(peak.peak) <= BOUND, f"{len(peak.peak)} processes alive at once (bound {BOUND}): {sorted(peak.peak)}"
    old = {w["generation"] for w in status["workers"] if w["generation"] != last}
    assert old <= set(range(oldest_kept, last)), status["workers"]

    # Every generation over the cap was stopped, and the log says how many connections it still had:
    # exactly the streams this test held on it.
    stopped = {int(g): (int(c), int(r)) for g, c, r in STOPPED.findall(service.output())}
    assert set(stopped) == set(range(1, oldest_kept)), service.output()
    for generation, (connections, requests) in stopped.items():
        assert connections == requests == held[generation], (generation, stopped[generation], held)

    # The streams of a stopped generation were cut (no end of the chunked body); those still draining flow on.
    with pytest.raises(httpx.RemoteProtocolError):
        list(by_generation[1][0].lines)
    assert next(by_generation[last - 1][0].lines) == "."
    assert service.get("/marker").json()["marker"] == "v1"


def test_a_request_that_ignores_the_disconnect_does_not_hold_a_closed_generation(
    start_service: StartService, marker_app: Path
) -> None:
    """/slow sleeps through a disconnect: it is cancelled, the worker still shuts its app down and leaves."""
    service = serve_marker(start_service, marker_app, graceful_timeout=60, PYPNM_MAX_DRAINING_GENERATIONS="1")
    status = supervisor_status(service)
    (old_pid,) = (w["pid"] for w in status["workers"])
    with ThreadPoolExecutor(max_workers=1) as pool:
        slow = pool.submit(service.get, "/slow?seconds=30", timeout=30)
        wait_until(lambda: service.get("/in-flight").json()["slow"] == 1, timeout=10)
        status = reload(service, status["generation"])  # generation 1 drains: the one allowed
        reload(service, status["generation"])  # one too many: generation 1 is stopped

        wait_until(lambda: STOPPED.search(service.output()), timeout=15)  # logged once the worker is gone
        wait_until(lambda: not pid_alive(old_pid), timeout=5)
        with pytest.raises(httpx.TransportError):  # cut, not answered
            slow.result(timeout=10)
    output = service.output()
    assert STOPPED.findall(output) == [("1", "1", "1")], output
    assert "killed" not in output, output  # it left by itself, within the grace period
    assert "Traceback" not in output, output  # the cancelled request is one line
    assert f"[worker pid={old_pid} gen=1] uvicorn.error: request cancelled: its connection was closed" in output
    assert f"[worker pid={old_pid} gen=1] uvicorn.error: Application shutdown complete." in output
