"""The `pypnm` command: serve (the default), reload, upgrade, status and check.

Flags of `serve` follow upstream PyPNM's launcher, so `pypnm --port 8080 --reload`
works as before; every problem with the input ends in one line on stderr and a
non-zero exit code (2 for flags and settings), never a traceback.

The HTTP sub-commands (`reload`, `upgrade`, `status`) are clients.py's; this module parses
their flags and prints the one line each ends in when it cannot do its work.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import socket
import sys
from pathlib import Path
from typing import Any, NoReturn

import pypnm
from pypnm.clients import CACERT_ENV, INTERRUPTED, TOKEN_ENV, Unanswered, reload, status, upgrade
from pypnm.settings import SettingsError, config_path, load_settings

COMMANDS = ("serve", "reload", "upgrade", "status", "check")


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
    serve.add_argument("--log-format", choices=["text", "json"], help="log lines as text (default) or JSON objects")
    serve.add_argument(
        "--workers",
        type=_workers,
        help="worker processes per generation, or 'auto' to size it from CPUs and memory (default 1)",
    )
    serve.add_argument(
        "--limit-max-requests",
        type=int,
        metavar="N",
        help="recycle a worker after about N requests (the new one first; default 0: never)",
    )
    serve.add_argument(
        "--limit-worker-memory",
        metavar="SIZE",
        help="recycle a worker whose resident memory passes SIZE, e.g. 512MiB (default 0: never)",
    )
    serve.add_argument("--no-access-log", action="store_true", help="do not log one line per request")
    serve.add_argument("--reload", action="store_true", help="also reload when watched source files change")
    serve.add_argument("--reload-dir", action="append", type=Path, help="directory to watch (repeatable)")
    serve.add_argument("--reload-include", action="append", help="glob of files that trigger (repeatable)")
    serve.add_argument("--reload-exclude", action="append", help="glob of files that never trigger (repeatable)")
    serve.add_argument("--graceful-timeout", type=float, help="seconds old workers get to finish (default 30)")
    serve.add_argument("--app", default="pypnm.main:app", help="ASGI app as module:attribute")
    serve.add_argument("--pid-file", type=Path, help="write the master's pid to FILE (rewritten by a self-upgrade)")
    _config_flag(serve)

    reload = commands.add_parser("reload", help="reload running services over HTTP, one instance after another")
    _url_flags(reload)
    reload.add_argument(
        "--wait",
        action="store_true",
        help="wait for the outcome, then for the new generation to stay up for the service's rollback_window: "
        "exit 0 succeeded (and stable), 1 failed or rolled back (always waits, with several instances)",
    )
    reload.add_argument(
        "--no-wait-stable",
        dest="wait_stable",
        action="store_false",
        help="with --wait: exit 0 once the new generation serves, without waiting out rollback_window "
        "(an automatic rollback after that is then not reported)",
    )
    reload.add_argument(
        "--timeout",
        type=_seconds,
        default=60.0,
        help="seconds to wait for each instance's outcome (default 60); the rollback_window is waited on top",
    )
    reload.add_argument(
        "--parallel",
        type=_positive_int,
        default=1,
        metavar="N",
        help="reload up to N instances at once; none is started after a failure (default 1)",
    )

    upgrade = commands.add_parser(
        "upgrade", help="hand a running service over to a new master running the pypnm installed now"
    )
    _url_flags(upgrade)
    upgrade.add_argument(
        "--wait", action="store_true", help="wait for the outcome: exit 0 the new master serves, 1 the upgrade failed"
    )
    upgrade.add_argument("--timeout", type=_seconds, default=150.0, help="seconds to wait (default 150)")

    status = commands.add_parser("status", help="show what running services serve")
    _url_flags(status)
    status.add_argument("--json", action="store_true", help="print the raw JSON")

    check = commands.add_parser("check", help="validate settings and the app as a reload would, then exit")
    check.add_argument("--app", default="pypnm.main:app", help="ASGI app as module:attribute")
    _config_flag(check)
    return parser


def _config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML settings file (default: $PYPNM_CONFIG)")


def _workers(text: str) -> int | str:
    if text.strip() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of workers or 'auto': {text!r}") from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, not {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _url_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        action="append",
        help="base URL of an instance (repeatable; default: from the settings, else 127.0.0.1:8000)",
    )
    parser.add_argument(
        "--targets",
        action="append",
        type=Path,
        metavar="FILE",
        help="file of instance URLs, one a line (blank lines and # comments skipped; repeatable)",
    )
    parser.add_argument(
        "--dns",
        action="append",
        metavar="[https://]NAME:PORT",
        help="every address NAME resolves to, as of a headless Service (http:// unless given; repeatable)",
    )
    parser.add_argument("--token", help=f"bearer token for System Operations (default: ${TOKEN_ENV})")
    tls = parser.add_mutually_exclusive_group()
    tls.add_argument(
        "--cacert",
        type=Path,
        help=f"CA certificates (PEM) to check the server against instead of the system's (default: ${CACERT_ENV})",
    )
    tls.add_argument("--insecure", action="store_true", help="do not check the server's TLS certificate (unsafe)")
    parser.add_argument(
        "--allow-http-token",
        action="store_true",
        help="send the token over plain http:// to a host that is not loopback (readable on the way)",
    )
    _config_flag(parser)


def _fail(message: str, code: int = 2) -> int:
    sys.stderr.write(f"pypnm: {message}\n")
    return code


def main(argv: list[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    if not args_in or (args_in[0] not in COMMANDS and args_in[0] not in ("-h", "--help", "-v", "--version")):
        args_in.insert(0, "serve")  # bare `pypnm [flags]` serves, as upstream PyPNM does
    args = _build_parser().parse_args(args_in)
    args.argv = args_in  # a self-upgrade starts the new master with the same command line
    handlers = {"serve": serve, "reload": reload, "upgrade": upgrade, "status": status, "check": check}
    try:
        return handlers[args.command](args)
    except Unanswered as exc:
        return _fail(str(exc), exc.code)
    except KeyboardInterrupt:
        return INTERRUPTED


# ----- serve -------------------------------------------------------------------------------


def _serve_overrides(args: argparse.Namespace) -> dict[str, Any]:
    given = {
        "host": args.host,
        "port": args.port,
        "ssl": args.ssl,
        "ssl_certfile": args.cert,
        "ssl_keyfile": args.key,
        "log_level": args.log_level,
        "log_format": args.log_format,
        "workers": args.workers,
        "limit_max_requests": args.limit_max_requests,
        "limit_worker_memory": args.limit_worker_memory,
        "access_log": False if args.no_access_log else None,
        "reload_dirs": args.reload_dir,
        "reload_includes": args.reload_include,
        "reload_excludes": args.reload_exclude,
        "graceful_timeout": args.graceful_timeout,
        "pid_file": args.pid_file,
    }
    if args.cert and args.key and args.ssl is None:
        given["ssl"] = True
    return {name: value for name, value in given.items() if value is not None}


def bind_listeners(host: str, port: int) -> list[socket.socket]:
    """The master's listening socket, when systemd passed none; raises OSError with the system's reason."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return [socket.create_server((host, port), family=family, backlog=2048)]


