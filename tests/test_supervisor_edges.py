"""The supervisor's rarer paths, with real processes: a worker that will not stop, a worker that cannot
come back, a settings file that is gone at reload time.

The app is written by the test: `stubbornpkg`, whose import fails while a flag file (named in
the environment) exists, and whose lifespan shutdown can be told to hang (bounded: 60 s).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from conftest import (
    Service,
    StartService,
    base_env,
    pid_alive,
    pypnm_command,
    serve_pypnm,
    wait_until,
    write_app_package,
)

APP = "stubbornpkg.main:app"
MAIN = """import asyncio
import os
from contextlib import asynccontextmanager

from fastapi import FastAPI

FLAG = os.environ.get("STUBBORN_FAIL_FLAG", "")


@asynccontextmanager
async def lifespan(app):
    # In each worker: a respawn is forked from the generation's zygote, which imported this already.
    if FLAG and os.path.exists(FLAG):
        raise RuntimeError("not now: the flag file exists")
    yield
    if os.environ.get("STUBBORN_HANG_ON_SHUTDOWN"):
        await asyncio.sleep(60)


app = FastAPI(lifespan=lifespan)


@app.get("/health")
async def health():
    return {"status": "ok", "pid": os.getpid()}
"""


def serve_stubborn(start_service: StartService, directory: Path, *flags: str, **env: str) -> Service:
    """Serve stubbornpkg, written into `directory`, from there."""
    write_app_package(directory, "stubbornpkg", MAIN)
    return start_service(pypnm_command("--app", APP, "--port", "{port}", *flags), cwd=directory, env=base_env(**env))


def worker_pid(service: Service) -> int:
    return int(service.get("/health").json()["pid"])


def test_a_worker_that_does_not_finish_within_graceful_timeout_is_killed(
    start_service: StartService, tmp_path: Path
) -> None:
    service = serve_stubborn(start_service, tmp_path, "--graceful-timeout", "1", STUBBORN_HANG_ON_SHUTDOWN="1")
    pid = worker_pid(service)

    service.signal(signal.SIGTERM)

    service.proc.wait(timeout=30)
    assert f"worker pid={pid} generation=1 did not finish in 1s; killing it" in service.output()
    wait_until(lambda: not pid_alive(pid), timeout=10)


def test_a_worker_that_cannot_come_back_is_retried_until_it_starts(start_service: StartService, tmp_path: Path) -> None:
    flag = tmp_path / "fail-now"
    service = serve_stubborn(start_service, tmp_path / "app", STUBBORN_FAIL_FLAG=str(flag))
    pid = worker_pid(service)
    flag.touch()  # from now on the generation's workers cannot start

    os.kill(pid, signal.SIGKILL)

    failed = (
        "cannot respawn a worker of generation 1: lifespan startup failed: RuntimeError: not now: the flag file exists"
    )
    wait_until(lambda: failed in service.output(), timeout=30)
    assert service.proc.poll() is None, "the master gave up"
    flag.unlink()
    new_pid = wait_until(lambda: (p := worker_pid(service)) != pid and p, timeout=30)
    assert f"worker respawned pid={new_pid} generation=1" in service.output()


def test_a_settings_file_gone_at_reload_fails_that_reload_only(start_service: StartService, tmp_path: Path) -> None:
    config = tmp_path / "pypnm.toml"
    config.write_text("gzip_minimum_size = 2000\n")
    service = serve_pypnm(start_service, "--config", str(config), PYPNM_RELOAD_MIN_INTERVAL="0")
    generation = service.status()["generation"]
    config.unlink()  # as the kubelet does when it swaps a ConfigMap's files

    failed = service.wait_reload(service.trigger_reload())

    assert failed["outcome"] == "failed", failed
    assert failed["reason"] == f"config file {str(config.resolve())!r}: cannot read it (No such file or directory)"
    assert service.status()["generation"] == generation  # the old generation still serves
    config.write_text("gzip_minimum_size = 2000\n")
    assert service.wait_reload(service.trigger_reload())["outcome"] == "succeeded"
