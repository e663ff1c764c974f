"""Automatic rollback (issue 12 item 7): a new generation that crash-loops within `rollback_window` is rolled back.

Real processes on loopback: a pypnm copy whose new version dies 3 s after its first request (a
bug of the new code only), and the marker app, whose `/exit` ends the worker that answers it.
The queue's part (a rollback runs before a queued reload and never joins one) is tested in-process.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import re
import signal
from pathlib import Path
from typing import Any

import httpx

from conftest import (
    NotifySocket,
    Service,
    StartService,
    base_env,
    make_certificate,
    metric,
    pypnm_command,
    rewrite,
    run_cli,
    serve_marker,
    serve_pypnm,
    set_marker,
    start_cli,
    supervisor_status,
    wait_until,
)
from pypnm.supervisor.reloads import ReloadQueue
from test_tls_reload import der_of_file, served_certificate

# ----- the queue -------------------------------------------------------------------------------------


def test_a_rollback_runs_before_a_queued_reload_and_never_joins_it() -> None:
    async def scenario() -> None:
        queue = ReloadQueue(lambda: 0.0)
        pending = queue.request("SIGHUP")
        rollback = queue.request_rollback("abc")
        assert queue.request("http") is pending, "a trigger joins the queued reload, not the rollback"
        assert rollback.source == "rollback" and rollback.rolls_back == "abc" and rollback is not pending
        assert await queue.next() is rollback
        queue.done(rollback)
        assert await queue.next() is pending

    asyncio.run(scenario())


def test_a_rollback_does_not_wait_out_the_min_interval() -> None:
    """The interval may be the crashing generation's own setting: it must not keep that generation serving."""

    async def scenario() -> None:
        queue = ReloadQueue(lambda: 3600.0)
        first = queue.request("start")
        assert await queue.next() is first
        queue.done(first)
        rollback = queue.request_rollback("abc")
        assert await asyncio.wait_for(queue.next(), timeout=5) is rollback
        queue.done(rollback)

        pending = queue.request("SIGHUP")  # waits out the hour: a rollback queued meanwhile ends the wait
        waiting = asyncio.ensure_future(queue.next())
        await asyncio.sleep(0.05)
        assert not waiting.done()
        second = queue.request_rollback("def")
        assert await asyncio.wait_for(waiting, timeout=5) is second
        assert queue.pending is pending  # still queued, behind the interval again
        queue.done(second)

    asyncio.run(scenario())


def test_a_withdrawn_rollback_is_not_run() -> None:
    async def scenario() -> None:
        queue = ReloadQueue(lambda: 0.0)
        rollback = queue.request_rollback("abc")
        assert queue.withdraw_rollback() is rollback
        pending = queue.request("SIGHUP")
        assert await queue.next() is pending

    asyncio.run(scenario())


# ----- helpers ---------------------------------------------------------------------------------------


def runtime_dir(service: Service) -> Path:
    """The master's runtime directory, where each generation's snapshot is `gen-<number>`."""
    found = re.search(r"runtime directory (\S+)", service.output())
    assert found, service.output()
    return Path(found.group(1))


def status_when(service: Service, check: Any, timeout: float = 30.0) -> dict[str, Any]:
    """The status once `check(status)` holds; a request that fails (a worker crashing under it) is asked again."""

    def ask() -> dict[str, Any] | None:
        try:
            status = supervisor_status(service)
        except (httpx.HTTPError, AssertionError):
            return None
        return status if check(status) else None

    result: dict[str, Any] = wait_until(ask, timeout=timeout, interval=0.1)
    return result


def crash_one(service: Service) -> None:
    """The marker app's worker that answers `/exit` ends with exit code 3 (before it answers)."""
    with contextlib.suppress(httpx.HTTPError):
        service.get("/exit")


def record(status: dict[str, Any], reload_id: str) -> dict[str, Any]:
    return dict(next(r for r in status["reloads"] if r["id"] == reload_id))


CRASH_AFTER_SERVING = '''

import os as _os
import threading as _threading

_crash: list[_threading.Timer] = []


@app.middleware("http")
async def _crash_after_serving(request, call_next):  # type: ignore[no-untyped-def]
    """The new version's bug: its worker dies 3 s after its first request (validation's included)."""
    if not _crash:
        _crash.append(_threading.Timer(3.0, _os._exit, args=(3,)))
        _crash[0].start()
    return await call_next(request)
'''


