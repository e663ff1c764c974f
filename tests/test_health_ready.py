"""`/health` carries upstream PyPNM's fields and is readable cross-origin; `/ready` turns 503 when stopping.

Real servers on 127.0.0.1. The 503 of a stopping worker is seen the way a load balancer
with a pooled connection sees it: a keep-alive connection opened to the old worker asks
`/ready` again and again while the worker is told to drain (by a reload, by SIGTERM to
the master, or by SIGTERM to the worker itself); from then on the worker answers it 503
until it closes the connection.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from conftest import RELOAD_PATH, Service, StartService, serve_pypnm, wait_until

WEBUI = "https://webui.example:5173"


def serve(start_service: StartService, **env: str) -> Service:
    env.setdefault("PYPNM_RELOAD_MIN_INTERVAL", "0")
    return serve_pypnm(start_service, "--workers", "1", "--graceful-timeout", "10", **env)


def test_health_has_upstream_fields_and_the_generation(start_service: StartService) -> None:
    service = serve(start_service)
    before = time.time()
    body = service.get("/health").json()
    status = service.status()

    assert body["status"] == "ok"
    assert body["version"] == status["version"]
    assert body["service"] == {"name": "pypnm", "version": status["version"]}
    assert body["generation"] == status["generation"] == 1
    uptime = body["uptime"]
    assert isinstance(uptime["starttime"], float) and isinstance(uptime["uptime"], int)
    # The same instant as the status's started_at of the worker that answered (one worker).
    assert uptime["starttime"] == datetime.fromisoformat(status["started_at"]).timestamp()
    assert 0 <= uptime["uptime"] <= before - uptime["starttime"] + 1
    memory = body["memory"]
    assert all(isinstance(memory[key], int) for key in ("rss_bytes", "total_bytes", "available_bytes"))
    assert 1_000_000 < memory["rss_bytes"] < memory["total_bytes"]
    assert 0 < memory["available_bytes"] <= memory["total_bytes"]
    # rss_bytes is the answering worker's resident memory: near what its /proc entry says now.
    worker_rss = int(Path(f"/proc/{status['pid']}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    assert abs(memory["rss_bytes"] - worker_rss) < worker_rss // 2
    with open("/proc/meminfo") as meminfo:
        total_kb = next(int(line.split()[1]) for line in meminfo if line.startswith("MemTotal:"))
    assert memory["total_bytes"] == total_kb * 1024

    assert service.get(RELOAD_PATH).status_code == 200
    wait_until(lambda: service.get("/health").json()["generation"] == 2)
    assert service.get("/ready").json() == {"status": "ready", "generation": 2}


def test_health_and_ready_unsupervised(start_service: StartService) -> None:
    service = start_service(
        [sys.executable, "-m", "uvicorn", "pypnm.main:app", "--port", "{port}", "--no-proxy-headers"]
    )
    body = service.get("/health").json()
    assert body["generation"] is None
    assert body["service"]["name"] == "pypnm" and body["memory"]["rss_bytes"] > 0
    response = service.get("/ready")
    assert response.status_code == 200 and response.json() == {"status": "ready", "generation": None}


def test_health_is_readable_cross_origin_by_a_listed_origin_only(start_service: StartService) -> None:
    service = serve(start_service, PYPNM_CORS_ORIGINS=f'["{WEBUI}"]')

    listed = service.get("/health", headers={"Origin": WEBUI})
    assert listed.status_code == 200 and listed.json()["status"] == "ok"
    assert listed.headers["access-control-allow-origin"] == WEBUI
    preflight = httpx.options(
        service.base_url + "/health",
        headers={"Origin": WEBUI, "Access-Control-Request-Method": "GET"},
        timeout=10,
    )
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == WEBUI
    assert service.get("/ready", headers={"Origin": WEBUI}).headers["access-control-allow-origin"] == WEBUI

    unlisted = service.get("/health", headers={"Origin": "https://elsewhere.example"})
    assert unlisted.status_code == 200  # answered (it is open), but a browser will not let that page read it
    assert "access-control-allow-origin" not in unlisted.headers


def ask_ready_until_stopping(client: httpx.Client, generation: int, timeout: float = 15.0) -> httpx.Response:
    """Ask /ready on the client's pooled connection until it answers 503; every answer must come from `generation`."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.02) + 1):
        response = client.get("/ready")
        assert response.json()["generation"] == generation, (
            f"answered by another generation before this one said it was stopping: {response.json()}"
        )
        if response.status_code == 503:
            return response
        assert response.status_code == 200, response.text
        assert time.monotonic() < deadline, "/ready never answered 503"
        time.sleep(0.02)
    raise AssertionError("/ready never answered 503")


def assert_stopping(response: httpx.Response, generation: int) -> None:
    body: dict[str, Any] = response.json()
    assert body["status"] == "stopping" and body["generation"] == generation
    assert "draining or stopping" in body["detail"]


def test_ready_is_503_on_the_old_generation_during_a_reload(start_service: StartService) -> None:
    service = serve(start_service)
    with httpx.Client(base_url=service.base_url, timeout=10) as old_connection:
        assert old_connection.get("/ready").json() == {"status": "ready", "generation": 1}
        assert service.get(RELOAD_PATH).status_code == 200  # on a connection of its own
        assert_stopping(ask_ready_until_stopping(old_connection, generation=1), generation=1)
        # The old worker closes that connection soon (Connection: close on a later answer, or once
        # idle); the client's next connection reaches the new generation.
        wait_until(lambda: old_connection.get("/ready").json() == {"status": "ready", "generation": 2})
    fresh = service.get("/ready")
    assert fresh.status_code == 200 and fresh.json() == {"status": "ready", "generation": 2}


def test_ready_is_503_once_the_master_is_told_to_stop(start_service: StartService) -> None:
    service = serve(start_service)
    with httpx.Client(base_url=service.base_url, timeout=10) as connection:
        assert connection.get("/ready").status_code == 200
        service.signal(signal.SIGTERM)
        assert_stopping(ask_ready_until_stopping(connection, generation=1), generation=1)
    assert service.proc.wait(20) == 0


def test_ready_is_503_when_the_worker_itself_gets_sigterm(start_service: StartService) -> None:
    service = serve(start_service)
    worker_pid = service.status()["pid"]
    with httpx.Client(base_url=service.base_url, timeout=10) as connection:
        assert connection.get("/ready").status_code == 200
        os.kill(worker_pid, signal.SIGTERM)
        assert_stopping(ask_ready_until_stopping(connection, generation=1), generation=1)
    # The master replaces the worker; the service is ready again on a new connection.
    wait_until(lambda: service.get("/ready").status_code == 200 and service.status()["pid"] != worker_pid)
