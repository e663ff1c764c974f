"""The `pypnm` command: serve (the default), reload, status and check.

Flags of `serve` follow upstream PyPNM's launcher, so `pypnm --port 8080 --reload`
works as before; every problem with the input ends in one line on stderr and a
non-zero exit code (2 for flags and settings), never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import httpx

import pypnm
from pypnm.settings import Settings, SettingsError, config_path, load_settings

COMMANDS = ("serve", "reload", "status", "check")
TOKEN_ENV = "PYPNM_TOKEN"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pypnm", description="PyPNM web service.")
    parser.add_argument("-v", "--version", action="version", version=f"pypnm {pypnm.__version__}")
    commands = parser.add_subparsers(dest="command", parser_class=_Parser)

    serve = commands.add_parser("serve", help="run the service under the reload supervisor (the default)")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default 8000)")
    serve.add_argument("--ssl", action="store_true", default=None, help="serve HTTPS (needs --cert and --key)")
    serve.add_argument("--cert", type=Path, help="TLS certificate file (PEM)")
    serve.add_argument("--key", type=Path, help="TLS private key file (PEM)")
    serve.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug", "trace"])
    serve.add_argument("--workers", type=int, help="worker processes per generation (default 1)")
    serve.add_argument("--no-access-log", action="store_true", help="do not log one line per request")
    serve.add_argument("--reload", action="store_true", help="also reload when watched source files change")
    serve.add_argument("--reload-dir", action="append", type=Path, help="directory to watch (repeatable)")
    serve.add_argument("--reload-include", action="append", help="glob of files that trigger (repeatable)")
    serve.add_argument("--reload-exclude", action="append", help="glob of files that never trigger (repeatable)")
    serve.add_argument("--graceful-timeout", type=float, help="seconds old workers get to finish (default 30)")
    serve.add_argument("--app", default="pypnm.main:app", help="ASGI app as module:attribute")
    _config_flag(serve)

    reload = commands.add_parser("reload", help="reload a running service over HTTP")
    _url_flags(reload)
    reload.add_argument("--wait", action="store_true", help="wait for the outcome: exit 0 succeeded, 1 failed")
    reload.add_argument("--timeout", type=float, default=60.0, help="seconds to wait (default 60)")

    status = commands.add_parser("status", help="show what a running service serves")
    _url_flags(status)
    status.add_argument("--json", action="store_true", help="print the raw JSON")

    check = commands.add_parser("check", help="validate settings and the app as a reload would, then exit")
    check.add_argument("--app", default="pypnm.main:app", help="ASGI app as module:attribute")
    _config_flag(check)
    return parser


def _config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML settings file (default: $PYPNM_CONFIG)")


def _url_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help="base URL of the service (default: from the settings, else 127.0.0.1:8000)")
    parser.add_argument("--token", help=f"bearer token for System Operations (default: ${TOKEN_ENV})")
    _config_flag(parser)


def _fail(message: str, code: int = 2) -> int:
    sys.stderr.write(f"pypnm: {message}\n")
    return code


def main(argv: list[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    if not args_in or (args_in[0] not in COMMANDS and args_in[0] not in ("-h", "--help", "-v", "--version")):
        args_in.insert(0, "serve")  # bare `pypnm [flags]` serves, as upstream PyPNM does
    args = _build_parser().parse_args(args_in)
    handlers = {"serve": serve, "reload": reload, "status": status, "check": check}
    try:
        return handlers[args.command](args)
    except _Unanswered as exc:
        return _fail(str(exc), exc.code)
    except KeyboardInterrupt:
        return 130


# ----- serve -------------------------------------------------------------------------------


def _serve_overrides(args: argparse.Namespace) -> dict[str, Any]:
    given = {
        "host": args.host,
        "port": args.port,
        "ssl": args.ssl,
        "ssl_certfile": args.cert,
        "ssl_keyfile": args.key,
        "log_level": args.log_level,
        "workers": args.workers,
        "access_log": False if args.no_access_log else None,
        "reload_dirs": args.reload_dir,
        "reload_includes": args.reload_include,
        "reload_excludes": args.reload_exclude,
        "graceful_timeout": args.graceful_timeout,
    }
    if args.cert and args.key and args.ssl is None:
        given["ssl"] = True
    return {name: value for name, value in given.items() if value is not None}


def serve(args: argparse.Namespace) -> int:
    from pypnm.logs import setup_logging
    from pypnm.supervisor.master import Master, bind_listeners
    from pypnm.supervisor.runtime import RuntimeDirError
    from pypnm.supervisor.snapshot import SnapshotError

    overrides = _serve_overrides(args)
    try:
        settings = load_settings(args.config, **overrides)
    except SettingsError as exc:
        return _fail(str(exc))
    setup_logging("master", settings.log_level)
    sys.path.insert(0, os.getcwd())  # find --app modules where uvicorn would, without importing them
    try:
        listeners = bind_listeners(settings.host, settings.port)
    except OSError as exc:
        return _fail(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}")
    try:
        master = Master(
            settings, listeners, app=args.app, config_file=config_path(args.config), overrides=overrides,
            watch=args.reload,
        )
    except (SnapshotError, RuntimeDirError) as exc:
        return _fail(str(exc))
    return master.run()


# ----- check -------------------------------------------------------------------------------


def check(args: argparse.Namespace) -> int:
    from pypnm.supervisor.master import generation_spec
    from pypnm.supervisor.runtime import RuntimeDir, RuntimeDirError
    from pypnm.supervisor.snapshot import SnapshotError, find_project_sources, take_snapshot
    from pypnm.supervisor.worker import check as check_generation

    try:
        settings = load_settings(args.config)
    except SettingsError as exc:
        return _fail(f"check failed: {exc}")  # exit 2 like every settings error; 1 is for the app
    sys.path.insert(0, os.getcwd())
    try:
        runtime = RuntimeDir.create(settings.runtime_dir)  # where the master would put it, swept the same way
    except RuntimeDirError as exc:
        return _fail(f"check failed: {exc}")
    try:
        try:
            snapshot = take_snapshot(find_project_sources(args.app), runtime.path / "gen", config_path(args.config))
        except SnapshotError as exc:
            return _fail(f"check failed: {exc}", 1)
        spec = generation_spec(args.app, 0, snapshot, settings, env={})
        spec.log_level = "warning"
        reason = check_generation(spec)
    finally:
        runtime.remove()
    if reason is not None:
        return _fail(f"check failed: {reason}", 1)
    paths = ", ".join(spec.check_paths) or "lifespan startup"
    sys.stdout.write(f"ok: {args.app} imports, starts and answers {paths}\n")
    return 0


# ----- reload and status (HTTP clients) ----------------------------------------------------


def _base_url(args: argparse.Namespace) -> str:
    if args.url:
        return str(args.url).rstrip("/")
    try:
        settings: Settings | None = load_settings(args.config)
    except SettingsError:
        settings = None
    host = settings.host if settings else "127.0.0.1"
    port = settings.port if settings else 8000
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    scheme = "https" if settings and settings.ssl else "http"
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def _client(args: argparse.Namespace) -> httpx.Client:
    token = args.token or os.environ.get(TOKEN_ENV)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=_base_url(args), headers=headers, timeout=10.0, verify=False)


def _detail(response: httpx.Response) -> str:
    try:
        return str(response.json().get("detail", response.text))
    except ValueError:
        return response.text.strip()


class _Unanswered(Exception):
    """The service could not be reached (exit 2) or refused the request (exit 1)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _get(client: httpx.Client, path: str, what: str) -> httpx.Response:
    try:
        response = client.get(path)
    except httpx.HTTPError as exc:
        raise _Unanswered(f"cannot reach {client.base_url}: {exc}", 2) from None
    if response.status_code != 200:
        raise _Unanswered(f"{what} refused ({response.status_code}): {_detail(response)}", 1)
    return response