# ----- real processes ----------------------------------------------------------------------------------


def test_a_generation_that_crashes_after_serving_is_rolled_back(
    start_service: StartService, pypnm_copy: Path, tmp_path: Path
) -> None:
    service = serve_pypnm(
        start_service,
        "--graceful-timeout",
        "5",
        PYTHONPATH=str(pypnm_copy),
        PYPNM_RELOAD_MIN_INTERVAL="0",
        PYPNM_ROLLBACK_CRASHES="2",
    )
    assert service.get("/health").json()["version"] == "0.1.0"
    snapshots = runtime_dir(service)
    rewrite(pypnm_copy / "pypnm" / "__init__.py", '__version__ = "0.1.0"', '__version__ = "0.2.0-crashing"')
    (pypnm_copy / "pypnm" / "main.py").write_text((pypnm_copy / "pypnm" / "main.py").read_text() + CRASH_AFTER_SERVING)

    result = run_cli("reload", "--url", service.base_url, "--wait", "--timeout", "60", cwd=tmp_path, timeout=120)

    # --wait waited through the swap and the crashes: the reload it started was rolled back.
    assert result.returncode == 1, result.stdout + result.stderr
    found = re.search(r"reload (\w+) rolled back \(by reload (\w+)\): generation 2 .*crashed 2 times", result.stdout)
    assert found, result.stdout
    assert "exit code 3" in result.stdout, result.stdout
    reload_id, rollback_id = found.groups()

    status = status_when(service, lambda s: s["generation"] == 3 and s["reload_state"] == "idle")
    assert service.get("/health").json()["version"] == "0.1.0", "the old code serves again"
    last = status["last_reload"]
    assert last["id"] == rollback_id and last["outcome"] == "rolled_back" and last["source"] == "rollback"
    assert last["rolls_back"] == reload_id and last["generation"] == 3
    assert last["reason"].count("exit code 3") == 2, last["reason"]
    undone = record(status, reload_id)
    assert undone["outcome"] == "succeeded" and undone["generation"] == 2
    assert undone["stability"] == "rolled_back" and undone["rolled_back_by"] == rollback_id
    assert status["rollback_watch"] is None, "a rollback's generation is not watched"
    assert metric(service.get("/metrics").text, "pypnm_reloads_total", outcome="rolled_back") == 1.0

    # Generation 3 serves generation 1's snapshot; the crashed generation's is removed once it has drained.
    wait_until(lambda: not (snapshots / "gen-2").exists(), timeout=20)
    assert (snapshots / "gen-1").is_dir()
    output = service.output()
    assert re.search(r"crashed 2 times within rollback_window \(30 s\).*: rolling back to generation 1", output)
    assert re.search(rf"reload {rollback_id}: rolled back in \d+ms: generation 3 serves generation 1's code", output)


def test_wait_follows_the_reload_that_replaced_its_generation_into_that_ones_rollback(
    start_service: StartService, pypnm_copy: Path, tmp_path: Path
) -> None:
    """A later reload (here a SIGHUP; a renewed certificate's, say) builds the same code again and replaces the
    generation within its window: when that one is rolled back, the code `--wait` was started for did not stay up."""
    service = serve_pypnm(
        start_service,
        "--graceful-timeout",
        "2",
        PYTHONPATH=str(pypnm_copy),
        PYPNM_RELOAD_MIN_INTERVAL="0",
        PYPNM_ROLLBACK_CRASHES="2",
    )
    rewrite(pypnm_copy / "pypnm" / "__init__.py", '__version__ = "0.1.0"', '__version__ = "0.2.0-crashing"')
    late_crash = CRASH_AFTER_SERVING.replace("Timer(3.0", "Timer(6.0")  # after the second reload's swap
    (pypnm_copy / "pypnm" / "main.py").write_text((pypnm_copy / "pypnm" / "main.py").read_text() + late_crash)

    waiting = start_cli("reload", "--url", service.base_url, "--wait", "--timeout", "60", cwd=tmp_path)
    try:
        status_when(service, lambda s: s["generation"] == 2 and s["reload_state"] == "idle", timeout=60)
        service.signal(signal.SIGHUP)  # the same code from disk again: generation 3 replaces generation 2
        output, errors = waiting.communicate(timeout=120)
        output += errors
    finally:
        if waiting.poll() is None:
            waiting.kill()
            waiting.wait(10)
    assert waiting.returncode == 1, output
    found = re.search(r"reload (\w+) succeeded, but its generation 2 was replaced by reload (\w+) within", output)
    assert found, output
    assert re.search(rf"and then: reload {found.group(2)} rolled back \(by reload \w+\): generation 3", output), output
    status = status_when(
        service, lambda s: s["last_reload"]["outcome"] == "rolled_back" and s["reload_state"] == "idle"
    )
    assert record(status, found.group(1))["replaced_by"] == found.group(2)
    assert service.get("/health").json()["version"] == "0.1.0", "the rollback went back past both"


