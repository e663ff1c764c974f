"""`GET /metrics`: totals over every worker of every generation, access like System Operations, compaction.

The main test runs a supervised pypnm (a private copy, so that it can be broken) with two
workers, scrapes, reloads three times, kills a worker with SIGKILL, breaks the code for a
failed reload, and scrapes again: every counter sample must be at least what it was.
The directory's compaction and its lock are tested on files made here, in-process, as are
the route labels.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from conftest import (
    RELOAD_PATH,
    Service,
    StartService,
    asgi_request,
    base_env,
    client_from,
    pid_alive,
    pypnm_command,
    wait_until,
)
from pypnm import metrics as names
from pypnm.api.app import create_app
from pypnm.settings import Settings
from pypnm.supervisor import metrics as master_metrics

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
TOKEN = "metrics-scraper-0123456789abcdef"
ASSET = "/static/docs/swagger-ui.css"


# ----- helpers ---------------------------------------------------------------------------------


def scrape(service: Service, **kwargs: Any) -> tuple[Samples, Samples]:
    """GET /metrics, parsed: (samples of counters and histograms, every sample)."""
    response = service.get("/metrics", **kwargs)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4"), response.headers
    return parse(response.text)


def parse(text: str) -> tuple[Samples, Samples]:
    monotonic: Samples = {}
    every: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in every, f"sample {key} twice"
            every[key] = sample.value
            if family.type in ("counter", "histogram"):
                monotonic[key] = sample.value
    return monotonic, every


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def request_counts(samples: Samples) -> dict[tuple[str, str, str], float]:
    """pypnm_http_requests_total by (method, route, status)."""
    return {
        (labels["method"], labels["route"], labels["status"]): count
        for (name, frozen), count in samples.items()
        if name == "pypnm_http_requests_total"
        for labels in [dict(frozen)]
    }


def assert_never_back(before: Samples, after: Samples) -> None:
    went_back = {key: (was, after.get(key)) for key, was in before.items() if after.get(key, -1.0) < was}
    assert not went_back, f"counter samples missing or lower after: {went_back}"


def serving(service: Service, generation: int, workers: int) -> dict[str, Any] | None:
    status = service.status()
    settled = (
        status["generation"] == generation
        and status["reload_state"] == "idle"
        and len(status["workers"]) == workers
        and all(w["generation"] == generation and w["state"] == "serving" for w in status["workers"])
    )
    return status if settled else None


def last_reload(service: Service) -> dict[str, Any] | None:
    status = service.status()
    return status["last_reload"] if status["reload_state"] == "idle" and status["pending_reload"] is None else None


# ----- real processes --------------------------------------------------------------------------


def test_counters_never_go_back_across_reloads_a_crash_and_a_failed_reload(
    start_service: StartService, pypnm_copy: Path
) -> None:
    service = start_service(
        pypnm_command("--port", "{port}", "--workers", "2", "--graceful-timeout", "10"),
        env=base_env(PYTHONPATH=str(pypnm_copy), PYPNM_RELOAD_MIN_INTERVAL="0"),
    )
    wait_until(lambda: serving(service, 1, 2))
    service.get("/health")
    assert service.get("/no/such/page/4711").status_code == 404
    assert service.get(ASSET).status_code == 200
    before, _ = scrape(service)

    health_served = 0
    for generation in (2, 3, 4):
        for _ in range(3):  # answered by workers that this reload retires: their counts must stay
            assert service.get("/health").status_code == 200
            health_served += 1
        assert service.get(RELOAD_PATH).json() == {"status": "reload triggered"}
        wait_until(functools.partial(serving, service, generation, 2), timeout=30)
    victim = service.status()["workers"][0]["pid"]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: not pid_alive(victim), timeout=10)
    wait_until(lambda: (s := serving(service, 4, 2)) and victim not in {w["pid"] for w in s["workers"]}, timeout=30)
    after, _ = scrape(service)

    assert_never_back(before, after)
    assert value(after, "pypnm_reloads_total", outcome="succeeded") == (
        value(before, "pypnm_reloads_total", outcome="succeeded") + 3
    )
    assert value(after, "pypnm_worker_restarts_total", reason="crash") == (
        value(before, "pypnm_worker_restarts_total", reason="crash") + 1
    )
    durations = "pypnm_reload_duration_seconds_count"
    assert value(after, durations) == value(before, durations) + 3
    counts_before, counts_after = request_counts(before), request_counts(after)
    assert counts_after[("GET", "/health", "200")] >= counts_before[("GET", "/health", "200")] + health_served
    assert counts_after[("GET", RELOAD_PATH, "200")] == counts_before.get(("GET", RELOAD_PATH, "200"), 0) + 3
    assert counts_after[("GET", "<unmatched>", "404")] >= 1
    assert counts_after[("GET", "/static/docs/{path}", "200")] >= 1
    routes = {route for _, route, _ in counts_after}
    assert not any("4711" in route or "swagger" in route for route in routes), routes  # templates, never raw paths

    # Broken code: the reload fails, the count says so, and nothing else goes back.
    module = pypnm_copy / "pypnm" / "api" / "health.py"
    module.write_text(module.read_text() + "\ndef broken(:\n    pass\n")
    assert service.get(RELOAD_PATH).status_code == 200
    failed = wait_until(lambda: (r := last_reload(service)) and r["outcome"] == "failed" and r, timeout=30)
    assert "SyntaxError" in failed["reason"]
    broken, every = scrape(service)
    assert_never_back(after, broken)
    reloads = "pypnm_reloads_total"
    assert value(broken, reloads, outcome="failed") == value(before, reloads, outcome="failed") + 1
    assert value(broken, reloads, outcome="succeeded") == value(after, reloads, outcome="succeeded")
    assert value(every, "pypnm_generation") == 4
    assert value(every, "pypnm_workers", state="serving") == 2
    code_version = service.status()["generation_code_version"]
    assert value(every, "pypnm_build_info", version="0.1.0", code_version=code_version) == 1

    # Eight workers have gone so far; their files are folded into the archives, so the directory holds
    # the master's two files, two archives, and the three files each live worker and the serving
    # generation's zygote reserve as they start (pypnm.metrics), however many workers went.
    def compacted() -> Samples | None:
        monotonic, every = scrape(service)
        return monotonic if value(every, "pypnm_metrics_files") <= 2 + 2 + 3 * 2 + 3 else None

    assert_never_back(broken, wait_until(compacted, timeout=20))


@pytest.fixture
def guarded(start_service: StartService) -> Service:
    return start_service(
        pypnm_command("--port", "{port}"),
        env=base_env(PYPNM_TRUSTED_NETWORKS='["127.0.0.1/32"]', PYPNM_API_TOKENS=f"scraper:{TOKEN}"),
    )


def test_metrics_follow_the_system_operations_access_rules(guarded: Service) -> None:
    with client_from("127.0.0.2", base_url=guarded.base_url) as untrusted:
        refused = untrusted.get("/metrics", headers={"X-Request-ID": "untrusted-scrape"})
        allowed = untrusted.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}", "X-Request-ID": "with-token"})
        wrong = untrusted.get("/metrics", headers={"Authorization": "Bearer not-the-token-0123456789"})
    assert refused.status_code == 403, refused.text
    assert "trusted_networks" in refused.json()["detail"]
    assert allowed.status_code == 200, allowed.text
    assert wrong.status_code == 401
    assert guarded.get("/metrics", headers={"Origin": "https://evil.example"}).status_code == 403
    assert guarded.get("/metrics", headers={"Host": "evil.example"}).status_code == 403

    def audit(request_id: str) -> str | None:
        lines = [line for line in guarded.output().splitlines() if f"request_id={request_id} " in line]
        return next((line for line in lines if " pypnm.audit: " in line), None)

    denied = wait_until(lambda: audit("untrusted-scrape"))
    assert "route=/metrics status=403 outcome=denied:untrusted-client" in denied
    token = wait_until(lambda: audit("with-token"))
    assert "token=scraper" in token and "route=/metrics status=200 outcome=allowed:token" in token
    _, every = scrape(guarded)
    assert value(every, "pypnm_http_requests_total", method="GET", route="/metrics", status="403") >= 3


# ----- in-process: labels, the switch, the OpenAPI document -------------------------------------


def asgi_get(app: Any, path: str, method: str = "GET") -> httpx.Response:
    return asgi_request(app, method, path, base_url="http://localhost")


def test_labels_are_route_templates_and_known_methods() -> None:
    app = create_app(Settings())
    _, start = parse(asgi_get(app, "/metrics").text)
    assert asgi_get(app, "/health", method="BREW").status_code == 405
    assert asgi_get(app, "/pypnm/system/webService/status", method="DELETE").status_code == 405
    assert asgi_get(app, "/health/../etc/passwd").status_code == 404
    _, end = parse(asgi_get(app, "/metrics").text)

    def grew(method: str, route: str, status: str) -> float:
        key = ("pypnm_http_requests_total", frozenset({"method": method, "route": route, "status": status}.items()))
        return end.get(key, 0) - start.get(key, 0)

    assert grew("<other>", "/health", "405") == 1
    assert grew("DELETE", "/pypnm/system/webService/status", "405") == 1
    assert grew("GET", "<unmatched>", "404") == 1
    assert grew("GET", "/metrics", "200") == 1  # the first scrape; the second counts once it has answered
    assert not any("passwd" in dict(labels).get("route", "") for _, labels in end)
    assert value(end, "pypnm_build_info", version="0.1.0", code_version=app.state.identity.code_version) == 1
    assert ("pypnm_generation", frozenset()) not in end, "no supervisor here: nothing to say about generations"


def test_metrics_can_be_switched_off() -> None:
    app = create_app(Settings(metrics_enabled=False))
    assert asgi_get(app, "/metrics").status_code == 404
    assert "/metrics" not in asgi_get(app, "/openapi.json").json()["paths"]


def test_openapi_documents_metrics_as_a_system_operation() -> None:
    operation = asgi_get(create_app(Settings()), "/openapi.json").json()["paths"]["/metrics"]["get"]
    assert operation["security"] == [{}, {"bearerAuth": []}]
    assert {"401", "403"} <= set(operation["responses"])
    assert "text/plain" in operation["responses"]["200"]["content"]


# ----- in-process: the directory, its compaction and its lock -----------------------------------


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(10)
    assert not pid_alive(proc.pid)
    return proc.pid


def write_file(path: Path, entries: list[tuple[str, str, dict[str, str], float]]) -> None:
    """A multiprocess file as prometheus-client writes it: (family, sample, labels, value) per entry."""
    data = MmapedDict(str(path))
    try:
        for family, sample, labels, amount in entries:
            data.write_value(mmap_key(family, sample, list(labels), list(labels.values()), "help"), amount, 0.0)
    finally:
        data.close()


def totals(directory: Path) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    files = [str(path) for path in directory.glob("*.db")]
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in MultiProcessCollector.merge(files, accumulate=True)
        for sample in family.samples
    }


def worker_files(directory: Path, pid: int, requests: float, fast: float, slow: float) -> None:
    """What a worker leaves: a counter, a histogram (non-cumulative buckets and a sum), a livesum gauge."""
    write_file(
        directory / f"counter_{pid}.db",
        [
            ("pypnm_http_requests", "pypnm_http_requests_total", {"method": "GET", "route": "/health"}, requests),
        ],
    )
    write_file(
        directory / f"histogram_{pid}.db",
        [
            ("d", "d_bucket", {"le": "0.1"}, fast),
            ("d", "d_bucket", {"le": "+Inf"}, slow),
            ("d", "d_sum", {}, fast * 0.05 + slow * 2),
        ],
    )
    write_file(directory / f"gauge_livesum_{pid}.db", [("g", "g", {}, 1.0)])


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    path = tmp_path / names.DIRECTORY
    path.mkdir()
    (path / names.LOCK_FILE).touch()
    return path


def test_compaction_folds_dead_processes_and_keeps_every_total(directory: Path) -> None:
    first, second = dead_pid(), dead_pid()
    worker_files(directory, first, requests=5, fast=4, slow=1)
    worker_files(directory, second, requests=7, fast=6, slow=1)
    worker_files(directory, os.getpid(), requests=11, fast=10, slow=1)  # alive: stays as it is
    before = totals(directory)
    assert before[("pypnm_http_requests_total", frozenset({"method": "GET", "route": "/health"}.items()))] == 23
    assert before[("g", frozenset())] == 3  # livesum: every file's gauge, until dead processes' files go

    folded = master_metrics.compact(directory)

    assert folded == 4  # counter and histogram files of the two dead pids
    assert totals(directory) == {key: amount for key, amount in before.items() if key[0] != "g"} | {
        ("g", frozenset()): 1.0  # only the live process's gauge is left
    }
    names_left = sorted(path.name for path in directory.iterdir())
    own = os.getpid()
    assert names_left == sorted(
        [
            "counter_archive.db",
            "histogram_archive.db",
            names.LOCK_FILE,
            f"counter_{own}.db",
            f"histogram_{own}.db",
            f"gauge_livesum_{own}.db",
        ]
    )

    # A later death adds to the archives.
    third = dead_pid()
    worker_files(directory, third, requests=2, fast=2, slow=0)
    before = totals(directory)
    assert master_metrics.compact(directory) == 2
    assert totals(directory) == {key: amount for key, amount in before.items() if key[0] != "g"} | {
        ("g", frozenset()): 1.0
    }
    assert master_metrics.compact(directory) == 0


def test_an_app_s_gauges_show_after_compaction_what_they_showed_before(directory: Path) -> None:
    """min, max, sum and mostrecent gauges count their dead processes too: folded as a scrape merges them.
    A gauge in mode `all` is a series per process: a dead process's is dropped, or they would pile up."""
    dead = [dead_pid() for _ in range(3)]
    own = os.getpid()
    values = {dead[0]: (3.0, 10.0), dead[1]: (9.0, 30.0), dead[2]: (5.0, 20.0), own: (4.0, 25.0)}
    for pid, (value, stamp) in values.items():
        for mode in ("all", "min", "max", "sum", "mostrecent"):
            data = MmapedDict(str(directory / f"gauge_{mode}_{pid}.db"))
            try:
                data.write_value(mmap_key(f"app_{mode}", f"app_{mode}", [], [], "help"), value, stamp)
            finally:
                data.close()
    before = totals(directory)
    assert before[("app_max", frozenset())] == 9 and before[("app_min", frozenset())] == 3
    assert before[("app_sum", frozenset())] == 21 and before[("app_mostrecent", frozenset())] == 9  # t=30

    assert master_metrics.compact(directory) == 15  # 5 files of each dead process

    after = totals(directory)
    assert {key: value for key, value in after.items() if key[0] != "app_all"} == {
        key: value for key, value in before.items() if key[0] != "app_all"
    }
    assert {key: value for key, value in after.items() if key[0] == "app_all"} == {
        ("app_all", frozenset({("pid", str(own))})): 4.0
    }
    archives = sorted(path.name for path in directory.iterdir() if "archive" in path.name)
    assert archives == [f"gauge_{mode}_archive.db" for mode in ("max", "min", "mostrecent", "sum")]

    # A later death adds to the archives as a scrape would have merged it.
    later = dead_pid()
    data = MmapedDict(str(directory / f"gauge_max_{later}.db"))
    try:
        data.write_value(mmap_key("app_max", "app_max", [], [], "help"), 12.0, 40.0)
    finally:
        data.close()
    assert master_metrics.compact(directory) == 1
    assert totals(directory)[("app_max", frozenset())] == 12


