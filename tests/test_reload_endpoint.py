"""The reload endpoint as the PyPNM docs define it, in every way the service can run.

Real processes on 127.0.0.1: plain uvicorn (with and without `--reload`) and the pypnm
supervisor, from a source copy and from an installed (non-editable) copy. The
repository's own files are never touched: every test that makes the endpoint touch
the route module file serves a private copy of the package.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from conftest import (
    RELOAD_BODY,
    RELOAD_PATH,
    SRC,
    STATUS_PATH,
    StartService,
    base_env,
    copy_package,
    project_copy,
    pypnm_command,
    wait_until,
)

ROUTE_MODULE = Path("pypnm") / "api" / "web_service.py"
NOBODY = 65534


def uvicorn_command(*extra: str) -> list[str]:
    return [sys.executable, "-m", "uvicorn", "pypnm.main:app", "--host", "127.0.0.1", "--port", "{port}", *extra]


def assert_exact_success(response: httpx.Response) -> None:
    assert response.status_code == 200, response.text
    assert response.content == RELOAD_BODY
    assert response.headers["content-type"] == "application/json"


# ----- unsupervised: plain uvicorn ---------------------------------------------------------


def test_unsupervised_reload_answers_exact_body_and_touches_route_module(
    start_service: StartService, pypnm_copy: Path
) -> None:
    route_module = pypnm_copy / ROUTE_MODULE
    service = start_service(uvicorn_command(), cwd=pypnm_copy, env=base_env(PYTHONPATH=str(pypnm_copy)))
    assert service.status()["mode"] == "unsupervised"
    long_ago = route_module.stat().st_mtime_ns - 3600 * 10**9
    os.utime(route_module, ns=(long_ago, long_ago))

    response = service.get(RELOAD_PATH)

    assert_exact_success(response)
    assert "x-reload-id" not in response.headers  # only the supervisor tracks reloads
    assert route_module.stat().st_mtime_ns > long_ago


def _nobody_can_run_python() -> str | None:
    """Why the server cannot run as an unprivileged user here, or None when it can."""
    if shutil.which("setpriv") is None:
        return "setpriv is not installed"
    probe = subprocess.run(
        [
            "setpriv",
            f"--reuid={NOBODY}",
            f"--regid={NOBODY}",
            "--clear-groups",
            sys.executable,
            "-c",
            "import fastapi, uvicorn, pydantic_settings, watchfiles",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )
    if probe.returncode != 0:
        return f"user {NOBODY} cannot import the venv's packages: {probe.stderr.strip().splitlines()[-1:]}"
    return None


def _immutable_works(directory: Path) -> str | None:
    """Why `chattr +i` does not stop root here, or None when it does."""
    if shutil.which("chattr") is None:
        return "chattr is not installed"
    probe = directory / "immutable-probe"
    probe.write_text("x")
    try:
        made = subprocess.run(["chattr", "+i", str(probe)], capture_output=True, text=True, timeout=10)
        if made.returncode != 0:
            return f"chattr +i failed: {made.stderr.strip()}"
        try:
            probe.touch()
        except PermissionError:
            return None
        return "chattr +i did not stop a touch"
    finally:
        subprocess.run(["chattr", "-i", str(probe)], capture_output=True, timeout=10)
        probe.unlink()


@pytest.fixture
def untouchable_route_module() -> Iterator[tuple[Path, list[str], str]]:
    """A copy of the package whose route module file the server process cannot touch.

    Yields (directory for PYTHONPATH, command prefix to run the server with, mechanism).
    As root: run the server as user 65534 over a root-owned read-only copy (setpriv),
    else make the file immutable (chattr +i). As another user: the route module is
    removed after the server imported it and its directory made read-only, so the
    touch cannot re-create it.
    """
    # Not under pytest's tmp_path: that is private to its owner, and user 65534 must read the copy.
    root = Path(tempfile.mkdtemp(prefix="pypnm-readonly-"))
    immutable: Path | None = None
    try:
        root.chmod(0o755)
        copy_package(SRC / "pypnm", root)
        route_module = root / ROUTE_MODULE
        if os.geteuid() != 0:
            yield root, [], "read-only directory (route module removed after import)"
            return
        why_not_setpriv = _nobody_can_run_python()
        if why_not_setpriv is None:
            for path in sorted(root.rglob("*"), reverse=True):
                path.chmod(0o555 if path.is_dir() else 0o444)
            prefix = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
            yield root, prefix, f"server runs as uid {NOBODY}, copy owned by root and read-only"
            return
        why_not_immutable = _immutable_works(root)
        if why_not_immutable is None:
            subprocess.run(["chattr", "+i", str(route_module)], check=True, timeout=10)
            immutable = route_module
            yield root, [], "chattr +i"
            return
        pytest.skip(f"no way to make a file untouchable for root here: {why_not_setpriv}; {why_not_immutable}")
    finally:
        if immutable is not None:
            subprocess.run(["chattr", "-i", str(immutable)], timeout=10)
        for path in [root, *root.rglob("*")]:
            if path.is_dir():
                path.chmod(stat.S_IRWXU)
        shutil.rmtree(root, ignore_errors=True)


def test_unsupervised_reload_500_when_route_module_cannot_be_touched(
    start_service: StartService, untouchable_route_module: tuple[Path, list[str], str]
) -> None:
    root, prefix, mechanism = untouchable_route_module
    service = start_service(
        [*prefix, *uvicorn_command()], cwd=root, env=base_env(PYTHONPATH=str(root), PYTHONDONTWRITEBYTECODE="1")
    )
    route_module = root / ROUTE_MODULE
    if not prefix and os.geteuid() != 0:
        route_module.unlink()
        route_module.parent.chmod(0o555)
    before = route_module.stat().st_mtime_ns if route_module.exists() else None

    response = service.get(RELOAD_PATH)

    assert response.status_code == 500, f"{mechanism}: {response.text}"
    assert response.headers["content-type"] == "application/json"
    detail = response.json()["detail"]
    assert set(response.json()) == {"detail"}
    assert detail.startswith("Failed to trigger reload: "), detail
    assert any(reason in detail for reason in ("Permission denied", "Read-only", "Operation not permitted")), detail
    assert "web_service.py" in detail, detail
    if before is not None:
        assert route_module.stat().st_mtime_ns == before
    # The failure is the request's, not the service's: it still answers.
    assert service.get("/health").status_code == 200


def test_uvicorn_reload_from_source_copy_restarts_worker(start_service: StartService, tmp_path: Path) -> None:
    """`uvicorn pypnm.main:app --reload` in a source tree: the touch makes uvicorn restart its worker."""
    src_copy = tmp_path / "src"
    copy_package(SRC / "pypnm", src_copy)
    service = start_service(uvicorn_command("--reload"), cwd=src_copy, env=base_env())
    before = service.status()
    assert before["mode"] == "unsupervised"

    assert_exact_success(service.get(RELOAD_PATH))

    after = wait_until(lambda: (s := service.status()) and s["pid"] != before["pid"] and s, timeout=20)
    assert after["mode"] == "unsupervised"
    assert service.get("/health").status_code == 200
    assert "WatchFiles detected changes in 'pypnm/api/web_service.py'" in service.output()


# ----- supervised: pypnm -----------------------------------------------------------------------


def test_supervised_reload_answers_exact_body_with_reload_id(start_service: StartService) -> None:
    """The repository's package under the supervisor: the endpoint asks the master, touches nothing."""
    service = start_service(
        pypnm_command("--port", "{port}", "--workers", "1"), env=base_env(PYPNM_RELOAD_MIN_INTERVAL="0")
    )
    before = service.status()
    assert before["mode"] == "supervised"

    response = service.get(RELOAD_PATH)

    assert_exact_success(response)
    reload_id = response.headers["x-reload-id"]
    record = service.wait_reload(reload_id)
    assert record["outcome"] == "succeeded", record
    assert record["source"] == f"http (request {response.headers['x-request-id']})"
    # The outcome is recorded once the old generation stopped accepting: a new connection reaches the new one.
    after = service.status()
    assert after["pid"] != before["pid"]
    assert after["generation"] == before["generation"] + 1 == record["generation"]
    assert after["workers"][0]["generation"] == after["generation"]