def test_a_rollback_serves_the_pair_renewed_since_not_the_one_kept_with_its_code(
    start_service: StartService, pypnm_copy: Path, tmp_path: Path
) -> None:
    """Certificates are renewed apart from code: rolling the code back must not undo a renewal."""
    first = make_certificate(tmp_path / "first", ip="127.0.0.1")
    renewed = make_certificate(tmp_path / "renewed", ip="127.0.0.1", not_after=datetime.timedelta(days=180))
    config = tmp_path / "pypnm.toml"
    config.write_text(f'ssl = true\nssl_certfile = "{first.cert}"\nssl_keyfile = "{first.key}"\nwatch_config = false\n')
    env = base_env(PYTHONPATH=str(pypnm_copy), PYPNM_RELOAD_MIN_INTERVAL="0", PYPNM_ROLLBACK_CRASHES="2")
    command = pypnm_command("--config", str(config), "--port", "{port}", "--graceful-timeout", "2")
    service = start_service(command, env=env, wait=False)
    service.base_url, service.verify = f"https://127.0.0.1:{service.port}", False
    service.wait_ready()
    kept = der_of_file(first.cert)
    assert served_certificate(service.port) == kept

    # A crashing version deployed, and the pair renewed in place before its reload (which serves the renewal).
    rewrite(pypnm_copy / "pypnm" / "__init__.py", '__version__ = "0.1.0"', '__version__ = "0.2.0-crashing"')
    (pypnm_copy / "pypnm" / "main.py").write_text((pypnm_copy / "pypnm" / "main.py").read_text() + CRASH_AFTER_SERVING)
    for source, target in ((renewed.key, first.key), (renewed.cert, first.cert)):
        os.replace(source, target)
    service.trigger_reload()
    status = status_when(
        service, lambda s: s["last_reload"]["outcome"] == "rolled_back" and s["reload_state"] == "idle"
    )
    assert service.get("/health").json()["version"] == "0.1.0", "the old code serves again"
    served = served_certificate(service.port)
    assert served == der_of_file(first.cert) and served != kept, "the renewed pair, not the one kept with the code"
    assert status["last_reload"]["warnings"] == [], status["last_reload"]


def test_a_rollback_is_a_reload_for_systemd_and_for_the_status(
    start_service: StartService, marker_app: Path, notify_socket: NotifySocket
) -> None:
    service = serve_marker(start_service, marker_app, NOTIFY_SOCKET=notify_socket.env, PYPNM_ROLLBACK_CRASHES="2")
    assert notify_socket.next()["READY"] == "1"
    set_marker(marker_app, "v2")
    reload_id = _sighup_reload(service, notify_socket)
    assert service.get("/marker").json()["marker"] == "v2"

    for _ in range(2):  # two crashes of the new generation within its window
        pids = {w["pid"] for w in status_when(service, lambda s: len(s["workers"]) == 1)["workers"]}
        crash_one(service)
        status_when(service, lambda s, pids=pids: s["generation"] != 2 or {w["pid"] for w in s["workers"]} != pids)

    reloading = notify_socket.next()
    assert reloading["RELOADING"] == "1"
    assert re.fullmatch(r"generation 2 serving; reloading \(reload \w+, requested by rollback\)", reloading["STATUS"])
    ready = notify_socket.next()
    assert ready["READY"] == "1"
    assert re.fullmatch(r"generation 3 serving; reload \w+ rolled back: generation 2 .*exit code 3.*", ready["STATUS"])
    status = status_when(service, lambda s: s["generation"] == 3 and s["reload_state"] == "idle")
    assert service.get("/marker").json()["marker"] == "v1"
    assert record(status, reload_id)["stability"] == "rolled_back"
    exits = [e for e in status["worker_exits"] if e["generation"] == 2]
    assert len(exits) == 2 and all(e["ended"] == "exit code 3" for e in exits), status["worker_exits"]