def test_a_file_whose_process_died_before_sizing_it_is_skipped_and_folded_away(directory: Path) -> None:
    # A worker killed (os._exit, SIGKILL) between creating its file and sizing it leaves it empty:
    # prometheus-client's reader fails on it, which failed every scrape and every compaction.
    crashed, finished = dead_pid(), dead_pid()
    (directory / f"counter_{crashed}.db").touch()
    worker_files(directory, finished, requests=5, fast=4, slow=1)

    assert str(directory / f"counter_{crashed}.db") not in names.value_files(directory)
    assert master_metrics.compact(directory) == 3  # the empty file goes with the others of dead processes
    assert not (directory / f"counter_{crashed}.db").exists()
    files = names.value_files(directory)
    requests = ("pypnm_http_requests_total", frozenset({"method": "GET", "route": "/health"}.items()))
    assert totals(directory)[requests] == 5 and len(files) == 2  # the two archives


def test_compaction_never_swaps_files_under_a_scrape(directory: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(master_metrics, "LOCK_WAIT", 0.05)
    pid = dead_pid()
    worker_files(directory, pid, requests=3, fast=3, slow=0)
    summed = sorted([f"counter_{pid}.db", f"histogram_{pid}.db"])

    with names.reading(directory):  # a scrape in progress
        assert master_metrics.compact(directory) == 0
        # Nothing swapped in or out, no archive built aside left over (a dead process's live gauge
        # goes at once: a scrape allows for that).
        assert sorted(path.name for path in directory.iterdir()) == sorted([*summed, names.LOCK_FILE])
    assert master_metrics.compact(directory) == 2
    assert not any(str(pid) in path.name for path in directory.iterdir())


def test_master_names_the_directory_before_importing_prometheus_client(tmp_path: Path) -> None:
    """As the master does, in a fresh interpreter: its own counters go to files in the new directory."""
    code = (
        "import os, sys, pathlib\n"
        "from pypnm.supervisor.metrics import MasterMetrics\n"
        "assert 'prometheus_client' not in sys.modules, 'imported before the directory was named'\n"
        "metrics = MasterMetrics.start(pathlib.Path(sys.argv[1]))\n"
        "metrics.worker_restarted('crash')\n"
        "print(os.getpid(), os.environ['PROMETHEUS_MULTIPROC_DIR'])\n"
    )
    env = {k: v for k, v in base_env().items() if k != names.MULTIPROC_ENV}
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    pid, directory = result.stdout.split()
    assert Path(directory) == tmp_path / names.DIRECTORY
    assert sorted(path.name for path in Path(directory).iterdir()) == sorted(
        [names.LOCK_FILE, f"counter_{pid}.db", f"histogram_{pid}.db"]
    )
    restarts = totals(Path(directory))
    assert restarts[("pypnm_worker_restarts_total", frozenset({"reason": "crash"}.items()))] == 1
    assert restarts[("pypnm_worker_restarts_total", frozenset({"reason": "hung"}.items()))] == 0
