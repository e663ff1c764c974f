"""What a generation is built from: its snapshot and settings, turned into the spec its workers run.

Functions of their arguments: nothing here changes the master (its log level, its settings) —
the master applies a new generation's settings only once it serves (master.py). The one look
outside is at a changed `log_file`, opened as the next start would open it (and removed again
if that created it), so that the reload's warning says when that start would fail.
`pypnm check` builds its spec here too, so a check validates exactly what a reload would.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

from pypnm.identity import SUPERVISOR_ENV
from pypnm.settings import CONFIG_ENV, ENV_PREFIX, RESTART_ONLY, Settings, SettingsError, load_settings
from pypnm.supervisor.logfile import LogFileError, check_can_open
from pypnm.supervisor.protocol import WorkerReady, WorkerSpec
from pypnm.supervisor.snapshot import TLS_CERT_FILE, TLS_KEY_FILE, TOKENS_FILE, Snapshot, SnapshotError
from pypnm.supervisor.tls import TLSError, check_pair

DEFAULT_APP = "pypnm.main:app"
DEFAULT_CHECK_PATHS = ["/health", "/openapi.json"]


def env_value(value: Any) -> str:
    """A setting's value as pydantic-settings reads it back from an environment variable."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | dict):
        return json.dumps([str(v) for v in value] if isinstance(value, list) else value)
    return str(value)


def generation_spec(app: str, number: int, snapshot: Snapshot, settings: Settings, env: dict[str, str]) -> WorkerSpec:
    """What every worker of a generation is told: its app, snapshot, files and checks."""
    env = dict(env)
    if snapshot.config_file is not None:
        env[CONFIG_ENV] = str(snapshot.config_file)
    if TOKENS_FILE in snapshot.files:
        env[f"{ENV_PREFIX}API_TOKENS_FILE"] = str(snapshot.files[TOKENS_FILE])
    check_paths = settings.check_paths
    if check_paths is None:
        check_paths = DEFAULT_CHECK_PATHS if app == DEFAULT_APP else []
    return WorkerSpec(
        app=app,
        generation=number,
        snapshot_dir=str(snapshot.directory),
        packages=snapshot.packages,
        source_dirs=snapshot.source_dirs,
        env=env,
        check_paths=check_paths,
        log_level=settings.log_level,
        graceful_timeout=settings.graceful_timeout,
        # The snapshot's frozen copies when the master made them (a reload), else the files (`pypnm check`).
        ssl_certfile=str(snapshot.files.get(TLS_CERT_FILE, settings.ssl_certfile)) if settings.ssl else None,
        ssl_keyfile=str(snapshot.files.get(TLS_KEY_FILE, settings.ssl_keyfile)) if settings.ssl else None,
        limit_request_line_size=settings.limit_request_line_size,
        limit_request_header_size=settings.limit_request_header_size,
        timeout_request_header=settings.timeout_request_header,
        limit_concurrency=settings.limit_concurrency,
        limit_max_requests=settings.limit_max_requests,
        limit_max_requests_jitter=settings.max_requests_jitter,
    )


def supervised_spec(
    app: str, number: int, snapshot: Snapshot, settings: Settings, overrides: dict[str, Any], control_path: str
) -> WorkerSpec:
    """A generation's spec under the master: the command line's overrides and the control socket in its env."""
    env = {f"{ENV_PREFIX}{name.upper()}": env_value(value) for name, value in overrides.items()}
    env[SUPERVISOR_ENV] = control_path
    return generation_spec(app, number, snapshot, settings, env)


class ReloadSettings(NamedTuple):
    """What a reload takes from the settings file."""

    generation: Settings  # what the new generation runs with, as far as the master applies it
    watch: Settings  # whose files the settings watch follows from now on (ConfigWatch.read_by_reload)


def settings_for(snapshot: Snapshot, running: Settings, overrides: dict[str, Any]) -> ReloadSettings:
    """The settings a new generation runs with, as far as the master applies them itself, and those to watch.

    The candidate's own code is the judge of the settings file; when this (older) code
    cannot read it, the running settings stay in force here and the candidate decides.
    The tokens file is frozen into the snapshot, so a respawned worker reads the same one.
    Settings only a restart applies keep their running values.
    """
    try:
        fresh = load_settings(snapshot.config_file, **overrides)
    except SettingsError:
        try:
            # A file that parses but names a tokens file that cannot be read (yet): a ConfigMap that
            # names a new key of a Secret lands before the Secret does, the kubelet updating each
            # volume on its own. Its arrival must reload, so the watch follows the file named there.
            named = load_settings(snapshot.config_file, read_tokens=False, **overrides)
        except SettingsError:  # nothing new to follow: the files in force stay watched
            named = running
        return ReloadSettings(running, named)
    if fresh.api_tokens_file is not None:
        snapshot.add_file(TOKENS_FILE, fresh.api_tokens_file)
    settings = fresh.model_copy(update={name: getattr(running, name) for name in RESTART_ONLY})
    return ReloadSettings(settings, settings)


