"""Worker recycling and the runtime profile (issue 12 items 4 and 5), with real processes on loopback.

A worker past `limit_max_requests` (plus its jitter) or `limit_worker_memory` is replaced from
its own generation: the replacement accepts first, then the old one drains, and no request
fails. `GET /pypnm/system/webService/runtimeProfile` says what was detected, how many workers
serve, and where that number came from. The settings and the detection are checked in-process.
"""

from __future__ import annotations

import re
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import (
    Service,
    StartService,
    assert_one_line_error,
    base_env,
    client_from,
    metric,
    pid_alive,
    run_cli,
    serve_marker,
    serve_pypnm,
    supervisor_status,
    wait_until,
    worker_pids,
)
from pypnm import profile
from pypnm.clients import _format_profile
from pypnm.profile import GIB, MIB, auto_workers
from pypnm.settings import SettingsError, load_settings, setting_source
from pypnm.supervisor import protocol
from pypnm.supervisor.protocol import WorkerLimitReached

PROFILE_PATH = "/pypnm/system/webService/runtimeProfile"

# ----- settings, protocol and detection, in-process -------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [("512MiB", 512 * MIB), ("1GiB", GIB), ("1.5 GiB", 3 * GIB // 2), ("2GB", 2 * 10**9), ("1048576", MIB), (0, 0)],
)
def test_limit_worker_memory_reads_sizes(given: str | int, expected: int) -> None:
    assert load_settings(limit_worker_memory=given).limit_worker_memory == expected


@pytest.mark.parametrize("given", ["lots", "12 parsecs", "-1", -5])
def test_a_bad_memory_limit_is_one_clear_line(given: str | int) -> None:
    with pytest.raises(SettingsError) as raised:
        load_settings(limit_worker_memory=given)
    message = str(raised.value)
    assert message.startswith("invalid setting 'limit_worker_memory' (PYPNM_LIMIT_WORKER_MEMORY)")
    assert "512MiB" in message or "0 for no limit" in message
    assert "\n" not in message


def test_jitter_defaults_to_a_tenth_of_the_limit() -> None:
    assert load_settings(limit_max_requests=1000).max_requests_jitter == 100
    assert load_settings(limit_max_requests=1000, limit_max_requests_jitter=0).max_requests_jitter == 0
    assert load_settings().max_requests_jitter == 0


def test_workers_auto_and_its_errors() -> None:
    assert load_settings(workers="auto").workers == profile.workers_for_auto()
    # limit_worker_memory is the per-worker budget of the formula
    assert load_settings(workers="auto", limit_worker_memory="1GiB").workers == profile.workers_for_auto(GIB)
    with pytest.raises(SettingsError, match=r"'many' is neither a number of workers .* nor 'auto'"):
        load_settings(workers="many")


def test_the_auto_formula() -> None:
    assert auto_workers(2, 64 * GIB) == 5  # 2 * cpus + 1
    assert auto_workers(16, 2 * GIB) == 4  # 2 GiB / (2 * 256 MiB): room for two generations at once
    assert auto_workers(16, 2 * GIB, worker_budget=GIB) == 1
    assert auto_workers(1, 100 * MIB) == 1  # never below 1
    assert auto_workers(64, 10**15) == 64  # never above the setting's limit
    assert auto_workers(3, None) == 7  # memory unknown: CPUs alone


