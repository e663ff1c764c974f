"""What the master tells: the status view (`/status`, `pypnm status`) and the start-up lines.

Built from the reload queue and the generations, never stored: the view is always what
the state is now. Its field names and values are documented in the README's status table
and read by `pypnm reload --wait` and the fleet commands: change them only additively.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
from pathlib import Path
from typing import Any, Literal

import pypnm
from pypnm.settings import Settings, SettingsError
from pypnm.supervisor.build import DEFAULT_APP
from pypnm.supervisor.lifecycle import Generations
from pypnm.supervisor.reloads import ReloadPhase, ReloadQueue

logger = logging.getLogger("pypnm.supervisor.master")

ReloadState = ReloadPhase | Literal["idle", "draining"]


def reload_state(queue: ReloadQueue, draining: bool) -> ReloadState:
    """The running reload's phase; else "draining" while an old generation drains; else "idle"."""
    phase = queue.current.phase if queue.current else None
    if phase is not None:
        return phase
    return "draining" if draining else "idle"


def status_view(
    queue: ReloadQueue,
    generations: Generations,
    *,
    started_at: str,
    app: str,
    route_file: Path,
    watching_source: bool,
    watching_config: list[str],
    template_pid: int | None,
    upgrade: dict[str, Any] | None = None,
    rollback: dict[str, Any] | None = None,
) -> dict[str, Any]:
    serving = generations.serving
    return {
        "generation": serving.number if serving else None,
        "generation_code_version": serving.code_version if serving else None,
        "workers": [
            worker.describe(generation.code_version)
            for generation in generations.all()
            for worker in generation.live_workers()
        ],
        "worker_exits": list(reversed(generations.exits)),
        "reload_state": reload_state(queue, bool(generations.draining)),
        "last_reload": queue.history[-1].as_dict() if queue.history else None,
        "pending_reload": queue.pending.id if queue.pending else None,
        "pending_rollback": queue.rollback.id if queue.rollback else None,  # queued behind the running reload
        "reloads": [r.as_dict() for r in reversed(queue.records())],
        "upgrade": upgrade,  # the running self-upgrade, else the last one (upgrade.py)
        "rollback_watch": rollback,  # the generation in its rollback_window (rollback.py), else None
        "master": {
            "pid": os.getpid(),
            "version": pypnm.__version__,  # the master's own pypnm; a self-upgrade changes it
            "started_at": started_at,
            "app": app,
            "route_module_file": str(route_file),
            "watching_source": watching_source,
            "watching_config": watching_config,
            "template_pid": template_pid,
            "zygote_pids": [g.zygote.pid for g in generations.all() if g.zygote is not None],
            "standby_pids": generations.standby.pids(),  # the next reload's zygote, forked ahead (standby.py)
        },
    }


def log_serving(settings: Settings, app: str, listeners: list[socket.socket], route_file: Path) -> None:
    """Say once, when the first generation serves, where and how to reload it."""
    host, port = listeners[0].getsockname()[:2]
    scheme = "https" if settings.ssl else "http"
    shown = f"[{host}]" if ":" in host else host
    endpoint = "GET /pypnm/system/webService/reload, " if app == DEFAULT_APP else ""
    logger.info(
        "serving %s on %s://%s:%d with %d worker(s); reload: %sSIGHUP to pid %d, or touch %s",
        app,
        scheme,
        shown,
        port,
        settings.workers,
        endpoint,
        os.getpid(),
        route_file,
    )


def log_access(settings: Settings) -> None:
    """Say once, at start, who may use System Operations (/pypnm/system/...)."""
    networks = settings.trusted_networks
    try:
        tokens = len(settings.tokens())
    except SettingsError as exc:
        tokens = 0
        logger.warning("%s", exc)
    logger.info(
        "System Operations (/pypnm/system/) are open to trusted_networks %s and to %d bearer token(s)",
        ", ".join(map(str, networks)) or "(none)",
        tokens,
    )
    try:
        loopback_host = settings.host == "localhost" or ipaddress.ip_address(settings.host).is_loopback
    except ValueError:
        loopback_host = False
    if not loopback_host and tokens == 0:
        who = (
            "no client"
            if not networks
            else "only loopback clients"
            if all(n.is_loopback for n in networks)
            else "only clients in trusted_networks"
        )
        logger.warning(
            "listening on %s, which is not loopback, with no api token configured: %s can use "
            "System Operations; set api_tokens or api_tokens_file to let other callers in",
            settings.host,
            who,
        )
