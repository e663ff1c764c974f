"""What a worker does around the swap: it warms up before it accepts, and drains at once when told to stop.

Real processes: the marker app under `pypnm --workers 1`, reloaded by SIGHUP. The warm-up
(one request through the worker's own HTTP stack, answered by a stand-in app) must come
before the worker accepts and leave nothing the app's clients can see: no request in the
app's metrics. A keep-alive connection to the replaced generation gets its next request
answered, by the old code, with `Connection: close`, and an idle one is closed without a
request: its client's next connection reaches the new generation.
"""

from __future__ import annotations

import json
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from conftest import (
    Service,
    StartService,
    parse_head,
    read_until_closed,
    reload_by_sighup,
    serve_marker,
    supervisor_status,
    wait_until,
)

SERVING = re.compile(r"\[worker pid=(\d+) gen=\d+\] pypnm\.supervisor\.worker: generation \d+ worker serving")
WARMED = re.compile(r"\[worker pid=(\d+) gen=\d+\] pypnm\.supervisor\.worker: warmed up before accepting in [\d.]+ms")
MARKER_REQUEST = b"GET /marker HTTP/1.1\r\nHost: localhost\r\n\r\n"


def read_response(sock: socket.socket) -> tuple[dict[str, str], dict[str, object]]:
    """One response on a keep-alive connection (the marker app answers with Content-Length): headers, JSON body."""
    sock.settimeout(10.0)
    data = b""
    for _ in range(1000):
        head, separator, rest = data.partition(b"\r\n\r\n")
        if separator:
            status, headers = parse_head(head)
            if len(rest) >= int(headers["content-length"]):
                assert status == 200, data
                return headers, json.loads(rest[: int(headers["content-length"])])
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection before it answered; got {data!r}"
        data += chunk
    raise AssertionError(f"no whole response: {data!r}")


def lines_in_order(service: Service, pattern: re.Pattern[str]) -> list[tuple[int, int]]:
    """(line number, worker pid) of every log line matching `pattern`."""
    return [
        (number, int(found.group(1)))
        for number, line in enumerate(service.output().splitlines())
        if (found := pattern.search(line))
    ]


def test_each_worker_warms_up_before_it_accepts_and_the_app_never_sees_it(
    start_service: StartService, marker_app: Path
) -> None:
    service = serve_marker(start_service, marker_app, "--log-level", "debug")
    first = supervisor_status(service)["generation"]
    status = reload_by_sighup(service, first)
    assert status["last_reload"]["outcome"] == "succeeded"

    warmed = lines_in_order(service, WARMED)
    serving = lines_in_order(service, SERVING)
    assert len(serving) == 2, service.output()  # generation 1's worker, then generation 2's
    for serving_line, pid in serving:
        before = [line for line, warmed_pid in warmed if warmed_pid == pid]
        assert before and before[0] < serving_line, f"worker {pid} accepted before it warmed up:\n{service.output()}"
    assert "warm-up request" not in service.output()  # neither failed nor answered other than 200

    # The app counts every request it answers (pypnm_http_requests_total, by route): the warm-up is not one.
    # Generation 1's worker, which answered the test's requests so far, writes its counts out up to
    # a second after its last one (pypnm.api.metrics.FLUSH_INTERVAL), and the first scrape after the
    # swap may come before that: scrape until some count shows, checking every scrape.
    def counted_routes() -> set[str]:
        metrics = service.get("/metrics").text
        routes = set(re.findall(r'^pypnm_http_requests_total\{[^}]*route="([^"]*)"', metrics, re.MULTILINE))
        assert routes <= {"/health", "/supervisor", "/metrics"}, metrics
        return routes

    wait_until(counted_routes, timeout=10.0, interval=0.2)


def test_keep_alive_connections_to_a_replaced_generation_are_drained_at_the_swap(
    start_service: StartService, marker_app: Path
) -> None:
    service = serve_marker(start_service, marker_app)
    first = supervisor_status(service)["generation"]
    with (
        socket.create_connection(("127.0.0.1", service.port), timeout=10.0) as asking,
        socket.create_connection(("127.0.0.1", service.port), timeout=10.0) as idle,
        ThreadPoolExecutor(1) as reloader,
    ):
        for sock in (asking, idle):
            sock.sendall(MARKER_REQUEST)
            headers, body = read_response(sock)
            assert headers.get("connection") != "close"  # kept alive while its generation serves
        old_pid = body["pid"]

        # One connection keeps asking across the reload (never idle, so never closed for it): the
        # old worker answers every request on it, and the first one after it stops accepting
        # with Connection: close.
        reload = reloader.submit(reload_by_sighup, service, first)
        deadline = time.monotonic() + 30.0
        for _ in range(10_000):
            asking.sendall(MARKER_REQUEST)
            headers, body = read_response(asking)
            assert body["pid"] == old_pid
            if headers.get("connection") == "close" or time.monotonic() > deadline:
                break
        assert headers.get("connection") == "close", "the old worker kept the connection open"
        assert read_until_closed(asking) == b""
        status = reload.result(timeout=60.0)
        assert status["last_reload"]["outcome"] == "succeeded"

        # The other one, idle all along, is closed by the old worker without a request.
        assert read_until_closed(idle, timeout=15.0) == b""

    answer = service.get("/marker").json()
    assert answer["pid"] != old_pid