def test_cpu_and_memory_limits_of_a_cgroup(tmp_path: Path) -> None:
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")
    (v2 / "memory.max").write_text(f"{GIB}\n")
    assert profile.cgroup_cpu_limit(v2) == 1.5
    assert profile.cgroup_memory_limit(v2) == GIB
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       8000000 kB\nMemFree: 1 kB\n")
    assert profile.detect_total_memory(v2, meminfo) == GIB  # the cgroup's limit is lower
    assert profile.detect_cpu_count(v2) <= 2  # 1.5 CPUs count as 2, fewer if the process has fewer
    (v2 / "cpu.max").write_text("max 100000\n")
    (v2 / "memory.max").write_text("max\n")
    assert profile.cgroup_cpu_limit(v2) is None and profile.cgroup_memory_limit(v2) is None
    assert profile.detect_total_memory(v2, meminfo) == 8000000 * 1024

    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "memory").mkdir()
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    (v1 / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "no limit"
    assert profile.cgroup_cpu_limit(v1) is None and profile.cgroup_memory_limit(v1) is None
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")
    (v1 / "memory" / "memory.limit_in_bytes").write_text(f"{512 * MIB}\n")
    assert profile.cgroup_cpu_limit(v1) == 2.0 and profile.cgroup_memory_limit(v1) == 512 * MIB
    assert profile.cgroup_cpu_limit(tmp_path / "none") is None  # no cgroup files: no limit


def test_where_a_setting_comes_from(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "pypnm.toml"
    config.write_text("workers = 3\n")
    monkeypatch.delenv("PYPNM_WORKERS", raising=False)
    assert setting_source("workers", {}, None) == ("default", None)
    assert setting_source("workers", {}, config) == ("settings_file", 3)
    monkeypatch.setenv("PYPNM_WORKERS", "auto")
    assert setting_source("workers", {}, config) == ("environment", "auto")
    assert setting_source("workers", {"workers": 2}, config) == ("explicit_cli", 2)


def test_limit_reached_is_an_additive_worker_event() -> None:
    event = WorkerLimitReached(requests=1003, limit=1000)
    assert protocol.decode_worker(protocol.encode_worker(event)) == event
    # A spec from an older master has no limit: its workers never send the event it would not know.
    spec = {"app": "a:app", "generation": 1, "snapshot_dir": "/s", "packages": [], "source_dirs": {}}
    assert protocol.WorkerSpec.from_dict(spec).limit_max_requests == 0


# ----- recycling, real processes --------------------------------------------------------------------


class Load:
    """Requests to /marker from a few threads (keep-alive and fresh connections) until stopped; every failure kept."""

    def __init__(self, service: Service, threads: int = 4) -> None:
        self.service = service
        self.answered_by: set[int] = set()
        self.answers = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i % 2 == 0,), daemon=True) for i in range(threads)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(15)

    def _run(self, keep_alive: bool) -> None:
        headers = {} if keep_alive else {"Connection": "close"}
        with httpx.Client(base_url=self.service.base_url, timeout=10.0, headers=headers) as client:
            for _ in range(100_000):  # bounded; stopped long before
                if self._stop.is_set():
                    return
                try:
                    response = client.get("/marker")
                    outcome = response.json()["pid"] if response.status_code == 200 else f"HTTP {response.status_code}"
                except httpx.HTTPError as exc:
                    outcome = f"{type(exc).__name__}: {exc}"
                with self._lock:
                    if isinstance(outcome, int):
                        self.answered_by.add(outcome)
                        self.answers += 1
                    else:
                        self.failures.append(outcome)


RECYCLED = re.compile(
    r"worker recycled pid=(\d+) generation=1: served (\d+) requests \(limit (\d+)\): replaced by pid=(\d+), draining it"
)


def test_workers_past_limit_max_requests_are_recycled_under_load_with_no_failed_request(
    start_service: StartService, marker_app: Path
) -> None:
    service = serve_marker(
        start_service, marker_app, "--limit-max-requests", "60", workers=2, PYPNM_LIMIT_MAX_REQUESTS_JITTER="20"
    )
    first = wait_until(lambda: pids if len(pids := worker_pids(service)) == 2 else None)
    with Load(service) as load:
        # Until each of the first two workers has been recycled and has left, and a replacement
        # has been recycled in its turn.
        def recycled() -> set[int]:
            return {int(m[0]) for m in RECYCLED.findall(service.output())}

        wait_until(lambda: recycled() >= first and recycled() - first, timeout=90)
        wait_until(lambda: not any(pid_alive(pid) for pid in first), timeout=30)
        recycles = RECYCLED.findall(service.output())
        replacements = {int(m[3]) for m in recycles}
        assert load.answered_by & (replacements - first)  # new workers served
    assert load.failures == [], load.failures[:5]
    assert load.answers > 200
    for _old, served, limit, _new in recycles:
        assert 60 <= int(limit) <= 80 and int(served) >= int(limit)  # the limit plus this worker's jitter
    assert len(worker_pids(service)) == 2  # still the generation's size

    status = supervisor_status(service)
    exits = [e for e in status["worker_exits"] if e["pid"] in first]
    assert {e["pid"] for e in exits} == first
    for entry in exits:
        assert entry["reason"] == "recycle" and entry["generation"] == 1
        assert re.fullmatch(r"served \d+ requests \(limit \d+\), exit code 0", entry["ended"]), entry
    metrics = service.get("/metrics").text
    assert metric(metrics, "pypnm_worker_restarts_total", reason="recycle") >= 2
    assert metric(metrics, "pypnm_worker_restarts_total", reason="crash") == 0


