"""The fork template is renewed when it died or its third-party packages changed; a second stop signal is final.

Real processes: pypnm serving its own app or the marker app on 127.0.0.1. The third-party
versions the master compares are read from package metadata, so a test makes one of the
watched distributions (httptools) visible first on PYTHONPATH as metadata only, and changes
its version there; the module itself still comes from the test environment.
"""

from __future__ import annotations

import contextlib
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from conftest import (
    STATUS_ROUTES,
    StartService,
    base_env,
    hold_next_import,
    pid_alive,
    pypnm_command,
    reload_by_sighup,
    serve_held_import,
    serve_marker,
    serve_pypnm,
    supervisor_status,
    wait_until,
    worker_pids,
    write_app_package,
)
from pypnm.supervisor.timeouts import SPAWN_ANSWER

MISSING_MODULE = "pypnm_test_no_such_module"


def fake_distribution(site: Path, name: str, version: str, top_level: str | None = None) -> None:
    """`name` at `version` as package metadata in `site` (no module, but `top_level` names one), replacing any there."""
    for old in site.glob(f"{name}-*.dist-info"):
        for file in old.iterdir():
            file.unlink()
        old.rmdir()
    info = site / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    if top_level is not None:
        (info / "top_level.txt").write_text(f"{top_level}\n")


def test_a_template_that_died_is_replaced_at_the_next_reload(start_service: StartService) -> None:
    # A preload module that is missing costs only speed: each template says so and serves.
    service = serve_pypnm(start_service, PYPNM_RELOAD_MIN_INTERVAL="0", PYPNM_PRELOAD_MODULES=MISSING_MODULE)
    before = service.status()
    template = before["master"]["template_pid"]
    assert f"cannot preload {MISSING_MODULE}" in service.output()

    os.kill(template, signal.SIGKILL)
    wait_until(lambda: not pid_alive(template), timeout=10)
    assert service.get("/health").status_code == 200  # the workers outlive their template

    record = service.wait_reload(service.trigger_reload())

    assert record["outcome"] == "succeeded", record
    after = service.status()
    assert after["generation"] == record["generation"] > before["generation"]
    assert after["master"]["template_pid"] not in (None, template) and pid_alive(after["master"]["template_pid"])
    output = service.output()
    assert "fork template is gone; starting a new one" in output
    assert output.count(f"cannot preload {MISSING_MODULE}") == 2, output


def test_a_template_that_answers_no_fork_is_killed_and_replaced(start_service: StartService) -> None:
    """Stopped (or deadlocked), it would fail every reload after: the first one it fails ends it."""
    service = serve_pypnm(start_service, PYPNM_RELOAD_MIN_INTERVAL="0", PYPNM_RELOAD_TIMEOUT="60")
    template = service.status()["master"]["template_pid"]
    os.kill(template, signal.SIGSTOP)
    try:
        failed = service.wait_reload(service.trigger_reload(), timeout=40)
        assert failed["outcome"] == "failed", failed
        assert f"the fork template answered no fork request within {SPAWN_ANSWER:g}s: killed" in failed["reason"]
        wait_until(lambda: not pid_alive(template), timeout=10)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(template, signal.SIGCONT)
    assert service.get("/health").status_code == 200  # the serving generation never needed it

    record = service.wait_reload(service.trigger_reload())
    assert record["outcome"] == "succeeded", record
    assert service.status()["master"]["template_pid"] not in (None, template)


def test_changed_third_party_packages_get_a_new_template(start_service: StartService, tmp_path: Path) -> None:
    site = tmp_path / "site"
    fake_distribution(site, "httptools", "99.0.0")
    service = serve_pypnm(start_service, PYPNM_RELOAD_MIN_INTERVAL="0", PYTHONPATH=str(site))
    before = service.status()
    first = service.wait_reload(service.trigger_reload())  # the same packages: the same template
    assert first["outcome"] == "succeeded", first
    assert service.status()["master"]["template_pid"] == before["master"]["template_pid"]

    fake_distribution(site, "httptools", "99.0.1")
    record = service.wait_reload(service.trigger_reload())

    assert record["outcome"] == "succeeded", record
    after = service.status()
    assert after["master"]["template_pid"] != before["master"]["template_pid"]
    assert not pid_alive(before["master"]["template_pid"])
    assert "third-party packages changed (httptools 99.0.0 -> 99.0.1): starting a new fork template" in (
        service.output()
    )


