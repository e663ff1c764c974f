"""HTTP limits of the workers: request head size (431), request head time (408/close), connections (503).

Every test talks to a real supervised pypnm on 127.0.0.1 through raw sockets, so what is
sent and when is exactly what the test says; every read and wait is bounded.
"""

from __future__ import annotations

import json
import select
import socket
import time
from pathlib import Path

import pytest

from conftest import (
    Service,
    StartService,
    parse_head,
    read_until_closed,
    serve_marker,
    serve_pypnm,
    wait_until,
)
from pypnm.settings import SettingsError, load_settings

KiB = 1024
MiB = 1024 * KiB


# ----- raw HTTP over a socket ------------------------------------------------------------------


def connect(service: Service) -> socket.socket:
    return socket.create_connection(("127.0.0.1", service.port), timeout=10.0)


def request(path: str = "/health", **headers: str) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{name}: {value}" for name, value in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_response(sock: socket.socket, buffer: bytearray, timeout: float = 10.0) -> tuple[int, bytes]:
    """The next response on a connection that stays open: status and body.

    `buffer` holds what was read past the response (pipelined answers) for the next call.
    """
    deadline = time.monotonic() + timeout
    for _ in range(10_000):
        head, separator, rest = bytes(buffer).partition(b"\r\n\r\n")
        if separator:
            status, headers = parse_head(head)
            length = int(headers.get("content-length", "0"))
            if len(rest) >= length:
                del buffer[: len(head) + 4 + length]
                return status, rest[:length]
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no complete response within {timeout}s; got {bytes(buffer)!r}"
        sock.settimeout(remaining)
        chunk = sock.recv(64 * KiB)
        assert chunk, f"connection closed before a complete response; got {bytes(buffer)!r}"
        buffer += chunk
    raise AssertionError(f"no complete response; got {bytes(buffer)!r}")


def parse_refusal(data: bytes) -> tuple[int, dict[str, str], str]:
    """A refusal that ends the connection: status, headers and its JSON `detail`."""
    head, _, body = data.partition(b"\r\n\r\n")
    status, headers = parse_head(head)
    return status, headers, str(json.loads(body)["detail"])