def test_a_worker_past_limit_worker_memory_is_recycled(start_service: StartService, marker_app: Path) -> None:
    service = serve_marker(start_service, marker_app, "--limit-worker-memory", "300MiB", workers=1)
    [before] = wait_until(lambda: worker_pids(service) or None)
    grown = service.get("/allocate", params={"mib": 400})
    assert grown.status_code == 200 and grown.json()["pid"] == before
    line = re.compile(
        rf"worker recycled pid={before} generation=1: RSS (\d+) MiB over limit_worker_memory 300 MiB: "
        r"replaced by pid=(\d+), draining it"
    )
    match = wait_until(lambda: line.search(service.output()), timeout=30)
    assert int(match.group(1)) > 300
    replacement = int(match.group(2))
    wait_until(lambda: not pid_alive(before), timeout=30)
    assert worker_pids(service) == {replacement}
    assert service.get("/marker").json()["pid"] == replacement
    [entry] = supervisor_status(service)["worker_exits"]
    assert (entry["pid"], entry["reason"]) == (before, "recycle")
    assert entry["ended"].startswith("RSS ") and entry["ended"].endswith("exit code 0")


def test_a_memory_limit_below_a_new_worker_is_said_once_and_recycles_nothing(
    start_service: StartService, marker_app: Path
) -> None:
    """A replacement would hold as much as the worker it replaces: recycling it would go on every second."""
    service = serve_marker(start_service, marker_app, "--limit-worker-memory", "1MiB", workers=2)
    first = wait_until(lambda: worker_pids(service) if len(worker_pids(service)) == 2 else None)
    told = re.compile(
        r"limit_worker_memory 1 MiB is below what worker pid=(\d+) generation=1 held as it started serving "
        r"\(RSS (\d+) MiB\): its generation's workers are not recycled for memory; set limit_worker_memory above that"
    )
    match = wait_until(lambda: told.search(service.output()), timeout=15)
    assert int(match.group(1)) in first and int(match.group(2)) > 1
    time.sleep(3)  # three checks of each worker at the master's heartbeat tick
    assert worker_pids(service) == first
    output = service.output()
    assert len(told.findall(output)) == 1 and "worker recycled" not in output


def test_a_reload_applies_new_limits_to_the_new_generation(start_service: StartService, marker_app: Path) -> None:
    config = marker_app / "pypnm.toml"
    config.write_text("limit_max_requests = 0\n")
    service = serve_marker(start_service, marker_app, "--config", str(config), workers=1)
    [before] = wait_until(lambda: worker_pids(service) or None)
    for _ in range(30):
        assert service.get("/marker").json()["pid"] == before  # no limit: never recycled
    config.write_text("limit_max_requests = 10\nlimit_max_requests_jitter = 0\n")
    # The settings file's change reloads: generation 2 serves with the new limit.
    wait_until(lambda: supervisor_status(service)["generation"] == 2)
    wait_until(lambda: {w["generation"] for w in supervisor_status(service)["workers"]} == {2})
    assert "worker recycled" not in service.output()
    for _ in range(30):
        assert service.get("/marker").status_code == 200
    wait_until(lambda: "generation=2: served " in service.output(), timeout=30)


# ----- the runtime profile -------------------------------------------------------------------------


def runtime_profile(service: Service) -> dict[str, object]:
    response = service.get(PROFILE_PATH)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "success"
    profile_: dict[str, object] = body["profile"]
    return profile_


def detected() -> dict[str, object]:
    memory = profile.detect_total_memory()
    return {
        "detected_cpu_count": profile.detect_cpu_count(),
        "detected_total_memory_gib": round(memory / GIB, 2) if memory else None,
    }


def test_runtime_profile_by_default(start_service: StartService) -> None:
    service = serve_pypnm(start_service)
    assert runtime_profile(service) == {
        **detected(),
        "active_workers": 1,
        "active_limit_max_requests": 0,
        "active_source": "default",
        "workers_setting": 1,
        "auto_workers": profile.workers_for_auto(),
        "limit_max_requests_jitter": 0,
        "limit_worker_memory": 0,
        "worker_timeout": 30.0,
    }


def test_runtime_profile_from_the_command_line(start_service: StartService) -> None:
    service = serve_pypnm(
        start_service, "--workers", "2", "--limit-max-requests", "500", "--limit-worker-memory", "1GiB"
    )
    shown = runtime_profile(service)
    assert (shown["active_workers"], shown["active_source"], shown["workers_setting"]) == (2, "explicit_cli", 2)
    assert (shown["active_limit_max_requests"], shown["limit_max_requests_jitter"]) == (500, 50)
    assert shown["limit_worker_memory"] == GIB
    printed = run_cli("status", "--url", service.base_url)
    assert printed.returncode == 0, printed.stderr
    assert "profile:      2 workers (from explicit_cli) on " in printed.stdout
    assert "recycle after 500 requests (+0..50); recycle past 1024 MiB RSS; worker_timeout 30.0s" in printed.stdout