def test_changed_preloaded_packages_get_a_new_template(start_service: StartService, tmp_path: Path) -> None:
    """A distribution that provides a `preload_modules` module is watched too (numpy, pandas, ...)."""
    site = tmp_path / "site"
    fake_distribution(site, "pypnm_test_preloaded", "1.0.0", top_level="pypnm_test_preloaded")
    (site / "pypnm_test_preloaded.py").write_text("VALUE = 1\n")
    service = serve_pypnm(
        start_service,
        PYPNM_RELOAD_MIN_INTERVAL="0",
        PYPNM_PRELOAD_MODULES='["pypnm_test_preloaded"]',
        PYTHONPATH=str(site),
    )
    before = service.status()["master"]["template_pid"]
    fake_distribution(site, "pypnm_test_preloaded", "1.0.1", top_level="pypnm_test_preloaded")
    record = service.wait_reload(service.trigger_reload())

    assert record["outcome"] == "succeeded", record
    assert service.status()["master"]["template_pid"] != before
    assert "third-party packages changed (pypnm_test_preloaded 1.0.0 -> 1.0.1)" in service.output()


LIBRARY_APP = (
    """from fastapi import FastAPI

import pypnm_test_library

app = FastAPI()


@app.get("/library")
async def library() -> dict[str, int]:
    return {"value": pypnm_test_library.VALUE}
"""
    + STATUS_ROUTES
)


def test_an_upgraded_library_is_imported_afresh_even_by_an_incremental_reload(
    start_service: StartService, tmp_path: Path
) -> None:
    """A zygote forked from the serving one would keep the library as the old template imported it."""
    site = tmp_path / "site"
    fake_distribution(site, "pypnm_test_library", "1.0.0", top_level="pypnm_test_library")
    (site / "pypnm_test_library.py").write_text("VALUE = 1\n")
    write_app_package(tmp_path, "libapp", LIBRARY_APP)
    env = base_env(
        PYPNM_RELOAD_IMPORT="incremental",
        PYPNM_RELOAD_MIN_INTERVAL="0",
        PYPNM_PRELOAD_MODULES='["pypnm_test_library"]',
        PYTHONPATH=str(site),
    )
    service = start_service(
        pypnm_command("--app", "libapp.main:app", "--port", "{port}", "--workers", "1"), cwd=tmp_path, env=env
    )
    # A reload from the serving zygote first: the line of incremental imports has begun.
    assert reload_by_sighup(service, 1)["last_reload"]["import"] == {"mode": "incremental", "reimported": 0}

    fake_distribution(site, "pypnm_test_library", "1.0.1", top_level="pypnm_test_library")
    (site / "pypnm_test_library.py").write_text("VALUE = 2\n")
    record = reload_by_sighup(service, 2)["last_reload"]

    reason = "the fork template was renewed: third-party modules are imported afresh"
    assert record["import"] == {"mode": "clean", "reason": reason}, record
    assert service.get("/library").json() == {"value": 2}


def test_a_second_stop_signal_stops_at_once(start_service: StartService, marker_app: Path) -> None:
    """The first SIGTERM drains (the slow request would finish); the second ends the workers, the request cut."""
    service = serve_marker(start_service, marker_app, graceful_timeout=60)
    (worker,) = [w["pid"] for w in service.get("/supervisor").json()["workers"]]
    with ThreadPoolExecutor(max_workers=1) as pool:
        slow = pool.submit(service.get, "/slow?seconds=30", timeout=60)
        wait_until(lambda: service.get("/in-flight").json()["slow"] == 1, timeout=10)

        service.signal(signal.SIGTERM)
        wait_until(lambda: "SIGTERM: stopping gracefully" in service.output(), timeout=10)
        assert not slow.done() and pid_alive(worker), "the first signal must let the request go on"
        service.signal(signal.SIGTERM)

        with pytest.raises(httpx.TransportError):  # cut, not answered
            slow.result(timeout=30)
    service.proc.wait(timeout=30)
    assert "SIGTERM again: stopping at once" in service.output()
    wait_until(lambda: not pid_alive(worker), timeout=10)


def test_a_stop_during_a_reload_ends_the_zygote_that_is_importing(start_service: StartService, tmp_path: Path) -> None:
    """The master stops while a reload's zygote is still inside the app's import: that zygote goes too."""
    service = serve_held_import(start_service, tmp_path)
    zygote = hold_next_import(service, tmp_path)  # held there for up to 30 s, unless it is ended

    service.signal(signal.SIGTERM)
    assert service.proc.wait(timeout=30) == 0
    wait_until(lambda: not pid_alive(zygote), timeout=10)  # not waiting out its import


def test_a_killed_master_takes_along_the_zygote_that_is_importing(start_service: StartService, tmp_path: Path) -> None:
    """SIGKILL leaves the master no say: the zygote inside the app's import goes with its parent, not at its end."""
    service = serve_held_import(start_service, tmp_path)
    master = supervisor_status(service)["master"]
    others = [master["template_pid"], *master["zygote_pids"], *worker_pids(service)]
    zygote = hold_next_import(service, tmp_path)  # held there for 30 s: a pass is not the import ending

    service.signal(signal.SIGKILL)
    service.proc.wait(timeout=10)
    wait_until(lambda: not any(pid_alive(pid) for pid in [zygote, *others]), timeout=10)
    assert not (tmp_path / "go").exists()