def memory_kib(pid: int, field: str) -> int:
    """A `VmRSS`/`VmHWM` line of /proc/<pid>/status, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{pid}/status")


def serve(start_service: StartService, **env: str) -> Service:
    return serve_pypnm(start_service, "--workers", "1", **env)


# ----- head size: 431 --------------------------------------------------------------------------


def test_a_header_line_over_the_line_limit_gets_431_and_the_connection_closes(start_service: StartService) -> None:
    service = serve(start_service)
    with connect(service) as sock:
        sock.sendall(request(**{"X-Big": "a" * (20 * KiB)}))
        answer = read_until_closed(sock)
    status, headers, detail = parse_refusal(answer)
    assert status == 431, answer[:200]
    assert headers["connection"] == "close"
    assert headers["content-type"] == "application/json"
    assert "limit_request_line_size" in detail and "16384 bytes" in detail, detail
    assert "refused a request from 127.0.0.1:" in service.output()
    assert service.get("/health").status_code == 200  # the worker is unharmed


def test_headers_adding_up_past_the_head_limit_get_431(start_service: StartService) -> None:
    service = serve(start_service)
    headers = {f"X-Part-{n}": "b" * (10 * KiB) for n in range(8)}  # each line fits, 80 KiB together does not
    with connect(service) as sock:
        sock.sendall(request(**headers))
        answer = read_until_closed(sock)
    status, _, detail = parse_refusal(answer)
    assert status == 431, answer[:200]
    assert "limit_request_header_size" in detail and "65536 bytes" in detail, detail


@pytest.mark.parametrize(
    "prefix",
    [
        pytest.param(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ", id="header"),
        pytest.param(  # trailer fields after the last chunk of a body are buffered like headers
            b"POST /health HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-Big: ",
            id="chunked-trailer",
        ),
    ],
)
def test_a_64_mb_field_is_cut_off_early_and_the_worker_stays_small(start_service: StartService, prefix: bytes) -> None:
    service = serve(start_service)
    worker = service.status()["pid"]
    peak_before = memory_kib(worker, "VmHWM")
    chunk = b"a" * (64 * KiB)
    sent = 0
    with connect(service) as sock:
        sock.sendall(prefix)
        try:
            for _ in range(64 * MiB // len(chunk)):
                sock.sendall(chunk)
                sent += len(chunk)
        except TimeoutError:
            pytest.fail(f"the server stopped reading after {sent} bytes but did not close the connection")
        except OSError:
            pass  # reset or broken pipe: the server closed the connection, as it should
    assert sent < 16 * MiB, f"the server took {sent} bytes of a single field before closing"
    growth_kib = memory_kib(worker, "VmHWM") - peak_before
    assert growth_kib < 16 * 1024, f"the worker's peak RSS grew by {growth_kib} KiB"
    response = service.get("/health")
    assert response.status_code == 200 and service.status()["pid"] == worker


def test_heads_under_the_limits_keep_alive_and_pipelining_still_work(start_service: StartService) -> None:
    service = serve(start_service)
    with connect(service) as sock:
        # One connection: a 15 KiB header line, then 56 KiB of headers, then two pipelined requests.
        received = bytearray()
        sock.sendall(request(**{"X-Big": "c" * (15 * KiB)}))
        assert read_response(sock, received)[0] == 200
        sock.sendall(request(**{f"X-Part-{n}": "d" * (14 * KiB) for n in range(4)}))
        assert read_response(sock, received)[0] == 200
        sock.sendall(request("/health") + request("/nothing-here"))
        assert read_response(sock, received)[0] == 200
        assert read_response(sock, received)[0] == 404
        # A chunked body of 3000 small chunks (not a head: no limit applies), then one more request.
        chunks = b"".join(b"40\r\n" + b"f" * 64 + b"\r\n" for _ in range(3000))
        sock.sendall(
            b"POST /health HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
            + chunks
            + b"0\r\n\r\n"
            + request()
        )
        assert read_response(sock, received)[0] == 405
        assert read_response(sock, received)[0] == 200
    service.trigger_reload()  # the documented 200 answer, on a connection of its own


def test_a_head_pipelined_behind_a_body_in_the_same_write_is_measured_too(start_service: StartService) -> None:
    service = serve(start_service)
    body = b'{"a": 1}\r\n\r\nGET /not-a-request HTTP/1.1\r\n\r\n'  # looks like a head: only the length says it is not
    post = b"POST /health HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    with connect(service) as sock:
        # Under the limits: the body, then a request behind it, in one write.
        received = bytearray()
        sock.sendall(post + request("/ready"))
        assert read_response(sock, received)[0] == 405
        assert read_response(sock, received)[0] == 200
    # Over the line limit behind a body, on a new connection (so that it all comes in one read,
    # where it can): refused as it would be alone, never served. The refusal is written at once,
    # so it may come before the POST's own answer.
    with connect(service) as sock:
        sock.sendall(post + request("/ready", **{"X-Big": "e" * (100 * KiB)}))
        answer = read_until_closed(sock)
    assert b"HTTP/1.1 431 " in answer, answer[:300]
    assert b"limit_request_line_size" in answer and b'"ready"' not in answer, answer[:300]


# ----- head time: 408 / close ------------------------------------------------------------------


def test_a_stalled_request_head_is_closed_after_the_timeout(start_service: StartService) -> None:
    service = serve(start_service, PYPNM_TIMEOUT_REQUEST_HEADER="1")
    with connect(service) as stalled, connect(service) as silent, connect(service) as kept:
        stalled.sendall(b"GET /heal")  # half a request line, then nothing
        # Meanwhile another connection is served normally, and a keep-alive one stalls in its second request.
        assert service.get("/health").status_code == 200
        kept.sendall(request())
        assert read_response(kept, bytearray())[0] == 200
        kept.sendall(b"GET /health HTTP/1.1\r\nHo")

        status, headers, detail = parse_refusal(read_until_closed(stalled))
        assert status == 408 and headers["connection"] == "close"
        assert "timeout_request_header" in detail, detail
        assert read_until_closed(silent) == b""  # nothing asked, nothing answered: just closed
        assert parse_refusal(read_until_closed(kept))[0] == 408


def test_a_trickling_request_head_is_closed_although_bytes_keep_coming(start_service: StartService) -> None:
    service = serve(start_service, PYPNM_TIMEOUT_REQUEST_HEADER="1")
    trickle = b"GET /health?" + b"x" * 100
    with connect(service) as sock:
        for sent in range(1, len(trickle) + 1):
            try:
                sock.sendall(trickle[sent - 1 : sent])
            except OSError:
                break
            readable, _, _ = select.select([sock], [], [], 0.25)
            if readable:
                break
        answer = read_until_closed(sock)
    assert sent < 40, f"still open after {sent} bytes sent over {sent * 0.25:.1f}s"
    assert parse_refusal(answer)[0] == 408


def test_the_head_timeout_does_not_cut_a_slow_response(start_service: StartService, marker_app: Path) -> None:
    service = serve_marker(start_service, marker_app, graceful_timeout=None, PYPNM_TIMEOUT_REQUEST_HEADER="1")
    with connect(service) as sock:
        sock.sendall(request("/slow?seconds=2.5"))  # answered well after the 1 s head timeout
        status, body = read_response(sock, bytearray())
        assert status == 200 and json.loads(body)["slept"] == 2.5
        sock.sendall(request("/marker"))  # the same keep-alive connection goes on
        assert read_response(sock, bytearray())[0] == 200


# ----- connections: 503 ------------------------------------------------------------------------


def test_connections_beyond_limit_concurrency_get_503(start_service: StartService) -> None:
    service = serve(start_service, PYPNM_LIMIT_CONCURRENCY="3")
    time.sleep(0.2)  # let the readiness checks' connections close
    idle = [connect(service), connect(service)]
    try:
        with connect(service) as third:
            third.sendall(request())
            assert read_response(third, bytearray())[0] == 200  # 3 connections open: within the limit
            with connect(service) as fourth:
                fourth.sendall(request())
                status, body = read_response(fourth, bytearray())
                assert status == 503, body
    finally:
        for sock in idle:
            sock.close()

    def served() -> bool:
        with connect(service) as sock:
            sock.sendall(request())
            return read_response(sock, bytearray())[0] == 200

    wait_until(served, timeout=10)  # once the idle connections are gone, requests are served again
    assert "Exceeded concurrency limit" in service.output()


# ----- settings --------------------------------------------------------------------------------


def test_a_reload_applies_new_limits_to_the_new_generation(start_service: StartService, tmp_path: Path) -> None:
    config = tmp_path / "pypnm.toml"
    config.write_text("limit_request_line_size = 8192\n")
    service = serve_pypnm(
        start_service,
        "--workers",
        "1",
        "--config",
        str(config),
        # Reloaded by hand below; the settings-file watch would add a reload of its own.
        PYPNM_RELOAD_MIN_INTERVAL="0",
        PYPNM_WATCH_CONFIG="false",
    )

    with connect(service) as sock:
        sock.sendall(request(**{"X-Big": "e" * (10 * KiB)}))
        assert parse_refusal(read_until_closed(sock))[0] == 431
    config.write_text("limit_request_line_size = 32768\n")
    reload_id = service.trigger_reload()

    def settled() -> bool:
        status = service.status()
        record = next(r for r in status["reloads"] if r["id"] == reload_id)
        return record["outcome"] == "succeeded" and all(
            w["generation"] == status["generation"] for w in status["workers"]
        )

    wait_until(settled, timeout=30)
    response = service.get("/health", headers={"X-Big": "e" * (10 * KiB)})
    assert response.status_code == 200


def test_a_line_limit_above_the_head_limit_is_a_settings_error() -> None:
    with pytest.raises(SettingsError, match="limit_request_line_size may not be larger than limit_request_header_size"):
        load_settings(limit_request_line_size=128 * KiB)
