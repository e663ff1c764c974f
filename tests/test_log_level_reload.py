"""The master applies a reload's `log_level` only when the new generation serves.

A reload whose settings file sets a new log level but whose candidate fails validation
must leave the master logging as before; a reload that succeeds applies it. Observed in
the master's output: at `warning` its INFO lines ("reload requested by ...: reload <id>
queued") are no longer written.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from conftest import RELOAD_PATH, Service, base_env, pypnm_command, wait_until

# check_paths is read by the master (it is in the workers' spec) and fails the candidate:
# GET /no-such-path answers 404 in its in-process check.
FAILS_VALIDATION = 'log_level = "warning"\ncheck_paths = ["/health", "/no-such-path"]\n'
VALID = 'log_level = "warning"\n'


def reload_and_wait(service: Service) -> dict[str, Any]:
    """Trigger a reload over HTTP; its record once it has an outcome."""
    response = service.get(RELOAD_PATH)
    assert response.status_code == 200, response.text
    reload_id = response.headers["X-Reload-Id"]

    def finished() -> dict[str, Any] | None:
        return next(
            (dict(r) for r in service.status()["reloads"] if r["id"] == reload_id and r["outcome"] is not None), None
        )

    record: dict[str, Any] = wait_until(finished, timeout=60.0, interval=0.1)
    return record


def queued_line(record: dict[str, Any]) -> str:
    return f"reload {record['id']} queued"


def test_a_failed_reload_leaves_the_log_level_alone(tmp_path: Path, start_service: Callable[..., Service]) -> None:
    config = tmp_path / "pypnm.toml"
    config.write_text('log_level = "info"\n')
    service = start_service(
        pypnm_command("--port", "{port}", "--config", str(config)), env=base_env(PYPNM_RELOAD_MIN_INTERVAL="0")
    )

    config.write_text(FAILS_VALIDATION)
    failed = reload_and_wait(service)
    assert failed["outcome"] == "failed" and "/no-such-path answered 404" in failed["reason"], failed
    # The next reload's INFO lines are still written: the failed one did not lower the level.
    after_failure = reload_and_wait(service)
    assert after_failure["outcome"] == "failed", after_failure
    assert queued_line(after_failure) in service.output(), "the failed reload changed the master's log level"

    config.write_text(VALID)
    succeeded = reload_and_wait(service)
    assert succeeded["outcome"] == "succeeded", succeeded
    # Now it serves with log_level=warning: the master's INFO lines stop, its WARNING lines do not.
    config.write_text(FAILS_VALIDATION)
    quiet = reload_and_wait(service)
    output = service.output()
    assert queued_line(quiet) not in output, "a successful reload did not apply its log level"
    assert f"reload {quiet['id']} failed" in output  # an ERROR line: the log still works
