"""Settings from a mounted ConfigMap or Secret: a content change reloads in place.

`KubeletVolume` keeps a temporary directory exactly as the kubelet keeps a ConfigMap or
Secret volume: each file is a symlink through `..data` to a timestamped directory, and an
update writes a new directory, points `..data_tmp` at it, renames that over `..data` and
deletes the old directory. A real `pypnm serve --config <volume>/pypnm.toml` must apply the
change itself: a setting visible over HTTP changes, the generation advances, the master
stays the same process; the same content again reloads nothing; broken content fails the
reload while the old generation serves and stays ready.
"""

from __future__ import annotations

import itertools
import os
import secrets
import shutil
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from watchfiles import Change

from conftest import RELOAD_PATH, REPO, STATUS_PATH, Service, StartService, base_env, pypnm_command, wait_until
from pypnm.supervisor.config_watch import names_a_file

WEBUI = "http://webui.example:3000"
TOKEN = "ci-" + secrets.token_urlsafe(24)
NEW_TOKEN = "ops-" + secrets.token_urlsafe(24)
PROBE = "probe-" + secrets.token_urlsafe(24)
UNCHANGED = "same content: no reload"  # the master's debug line for events that changed no content


class KubeletVolume:
    """A ConfigMap or Secret volume as the kubelet's atomic writer keeps it."""

    _stamps = itertools.count()

    def __init__(self, directory: Path, files: dict[str, str]) -> None:
        self.directory = directory
        directory.mkdir()
        self.current = self._write(files)
        os.symlink(self.current, directory / "..data")
        for name in files:
            os.symlink(f"..data/{name}", directory / name)

    def path(self, name: str) -> Path:
        return self.directory / name

    def _write(self, files: dict[str, str]) -> str:
        name = f"..2026_11_25_12_00_{next(self._stamps):02d}.{secrets.randbelow(1000):03d}"
        (self.directory / name).mkdir()
        for file, text in files.items():
            (self.directory / name / file).write_text(text)
        return name

    def update(self, files: dict[str, str]) -> None:
        """The kubelet's sequence: new directory, `..data_tmp` symlink, rename over `..data`, a link for
        each new key, old directory gone."""
        old, self.current = self.current, self._write(files)
        os.symlink(self.current, self.directory / "..data_tmp")
        os.rename(self.directory / "..data_tmp", self.directory / "..data")
        for name in files:
            if not os.path.lexists(self.directory / name):
                os.symlink(f"..data/{name}", self.directory / name)
        shutil.rmtree(self.directory / old)


def get(service: Service, path: str, token: str | None = None, **headers: str) -> httpx.Response:
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return service.get(path, headers=headers)


def status(service: Service, token: str | None = None) -> dict[str, Any]:
    response = get(service, STATUS_PATH, token)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def finished_reload(service: Service, seen: set[str], token: str | None = None) -> dict[str, Any]:
    """Wait for a reload not in `seen` to have an outcome, and for the service to be idle again."""

    def find() -> dict[str, Any] | None:
        now = status(service, token)
        new = [r for r in now["reloads"] if r["id"] not in seen]
        if (
            new
            and all(r["outcome"] is not None for r in new)
            and now["pending_reload"] is None
            and now["reload_state"] == "idle"
        ):
            assert len(new) == 1, new  # one change, one reload
            return dict(new[0])
        return None

    record: dict[str, Any] = wait_until(find, timeout=60.0, interval=0.1)
    return record


def reload_ids(service: Service, token: str | None = None) -> set[str]:
    return {r["id"] for r in status(service, token)["reloads"]}


def cors_origin(service: Service) -> str | None:
    origin: str | None = get(service, "/health", Origin=WEBUI).headers.get("access-control-allow-origin")
    return origin


def unchanged_lines(service: Service) -> int:
    return service.output().count(UNCHANGED)


@pytest.fixture
def serve(tmp_path: Path, start_service: StartService) -> Callable[..., Service]:
    def start(config: Path, *args: str, **env: str) -> Service:
        env.setdefault("PYPNM_RELOAD_MIN_INTERVAL", "0")
        return start_service(
            pypnm_command("serve", "--port", "{port}", "--config", str(config), "--log-level", "debug", *args),
            env=base_env(**env),
        )

    return start