@pytest.fixture(scope="module")
def installed_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`pip install --no-deps --target` of a copy of the project: a plain, non-editable install."""
    base = tmp_path_factory.mktemp("installed")
    project = project_copy(base / "project")
    site = base / "site"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--quiet",
            "--disable-pip-version-check",
            "--target",
            str(site),
            str(project),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"pip install failed:\n{result.stdout}\n{result.stderr}"
    assert (site / "pypnm" / "api" / "web_service.py").is_file()
    assert not list(site.glob("*.pth")), "expected a regular install, not an editable one"
    return site


def test_pypnm_reload_flag_from_installed_copy_started_elsewhere(
    start_service: StartService, installed_copy: Path, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "unrelated-cwd"
    elsewhere.mkdir()
    service = start_service(
        pypnm_command("--reload", "--port", "{port}", "--workers", "1"),
        cwd=elsewhere,
        env=base_env(PYTHONPATH=str(installed_copy), PYPNM_RELOAD_MIN_INTERVAL="0"),
    )
    before = service.status()
    assert before["mode"] == "supervised"
    assert before["master"]["watching_source"] is True
    served_from = Path(before["master"]["route_module_file"])
    assert served_from == (installed_copy / ROUTE_MODULE).resolve(), "not serving the installed copy"

    assert_exact_success(service.get(RELOAD_PATH))

    after = wait_until(lambda: (s := service.status()) and s["pid"] != before["pid"] and s, timeout=30)
    assert after["mode"] == "supervised"
    assert after["generation"] > before["generation"]
    assert service.get("/health").status_code == 200
    assert service.get(STATUS_PATH).status_code == 200
