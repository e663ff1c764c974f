"""The shipped deployment: the Kubernetes base in deploy/kubernetes/ and the Dockerfile.

The manifests are validated offline against the Kubernetes JSON schemas that
kubernetes-validate ships (strict: unknown fields fail), and their invariants are checked
by reading them: against each other (ports, selectors, mounts), against pypnm's own code
(settings loader, tokens-file reader, app routes, the server started with the pod's
arguments) and against the Dockerfile. The image itself is built and run only where a
container engine answers; elsewhere that test skips and says why.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
import subprocess
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dockerfile
import httpx
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version, major_minor
from starlette.routing import Match

from conftest import (
    RELOAD_PATH,
    REPO,
    STATUS_PATH,
    Service,
    StartService,
    base_env,
    free_port,
    pypnm_command,
    wait_until,
)
from pypnm.settings import Settings, SettingsError, load_settings, read_tokens_file

BASE = REPO / "deploy" / "kubernetes"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
# The oldest Kubernetes this base is meant for, and the newest whose schemas the pinned
# kubernetes-validate ships.
KUBERNETES_VERSIONS = ["1.30", latest_version()]


# ----- reading the manifests -----------------------------------------------------------------


def load_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def kustomization() -> dict[str, Any]:
    return load_documents(BASE / "kustomization.yaml")[0]


def manifest_files() -> list[Path]:
    return sorted(p for p in BASE.glob("*.yaml") if p.name != "kustomization.yaml")


def resources() -> list[dict[str, Any]]:
    return [doc for name in kustomization()["resources"] for doc in load_documents(BASE / name)]


def resource(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [r for r in resources() if r["kind"] == kind and (name is None or r["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''} in the base, found {len(found)}"
    return found[0]


def pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = resource("Deployment")["spec"]["template"]["spec"]
    return spec


def container() -> dict[str, Any]:
    containers = pod_spec()["containers"]
    assert len(containers) == 1
    result: dict[str, Any] = containers[0]
    return result


def arg_value(flag: str) -> str | None:
    args = container().get("args", [])
    return str(args[args.index(flag) + 1]) if flag in args else None


def container_port(name_or_number: str | int) -> int:
    """A port as a probe or Service names it (number or the container port's name), as a number."""
    if isinstance(name_or_number, int):
        return name_or_number
    ports = {p["name"]: p["containerPort"] for p in container()["ports"] if "name" in p}
    assert name_or_number in ports, f"no container port named {name_or_number!r} (have {sorted(ports)})"
    return int(ports[name_or_number])


def mounts() -> dict[str, dict[str, Any]]:
    """mountPath → {"mount": volumeMount, "volume": the pod volume it mounts}."""
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    return {m["mountPath"]: {"mount": m, "volume": volumes[m["name"]]} for m in container()["volumeMounts"]}


def container_env() -> dict[str, str]:
    return {e["name"]: e["value"] for e in container().get("env", [])}


def config_toml() -> str:
    configmap = resource("ConfigMap")
    config_file = Path(arg_value("--config") or "")
    text: str = configmap["data"][config_file.name]
    return text


def config() -> dict[str, Any]:
    return tomllib.loads(config_toml())


def setting(name: str) -> Any:
    """A setting as the pods get it: from the ConfigMap's file, else pypnm's default."""
    return config().get(name, Settings.model_fields[name].default)


def prestop_delay() -> float:
    handler = container()["lifecycle"]["preStop"]
    if "sleep" in handler:
        return float(handler["sleep"]["seconds"])
    command = handler["exec"]["command"]
    match = re.fullmatch(r"import time; time\.sleep\((\d+(?:\.\d+)?)\)", command[-1])
    assert command[:2] == ["python", "-c"] and match, f"preStop is not a recognised sleep: {command}"
    return float(match.group(1))


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings read in this process come from the manifests only, not from the test's environment."""
    for key in list(os.environ):
        if key.startswith("PYPNM_"):
            monkeypatch.delenv(key)


# ----- the base as a whole -------------------------------------------------------------------


def test_kustomization_lists_every_manifest_file() -> None:
    listed = kustomization()["resources"]
    assert len(listed) == len(set(listed)), f"listed twice: {listed}"
    assert sorted(listed) == [p.name for p in manifest_files()]
    kinds = sorted(r["kind"] for r in resources())
    assert kinds == ["ConfigMap", "Deployment", "PodDisruptionBudget", "Secret", "Service", "Service"]


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a network connection fails the test: validation must work offline."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: p.name)
def test_manifest_validates_against_the_kubernetes_schema(path: Path, version: str, no_network: None) -> None:
    documents = load_documents(path)
    assert documents, f"{path.name} holds no resource"
    for document in documents:
        # strict: a misspelt or misplaced field is an error, as `kubectl apply` would make it.
        # A kind without a schema raises SchemaNotFoundError, which fails the test too.
        assert kubernetes_validate.validate(document, version, strict=True) == major_minor(version)


def test_the_schema_check_rejects_a_bad_manifest(no_network: None) -> None:
    """The validation above can fail: an unknown field and a wrong type are both caught offline."""
    deployment = load_documents(BASE / "deployment.yaml")[0]
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["pathh"] = "/ready"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)
    deployment = load_documents(BASE / "deployment.yaml")[0]
    deployment["spec"]["replicas"] = "three"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)


