"""Reinstalling pypnm under a running master: the next reload serves what was installed.

One virtual environment of its own (in tmp_path, no network): the test environment's
third-party packages are made visible to it by a `.pth` line, and pypnm is installed into
it from wheels and an editable checkout built here, each with its own `__version__`. The
service runs from that environment while pip replaces pypnm under it: another wheel, then
an editable install (the wheel's directory disappears), then a wheel again.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

from conftest import Service, StartService, base_env, project_copy, wait_until

ROUTE_MODULE = Path("pypnm", "api", "web_service.py")


def pip(python: Path, *args: str) -> None:
    """pip of the test environment, run by `python`, so it installs into `python`'s environment; offline."""
    env = base_env(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [str(python), "-m", "pip", *args, "--no-index", "--no-deps", "--no-build-isolation", "-q"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, f"pip {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"


def versioned_copy(parent: Path, version: str) -> Path:
    """The project (pyproject, README, src/pypnm) with `__version__ = version`."""
    root = project_copy(parent / f"pypnm-{version}")
    init = root / "src" / "pypnm" / "__init__.py"
    text = init.read_text()
    assert '__version__ = "' in text
    start = text.index('__version__ = "')
    end = text.index('"', start + len('__version__ = "'))
    init.write_text(text[:start] + f'__version__ = "{version}"' + text[end + 1 :])
    return root


def build_wheel(parent: Path, version: str) -> Path:
    """A wheel of the project at `version`, built by hatchling (the [test] extra) in this environment."""
    source = versioned_copy(parent / "sources", version)
    pip(Path(sys.executable), "wheel", "-w", str(parent / "wheels"), str(source))
    (wheel,) = (parent / "wheels").glob(f"pypnm-{version}-*.whl")
    return wheel


def make_venv(root: Path) -> tuple[Path, Path]:
    """A venv that sees the test environment's packages (after its own); returns (python, site-packages)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=60)
    python = root / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout.strip()
    )
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    # Processed after the venv's own `.pth` files (names sort after '_'), so an editable install comes first.
    (site / "zz-test-environment.pth").write_text("".join(f"{path}\n" for path in sorted(ours)))
    return python, site


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
