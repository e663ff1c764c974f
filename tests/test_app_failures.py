"""An app that cannot serve is refused with the reason, the file and the line: by `pypnm check`, and at start.

Real processes: `python -m pypnm check --app failpkg.main:app` (the same validation a reload's
candidate runs: import from a snapshot, lifespan startup, the check requests in-process) and
`pypnm --app ...` serving it, each against a small app written by the test into its own
directory, one way of failing each.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import (
    StartService,
    assert_one_line_error,
    base_env,
    pypnm_command,
    rewrite,
    run_cli,
    serve_pypnm,
    wait_until,
    write_app_package,
)

APP = "failpkg.main:app"

HEADER = (  # four lines: the failing line numbers below count from here
    "from contextlib import asynccontextmanager\n\n"
    "from fastapi import FastAPI\nfrom fastapi.responses import JSONResponse\n"
)
LIFESPAN_FAILS = (
    HEADER + "\n\n@asynccontextmanager\nasync def lifespan(app):\n"
    '    raise RuntimeError("no database")\n    yield\n\n\napp = FastAPI(lifespan=lifespan)\n'
)
FAILURES = {
    "raises-at-import": (
        HEADER + 'app = FastAPI()\nraise RuntimeError("boom at import")\n',
        ["RuntimeError: boom at import", "{main}", "line 6"],
    ),
    "exits-on-an-error": (  # as pypnm.main does for a settings error: the error is the reason, not "SystemExit: 2"
        HEADER + 'import sys\n\ntry:\n    int("not a number")\nexcept ValueError:\n    sys.exit(2)\n',
        ["ValueError: invalid literal for int() with base 10: 'not a number'"],
    ),
    "lifespan-fails": (LIFESPAN_FAILS, ["lifespan startup failed: "]),
    "check-answers-503": (
        HEADER + 'app = FastAPI()\n\n\n@app.get("/health")\nasync def health():\n'
        '    return JSONResponse({"status": "down"}, status_code=503)\n',
        ["check GET /health answered 503"],
    ),
    "check-raises": (
        HEADER + 'app = FastAPI()\n\n\n@app.get("/health")\nasync def health():\n'
        '    raise RuntimeError("health exploded")\n',
        ["check GET /health raised RuntimeError: health exploded", "{main}", "line 10"],
    ),
}


def write_app(directory: Path, main: str) -> Path:
    """`failpkg` with `main.py` holding `main`, in `directory` (the directory to run pypnm in); returns main.py."""
    return write_app_package(directory, "failpkg", main)


@pytest.mark.parametrize("failure", sorted(FAILURES))
def test_check_names_why_the_app_cannot_serve(tmp_path: Path, failure: str) -> None:
    source, names = FAILURES[failure]
    main = write_app(tmp_path, source)
    env = base_env(PYPNM_CHECK_PATHS="/health")
    result = run_cli("check", "--app", APP, env=env, cwd=tmp_path, timeout=60)
    line = assert_one_line_error(result, 1, "check failed: ", *(name.format(main=main) for name in names))
    assert "/gen" not in line, "the reason names the master's private copy, not the operator's file"
    assert result.stdout == ""


def test_a_failed_lifespan_is_reported_with_its_exception(tmp_path: Path) -> None:
    write_app(tmp_path, LIFESPAN_FAILS)
    result = run_cli("check", "--app", APP, cwd=tmp_path, timeout=60)
    assert_one_line_error(result, 1, "check failed: lifespan startup failed: RuntimeError: no database")


@pytest.mark.parametrize(
    ("app", "names"),
    [
        ("failpkg.main:nope", ["AttributeError", "'nope'"]),
        ("nosuchpkg.main:app", ["cannot find module 'nosuchpkg'", "--app"]),
    ],
    ids=["no-such-attribute", "no-such-module"],
)
def test_check_names_an_app_that_is_not_there(tmp_path: Path, app: str, names: list[str]) -> None:
    write_app(tmp_path, HEADER + "app = FastAPI()\n")
    result = run_cli("check", "--app", app, cwd=tmp_path, timeout=60)
    assert_one_line_error(result, 1, "check failed: ", *names)


def test_an_app_that_cannot_serve_at_start_ends_pypnm_with_its_reason(
    start_service: StartService, tmp_path: Path
) -> None:
    source, names = FAILURES["raises-at-import"]
    main = write_app(tmp_path / "app", source)
    runtime = tmp_path / "run"
    runtime.mkdir()
    service = start_service(
        pypnm_command("--app", APP, "--port", "{port}"),
        cwd=tmp_path / "app",
        env=base_env(PYPNM_RUNTIME_DIR=str(runtime)),
        wait=False,
    )

    assert service.proc.wait(timeout=60) == 1, service.output()
    line = next((line for line in service.output().splitlines() if "cannot start: " in line), None)
    assert line is not None, service.output()
    for name in names:
        assert name.format(main=main) in line, (name, line)
    # Nothing is left of it: its runtime directory went with it.
    wait_until(lambda: list(runtime.iterdir()) == [], timeout=10)


def test_a_reason_of_any_size_is_cut_for_the_status_and_whole_in_the_log(
    start_service: StartService, pypnm_copy: Path
) -> None:
    """An exception holding 100 000 characters: more than any message between the processes can carry."""
    service = serve_pypnm(
        start_service, PYTHONPATH=str(pypnm_copy), PYPNM_RELOAD_MIN_INTERVAL="0", PYPNM_WATCH_CONFIG="false"
    )
    future = "from __future__ import annotations\n"
    rewrite(pypnm_copy / "pypnm" / "api" / "health.py", future, future + 'raise ValueError("x" * 100_000 + "END")\n')
    for _ in range(3):  # several records with such a reason: the status still fits one answer
        record = service.reload_and_settle()
        assert record["outcome"] == "failed", record
        reason = record["reason"]
        assert reason.startswith("ValueError: xxxx") and "END" not in reason, reason[:200]
        assert reason.endswith("more characters: the whole reason is in the log)"), reason[-200:]
        assert len(reason) < 5000
    assert service.status()["generation"] == 1 and service.get("/health").status_code == 200
    assert "xxxxEND" in service.output()  # the process that met it logged all of it