def test_configmap_update_is_applied_in_place(tmp_path: Path, serve: Callable[..., Service]) -> None:
    volume = KubeletVolume(tmp_path / "pypnm-config", {"pypnm.toml": "cors_origins = []\n"})
    config = volume.path("pypnm.toml")
    service = serve(config)
    start = status(service)
    assert start["master"]["watching_config"] == [str(config)]
    assert cors_origin(service) is None
    master, generation, seen = start["master"]["pid"], start["generation"], reload_ids(service)

    # A change: the kubelet swaps ..data; the file's own path gets no event of its own.
    volume.update({"pypnm.toml": f'cors_origins = ["{WEBUI}"]\n'})
    record = finished_reload(service, seen)
    assert record["outcome"] == "succeeded", record
    assert record["source"] == f"file change: {config}"
    assert cors_origin(service) == WEBUI  # the new setting serves
    now = status(service)
    assert now["generation"] == record["generation"] > generation
    assert now["master"]["pid"] == master  # in place: no restart
    assert get(service, "/ready").status_code == 200

    # The same content again: the watch sees the swap, reads the file, and reloads nothing.
    seen, generation, before = reload_ids(service), now["generation"], unchanged_lines(service)
    volume.update({"pypnm.toml": f'cors_origins = ["{WEBUI}"]\n'})
    wait_until(lambda: unchanged_lines(service) > before, timeout=30.0)
    now = status(service)
    assert reload_ids(service) == seen and now["pending_reload"] is None
    assert now["generation"] == generation

    # Broken content: the reload fails naming the setting, its problem and the file as given;
    # the old generation keeps serving its settings, ready.
    volume.update({"pypnm.toml": f'cors_origins = ["{WEBUI}"]\ntrusted_networks = ["not-a-network"]\n'})
    record = finished_reload(service, seen)
    assert record["outcome"] == "failed", record
    assert record["source"] == f"file change: {config}"
    assert (
        f"invalid setting 'trusted_networks'[0] (PYPNM_TRUSTED_NETWORKS or 'trusted_networks' in "
        f"{str(config)!r})" in record["reason"]
    ), record["reason"]
    assert "'not-a-network' is not an IP address or network" in record["reason"]
    now = status(service)
    assert now["last_reload"]["id"] == record["id"] and now["last_reload"]["outcome"] == "failed"
    assert now["generation"] == generation and now["master"]["pid"] == master
    ready = get(service, "/ready")
    assert ready.status_code == 200 and ready.json()["generation"] == generation
    assert cors_origin(service) == WEBUI
    assert (
        f"reload {record['id']} failed: generation {record['generation']} discarded, generation "
        f"{generation} keeps serving" in service.output()
    )

    # Fixed content is applied again.
    seen = reload_ids(service)
    volume.update({"pypnm.toml": "cors_origins = []\n"})
    record = finished_reload(service, seen)
    assert record["outcome"] == "succeeded", record
    assert cors_origin(service) is None
    assert status(service)["master"]["pid"] == master


def test_a_log_file_beside_the_settings_file_is_passed_over(tmp_path: Path, serve: Callable[..., Service]) -> None:
    """Lines written to a log file in the settings file's directory are events there too: they must not
    make the master read the files (and say so at debug level, one more line each time) again and again."""
    directory = tmp_path / "etc"
    directory.mkdir()
    log, config = directory / "pypnm.log", directory / "pypnm.toml"
    config.write_text(f'log_file = "{log}"\n')
    service = serve(config)  # at --log-level debug: each request writes lines into the directory
    wait_until(lambda: log.exists() and "watching the content of" in log.read_text(), timeout=30.0)
    deadline = time.monotonic() + 3.0  # longer than watchfiles' debounce: several batches of events
    for _ in range(300):
        if time.monotonic() > deadline:
            break
        assert get(service, "/health").status_code == 200
        time.sleep(0.01)
    assert log.read_text().count(UNCHANGED) == 0

    os.utime(config)  # an event that names the file, with the same content: read, and said
    wait_until(lambda: log.read_text().count(UNCHANGED) >= 1, timeout=30.0)
    assert status(service)["generation"] == 1


def test_events_that_name_a_link_on_the_way_to_the_file_count(tmp_path: Path) -> None:
    """pypnm.toml -> current.toml -> v3.toml: retargeting current.toml changes what pypnm.toml holds."""
    (tmp_path / "v3.toml").write_text("")
    os.symlink("v3.toml", tmp_path / "current.toml")
    os.symlink("current.toml", tmp_path / "pypnm.toml")
    files = [tmp_path / "pypnm.toml"]
    for name in ("pypnm.toml", "current.toml", "v3.toml", "..data"):
        assert names_a_file({(Change.modified, str(tmp_path / name))}, files), name
    assert not names_a_file({(Change.modified, str(tmp_path / "pypnm.log"))}, files)