def test_selectors_match_the_pods() -> None:
    labels = resource("Deployment")["spec"]["template"]["metadata"]["labels"]
    selectors = {
        "Deployment": resource("Deployment")["spec"]["selector"]["matchLabels"],
        "PodDisruptionBudget": resource("PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
        "Service pypnm": resource("Service", "pypnm")["spec"]["selector"],
        "Service pypnm-headless": resource("Service", "pypnm-headless")["spec"]["selector"],
    }
    for owner, selector in selectors.items():
        assert selector and selector.items() <= labels.items(), f"{owner} selects {selector}, pods have {labels}"


# ----- the Deployment --------------------------------------------------------------------------


def test_rolling_update_never_lowers_capacity() -> None:
    spec = resource("Deployment")["spec"]
    assert spec["replicas"] == 3
    assert spec["strategy"]["type"] == "RollingUpdate"
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert spec["strategy"]["rollingUpdate"]["maxSurge"] >= 1  # with 0 unavailable, surge is how it moves
    budget = resource("PodDisruptionBudget")["spec"]
    assert budget.get("maxUnavailable") == 1 or budget.get("minAvailable") == spec["replicas"] - 1


def test_probe_paths_are_routes_of_the_app(clean_env: None) -> None:
    from pypnm.api.app import create_app

    app = create_app(load_settings())

    def serves(path: str) -> bool:
        # Ask the app's own router, as it dispatches a GET (included routers and prefixes too).
        scope = {"type": "http", "method": "GET", "path": path, "root_path": "", "query_string": b"", "headers": []}
        return any(route.matches(scope)[0] is Match.FULL for route in app.router.routes)

    assert not serves("/no-such-probe")
    probes = container()
    assert probes["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert probes["livenessProbe"]["httpGet"]["path"] == "/health"
    for kind in ("readinessProbe", "livenessProbe"):
        path = probes[kind]["httpGet"]["path"]
        assert serves(path), f"{kind} asks for {path}, which the app does not serve"
        # Probes carry no token: the path must not be a guarded System Operation.
        assert not path.startswith("/pypnm/system/"), f"{kind} path {path} needs a token"


def test_the_scheme_is_set_beside_the_probes_never_in_the_configmap() -> None:
    """A reload applies `ssl` in place: set in the ConfigMap, it would switch every pod's scheme at once
    under probes that keep theirs (every pod unready, then restarted in a loop). It belongs in the
    Deployment's arguments, rolled out with the probes' scheme, and the ConfigMap says why."""
    in_configmap = {"ssl", "ssl_certfile", "ssl_keyfile"} & set(config())
    assert not in_configmap, f"the ConfigMap sets {sorted(in_configmap)}: give --ssl --cert --key as arguments"
    comments = " ".join(line.strip().lstrip("#") for line in (BASE / "configmap.yaml").read_text().splitlines())
    assert re.search(r"Never set ssl, ssl_certfile or ssl_keyfile here.*--ssl --cert FILE --key FILE", comments), (
        "configmap.yaml must say that ssl belongs in the Deployment's arguments, and why"
    )
    args = container().get("args", [])
    https = "--ssl" in args or ("--cert" in args and "--key" in args)
    for kind in ("readinessProbe", "livenessProbe"):
        scheme = container()[kind]["httpGet"].get("scheme", "HTTP")
        assert scheme == ("HTTPS" if https else "HTTP"), f"{kind} probes {scheme} of a pod serving {args}"


def test_liveness_cannot_kill_a_pod_in_the_middle_of_a_reload() -> None:
    liveness = container()["livenessProbe"]
    tolerated = liveness["periodSeconds"] * liveness["failureThreshold"]
    busiest = setting("reload_timeout") + setting("graceful_timeout")
    assert tolerated > busiest, (
        f"liveness restarts a pod after {tolerated}s of failures, a reload may take {busiest}s "
        "(reload_timeout + graceful_timeout)"
    )
    for kind in ("readinessProbe", "livenessProbe"):
        probe = container()[kind]
        assert probe["timeoutSeconds"] < probe["periodSeconds"], kind


def test_grace_period_covers_prestop_and_graceful_timeout() -> None:
    grace = pod_spec()["terminationGracePeriodSeconds"]
    needed = setting("graceful_timeout") + prestop_delay()
    assert prestop_delay() >= 1, "the preStop delay must give endpoints time to update"
    assert grace > needed, f"terminationGracePeriodSeconds {grace} <= graceful_timeout + preStop = {needed}"


def test_ports_agree() -> None:
    port = int(arg_value("--port") or setting("port"))
    assert "port" not in config() or config()["port"] == port, "port set both in args and in the ConfigMap"
    http = [p for p in container()["ports"] if p.get("name") == "http"]
    assert [p["containerPort"] for p in http] == [port]
    service = resource("Service", "pypnm")["spec"]
    assert [container_port(p["targetPort"]) for p in service["ports"]] == [port]
    headless = resource("Service", "pypnm-headless")["spec"]
    assert headless["clusterIP"] == "None"
    # Clients of the headless Service connect to the pods' addresses: its port must be the pod's.
    assert [(p["port"], container_port(p["targetPort"])) for p in headless["ports"]] == [(port, port)]
    for kind in ("readinessProbe", "livenessProbe"):
        assert container_port(container()[kind]["httpGet"]["port"]) == port, kind
    assert (arg_value("--host") or setting("host")) == "0.0.0.0"


def test_pod_runs_unprivileged_with_resources() -> None:
    pod = pod_spec()["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert pod["runAsUser"] > 0 and pod["runAsGroup"] > 0 and pod["fsGroup"] > 0
    assert pod["seccompProfile"]["type"] == "RuntimeDefault"
    own = container()["securityContext"]
    assert own["allowPrivilegeEscalation"] is False
    assert own["capabilities"]["drop"] == ["ALL"] and not own["capabilities"].get("add")
    assert own.get("privileged", False) is False
    resources_ = container()["resources"]
    assert resources_["requests"]["cpu"] and resources_["requests"]["memory"] and resources_["limits"]["memory"]


def test_read_only_root_with_runtime_dir_and_tmp_on_empty_dirs(
    clean_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert container()["securityContext"]["readOnlyRootFilesystem"] is True
    runtime_dir = container_env()["PYPNM_RUNTIME_DIR"]
    for path in (runtime_dir, "/tmp"):
        assert path in mounts(), f"nothing is mounted at {path}"
        assert "emptyDir" in mounts()[path]["volume"], f"{path} is not an emptyDir"
        assert not mounts()[path]["mount"].get("readOnly", False), f"{path} is mounted read-only"
    # The variable is pypnm's runtime_dir setting, so the master puts its directory there.
    monkeypatch.setenv("PYPNM_RUNTIME_DIR", runtime_dir)
    assert load_settings().runtime_dir == Path(runtime_dir)


def test_service_links_cannot_break_the_settings(clean_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """With service links on, the kubelet sets `<SERVICE>_PORT=tcp://<cluster IP>:<port>` in every pod of
    the namespace; for the Service named pypnm that is PYPNM_PORT, which pypnm reads as its port."""
    breaking = []
    for service in (r for r in resources() if r["kind"] == "Service"):
        variable = service["metadata"]["name"].upper().replace("-", "_") + "_PORT"
        port = service["spec"]["ports"][0]["port"]
        with monkeypatch.context() as env:
            env.setenv(variable, f"tcp://10.0.0.1:{port}")
            try:
                load_settings()
            except SettingsError:
                breaking.append(variable)
    assert breaking == ["PYPNM_PORT"]  # the reason for the switch below; renaming the Service would lift it
    assert pod_spec()["enableServiceLinks"] is False


def test_prestop_runs_with_the_images_python() -> None:
    handler = container()["lifecycle"]["preStop"]
    if "exec" in handler:
        # No shell in the command: the runtime looks `python` up in the image's PATH.
        path = dockerfile_env()["PATH"].split(":")
        assert path[0] == f"{venv_dir()}/bin", f"the image's PATH {path} does not start with its venv"


# ----- the ConfigMap and the Secret --------------------------------------------------------------


def test_configmap_is_mounted_as_a_directory_and_named_by_config() -> None:
    config_file = Path(arg_value("--config") or "")
    assert config_file.is_absolute()
    mount = mounts()[str(config_file.parent)]
    assert mount["volume"]["configMap"]["name"] == resource("ConfigMap")["metadata"]["name"]
    # A subPath mount is a copy the kubelet never updates; a directory mount follows `..data`.
    assert "subPath" not in mount["mount"]
    assert config_file.name in resource("ConfigMap")["data"]


def test_configmap_settings_load_with_pypnm(clean_env: None, tmp_path: Path) -> None:
    unknown = set(config()) - set(Settings.model_fields)
    assert not unknown, f"settings pypnm does not know (it would refuse to start): {sorted(unknown)}"
    config_file = tmp_path / "pypnm.toml"
    config_file.write_text(config_toml())
    tokens = tmp_path / "tokens"
    tokens.write_text(resource("Secret")["stringData"]["tokens"])
    # The file names the Secret's path in the pod; here the same content lies elsewhere.
    settings = load_settings(config_file, api_tokens_file=tokens)
    assert settings.graceful_timeout == setting("graceful_timeout")
    # Cluster callers use a token: no address is trusted, loopback included (see the ConfigMap).
    assert settings.trusted_networks == []
    assert settings.forwarded_allow_ips == []


def test_configmap_with_a_misspelt_setting_is_refused(clean_env: None, tmp_path: Path) -> None:
    """The load above can fail: pypnm's loader rejects a key it does not know."""
    config_file = tmp_path / "pypnm.toml"
    config_file.write_text(config_toml().replace("graceful_timeout", "graceful_timout", 1))
    with pytest.raises(SettingsError, match="graceful_timout"):
        load_settings(config_file, api_tokens_file=None)


def test_tokens_secret_parses_and_is_where_the_settings_look(tmp_path: Path) -> None:
    secret = resource("Secret")
    tokens_file = Path(config()["api_tokens_file"])
    mount = mounts()[str(tokens_file.parent)]
    assert mount["volume"]["secret"]["secretName"] == secret["metadata"]["name"]
    assert "subPath" not in mount["mount"]
    # pypnm reads the file as the user of runAsUser, through fsGroup; 0440 keeps others out.
    assert mount["volume"]["secret"]["defaultMode"] & 0o007 == 0
    copy = tmp_path / tokens_file.name
    copy.write_text(secret["stringData"][tokens_file.name])
    # No token is shipped: a token in the base would be a secret known to everyone.
    assert read_tokens_file(copy) == {}


# ----- the pod's command line, run here --------------------------------------------------------


@pytest.fixture
def pod_process(tmp_path: Path, start_service: StartService) -> Iterator[tuple[Service, Path]]:
    """pypnm started as the pod starts it (the image's entrypoint + the Deployment's args and env),
    with the pod's paths moved into tmp_path and host:port moved to loopback and a free port."""
    entrypoint = dockerfile_entrypoint()
    assert entrypoint[:2] == ["pypnm", "serve"]
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "pypnm.toml").write_text(config_toml())
    tokens = etc / "tokens"
    tokens.write_text(resource("Secret")["stringData"]["tokens"])
    runtime = tmp_path / "run"
    runtime.mkdir()
    args = list(container()["args"])
    replace = {"--config": str(etc / "pypnm.toml"), "--host": "127.0.0.1", "--port": "{port}"}
    for flag, value in replace.items():
        args[args.index(flag) + 1] = value
    env = base_env(**{**container_env(), "PYPNM_RUNTIME_DIR": str(runtime), "PYPNM_API_TOKENS_FILE": str(tokens)})
    service = start_service(
        pypnm_command(*entrypoint[1:], *args),
        env=env,
        ready_path=container()["readinessProbe"]["httpGet"]["path"],
    )
    yield service, runtime


def test_pod_command_line_serves_probes_and_guards_system_operations(pod_process: tuple[Service, Path]) -> None:
    service, runtime = pod_process
    for kind in ("readinessProbe", "livenessProbe"):
        response = service.get(container()[kind]["httpGet"]["path"])
        assert response.status_code == 200, (kind, response.text)
    # Nobody is trusted by address, loopback included: without a token System Operations refuse.
    response = service.get(RELOAD_PATH)
    assert response.status_code == 403, response.text
    assert "trusted_networks" in response.json()["detail"]
    # The master's private directory (its control socket) is under the runtime directory, which
    # is the emptyDir in the pod, not on the read-only root.
    assert list(runtime.rglob("control.sock")), f"no control socket under {runtime}"
    assert service.stop() == 0, service.output()


# ----- the Dockerfile --------------------------------------------------------------------------


def dockerfile_stages() -> list[list[dockerfile.Command]]:
    stages: list[list[dockerfile.Command]] = []
    for command in dockerfile.parse_file(str(DOCKERFILE)):
        if command.cmd.upper() == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(command)
    return stages


def final_stage() -> list[dockerfile.Command]:
    return dockerfile_stages()[-1]


def instructions(name: str, stage: list[dockerfile.Command] | None = None) -> list[dockerfile.Command]:
    return [c for c in (stage if stage is not None else final_stage()) if c.cmd.upper() == name]


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for command in instructions("ENV"):
        values = command.value
        env.update(zip(values[::2], values[1::2], strict=True))
    return env


def venv_dir() -> str:
    runs = " ".join(c.value[0] for c in instructions("RUN"))
    match = re.search(r"python -m venv (\S+)", runs)
    assert match, "the runtime stage creates no venv"
    return match.group(1)


def dockerfile_entrypoint() -> list[str]:
    (entrypoint,) = instructions("ENTRYPOINT")
    assert entrypoint.json, f"ENTRYPOINT is in shell form: {entrypoint.original}"
    command = list(entrypoint.value)
    if command[:2] == ["tini", "--"]:
        command = command[2:]
    return command


def test_dockerfile_is_multi_stage_and_builds_a_wheel() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2
    builder_name = stages[0][0].value[-1]
    assert [v.upper() for v in stages[0][0].value[1:]] == ["AS", builder_name.upper()], "the builder stage is unnamed"
    assert any("pip wheel" in c.value[0] for c in instructions("RUN", stages[0]))
    # The runtime stage takes the wheels from the builder, never the sources.
    takes = [
        c
        for c in final_stage()
        if c.cmd.upper() in ("RUN", "COPY") and any(f"from={builder_name}" in f for f in c.flags)
    ]
    assert takes, "the runtime stage takes nothing from the builder"
    assert not [c for c in instructions("COPY") if not c.flags], "the runtime stage copies from the build context"


def test_dockerfile_runs_as_the_deployments_non_root_user() -> None:
    users = instructions("USER")
    assert users, "no USER: the image would run as root"
    user, _, group = users[-1].value[0].partition(":")
    assert user.isdigit() and int(user) != 0, f"USER {users[-1].value[0]} is not a numeric non-root user"
    pod = pod_spec()["securityContext"]
    assert (int(user), int(group or user)) == (pod["runAsUser"], pod["runAsGroup"])


def test_dockerfile_entrypoint_and_signals() -> None:
    assert dockerfile_entrypoint()[:2] == ["pypnm", "serve"]
    (stop,) = instructions("STOPSIGNAL")
    assert stop.value == ("SIGTERM",)
    (cmd,) = instructions("CMD")
    assert cmd.json
    exposed = [int(p.split("/")[0]) for c in instructions("EXPOSE") for p in c.value]
    assert exposed == [c["containerPort"] for c in container()["ports"]]


def test_dockerfile_works_with_a_read_only_root() -> None:
    env = dockerfile_env()
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["PYPNM_RUNTIME_DIR"] == container_env()["PYPNM_RUNTIME_DIR"]
    assert "emptyDir" in mounts()[env["PYPNM_RUNTIME_DIR"]]["volume"]
    runs = " ".join(c.value[0] for c in instructions("RUN"))
    assert "compileall" in runs and venv_dir() in runs, "bytecode is not compiled at build time"


def test_dockerignore_keeps_the_context_to_what_is_copied() -> None:
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip()[:1] not in ("", "#")]
    assert patterns[0] == "*", "the .dockerignore should start by excluding everything"
    included = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    copied = {
        source.rstrip("/")
        for stage in dockerfile_stages()
        for c in instructions("COPY", stage)
        if not c.flags
        for source in c.value[:-1]
    }
    assert copied and copied <= included, f"copied but excluded from the context: {copied - included}"


# ----- the image, where a container engine answers ----------------------------------------------


def container_engine() -> str | None:
    docker = shutil.which("docker")
    if docker is None:
        return None
    try:
        answer = subprocess.run([docker, "info"], capture_output=True, timeout=20, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return None
    return docker if answer.returncode == 0 else None


def run(*command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_image_builds_and_reloads_on_a_read_only_root() -> None:
    docker = container_engine()
    if docker is None:
        pytest.skip("no container engine answers (`docker info` fails): the image was not built or run")
    tag = f"pypnm-test:{uuid.uuid4().hex[:8]}"
    name = f"pypnm-test-{uuid.uuid4().hex[:8]}"
    build = run(docker, "build", "-t", tag, str(REPO), timeout=900)
    assert build.returncode == 0, build.stdout + build.stderr
    try:
        token = secrets.token_urlsafe(24)
        port = free_port()
        runtime_dir = dockerfile_env()["PYPNM_RUNTIME_DIR"]
        started = run(
            docker,
            "run",
            "-d",
            "--name",
            name,
            "--read-only",
            "--cap-drop",
            "ALL",
            "--tmpfs",
            "/tmp:mode=1777",
            "--tmpfs",
            f"{runtime_dir}:mode=1777",
            "-p",
            f"127.0.0.1:{port}:8000",
            "-e",
            f'PYPNM_API_TOKENS={{"test": "{token}"}}',
            tag,
        )
        assert started.returncode == 0, started.stderr
        base = f"http://127.0.0.1:{port}"
        headers = {"Authorization": f"Bearer {token}"}
        wait_until(lambda: httpx.get(base + "/health", timeout=2).status_code == 200, timeout=60)
        response = httpx.get(base + RELOAD_PATH, headers=headers, timeout=10)
        assert (response.status_code, response.content) == (200, b'{"status":"reload triggered"}')
        reload_id = response.headers["X-Reload-Id"]

        def outcome() -> str | None:
            reloads = httpx.get(base + STATUS_PATH, headers=headers, timeout=5).json()["reloads"]
            return next((r["outcome"] for r in reloads if r["id"] == reload_id), None)

        assert wait_until(outcome, timeout=60) == "succeeded"
        stopped = run(docker, "stop", "-t", "40", name, timeout=60)
        assert stopped.returncode == 0, stopped.stderr
        code = run(docker, "inspect", "-f", "{{.State.ExitCode}}", name)
        logs = run(docker, "logs", name)
        assert code.stdout.strip() == "0", logs.stdout + logs.stderr
    finally:
        run(docker, "rm", "-f", name)
        run(docker, "rmi", "-f", tag)