def serve(args: argparse.Namespace) -> int:
    from pypnm.logs import LogOutput, setup_logging
    from pypnm.supervisor import systemd
    from pypnm.supervisor.logfile import LogFileError
    from pypnm.supervisor.master import Master
    from pypnm.supervisor.runtime import RuntimeDirError
    from pypnm.supervisor.snapshot import SnapshotError
    from pypnm.supervisor.upgrade import HandoverError, PidFileError, Successor

    try:
        successor = Successor.take()  # started by a self-upgrade: the old master's sockets, and answers owed
    except HandoverError as exc:
        return _fail(str(exc))

    def fail(message: str) -> int:
        if successor is not None:
            successor.failed(f"the new master cannot start: {message}")
        return _fail(message)

    overrides = _serve_overrides(args)
    try:
        settings = load_settings(args.config, **overrides)
    except SettingsError as exc:
        return fail(str(exc))
    try:
        setup_logging("master", settings.log_level, LogOutput.from_settings(settings))
    except LogFileError as exc:
        return fail(str(exc))
    if successor is not None:
        successor.announce()
    sys.path.insert(0, os.getcwd())  # find --app modules where uvicorn would, without importing them
    # systemd (pypnm.supervisor.systemd): take NOTIFY_SOCKET, WATCHDOG_* and LISTEN_* out of the
    # environment before any process is started, and serve on the sockets systemd passed, if any.
    notifier = systemd.take_notifier()
    if successor is not None:
        notifier.defer_until_main()  # the old master is systemd's main pid until it hands over
    try:
        activated = systemd.activated_listeners()
    except systemd.ActivationError as exc:
        return fail(str(exc))
    try:
        # With sockets from systemd the host and port settings are informational: nothing is bound here.
        # A self-upgrade's new master serves on the old one's sockets unless host or port changed.
        if successor is not None:
            listeners = successor.listeners(settings, bind_listeners)
        else:
            listeners = activated or bind_listeners(settings.host, settings.port)
    except OSError as exc:
        return fail(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}")
    try:
        master = Master(
            settings,
            listeners,
            app=args.app,
            config_file=config_path(args.config),
            overrides=overrides,
            watch=args.reload,
            notifier=notifier,
            command=args.argv,
            activated=bool(activated) or (successor is not None and successor.offer.activated),
            successor=successor,
        )
    except (SnapshotError, RuntimeDirError, PidFileError) as exc:
        return fail(str(exc))
    return master.run()


