"""The PyPNM WebUI's Health page: browser requests to each instance, cross-origin, without a token.

The requests are the ones a browser sends for the page's `fetch()` of
`GET /pypnm/system/webService/reload` and `GET /health`: a simple GET (no preflight) with
`Origin` of the WebUI, `Sec-Fetch-Site: cross-site`, `Sec-Fetch-Mode: cors`, no cookie and
no `Authorization`, and `Host` naming the instance. Only loopback may be a target here, so
the instance name reaches pypnm through the `Host` header alone (no DNS), and the operators'
network of the recipe is 127.0.0.0/8. Each ingredient of the recipe (`cors_origins`,
`trusted_networks`, `allowed_hosts`) is shown to be needed: without it the request is refused.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import RELOAD_PATH, STATUS_PATH, Service, StartService, base_env, pypnm_command, wait_until

WEBUI = "http://webui.example:3000"
INSTANCE = "pypnm-1.example"
PROBE = "probe-" + secrets.token_urlsafe(24)  # the test's own calls (settings, status); the browser has none
RECIPE = {
    "cors_origins": f'["{WEBUI}"]',
    "trusted_networks": '["127.0.0.0/8"]',  # the operators' network (here: where the test's "browser" is)
    "allowed_hosts": f'["{INSTANCE}"]',
}


def browser_get(service: Service, path: str) -> httpx.Response:
    """What the WebUI page's fetch(`http://pypnm-1.example:PORT/...`) sends, headers and all."""
    headers = {
        "Host": f"{INSTANCE}:{service.port}",
        "Origin": WEBUI,
        "Referer": f"{WEBUI}/",
        "Sec-Fetch-Site": "cross-site",
        "Sec-Fetch-Mode": "cors",
        "Sec-Fetch-Dest": "empty",
        "Accept": "*/*",
        "User-Agent": "Mozilla/5.0 (X11; Linux x86_64) Chrome/131.0",
    }
    return service.get(path, headers=headers)


@pytest.fixture
def instance(tmp_path: Path, start_service: StartService) -> Callable[[dict[str, str]], Service]:
    """One pypnm; `configure(settings)` writes its settings file and reloads it (with a token)."""
    config = tmp_path / "pypnm.toml"
    config.write_text(f'[api_tokens]\nprobe = "{PROBE}"\n')
    service = start_service(
        pypnm_command("--port", "{port}", "--config", str(config)),
        env=base_env(PYPNM_RELOAD_MIN_INTERVAL="0", PYPNM_WATCH_CONFIG="false"),  # reloaded by hand below
    )
    auth = {"Authorization": f"Bearer {PROBE}"}

    def configure(settings: dict[str, str]) -> Service:
        lines = [f"{name} = {value}" for name, value in settings.items()]
        config.write_text("\n".join([*lines, "[api_tokens]", f'probe = "{PROBE}"', ""]))
        reload_id = service.get(RELOAD_PATH, headers=auth).headers["X-Reload-Id"]

        def settled() -> dict[str, Any] | None:
            status = service.get(STATUS_PATH, headers=auth).json()
            record = next((r for r in status["reloads"] if r["id"] == reload_id), None)
            if record is None or record["outcome"] is None or status["reload_state"] != "idle":
                return None
            assert record["outcome"] == "succeeded", record
            # Only the new generation's workers left: each request below meets the new settings.
            return record if all(w["generation"] == record["generation"] for w in status["workers"]) else None

        wait_until(settled, timeout=60.0, interval=0.1)
        return service

    return configure


REFUSED = [
    pytest.param({}, "Cross-site request refused", "cors_origins", id="nothing"),
    pytest.param(
        {k: v for k, v in RECIPE.items() if k != "cors_origins"},
        "Cross-site request refused",
        "cors_origins",
        id="origin-not-listed",
    ),
    pytest.param(
        {k: v for k, v in RECIPE.items() if k != "allowed_hosts"},
        f'Host "{INSTANCE}:',
        "allowed_hosts",
        id="instance-name-not-listed",
    ),
    pytest.param(
        {**RECIPE, "trusted_networks": '["10.20.0.0/16"]'},
        "System Operations are open only to clients in trusted_networks",
        "trusted_networks",
        id="browser-not-in-trusted-networks",
    ),
]


@pytest.mark.parametrize(("settings", "detail_starts", "names"), REFUSED)
def test_webui_reload_is_refused_without_the_whole_recipe(
    instance: Callable[[dict[str, str]], Service], settings: dict[str, str], detail_starts: str, names: str
) -> None:
    service = instance(settings)
    response = browser_get(service, RELOAD_PATH)
    assert response.status_code == 403, response.text
    detail = response.json()["detail"]
    assert detail.startswith(detail_starts) and names in detail, detail
    assert "X-Reload-Id" not in response.headers  # nothing was triggered
    listed = "cors_origins" in settings
    # A listed origin may read the refusal (so the page can show why); others get no CORS header.
    assert response.headers.get("access-control-allow-origin") == (WEBUI if listed else None)


def test_webui_reload_and_health_work_with_the_recipe(instance: Callable[[dict[str, str]], Service]) -> None:
    service = instance(RECIPE)
    before = service.get(STATUS_PATH, headers={"Authorization": f"Bearer {PROBE}"}).json()["generation"]

    response = browser_get(service, RELOAD_PATH)
    assert response.status_code == 200, response.text
    assert response.content == b'{"status":"reload triggered"}'
    assert response.headers["access-control-allow-origin"] == WEBUI
    exposed = {h.strip().lower() for h in response.headers["access-control-expose-headers"].split(",")}
    assert "x-reload-id" in exposed  # the page may read the id and follow the reload in /status
    assert "access-control-allow-credentials" not in response.headers  # nothing to send, nothing allowed
    assert "origin" in response.headers.get("vary", "").lower()  # caches keep answers per origin
    reload_id = response.headers["X-Reload-Id"]

    def succeeded() -> bool:
        status = browser_get(service, STATUS_PATH)  # the page may follow it the same way
        assert status.status_code == 200 and status.headers["access-control-allow-origin"] == WEBUI
        record = next((r for r in status.json()["reloads"] if r["id"] == reload_id), None)
        return record is not None and record["outcome"] == "succeeded" and record["generation"] > before

    wait_until(succeeded, timeout=60.0, interval=0.1)

    health = browser_get(service, "/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert health.headers["access-control-allow-origin"] == WEBUI


def test_webui_health_is_open_but_unreadable_without_the_recipe(instance: Callable[[dict[str, str]], Service]) -> None:
    service = instance({})
    health = browser_get(service, "/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"  # open: answered
    assert "access-control-allow-origin" not in health.headers  # but the browser hides it from the page
