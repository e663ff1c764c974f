"""Reinstalling pypnm under a running master: the next reload serves what was installed.

One virtual environment of its own (in tmp_path, no network): the test environment's
third-party packages are made visible to it by a `.pth` line, and pypnm is installed into
it from wheels and an editable checkout built here, each with its own `__version__`. The
service runs from that environment while pip replaces pypnm under it: another wheel, then
an editable install (the wheel's directory disappears), then a wheel again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from conftest import Service, StartService, base_env, build_wheel, make_venv, pip, versioned_copy, wait_until

ROUTE_MODULE = Path("pypnm", "api", "web_service.py")


def reload_and_wait(service: Service) -> dict[str, Any]:
    reload_id = service.trigger_reload()

    def finished() -> dict[str, Any] | None:
        # pip's writes to the watched route module trigger reloads of their own: wait until all are done.
        status = service.status()
        record = next((r for r in status["reloads"] if r["id"] == reload_id), None)
        if record is None or record["outcome"] is None or status["reload_state"] != "idle":
            return None
        return dict(record) if status["pending_reload"] is None else None

    record: dict[str, Any] = wait_until(finished, timeout=30, interval=0.1)
    return record


def test_a_reload_after_a_reinstall_serves_the_new_install(start_service: StartService, tmp_path: Path) -> None:
    wheels = {version: build_wheel(tmp_path, version) for version in ("0.1.1", "0.1.2", "0.1.4")}
    editable = versioned_copy(tmp_path / "checkout", "0.1.3")
    python, site = make_venv(tmp_path / "venv")
    pip(python, "install", str(wheels["0.1.1"]))

    env = base_env(PYPNM_RELOAD_MIN_INTERVAL="0")
    env.pop("PYTHONPATH", None)
    service = start_service([str(python), "-m", "pypnm", "--port", "{port}"], env=env, cwd=tmp_path)
    status = service.status()
    assert status["version"] == "0.1.1"
    assert status["master"]["route_module_file"] == str(site / ROUTE_MODULE)

    steps = [
        ("0.1.2", ["install", str(wheels["0.1.2"])], site),  # another wheel, same place
        ("0.1.3", ["install", "-e", str(editable)], editable / "src"),  # editable: the wheel's files are gone
        ("0.1.4", ["install", str(wheels["0.1.4"])], site),  # and back to a wheel
    ]
    for version, args, where in steps:
        before = status
        pip(python, *args)
        record = reload_and_wait(service)
        assert record["outcome"] == "succeeded", record
        status = service.status()
        assert status["version"] == version, f"after installing {version}: {status['version']} serves"
        assert status["code_version"] != before["code_version"]
        assert status["master"]["route_module_file"] == str(where.resolve() / ROUTE_MODULE)

        if version == "0.1.3":
            assert "the project's sources moved" in service.output()
        # The master watches the route module file that is installed now: touching it reloads, as the docs say.
        route_file = where.resolve() / ROUTE_MODULE
        line = f"reload requested by file change: {route_file}"
        generation, seen = status["generation"], service.output().count(line)  # pip's own writes trigger too
        route_file.touch()

        def reloaded(generation: int = generation) -> bool:
            return int(service.status()["generation"]) > generation

        wait_until(reloaded, timeout=20)
        assert service.output().count(line) > seen
        status = service.status()

    assert "Traceback" not in service.output()