def _sighup_reload(service: Service, notify_socket: NotifySocket) -> str:
    """SIGHUP the master; the id of the reload once it succeeded (from its RELOADING=1/READY=1 pair)."""
    service.signal(signal.SIGHUP)
    assert notify_socket.next()["RELOADING"] == "1"
    ready = notify_socket.next()
    found = re.fullmatch(r"generation 2 serving; reload (\w+) succeeded", ready["STATUS"])
    assert found, ready
    return found.group(1)


def test_a_stable_generation_is_kept_and_its_predecessors_snapshot_removed_after_the_window(
    start_service: StartService, pypnm_copy: Path, tmp_path: Path
) -> None:
    service = serve_pypnm(
        start_service, PYTHONPATH=str(pypnm_copy), PYPNM_RELOAD_MIN_INTERVAL="0", PYPNM_ROLLBACK_WINDOW="5"
    )
    snapshots = runtime_dir(service)
    rewrite(pypnm_copy / "pypnm" / "__init__.py", '__version__ = "0.1.0"', '__version__ = "0.2.0"')

    waiting = start_cli("reload", "--url", service.base_url, "--wait", "--timeout", "30", cwd=tmp_path)
    try:
        watched = status_when(service, lambda s: s["generation"] == 2 and s["rollback_watch"] is not None)
        assert watched["rollback_watch"]["kept_generation"] == 1 and watched["rollback_watch"]["crashes"] == []
        reload_id = watched["rollback_watch"]["reload"]
        assert record(watched, reload_id)["stability"] == "watching"
        assert record(watched, reload_id)["rollback_window"] == 5
        shown = run_cli("status", "--url", service.base_url, cwd=tmp_path)
        assert "watching:     generation 2 for 5 s (rollback_window), 0 of 3 crashes" in shown.stdout, shown.stdout
        # Kept through the window, although generation 1 has nothing left to drain.
        status_when(service, lambda s: all(w["generation"] == 2 for w in s["workers"]))
        assert (snapshots / "gen-1").is_dir()
        stdout, stderr = waiting.communicate(timeout=60)
    finally:
        if waiting.poll() is None:
            waiting.kill()
            waiting.wait(10)

    # --wait returned once the window had passed: the reload succeeded and its generation stayed up.
    assert waiting.returncode == 0, stdout + stderr
    assert re.search(rf"reload {reload_id} succeeded: generation 2 serving \(.*\), stable for 5 s\n", stdout), stdout
    stable = supervisor_status(service)
    assert record(stable, reload_id)["stability"] == "stable" and stable["rollback_watch"] is None
    assert not (snapshots / "gen-1").exists(), "released once the window passed"
    assert (snapshots / "gen-2").is_dir()
    assert service.get("/health").json()["version"] == "0.2.0"
    assert re.search(r"generation 2 stable for 5 s \(rollback_window\), 0 crash\(es\)", service.output())


def _reload_by_sighup_id(service: Service) -> str:
    before = {r["id"] for r in supervisor_status(service)["reloads"]}
    service.signal(signal.SIGHUP)
    status = status_when(
        service, lambda s: any(r["id"] not in before and r["outcome"] == "succeeded" for r in s["reloads"])
    )
    return str(next(r["id"] for r in status["reloads"] if r["id"] not in before))


