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

from conftest import Service, base_env, pypnm_command

# check_paths is read by the master (it is in the workers' spec) and fails the candidate:
# GET /no-such-path answers 404 in its in-process check.
FAILS_VALIDATION = 'log_level = "warning"\ncheck_paths = ["/health", "/no-such-path"]\n'
VALID = 'log_level = "warning"\n'


def queued_line(record: dict[str, Any]) -> str:
    return f"reload {record['id']} queued"


def test_a_failed_reload_leaves_the_log_level_alone(tmp_path: Path, start_service: Callable[..., Service]) -> None:
    config = tmp_path / "pypnm.toml"
    config.write_text('log_level = "info"\n')
    service = start_service(
        pypnm_command("--port", "{port}", "--config", str(config)), env=base_env(PYPNM_RELOAD_MIN_INTERVAL="0")
    )

    config.write_text(FAILS_VALIDATION)
    failed = service.wait_reload(service.trigger_reload(), timeout=60.0)
    assert failed["outcome"] == "failed" and "/no-such-path answered 404" in failed["reason"], failed
    # The next reload's INFO lines are still written: the failed one did not lower the level.
    after_failure = service.wait_reload(service.trigger_reload(), timeout=60.0)
    assert after_failure["outcome"] == "failed", after_failure
    assert queued_line(after_failure) in service.output(), "the failed reload changed the master's log level"

    config.write_text(VALID)
    succeeded = service.wait_reload(service.trigger_reload(), timeout=60.0)
    assert succeeded["outcome"] == "succeeded", succeeded
    # Now it serves with log_level=warning: the master's INFO lines stop, its WARNING lines do not.
    config.write_text(FAILS_VALIDATION)
    quiet = service.wait_reload(service.trigger_reload(), timeout=60.0)
    output = service.output()
    assert queued_line(quiet) not in output, "a successful reload did not apply its log level"
    assert f"reload {quiet['id']} failed" in output  # an ERROR line: the log still works