def freeze_tls(snapshot: Snapshot, settings: Settings, tag: str = "") -> list[str]:
    """Freeze the certificate and key into the snapshot and check the copies; warnings, or TLSError/SnapshotError.

    Frozen like the tokens file: a respawned worker serves the pair this reload checked,
    whatever has been written over the files since. With `tag`, the copies are made under
    names of their own (`refreeze_tls`), and the snapshot's pair is left as it was.
    """
    if not settings.ssl or settings.ssl_certfile is None or settings.ssl_keyfile is None:
        return []
    cert = snapshot.add_file(TLS_CERT_FILE + tag, settings.ssl_certfile)
    key = snapshot.add_file(TLS_KEY_FILE + tag, settings.ssl_keyfile)
    return check_pair(cert, key, shown_cert=str(settings.ssl_certfile), shown_key=str(settings.ssl_keyfile))


def refreeze_tls(snapshot: Snapshot, settings: Settings, tag: str) -> list[str]:
    """For a rollback to `snapshot`: the pair its settings name as it is on disk now, when that passes the check,
    else the copies frozen with it, when those still do; warnings, or TLSError when neither passes.

    Why: a rollback undoes code and settings, but certificates are renewed apart from them. The
    kept copies may be older than a renewal made since (serving them would undo it, and the watch,
    which knows the renewed content, would never bring it back), or have expired meanwhile. The
    files on disk are copied under new names (`tag`), so the kept copies stay as they were until
    the new ones have passed.
    """
    if not settings.ssl or settings.ssl_certfile is None or settings.ssl_keyfile is None:
        return []
    try:
        warnings = freeze_tls(snapshot, settings, f".{tag}")
    except (TLSError, SnapshotError) as exc:
        on_disk = str(exc)
    else:
        for role in (TLS_CERT_FILE, TLS_KEY_FILE):
            snapshot.files[role] = snapshot.files[f"{role}.{tag}"]
        return warnings
    kept_cert, kept_key = snapshot.files.get(TLS_CERT_FILE), snapshot.files.get(TLS_KEY_FILE)
    if kept_cert is None or kept_key is None:
        raise TLSError(on_disk)
    try:
        kept = check_pair(
            kept_cert, kept_key, shown_cert=str(settings.ssl_certfile), shown_key=str(settings.ssl_keyfile)
        )
    except TLSError as exc:
        raise TLSError(f"{on_disk}; and the pair kept with the code to roll back to: {exc}") from None
    return [f"the TLS pair on disk was refused ({on_disk}): the rollback serves the pair kept with its code", *kept]


UPGRADE_APPLIES = " or a self-upgrade (pypnm upgrade, SIGUSR2)"  # a new master binds anew (upgrade.py)


def restart_only_changes(running: Settings, ready: list[WorkerReady]) -> list[str]:
    """Name each setting that the candidate's settings change but only a restart can apply."""
    seen = next((event.restart_only for event in ready if event.restart_only), None)
    if not seen:
        return []
    current = running.restart_only()
    return [
        f"setting {name!r} changed ({current.get(name)!r} -> {value!r}) but needs a restart"
        f"{UPGRADE_APPLIES if name in ('host', 'port') else ''}; still using {current.get(name)!r}"
        f"{_unusable_at_start(name, value)}"
        for name, value in seen.items()
        if name in current and current[name] != value
    ]


def _unusable_at_start(name: str, value: Any) -> str:
    """Why the next start would stop at this restart-only value, said after its warning; "" when it would not.

    A `log_file` that cannot be opened passes a reload (the running processes keep the old one)
    but ends `pypnm serve` with exit 2: every new instance would fail while these ones look healthy.
    """
    if name != "log_file" or not value:
        return ""
    try:
        check_can_open(Path(value).absolute())  # the master's directory, as LogOutput.from_settings takes it
    except LogFileError as exc:
        return f"; the next start with these settings would fail: {exc}: create its directory or fix the setting"
    return ""


def scheme_change(running: Settings, new: Settings) -> list[str]:
    """A warning when the new generation serves the other scheme: it applies in place, and whoever
    still speaks the old one (clients, load balancers, a Kubernetes probe's `scheme`) now fails."""
    if running.ssl == new.ssl:
        return []
    old, now = ("https", "http") if running.ssl else ("http", "https")
    return [
        f"setting 'ssl' changed ({running.ssl!r} -> {new.ssl!r}): the service now answers {now}:// only; clients "
        f"and health checks that used {old}:// now fail (a Kubernetes probe needs scheme: {now.upper()}); "
        "change them too, or set ssl back and reload"
    ]