def reload(args: argparse.Namespace) -> int:
    with _client(args) as client:
        response = _get(client, "/pypnm/system/webService/reload", "reload")
        reload_id = response.headers.get("X-Reload-Id")
        if not args.wait:
            sys.stdout.write(f"reload triggered{f' (id {reload_id})' if reload_id else ''}\n")
            return 0
        if not reload_id:
            return _fail("the service does not track reloads (it runs without the pypnm supervisor)")
        return _wait_for(client, reload_id, args.timeout)


def _wait_for(client: httpx.Client, reload_id: str, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            response = client.get("/pypnm/system/webService/status")
            if response.status_code == 200:
                record = next((r for r in response.json().get("reloads", []) if r["id"] == reload_id), None)
                if record and record.get("outcome") == "succeeded":
                    sys.stdout.write(
                        f"reload {reload_id} succeeded: generation {record['generation']} serving "
                        f"({record['duration_ms']:.0f} ms)\n"
                    )
                    for warning in record.get("warnings", []):
                        sys.stdout.write(f"warning: {warning}\n")
                    return 0
                if record and record.get("outcome") == "failed":
                    sys.stdout.write(f"reload {reload_id} failed: {record['reason']}\n")
                    return 1
        except httpx.HTTPError:
            pass  # the service may be busy swapping; keep asking until the deadline
        time.sleep(0.1)
    return _fail(f"reload {reload_id} had no outcome within {timeout:.0f}s")


def status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        info = _get(client, "/pypnm/system/webService/status", "status").json()
    if args.json:
        sys.stdout.write(json.dumps(info, indent=2) + "\n")
        return 0
    sys.stdout.write(_format_status(info))
    return 0


def _format_status(info: dict[str, Any]) -> str:
    lines = [
        f"mode:         {info.get('mode')}",
        f"version:      {info.get('version')} (code {info.get('code_version')})",
    ]
    if info.get("mode") != "supervised":
        lines.append(f"pid:          {info.get('pid')} since {info.get('started_at')}")
        return "\n".join(lines) + "\n"
    lines.append(f"generation:   {info.get('generation')} (reload state: {info.get('reload_state')})")
    for worker in info.get("workers", []):
        lines.append(
            f"worker:       pid {worker['pid']} generation {worker['generation']} {worker['state']} "
            f"code {worker['code_version']} since {worker['started_at']}"
        )
    last = info.get("last_reload")
    if last:
        outcome = last.get("outcome") or "in progress"
        lines.append(f"last reload:  {last['id']} {outcome} via {last['source']} at {last.get('finished_at')}"
                     f" ({last.get('duration_ms')} ms)")
        if last.get("reason"):
            lines.append(f"  reason:     {last['reason']}")
    if info.get("pending_reload"):
        lines.append(f"queued:       {info['pending_reload']}")
    return "\n".join(lines) + "\n"