# ----- check -------------------------------------------------------------------------------


def check(args: argparse.Namespace) -> int:
    from pypnm.supervisor.build import freeze_tls, generation_spec
    from pypnm.supervisor.logfile import LogFileError, check_can_open
    from pypnm.supervisor.runtime import RuntimeDir, RuntimeDirError
    from pypnm.supervisor.snapshot import SnapshotError, find_project_sources, take_snapshot
    from pypnm.supervisor.tls import TLSError
    from pypnm.supervisor.upgrade import PidFileError, check_pid_file
    from pypnm.supervisor.worker import check as check_generation

    try:
        settings = load_settings(args.config)
    except SettingsError as exc:
        return _fail(f"check failed: {exc}")  # exit 2 like every settings error; 1 is for the app
    try:
        # What `pypnm serve` stops at before anything starts, checked the same way: a valid value
        # that cannot be used here would pass a reload, and fail every later start.
        if settings.log_file is not None:
            check_can_open(settings.log_file.absolute())
        if settings.pid_file is not None:
            check_pid_file(settings.pid_file)
    except (LogFileError, PidFileError) as exc:
        return _fail(f"check failed: {exc}", 1)
    sys.path.insert(0, os.getcwd())
    try:
        runtime = RuntimeDir.create(settings.runtime_dir)  # where the master would put it, swept the same way
    except RuntimeDirError as exc:
        return _fail(f"check failed: {exc}")
    try:
        try:
            sources = find_project_sources(args.app)
            snapshot = take_snapshot(
                sources, runtime.path / "gen", config_path(args.config), excludes=settings.reload_excludes
            )
            for warning in freeze_tls(snapshot, settings):  # the certificate check a reload makes
                sys.stderr.write(f"pypnm: warning: {warning}\n")
        except (SnapshotError, TLSError) as exc:
            return _fail(f"check failed: {exc}", 1)
        spec = dataclasses.replace(generation_spec(args.app, 0, snapshot, settings, env={}), log_level="warning")
        reason = check_generation(spec)
    finally:
        runtime.remove()
    if reason is not None:
        return _fail(f"check failed: {reason}", 1)
    paths = ", ".join(spec.check_paths) or "lifespan startup"
    sys.stdout.write(f"ok: {args.app} imports, starts and answers {paths}\n")
    return 0