def test_tokens_secret_update_is_applied_in_place(tmp_path: Path, serve: Callable[..., Service]) -> None:
    secret = KubeletVolume(tmp_path / "pypnm-tokens", {"tokens": f"ci:{TOKEN}\n"})
    tokens = secret.path("tokens")
    config = tmp_path / "pypnm.toml"
    # Every call needs a token; the test watches the status with one from the settings file.
    config.write_text(f'trusted_networks = []\napi_tokens_file = "{tokens}"\n[api_tokens]\nprobe = "{PROBE}"\n')
    service = serve(config)
    start = status(service, PROBE)
    assert start["master"]["watching_config"] == [str(config), str(tokens)]
    assert get(service, STATUS_PATH, TOKEN).status_code == 200
    assert get(service, STATUS_PATH, NEW_TOKEN).status_code == 401
    master, seen = start["master"]["pid"], reload_ids(service, PROBE)

    secret.update({"tokens": f"ops:{NEW_TOKEN}\n"})
    record = finished_reload(service, seen, PROBE)
    assert record["outcome"] == "succeeded", record
    assert record["source"] == f"file change: {tokens}"
    assert get(service, STATUS_PATH, NEW_TOKEN).status_code == 200  # the new token works
    assert get(service, STATUS_PATH, TOKEN).status_code == 401  # the old one no longer does
    now = status(service, PROBE)
    assert now["generation"] > start["generation"] and now["master"]["pid"] == master

    # A broken tokens file fails the reload; the tokens in force stay, the pod stays ready.
    seen = reload_ids(service, PROBE)
    secret.update({"tokens": f"ops:{NEW_TOKEN}\nci:short\n"})
    record = finished_reload(service, seen, PROBE)
    assert record["outcome"] == "failed", record
    assert f"api_tokens_file {str(tokens)!r} line 2" in record["reason"], record["reason"]
    assert "must be at least 16 characters" in record["reason"]
    assert get(service, STATUS_PATH, NEW_TOKEN).status_code == 200
    assert get(service, "/ready").status_code == 200
    assert status(service, PROBE)["generation"] == now["generation"]


def test_a_secret_arriving_after_the_configmap_that_names_it_is_applied(
    tmp_path: Path, serve: Callable[..., Service]
) -> None:
    """One `kubectl apply` names a new key of the Secret in the ConfigMap and adds it to the Secret;
    the kubelet updates the two volumes independently, and here the ConfigMap lands first."""
    secret = KubeletVolume(tmp_path / "pypnm-tokens", {"tokens": f"ci:{TOKEN}\n"})
    tokens, new = secret.path("tokens"), secret.path("tokens-v2")
    settings = 'trusted_networks = []\napi_tokens_file = "{}"\n[api_tokens]\nprobe = "{}"\n'
    volume = KubeletVolume(tmp_path / "pypnm-config", {"pypnm.toml": settings.format(tokens, PROBE)})
    config = volume.path("pypnm.toml")
    service = serve(config)
    start = status(service, PROBE)
    master, seen = start["master"]["pid"], reload_ids(service, PROBE)

    # The ConfigMap first: its reload fails (the tokens file it names is not there yet), the old
    # tokens stay in force, and the watch now follows the file the new settings name.
    volume.update({"pypnm.toml": settings.format(new, PROBE)})
    record = finished_reload(service, seen, PROBE)
    assert record["outcome"] == "failed", record
    assert f"api_tokens_file {str(new)!r}: cannot read it" in record["reason"], record["reason"]
    assert get(service, STATUS_PATH, TOKEN).status_code == 200
    assert get(service, "/ready").status_code == 200
    assert status(service, PROBE)["master"]["watching_config"] == [str(config), str(new)]

    # Then the Secret: the new key's arrival reloads by itself, and the new settings serve.
    seen = reload_ids(service, PROBE)
    secret.update({"tokens": f"ci:{TOKEN}\n", "tokens-v2": f"ops:{NEW_TOKEN}\n"})
    record = finished_reload(service, seen, PROBE)
    assert record["outcome"] == "succeeded", record
    assert record["source"] == f"file change: {new}"
    assert get(service, STATUS_PATH, NEW_TOKEN).status_code == 200
    assert get(service, STATUS_PATH, TOKEN).status_code == 401
    assert status(service, PROBE)["master"]["pid"] == master


