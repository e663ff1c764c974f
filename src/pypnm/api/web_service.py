"""System Operations: `/pypnm/system/webService/reload`, `/upgrade`, `/status` and `/runtimeProfile`.

This file is "the route module" of the seed document: in an unsupervised process the
reload endpoint touches this very file, so that an auto-reloader watching it
(`uvicorn pypnm.main:app --reload`) restarts the code. Under the pypnm supervisor the
endpoint asks the master instead, which also works when this file is read-only; the
master still watches this file, so scripts that touch it keep working there too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from pypnm.identity import SUPERVISOR_ENV, ProcessIdentity
from pypnm.profile import SettingSource, runtime_profile
from pypnm.settings import config_path, setting_source
from pypnm.supervisor import control
from pypnm.supervisor.protocol import (
    ReloadAccepted,
    ReloadRequest,
    StatusAnswer,
    StatusRequest,
    UpgradeAccepted,
    UpgradeRequest,
)
from pypnm.supervisor.timeouts import CONTROL_ASK

ROUTE_MODULE_FILE = Path(__file__)
RELOAD_ID_HEADER = "X-Reload-Id"
UPGRADE_ID_HEADER = "X-Upgrade-Id"

router = APIRouter(prefix="/pypnm/system/webService", tags=["PyPNM System Web Service"])


class ReloadTriggered(BaseModel):
    status: str = "reload triggered"


class ErrorDetail(BaseModel):
    detail: str


class RuntimeProfile(BaseModel):
    detected_cpu_count: int
    detected_total_memory_gib: float | None
    active_workers: int | None
    active_limit_max_requests: int
    active_source: SettingSource
    workers_setting: int | Literal["auto"]
    auto_workers: int
    limit_max_requests_jitter: int
    limit_worker_memory: int
    worker_timeout: float


class RuntimeProfileAnswer(BaseModel):
    status: Literal["success"] = "success"
    profile: RuntimeProfile


async def trigger_reload(request: Request) -> str | None:
    """Start a reload; return its id when a supervisor tracks it (None when only touched)."""
    socket_path = os.environ.get(SUPERVISOR_ENV)
    if socket_path:
        answer = await control.ask(
            socket_path,
            ReloadRequest(source="http", request_id=request.state.request_id),
            ReloadAccepted,
            timeout=CONTROL_ASK,  # the master drops a request it reads later: a 500 after it means "not started"
        )
        return answer.reload_id
    ROUTE_MODULE_FILE.touch()
    return None


@router.get(
    "/reload",
    summary="Trigger a reload of the web service",
    response_model=ReloadTriggered,
    responses={500: {"model": ErrorDetail, "description": "The reload could not be triggered"}},
)
async def reload_web_service(request: Request) -> JSONResponse:
    """Touch the route module file (unsupervised) or ask the supervisor (supervised) to reload.

    Answers as soon as the reload is triggered. Under the supervisor the `X-Reload-Id`
    header names the reload; poll `/pypnm/system/webService/status` until
    `last_reload.id` (or an entry of `reloads`) with that id has an `outcome`.
    """
    try:
        reload_id = await trigger_reload(request)
    except control.ControlTimeout as exc:
        raise HTTPException(
            status_code=500,
            detail=f"Failed to trigger reload: {exc}; the reload was not started (the supervisor drops a "
            "request it reads too late); retry, or check the pypnm master's log",
        ) from exc
    except Exception as exc:  # the contract: any failure becomes the seed's 500
        reason = str(exc) or type(exc).__name__  # a bare TimeoutError has no message
        raise HTTPException(status_code=500, detail=f"Failed to trigger reload: {reason}") from exc
    headers = {RELOAD_ID_HEADER: reload_id} if reload_id else None
    return JSONResponse({"status": "reload triggered"}, headers=headers)


async def supervisor_status(socket_path: str) -> dict[str, Any]:
    """The master's status view; 503 when it does not answer."""
    try:
        supervisor = await control.ask(socket_path, StatusRequest(), StatusAnswer)
    except Exception as exc:
        raise HTTPException(
            status_code=503,
            detail=f"The supervisor did not answer ({str(exc) or type(exc).__name__}); "
            "retry, or check the pypnm master's log",
        ) from exc
    return supervisor.status


class UpgradeTriggered(BaseModel):
    status: str = "upgrade triggered"


@router.get(
    "/upgrade",
    summary="Hand the service over to a new master running the pypnm installed now",
    response_model=UpgradeTriggered,
    responses={500: {"model": ErrorDetail, "description": "The upgrade could not be triggered"}},
)
async def upgrade_web_service(request: Request) -> JSONResponse:
    """Ask the supervisor to start a new master (a fresh interpreter) that takes the listening sockets over.

    Answers as soon as the upgrade is started; the `X-Upgrade-Id` header names it. Poll
    `/pypnm/system/webService/status` until `upgrade.id` is that id and `upgrade.outcome` is set.
    Only a supervised service upgrades itself.
    """
    socket_path = os.environ.get(SUPERVISOR_ENV)
    try:
        if not socket_path:
            raise control.ControlError("the service runs without the pypnm supervisor; restart it instead")
        answer = await control.ask(
            socket_path,
            UpgradeRequest(source="http", request_id=request.state.request_id),
            UpgradeAccepted,
            timeout=CONTROL_ASK,
        )
    except Exception as exc:  # like the reload: any failure is a 500 that says why
        reason = str(exc) or type(exc).__name__
        raise HTTPException(status_code=500, detail=f"Failed to trigger upgrade: {reason}") from exc
    return JSONResponse({"status": "upgrade triggered"}, headers={UPGRADE_ID_HEADER: answer.upgrade_id})


@router.get("/status", summary="What is serving now, and how the last reload ended")
async def web_service_status(request: Request) -> dict[str, Any]:
    identity: ProcessIdentity = request.app.state.identity
    status = identity.as_dict()
    socket_path = os.environ.get(SUPERVISOR_ENV)
    if socket_path:
        status.update(await supervisor_status(socket_path))
    return status


@router.get(
    "/runtimeProfile",
    summary="CPUs and memory detected, the worker count in force and where it came from, the workers' limits",
    response_model=RuntimeProfileAnswer,
    responses={503: {"model": ErrorDetail, "description": "The supervisor did not answer"}},
)
async def web_service_runtime_profile(request: Request) -> dict[str, Any]:
    """The runtime profile. Under the supervisor it is the master's (it knows the serving generation's
    size and whether `workers` came from the command line, the environment, the settings file or the
    default); in a process without one (plain uvicorn), this process's own settings, without a worker count.
    """
    socket_path = os.environ.get(SUPERVISOR_ENV)
    if socket_path:
        profile = (await supervisor_status(socket_path)).get("runtime_profile")
        if not isinstance(profile, dict):
            raise HTTPException(
                status_code=503,
                detail="The supervisor runs an older pypnm that has no runtime profile; restart pypnm to update it",
            )
        return {"status": "success", "profile": profile}
    source, given = setting_source("workers", {}, config_path())
    profile = runtime_profile(request.app.state.settings, active_workers=None, source=source, given=given)
    return {"status": "success", "profile": profile}