def test_rollback_window_0_turns_rollback_off(start_service: StartService, marker_app: Path) -> None:
    service = serve_marker(start_service, marker_app, PYPNM_ROLLBACK_WINDOW="0", PYPNM_ROLLBACK_CRASHES="1")
    snapshots = runtime_dir(service)
    set_marker(marker_app, "v2")
    reload_id = _reload_by_sighup_id(service)
    assert record(supervisor_status(service), reload_id)["stability"] is None

    pid = status_when(service, lambda s: len(s["workers"]) == 1 and s["generation"] == 2)["workers"][0]["pid"]
    crash_one(service)
    after = status_when(service, lambda s: len(s["workers"]) == 1 and s["workers"][0]["pid"] != pid)

    assert after["generation"] == 2, "replaced from its own generation, not rolled back"
    assert service.get("/marker").json()["marker"] == "v2"
    assert after["last_reload"]["id"] == reload_id
    wait_until(lambda: not (snapshots / "gen-1").exists(), timeout=20)  # nothing kept: removed after its drain


def test_the_first_generation_has_nothing_to_roll_back_to(start_service: StartService, marker_app: Path) -> None:
    service = serve_marker(start_service, marker_app, PYPNM_ROLLBACK_CRASHES="1")
    pid = supervisor_status(service)["workers"][0]["pid"]
    crash_one(service)

    after = status_when(service, lambda s: len(s["workers"]) == 1 and s["workers"][0]["pid"] != pid)
    assert after["generation"] == 1 and after["last_reload"]["stability"] == "unstable"
    assert "nothing to roll back to" in after["last_reload"]["stability_detail"]
    assert service.get("/marker").json()["marker"] == "v1"
    assert re.search(r"generation 1 \(reload \w+\) crashed 1 times .*no earlier generation", service.output())


def test_a_generation_replaced_within_its_window_is_never_the_one_to_go_back_to(
    start_service: StartService, marker_app: Path
) -> None:
    service = serve_marker(start_service, marker_app, PYPNM_ROLLBACK_CRASHES="1")
    set_marker(marker_app, "v2")
    second = _reload_by_sighup_id(service)
    set_marker(marker_app, "v3")
    third = _reload_by_sighup_id(service)
    status = supervisor_status(service)
    assert record(status, second)["stability"] == "replaced"
    assert status["rollback_watch"]["generation"] == 3
    assert status["rollback_watch"]["kept_generation"] == 1, "generation 2 had not proved itself"

    crash_one(service)

    after = status_when(service, lambda s: s["generation"] == 4 and s["reload_state"] == "idle")
    assert service.get("/marker").json()["marker"] == "v1"
    assert record(after, third)["stability"] == "rolled_back"
    assert "generation 4 serves generation 1's code" in service.output()


def test_a_hung_worker_counts_like_a_crash(start_service: StartService, marker_app: Path) -> None:
    service = serve_marker(start_service, marker_app, PYPNM_ROLLBACK_CRASHES="1", PYPNM_WORKER_TIMEOUT="1")
    set_marker(marker_app, "v2")
    reload_id = _reload_by_sighup_id(service)

    with contextlib.suppress(httpx.HTTPError):
        service.get("/block", params={"seconds": 20}, timeout=30)  # killed by the master before it answers

    after = status_when(service, lambda s: s["generation"] == 3 and s["reload_state"] == "idle")
    assert service.get("/marker").json()["marker"] == "v1"
    undone = record(after, reload_id)
    assert undone["stability"] == "rolled_back"
    assert re.search(r"hung \(event loop blocked for \d+ s\), killed by SIGKILL", undone["stability_detail"])


def test_a_rollback_that_cannot_bring_the_kept_snapshot_up_leaves_the_new_generation_serving(
    start_service: StartService, marker_app: Path
) -> None:
    service = serve_marker(start_service, marker_app, PYPNM_ROLLBACK_CRASHES="1")
    kept = runtime_dir(service) / "gen-1" / "markerpkg" / "marker.py"
    set_marker(marker_app, "v2")
    reload_id = _reload_by_sighup_id(service)
    kept.write_text('raise RuntimeError("the kept snapshot is broken")\n')  # what a rollback would import

    crash_one(service)

    after = status_when(service, lambda s: s["last_reload"]["source"] == "rollback" and s["reload_state"] == "idle")
    assert after["last_reload"]["outcome"] == "failed"
    assert "the kept snapshot is broken" in after["last_reload"]["reason"]
    assert after["generation"] == 2 and service.get("/marker").json()["marker"] == "v2"
    undone = record(after, reload_id)
    assert undone["stability"] == "unstable" and "the rollback failed" in undone["stability_detail"]
