"""A reload request whose caller gave up is dropped by the master, never run later.

Real processes: pypnm serving its own app; the master is frozen with SIGSTOP while the
endpoint waits for it, and thawed with SIGCONT after the endpoint has answered 500.
"""

from __future__ import annotations

import signal

from conftest import RELOAD_BODY, RELOAD_PATH, StartService, serve_pypnm, wait_until
from pypnm.supervisor.timeouts import CONTROL_ASK as RELOAD_CONTROL_TIMEOUT


def test_a_reload_that_timed_out_is_dropped_and_a_retry_reloads_once(
    start_service: StartService,
) -> None:
    service = serve_pypnm(start_service, "--workers", "1", PYPNM_RELOAD_MIN_INTERVAL="0")
    before = service.status()
    request_id = "frozen-master-reload-1"

    service.signal(signal.SIGSTOP)
    try:
        response = service.get(RELOAD_PATH, headers={"X-Request-ID": request_id}, timeout=RELOAD_CONTROL_TIMEOUT + 20)
    finally:
        service.signal(signal.SIGCONT)

    assert response.status_code == 500, response.text
    assert response.json() == {
        "detail": f"Failed to trigger reload: the supervisor did not answer within {RELOAD_CONTROL_TIMEOUT:g}s; "
        "the reload was not started (the supervisor drops a request it reads too late); "
        "retry, or check the pypnm master's log"
    }
    assert "x-reload-id" not in response.headers

    # Thawed, the master reads the stale request and says it dropped it.
    source = f"http (request {request_id})"
    wait_until(lambda: f"reload requested by {source} dropped: its caller gave up" in service.output(), timeout=15)
    after = service.status()
    assert after["generation"] == before["generation"]
    assert after["pending_reload"] is None and after["reload_state"] == "idle", after
    assert all(r["source"] != source for r in after["reloads"]), after["reloads"]
    assert f"reload requested by {source}: reload" not in service.output()  # never queued

    # The retry reloads, once: it takes the very next generation number, which the dropped one never got.
    retry = service.get(RELOAD_PATH)
    assert retry.status_code == 200 and retry.content == RELOAD_BODY, retry.text
    record = service.wait_reload(retry.headers["x-reload-id"])
    assert record["outcome"] == "succeeded", record
    assert record["generation"] == before["generation"] + 1
    assert service.status()["generation"] == before["generation"] + 1