def test_runtime_profile_from_the_settings_file(start_service: StartService, tmp_path: Path) -> None:
    config = tmp_path / "pypnm.toml"
    config.write_text('workers = 2\nworker_timeout = 12.5\nlimit_worker_memory = "512MiB"\n')
    service = serve_pypnm(start_service, "--config", str(config))
    shown = runtime_profile(service)
    assert (shown["active_workers"], shown["active_source"]) == (2, "settings_file")
    assert (shown["worker_timeout"], shown["limit_worker_memory"]) == (12.5, 512 * MIB)


def test_runtime_profile_follows_the_settings_a_reload_applies(start_service: StartService, tmp_path: Path) -> None:
    """The master keeps the profile it built until a reload applies other settings; the answer is then theirs."""
    config = tmp_path / "pypnm.toml"
    config.write_text("workers = 1\nworker_timeout = 12.5\n")
    # Reloaded by hand below: with the watch on, a settings file change seen while that reload builds
    # would ask for a second one, and the first one's generation would never be the one left serving.
    service = serve_pypnm(
        start_service, "--config", str(config), PYPNM_RELOAD_MIN_INTERVAL="0", PYPNM_WATCH_CONFIG="false"
    )
    first = runtime_profile(service)
    assert (first["active_workers"], first["worker_timeout"]) == (1, 12.5)
    assert runtime_profile(service) == first  # asked again: the same answer
    config.write_text("workers = 2\nworker_timeout = 20\n")
    record = service.reload_and_settle()
    assert record["outcome"] == "succeeded", record
    shown = runtime_profile(service)
    assert shown == {**first, "active_workers": 2, "workers_setting": 2, "worker_timeout": 20.0}
    assert service.status()["runtime_profile"] == shown  # /status carries the same profile


def test_runtime_profile_from_the_environment_and_its_access_rules(start_service: StartService) -> None:
    service = serve_pypnm(
        start_service, PYPNM_WORKERS="2", PYPNM_TRUSTED_NETWORKS='["127.0.0.1/32"]', PYPNM_LIMIT_MAX_REQUESTS="7"
    )
    shown = runtime_profile(service)
    assert (shown["active_workers"], shown["active_source"], shown["active_limit_max_requests"]) == (
        2,
        "environment",
        7,
    )
    with client_from("127.0.0.2", base_url=service.base_url) as client:
        refused = client.get(PROFILE_PATH)
    assert refused.status_code == 403, refused.text
    assert "trusted_networks" in refused.json()["detail"]
    document = service.get("/openapi.json").json()
    operation = document["paths"][PROFILE_PATH]["get"]
    assert {"200", "401", "403"} <= set(operation["responses"])


def test_workers_auto_sizes_the_generation(start_service: StartService) -> None:
    service = serve_pypnm(start_service, "--workers", "auto")
    shown = runtime_profile(service)
    expected = profile.workers_for_auto()
    assert shown == {**shown, **detected(), "workers_setting": "auto", "active_source": "explicit_cli"}
    assert shown["active_workers"] == shown["auto_workers"] == expected
    wait_until(lambda: len(worker_pids(service)) == expected)


def test_bad_recycling_flags_are_one_line(tmp_path: Path) -> None:
    assert_one_line_error(run_cli("--workers", "lots", cwd=tmp_path), 2, "not a number of workers or 'auto'")
    assert_one_line_error(run_cli("--limit-worker-memory", "much", cwd=tmp_path), 2, "limit_worker_memory", "512MiB")


def test_runtime_profile_without_a_supervisor(start_service: StartService) -> None:
    service = start_service(
        [sys.executable, "-m", "uvicorn", "pypnm.main:app", "--port", "{port}"],
        env=base_env(PYPNM_LIMIT_MAX_REQUESTS="9"),
    )
    shown = runtime_profile(service)
    assert (shown["active_workers"], shown["active_limit_max_requests"]) == (None, 9)


def test_the_status_line_of_the_profile_counts_workers_and_names_the_limits() -> None:
    shown = {
        "active_workers": 1,
        "active_source": "default",
        "detected_cpu_count": 2,
        "detected_total_memory_gib": 4.0,
        "active_limit_max_requests": 1000,
        "limit_max_requests_jitter": 100,
        "limit_worker_memory": 512 * MIB,
        "worker_timeout": 30.0,
    }
    assert _format_profile(shown) == (
        "1 worker (from default) on 2 CPUs, 4.0 GiB; recycle after 1000 requests (+0..100); "
        "recycle past 512 MiB RSS; worker_timeout 30.0s"
    )
    assert _format_profile({**shown, "active_workers": 5, "workers_setting": "auto"}).startswith(
        "5 workers (auto, from default) on 2 CPUs"
    )
