"""The reload supervisor with real processes: triggers, validation, last known good, draining, stops.

Two kinds of service are served, always from private copies so that tests can edit
them: a copy of the pypnm package (PYTHONPATH points at it), and the small
`tests/apps/markerpkg` app under `--app markerpkg.main:app`, whose answers carry a
marker that tests rewrite on disk and whose `/supervisor` relays the master's status.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import (
    RELOAD_PATH,
    STATUS_PATH,
    Service,
    StartService,
    pid_alive,
    rewrite,
    run_cli,
    serve_marker,
    serve_pypnm,
    set_marker,
    supervisor_status,
    wait_until,
)

# ----- helpers ---------------------------------------------------------------------------------


def serve_pypnm_copy(
    start_service: StartService, copy_root: Path, *flags: str, workers: int = 1, **env: str
) -> Service:
    env.setdefault("PYPNM_RELOAD_MIN_INTERVAL", "0")
    env.setdefault("PYPNM_ROLLBACK_WINDOW", "1")  # `reload --wait` waits it out: keep the tests short
    service = serve_pypnm(
        start_service, "--workers", str(workers), "--graceful-timeout", "10", *flags, PYTHONPATH=str(copy_root), **env
    )
    route_file = Path(service.status()["master"]["route_module_file"])
    assert route_file.is_relative_to(copy_root), f"serving {route_file}, not the copy in {copy_root}"
    return service


def marker(service: Service) -> str:
    response = service.get("/marker")
    assert response.status_code == 200, response.text
    return str(response.json()["marker"])


def serving_alone(service: Service, generation: int, workers: int = 1) -> dict[str, Any] | None:
    """The status once `generation` serves with all its workers and nothing else is left; else None."""
    status = supervisor_status(service)
    live = status["workers"]
    settled = (
        status["generation"] == generation
        and status["reload_state"] == "idle"
        and status["pending_reload"] is None
        and len(live) == workers
        and all(w["generation"] == generation and w["state"] == "serving" for w in live)
    )
    return status if settled else None


def wait_serving_alone(service: Service, generation: int, workers: int = 1, timeout: float = 30) -> dict[str, Any]:
    result: dict[str, Any] = wait_until(lambda: serving_alone(service, generation, workers), timeout)
    return result


def worker_pids(status: dict[str, Any]) -> set[int]:
    return {w["pid"] for w in status["workers"]}


def assert_new_generation(before: dict[str, Any], after: dict[str, Any], code_changed: bool) -> None:
    assert after["generation"] == before["generation"] + 1
    assert worker_pids(after).isdisjoint(worker_pids(before)), (before["workers"], after["workers"])
    assert after["last_reload"]["outcome"] == "succeeded", after["last_reload"]
    assert after["last_reload"]["generation"] == after["generation"]
    if code_changed:
        assert after["generation_code_version"] != before["generation_code_version"]
    else:
        assert after["generation_code_version"] == before["generation_code_version"]


def wait_in_flight(service: Service, count: int = 1) -> None:
    wait_until(lambda: service.get("/in-flight").json()["slow"] >= count, timeout=10)


# ----- every trigger reloads -------------------------------------------------------------------


def test_reload_by_endpoint_serves_new_code(start_service: StartService, pypnm_copy: Path) -> None:
    service = serve_pypnm_copy(start_service, pypnm_copy)
    before = wait_serving_alone(service, 1)
    assert service.get("/health").json()["version"] == "0.1.0"
    rewrite(pypnm_copy / "pypnm" / "__init__.py", '__version__ = "0.1.0"', '__version__ = "0.1.0+edited"')

    response = service.get(RELOAD_PATH)

    assert response.status_code == 200
    after = wait_serving_alone(service, 2)
    assert_new_generation(before, after, code_changed=True)
    assert after["last_reload"]["id"] == response.headers["x-reload-id"]
    assert after["last_reload"]["source"] == f"http (request {response.headers['x-request-id']})"
    assert after["version"] == "0.1.0+edited"
    assert after["code_version"] == after["generation_code_version"]
    assert after["pid"] in worker_pids(after)
    assert service.get("/health").json()["version"] == "0.1.0+edited"


def test_reload_by_sighup(start_service: StartService, marker_app: Path) -> None:
    service = serve_marker(start_service, marker_app)
    before = wait_serving_alone(service, 1)
    assert marker(service) == "v1"
    set_marker(marker_app, "v2")

    service.signal(signal.SIGHUP)

    after = wait_serving_alone(service, 2)
    assert_new_generation(before, after, code_changed=True)
    assert after["last_reload"]["source"] == "SIGHUP"
    assert marker(service) == "v2"


def test_reload_by_cli_wait(start_service: StartService, pypnm_copy: Path, tmp_path: Path) -> None:
    service = serve_pypnm_copy(start_service, pypnm_copy)
    before = wait_serving_alone(service, 1)

    result = run_cli("reload", "--url", service.base_url, "--wait", "--timeout", "30", cwd=tmp_path)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "succeeded" in result.stdout and "generation 2 serving" in result.stdout, result.stdout
    after = wait_serving_alone(service, 2)
    assert_new_generation(before, after, code_changed=False)
    assert after["last_reload"]["id"] in result.stdout


def test_reload_by_touching_the_route_module(start_service: StartService, marker_app: Path) -> None:
    service = serve_marker(start_service, marker_app)
    before = wait_serving_alone(service, 1)
    route_module = marker_app / "markerpkg" / "main.py"
    assert supervisor_status(service)["master"]["route_module_file"] == str(route_module.resolve())
    wait_until(lambda: "watching" in service.output(), timeout=10)
    set_marker(marker_app, "v2")  # not the route module: no reload by itself without --reload

    route_module.touch()

    after = wait_serving_alone(service, 2)
    assert_new_generation(before, after, code_changed=True)
    assert after["last_reload"]["source"] == f"file change: {route_module.resolve()}"
    assert marker(service) == "v2"


def test_reload_by_touching_the_pypnm_route_module(start_service: StartService, pypnm_copy: Path) -> None:
    service = serve_pypnm_copy(start_service, pypnm_copy)
    before = wait_serving_alone(service, 1)
    wait_until(lambda: "watching" in service.output(), timeout=10)

    (pypnm_copy / "pypnm" / "api" / "web_service.py").touch()

    after = wait_serving_alone(service, 2)
    assert_new_generation(before, after, code_changed=False)
    assert after["last_reload"]["source"].startswith("file change: ")


def test_reload_flag_reloads_on_a_source_change(start_service: StartService, marker_app: Path) -> None:
    package = marker_app / "markerpkg"
    service = serve_marker(start_service, marker_app, "--reload", "--reload-dir", str(package))
    before = wait_serving_alone(service, 1)
    assert before["master"]["watching_source"] is True
    wait_until(lambda: "watching" in service.output(), timeout=10)

    set_marker(marker_app, "v2")

    wait_until(lambda: marker(service) == "v2", timeout=20)
    after = wait_serving_alone(service, 2)
    assert_new_generation(before, after, code_changed=True)
    assert after["last_reload"]["source"] == f"file change: {(package / 'marker.py').resolve()}"


def test_reload_flag_with_pypnm_copy(start_service: StartService, pypnm_copy: Path) -> None:
    service = serve_pypnm_copy(start_service, pypnm_copy, "--reload")
    before = wait_serving_alone(service, 1)
    wait_until(lambda: "watching" in service.output(), timeout=10)

    rewrite(pypnm_copy / "pypnm" / "__init__.py", '__version__ = "0.1.0"', '__version__ = "0.1.0+watched"')

    wait_until(lambda: service.get("/health").json()["version"] == "0.1.0+watched", timeout=20)
    after = wait_serving_alone(service, 2)
    assert_new_generation(before, after, code_changed=True)


# ----- broken code never serves -----------------------------------------------------------------


@pytest.mark.parametrize("breakage", ["syntax-error", "exception-at-import"])
def test_broken_code_keeps_the_old_generation(
    start_service: StartService, pypnm_copy: Path, tmp_path: Path, breakage: str
) -> None:
    service = serve_pypnm_copy(start_service, pypnm_copy)
    before = wait_serving_alone(service, 1)
    module = pypnm_copy / "pypnm" / "api" / "health.py"
    original = module.read_text()
    assert original.endswith("\n")
    bad_line = original.count("\n") + 2
    if breakage == "syntax-error":
        module.write_text(original + "\ndef broken(:\n    pass\n")
        expected = ["SyntaxError", str(module), f"line {bad_line}"]
    else:
        module.write_text(original + '\nraise RuntimeError("boom at import")\n')
        expected = ["RuntimeError: boom at import", str(module), f"line {bad_line}"]

    result = run_cli("reload", "--url", service.base_url, "--wait", "--timeout", "30", cwd=tmp_path)

    assert result.returncode == 1, result.stdout + result.stderr
    assert "failed" in result.stdout and expected[0] in result.stdout, result.stdout
    failed = wait_serving_alone(service, 1)
    last = failed["last_reload"]
    assert last["outcome"] == "failed", last
    for part in expected:
        assert part in last["reason"], (part, last["reason"])
    assert worker_pids(failed) == worker_pids(before), "the serving workers must not change"
    assert failed["generation_code_version"] == before["generation_code_version"]
    assert service.get("/health").status_code == 200
    assert service.get("/health").json()["version"] == "0.1.0"

    module.write_text(original)
    fixed = run_cli("reload", "--url", service.base_url, "--wait", "--timeout", "30", cwd=tmp_path)

    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    generation = last["generation"] + 1  # the failed attempt used a number of its own
    after = wait_serving_alone(service, generation)
    assert after["last_reload"]["outcome"] == "succeeded"
    assert worker_pids(after).isdisjoint(worker_pids(before))
    assert service.get("/health").status_code == 200


# ----- crashes -----------------------------------------------------------------------------------


def test_killed_worker_respawns_on_its_own_generation(start_service: StartService, marker_app: Path) -> None:
    service = serve_marker(start_service, marker_app)
    before = wait_serving_alone(service, 1)
    (old_pid,) = worker_pids(before)
    set_marker(marker_app, "v2")  # on disk now; the running generation was built from v1

    os.kill(old_pid, signal.SIGKILL)

    wait_until(lambda: not pid_alive(old_pid), timeout=10)
    after = wait_until(lambda: (s := serving_alone(service, 1)) and worker_pids(s) != {old_pid} and s, timeout=20)
    (new_pid,) = worker_pids(after)
    answer = service.get("/marker").json()
    assert answer == {"marker": "v1", "pid": new_pid}
    assert after["workers"][0]["code_version"] == before["generation_code_version"]
    assert after["generation_code_version"] == before["generation_code_version"]
    assert after["last_reload"]["id"] == before["last_reload"]["id"], "a respawn is not a reload"

    # The change on disk was real: a reload picks it up.
    service.signal(signal.SIGHUP)
    wait_serving_alone(service, 2)
    assert marker(service) == "v2"


def test_killed_master_takes_workers_zygote_and_template_along(start_service: StartService, marker_app: Path) -> None:
    service = serve_marker(start_service, marker_app, workers=2)
    status = wait_serving_alone(service, 1, workers=2)
    others = [*worker_pids(status), status["master"]["template_pid"], *status["master"]["zygote_pids"]]
    assert len(others) == 4 and all(pid_alive(pid) for pid in others)

    runtime_dir = Path(status["control_socket"]).parent

    service.signal(signal.SIGKILL)

    assert runtime_dir.name.startswith("pypnm-")
    wait_until(lambda: not any(pid_alive(pid) for pid in others), timeout=8)
    # A killed master cannot remove its runtime directory (snapshots, control socket): its last process does.
    wait_until(lambda: not runtime_dir.exists(), timeout=8)


# ----- coalescing -------------------------------------------------------------------------------


@pytest.mark.parametrize("trigger", ["endpoint", "SIGHUP"])
def test_storm_of_triggers_builds_at_most_two_generations(
    start_service: StartService, pypnm_copy: Path, trigger: str
) -> None:
    # 2 s rather than the default 1 s between reload starts: the same rule, with room for a slow machine
    # to send the whole storm inside one interval.
    service = serve_pypnm_copy(start_service, pypnm_copy, PYPNM_RELOAD_MIN_INTERVAL="2")
    before = wait_serving_alone(service, 1)

    reload_ids: set[str] = set()
    if trigger == "endpoint":
        with httpx.Client(base_url=service.base_url, timeout=10) as client:
            for _ in range(200):
                response = client.get(RELOAD_PATH)
                assert response.status_code == 200, response.text
                reload_ids.add(response.headers["x-reload-id"])
    else:
        for _ in range(200):
            service.signal(signal.SIGHUP)

    def settled() -> dict[str, Any] | None:
        status = supervisor_status(service)
        done = status["reload_state"] == "idle" and status["pending_reload"] is None
        return status if done and all(r["outcome"] for r in status["reloads"]) else None

    wait_until(lambda: (s := settled()) and s["generation"] > before["generation"], timeout=30)
    after = wait_until(settled, timeout=30)
    new = [r for r in after["reloads"] if r["source"] != "start"]
    assert 1 <= len(new) <= 2, new
    assert 1 <= after["generation"] - before["generation"] <= 2, after
    assert all(r["outcome"] == "succeeded" for r in new), new
    if trigger == "endpoint":
        assert reload_ids == {r["id"] for r in new}
        assert sum(1 + r["coalesced"] for r in new) == 200
    assert service.get("/health").status_code == 200


# ----- in-flight requests -------------------------------------------------------------------------


def test_slow_request_finishes_on_old_generation_while_new_one_serves(
    start_service: StartService, marker_app: Path
) -> None:
    service = serve_marker(start_service, marker_app)
    before = wait_serving_alone(service, 1)
    (old_pid,) = worker_pids(before)
    with ThreadPoolExecutor(max_workers=1) as pool:
        slow: Future[httpx.Response] = pool.submit(service.get, "/slow?seconds=4", timeout=30)
        wait_in_flight(service)
        set_marker(marker_app, "v2")

        service.signal(signal.SIGHUP)

        wait_until(lambda: marker(service) == "v2", timeout=15)
        # The new generation answers while the slow request is still being served by the old one.
        assert not slow.done(), "the new generation only served after the slow request ended"
        during = supervisor_status(service)
        assert during["generation"] == 2
        assert {w["pid"]: w["state"] for w in during["workers"]}.get(old_pid) == "draining", during["workers"]
        response = slow.result(timeout=30)
    assert response.status_code == 200
    assert response.json() == {"marker": "v1", "pid": old_pid, "slept": 4.0}
    wait_until(lambda: not pid_alive(old_pid), timeout=10)
    wait_serving_alone(service, 2)


def test_a_replaced_generation_drains_within_the_graceful_timeout_it_started_with(
    start_service: StartService, marker_app: Path
) -> None:
    config = marker_app / "pypnm.toml"
    config.write_text("graceful_timeout = 8\n")
    service = serve_marker(start_service, marker_app, "--config", str(config), graceful_timeout=None)
    before = wait_serving_alone(service, 1)
    (old_pid,) = worker_pids(before)
    with ThreadPoolExecutor(max_workers=1) as pool:
        slow: Future[httpx.Response] = pool.submit(service.get, "/slow?seconds=4", timeout=30)
        wait_in_flight(service)
        config.write_text("graceful_timeout = 1\n")  # the reload that replaces generation 1 lowers it

        service.signal(signal.SIGHUP)

        response = slow.result(timeout=30)  # the old worker's uvicorn gives it 8 s: the master kills none sooner
    assert response.status_code == 200, response.text
    assert response.json() == {"marker": "v1", "pid": old_pid, "slept": 4.0}
    assert f"worker pid={old_pid} generation=1 did not finish" not in service.output()
    wait_serving_alone(service, 2)


def test_sigterm_lets_the_request_in_flight_finish(start_service: StartService, marker_app: Path) -> None:
    service = serve_marker(start_service, marker_app, workers=2)
    status = wait_serving_alone(service, 1, workers=2)
    others = [*worker_pids(status), status["master"]["template_pid"], *status["master"]["zygote_pids"]]
    with ThreadPoolExecutor(max_workers=1) as pool:
        slow: Future[httpx.Response] = pool.submit(service.get, "/slow?seconds=3", timeout=30)
        # Each worker answers /in-flight for itself: ask until the one serving the slow request answers.
        wait_until(lambda: service.get("/in-flight").json()["slow"] >= 1, timeout=10)

        service.signal(signal.SIGTERM)

        response = slow.result(timeout=30)
    assert response.status_code == 200, response.text
    assert response.json()["marker"] == "v1"
    assert service.proc.wait(timeout=20) == 0, service.output()
    wait_until(lambda: not any(pid_alive(pid) for pid in others), timeout=5)


def test_no_failed_requests_while_reloading(start_service: StartService, pypnm_copy: Path) -> None:
    service = serve_pypnm_copy(start_service, pypnm_copy, workers=2)
    before = wait_serving_alone(service, 1, workers=2)
    reloads_wanted = 3
    outcomes: list[str] = []
    failures: list[str] = []
    count = 0
    counted = threading.Condition()

    def reloader() -> None:
        """Three reloads, each after some requests went through the previous generation."""
        with httpx.Client(base_url=service.base_url, timeout=10) as client:
            for _ in range(reloads_wanted):
                with counted:

                    def enough(target: int = count + 40) -> bool:  # 40 more requests since this reload's turn
                        return count >= target

                    counted.wait_for(enough, timeout=10)
                reload_id = client.get(RELOAD_PATH).headers["x-reload-id"]

                def outcome(reload_id: str = reload_id) -> str | None:
                    records = client.get(STATUS_PATH).json()["reloads"]
                    return next((r["outcome"] for r in records if r["id"] == reload_id), None)

                outcomes.append(wait_until(outcome, timeout=30))

    thread = threading.Thread(target=reloader, daemon=True)
    started = time.monotonic()
    thread.start()
    with httpx.Client(base_url=service.base_url, timeout=10) as keep_alive:
        for i in range(20_000):
            if not thread.is_alive() and time.monotonic() - started >= 3:
                break
            if time.monotonic() - started > 60:
                pytest.fail("the reloads did not finish within 60 s")
            try:
                response = keep_alive.get("/health") if i % 2 else service.get("/health")  # fresh connection
                if response.status_code != 200:
                    failures.append(f"request {i}: {response.status_code} {response.text[:200]}")
            except httpx.HTTPError as exc:
                failures.append(f"request {i}: {type(exc).__name__}: {exc}")
            with counted:
                count += 1
                counted.notify_all()
    thread.join(timeout=30)

    assert failures == [], failures[:10]
    assert outcomes == ["succeeded"] * reloads_wanted
    assert count >= 3 * 40
    wait_serving_alone(service, before["generation"] + reloads_wanted, workers=2)