def test_a_settings_file_that_does_not_parse_keeps_the_watch_on_the_files_in_force(
    tmp_path: Path, serve: Callable[..., Service]
) -> None:
    """Nothing new to follow: the settings file and the tokens file in force stay watched, and fixing
    the settings file reloads."""
    secret = KubeletVolume(tmp_path / "pypnm-tokens", {"tokens": f"ci:{TOKEN}\n"})
    tokens = secret.path("tokens")
    settings = f'trusted_networks = []\napi_tokens_file = "{tokens}"\n[api_tokens]\nprobe = "{PROBE}"\n'
    volume = KubeletVolume(tmp_path / "pypnm-config", {"pypnm.toml": settings})
    config = volume.path("pypnm.toml")
    service = serve(config)
    seen = reload_ids(service, PROBE)

    volume.update({"pypnm.toml": settings + "not toml [\n"})
    record = finished_reload(service, seen, PROBE)
    assert record["outcome"] == "failed" and "not valid TOML" in record["reason"], record
    assert status(service, PROBE)["master"]["watching_config"] == [str(config), str(tokens)]

    seen = reload_ids(service, PROBE)
    secret.update({"tokens": f"ops:{NEW_TOKEN}\n"})
    record = finished_reload(service, seen, PROBE)
    assert record["outcome"] == "failed", record  # the settings file still does not parse
    assert get(service, STATUS_PATH, TOKEN).status_code == 200

    seen = reload_ids(service, PROBE)
    volume.update({"pypnm.toml": settings})
    record = finished_reload(service, seen, PROBE)
    assert record["outcome"] == "succeeded", record
    assert get(service, STATUS_PATH, NEW_TOKEN).status_code == 200


def test_watch_config_off_and_a_manual_reload_after_the_old_directory_is_gone(
    tmp_path: Path, serve: Callable[..., Service]
) -> None:
    volume = KubeletVolume(tmp_path / "pypnm-config", {"pypnm.toml": "cors_origins = []\n"})
    config = volume.path("pypnm.toml")
    # Off by environment, so that pypnm versions without the setting run this test too (the
    # manual reload below failed there: they resolved the path once, into the deleted directory).
    service = serve(config, PYPNM_WATCH_CONFIG="false")
    start = status(service)
    assert start["master"].get("watching_config", []) == []

    volume.update({"pypnm.toml": f'cors_origins = ["{WEBUI}"]\n'})
    time.sleep(1.5)  # a watch sees a swap within milliseconds; this one must not react at all
    assert reload_ids(service) == {r["id"] for r in start["reloads"]}
    assert cors_origin(service) is None

    response = get(service, RELOAD_PATH)
    assert response.status_code == 200 and response.content == b'{"status":"reload triggered"}'
    record = finished_reload(service, {r["id"] for r in start["reloads"]})
    assert record["id"] == response.headers["X-Reload-Id"]
    assert record["outcome"] == "succeeded", record
    assert cors_origin(service) == WEBUI


def test_watch_config_in_the_file_turns_the_watch_off_and_reload_flag_keeps_it(
    tmp_path: Path, serve: Callable[..., Service]
) -> None:
    config = tmp_path / "pypnm.toml"
    config.write_text("watch_config = false\n")
    plain = serve(config)
    assert status(plain)["master"]["watching_config"] == []
    # `--reload` has always reloaded on a change of the settings file: it still does, by content.
    dev = serve(config, "--reload")
    start = status(dev)
    assert start["master"]["watching_config"] == [str(config)]
    config.write_text(f'watch_config = false\ncors_origins = ["{WEBUI}"]\n')
    record = finished_reload(dev, {r["id"] for r in start["reloads"]})
    assert record["outcome"] == "succeeded" and record["source"] == f"file change: {config}", record
    assert cors_origin(dev) == WEBUI


def test_the_shipped_configmap_turns_the_watch_on() -> None:
    """deploy/kubernetes/ relies on it: a `kubectl apply` of the ConfigMap must reach the pods in place."""
    (configmap,) = [doc for doc in yaml.safe_load_all((REPO / "deploy/kubernetes/configmap.yaml").read_text()) if doc]
    assert tomllib.loads(configmap["data"]["pypnm.toml"])["watch_config"] is True
