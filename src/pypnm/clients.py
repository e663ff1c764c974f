"""The HTTP sub-commands: `pypnm reload`, `upgrade` and `status`, against one instance or a fleet.

They carry a bearer token, so they check the server's TLS certificate against the system trust
store (or `--cacert`), refuse to send a token over plain http:// to anything but loopback, and
refuse one that an HTTP header cannot carry; all of it before a connection is opened.

They talk to one instance or to a fleet (`--url` repeated, `--targets FILE`, `--dns NAME:PORT`):
`reload` then rolls through the instances, waiting for each outcome and starting no other after
a failure, and `status` prints one row per instance. Whatever a service answers, the command
ends in one line (`Unanswered`, which cli.py prints), never a traceback. The progress of a
waited-for reload is one status line redrawn after a carriage return on a terminal, and nothing
but outcome lines elsewhere; this is hand-written rather than taken from a progress library
because it is a single line of plain text that any terminal (even TERM=dumb) shows correctly,
where the libraries bring escape sequences and a dependency for it.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from pypnm.settings import SettingsError, load_settings

if TYPE_CHECKING:
    import httpx

TOKEN_ENV = "PYPNM_TOKEN"
CACERT_ENV = "PYPNM_CACERT"
RELOAD_PATH = "/pypnm/system/webService/reload"
UPGRADE_PATH = "/pypnm/system/webService/upgrade"
STATUS_PATH = "/pypnm/system/webService/status"
# How long past a reload's rollback_window `reload --wait` waits for the service to say it was stable.
STABLE_MARGIN = 10.0
UPGRADE_GONE = 3.0  # seconds of refused connections after which `upgrade --wait` stops asking (see _await_upgrade)
STATUS_CONCURRENCY = 8  # instances `pypnm status` asks at once: a large fleet answers in seconds, not minutes
INTERRUPTED = 130  # the exit code of a command ended by Ctrl-C, as a shell gives it
REQUEST_TIMEOUT = 10.0  # seconds one HTTP request of a client waits for its answer
STOP_CHECK = 0.1  # seconds between a rolling reload's looks at whether Ctrl-C stopped it


def _base_url(args: argparse.Namespace) -> str:
    """The instance of the settings, when no instance is named.

    Settings that cannot be read are said, not stepped over: the defaults (127.0.0.1:8000) might
    be another instance on the same host, which would then be the one reloaded.
    """
    try:
        settings = load_settings(args.config, read_tokens=False)  # a client user may not read the tokens file
    except SettingsError as exc:
        raise Unanswered(f"{exc} (the settings name the instance to talk to: fix them, or give --url)", 2) from None
    host = settings.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    scheme = "https" if settings.ssl else "http"
    return f"{scheme}://[{host}]:{settings.port}" if ":" in host else f"{scheme}://{host}:{settings.port}"


def _is_loopback(host: str) -> bool:
    if host == "localhost":  # httpx lower-cases the host; the name is loopback by RFC 6761
        return True
    try:
        return ipaddress.ip_address(host).is_loopback  # 127.0.0.0/8 and ::1
    except ValueError:
        return False  # any other name may resolve anywhere


def _refuse_http_token(url: httpx.URL, token: str | None, allow_http_token: bool) -> str | None:
    """Why the token must not go to `url`, or None: plain http:// is readable by anyone on the path."""
    if not token or url.scheme != "http" or allow_http_token or _is_loopback(url.host):
        return None
    return (
        f"refusing to send the token over plain http:// to {url.host}, where anyone on the way can read it: "
        "use https://, or pass --allow-http-token if the network is trusted"
    )


def _tls_verify(args: argparse.Namespace) -> ssl.SSLContext | bool:
    if args.insecure:
        sys.stderr.write(
            "pypnm: warning: --insecure: the server's certificate is not checked, so whoever answers gets the token\n"
        )
        return False
    cacert = args.cacert or os.environ.get(CACERT_ENV)
    try:
        # ssl's default context, not httpx's default (certifi's bundle): it reads the system trust
        # store (OpenSSL's default paths, which also honour SSL_CERT_FILE and SSL_CERT_DIR), so a
        # private CA that the administrator installed on the machine is trusted as curl trusts it.
        # A --cacert file replaces the system store, as curl's does.
        return ssl.create_default_context(cafile=str(cacert) if cacert else None)
    except OSError as exc:  # ssl.SSLError is an OSError: a file that is no PEM certificate
        source = "--cacert" if args.cacert else CACERT_ENV
        raise Unanswered(f"cannot use {source} {cacert}: {exc.strerror or exc}", 2) from None


def _client(args: argparse.Namespace, target: _Target, verify: ssl.SSLContext | bool) -> httpx.Client:
    import httpx  # here, not at the top: the server's master never needs it (memory)

    url = httpx.URL(target.url)  # checked by _targets
    token = args.token or os.environ.get(TOKEN_ENV)
    # Decided before the client exists, so a refused token cannot leave by any code path.
    refusal = _refuse_http_token(url, token, args.allow_http_token) or _bad_token(token)
    if refusal:
        raise Unanswered(refusal, 2)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    hooks: dict[str, list[Callable[[httpx.Request], None]]] = {}
    if target.name is not None:
        headers["Host"] = target.host_header or target.name
        server_name = target.name

        def name_the_server(request: httpx.Request) -> None:
            # The URL holds one address of the name: TLS must still ask for (SNI) and verify the
            # certificate of the name, which is what a certificate for a Service carries.
            request.extensions["sni_hostname"] = server_name

        hooks["request"] = [name_the_server]
    # A request waits at most 10 s, and never longer than the whole command may (`--timeout`).
    timeout = min(REQUEST_TIMEOUT, getattr(args, "timeout", REQUEST_TIMEOUT))
    return httpx.Client(base_url=target.url, headers=headers, timeout=timeout, verify=verify, event_hooks=hooks)


def _bad_token(token: str | None) -> str | None:
    """Why `token` cannot be sent, or None: a header carries printable ASCII only, and a token has no white space."""
    if not token or (token.isascii() and token.isprintable() and not any(c.isspace() for c in token)):
        return None
    return (
        f"the token (--token or ${TOKEN_ENV}) holds {_odd_character(token)}: a token is printable ASCII "
        "with no white space; check for a line ending or a stray character where it was copied from"
    )


def _odd_character(token: str) -> str:
    odd = next(c for c in token if not (c.isascii() and c.isprintable()) or c.isspace())
    return f"{odd!r} at position {token.index(odd) + 1}"


# ----- targets: the instances an HTTP sub-command talks to ---------------------------------------


@dataclass(frozen=True)
class _Target:
    """One instance: the base URL connected to and, when found by --dns, the name it was found under."""

    url: str
    name: str | None = None  # --dns: the certificate must name it (the URL holds an address)
    host_header: str | None = None  # --dns: NAME[:PORT] as given, sent as Host as a request to the name would


def _several(args: argparse.Namespace) -> bool:
    """Fleet mode: instances from a list or a name, each reported by its URL; a reload rolls through them."""
    return bool(args.targets or args.dns or len(args.url or []) > 1)


def _targets(args: argparse.Namespace) -> list[_Target]:
    """Every instance named by --url, --targets and --dns, in that order, each once; all checked before any is used."""
    found = [_Target(_checked_url(url, "--url")) for url in args.url or []]
    for path in args.targets or []:
        found += _read_targets(path)
    for spec in args.dns or []:
        found += _resolve(spec)
    if not _several(args) and not found:
        found = [_Target(_checked_url(_base_url(args), "--url"))]
    if not found:
        raise Unanswered("no instance to talk to: the --targets files and --dns names gave none", 2)
    unique: dict[tuple[str, str, int], _Target] = {}  # each instance once, as it was first named
    for target in found:
        unique.setdefault(_instance(target.url), target)
    return list(unique.values())


def _instance(url: str) -> tuple[str, str, int]:
    """What tells instances apart: `http://10.0.0.1` and `http://10.0.0.1:80` are one."""
    import httpx  # here, not at the top: the server's master never needs it (memory)

    parsed = httpx.URL(url)
    return parsed.scheme, parsed.host, parsed.port or (443 if parsed.scheme == "https" else 80)


def _checked_url(text: str, where: str) -> str:
    import httpx  # here, not at the top: the server's master never needs it (memory)

    base_url = text.strip().rstrip("/")
    try:
        url = httpx.URL(base_url)
    except httpx.InvalidURL as exc:
        raise Unanswered(f"{where} {base_url}: {exc}", 2) from None
    if url.scheme not in ("http", "https") or not url.host:
        raise Unanswered(f"{where} {base_url}: give it as http://HOST:PORT or https://HOST:PORT", 2)
    return base_url


def _read_targets(path: Path) -> list[_Target]:
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise Unanswered(f"--targets {path}: {reason}", 2) from None
    return [
        _Target(_checked_url(line, f"--targets {path} line {number}:"))
        for number, line in enumerate(lines, 1)
        if line.strip() and not line.strip().startswith("#")
    ]


def _resolve(spec: str) -> list[_Target]:
    """One target per address NAME resolves to, in address order, so that two runs roll in the same order.

    That is what a Kubernetes headless Service's name gives: every ready pod's address.
    """
    import httpx  # here, not at the top: the server's master never needs it (memory)

    has_scheme = "://" in spec
    usage = f"--dns {spec}: give it as NAME:PORT, or https://NAME:PORT for instances serving HTTPS"
    text = spec if has_scheme else f"http://{spec}"
    try:
        url = httpx.URL(text)
        given_port = urllib.parse.urlsplit(text).port  # httpx drops a port that is the scheme's default
    except (httpx.InvalidURL, ValueError):
        raise Unanswered(usage, 2) from None
    if (
        url.scheme not in ("http", "https")
        or not url.host
        or url.raw_path not in (b"", b"/")
        or (given_port is None and not has_scheme)
    ):
        raise Unanswered(usage, 2)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        found = socket.getaddrinfo(url.host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise Unanswered(f"--dns {spec}: cannot resolve {url.host}: {reason}", 2) from None
    addresses = sorted(
        {ipaddress.ip_address(str(info[4][0])) for info in found}, key=lambda address: (address.version, address)
    )
    targets = []
    for address in addresses:
        host = f"[{address}]" if address.version == 6 else str(address)
        base_url = _checked_url(f"{url.scheme}://{host}:{port}", f"--dns {spec}:")
        targets.append(_Target(base_url, name=url.host, host_header=url.netloc.decode("ascii")))
    return targets


def _detail(response: httpx.Response) -> str:
    try:
        return str(response.json().get("detail", response.text))
    except ValueError:
        return response.text.strip()


class Unanswered(Exception):
    """The command cannot do its work: `code` is its exit code (2 unreachable, unreadable or bad input;
    1 refused; 130 interrupted), the message its one line (cli.py prints it). `unknown`: what was
    asked for may have started and may still succeed (no answer, or no outcome, in time)."""

    def __init__(self, message: str, code: int, *, unknown: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.unknown = unknown


def _get(client: httpx.Client, path: str, what: str) -> httpx.Response:
    import httpx  # here, not at the top: the server's master never needs it (memory)

    try:
        response = client.get(path)
    except httpx.ReadTimeout:
        raise Unanswered(
            f"{client.base_url}: no answer to the {what} request within {client.timeout.read:g}s (it was sent: "
            f"the {what} may have started; ask 'pypnm status')",
            2,
            unknown=True,
        ) from None
    except httpx.HTTPError as exc:
        certificate = _certificate_problem(exc)
        if certificate:
            raise Unanswered(
                f"{client.base_url}: certificate verify failed: {certificate} (nothing was sent; for a private CA "
                f"pass --cacert FILE or set {CACERT_ENV})",
                2,
            ) from None
        raise Unanswered(f"cannot reach {client.base_url}: {exc}", 2) from None
    if response.is_redirect:  # a proxy or another service: pypnm never redirects these paths
        where = response.headers.get("location", "nowhere")
        raise Unanswered(f"{what} refused ({response.status_code}): redirected to {where}; give that URL", 1)
    if response.status_code == 404:
        # pypnm serves these paths whenever it runs (an instance without a supervisor included): a 404
        # is another service on the port, or a URL whose path prefix is not the one pypnm is mounted at.
        raise Unanswered(
            f"{client.base_url} does not serve pypnm's System Operations (404 for {path}): is this a pypnm "
            "instance, and is the URL's path prefix right?",
            2,
        )
    if response.status_code != 200:
        raise Unanswered(f"{what} refused ({response.status_code}): {_detail(response)}", 1)
    return response


def _certificate_problem(exc: BaseException) -> str | None:
    """OpenSSL's reason when `exc` comes from a certificate that failed verification (httpx wraps it twice)."""
    cause: BaseException | None = exc
    for _ in range(8):  # the chain is httpx -> httpcore -> ssl; bounded against cycles
        if cause is None:
            return None
        if isinstance(cause, ssl.SSLCertVerificationError):
            return str(cause.verify_message or cause.reason or cause)
        cause = cause.__cause__ or cause.__context__
    return None


def reload(args: argparse.Namespace) -> int:
    targets = _targets(args)
    verify = _tls_verify(args)
    if _several(args):
        return _rolling_reload(args, targets, verify)
    with _client(args, targets[0], verify) as client:
        reload_id = _get(client, RELOAD_PATH, "reload").headers.get("X-Reload-Id")
        if not args.wait:
            sys.stdout.write(f"reload triggered{f' (id {reload_id})' if reload_id else ''}\n")
            return 0
        if not reload_id:
            raise Unanswered(_UNTRACKED, 2)
        console = _Console(sys.stdout)
        try:
            outcome = _await_outcome(
                client,
                reload_id,
                args.timeout,
                lambda text: console.progress("", text),
                threading.Event(),
                stable=args.wait_stable,
            )
        finally:
            console.finish("")  # the status line goes before anything else is written, stderr included
    console.finish("", [outcome.message, *outcome.warnings])
    return outcome.code


_UNTRACKED = "the service does not track reloads (it runs without the pypnm supervisor)"


@dataclass
class _Outcome:
    """How one instance's reload ended, as the exit code it alone would give and the line that says it."""

    code: int
    message: str
    warnings: list[str] = field(default_factory=list)
    unknown: bool = False  # triggered (or maybe), no outcome seen in time: it may still succeed


def _await_outcome(
    client: httpx.Client,
    reload_id: str,
    timeout: float,
    show: Callable[[str], None],
    stop: threading.Event,
    *,
    stable: bool = True,
) -> _Outcome:
    """Poll the status until the reload has an outcome; `show` gets each phase seen on the way.

    With `stable`, a reload that succeeded is waited on while the service watches its generation
    (`stability` "watching", for the record's `rollback_window`), so that a rollback in that time is
    reported as the failure it is. A service that does not watch (an older pypnm, rollback_window = 0)
    has no "watching": its outcome is final at once. A generation replaced within its window by a
    later reload (`replaced_by`: one that the settings watch started, say, which built the same code
    from disk again) is followed into that reload's window: if that one is rolled back, the code this
    reload brought did not stay up either (the rollback goes back past both).

    Raises Unanswered when the status is refused, when no outcome comes within `timeout` (and the
    window after it), and when `stop` is set (the command was interrupted).
    """
    # The service may be busy swapping: a failed ask is asked again.
    poll = _StatusPoll(client, f"reload {reload_id}", timeout, 0.1, stop)
    watching_since: float | None = None
    rolling_back = False
    first: dict[str, Any] | None = None  # this reload's record, once a later one replaced its generation
    following = reload_id  # this reload, or the one that replaced its generation (and so on)
    for info in poll.answers():
        with _expected(client.base_url):
            if info is None:
                continue
            record = next((r for r in info.get("reloads", []) if r.get("id") == following), None)
            if record is not None and stable and record.get("stability") == "replaced" and record.get("replaced_by"):
                first = first or record
                following, watching_since, rolling_back = record["replaced_by"], None, False
                continue
            watching = record is not None and stable and record.get("stability") == "watching"
            if record is not None and record.get("outcome") and not watching:
                return _ended(reload_id, record) if first is None else _ended_replaced(reload_id, first, record)
            if watching and watching_since is None:
                watching_since = time.monotonic()
                window = float(record.get("rollback_window") or 0) if record else 0.0
                poll.extend(watching_since + window + STABLE_MARGIN)
            watch = info.get("rollback_watch") or {}
            if watching and watch.get("reload") == following and watch.get("rollback") and not rolling_back:
                rolling_back = True  # the rollback is a reload of its own: it gets the same time again
                poll.extend(time.monotonic() + timeout)
            show(_phase(following, info, record, time.monotonic() - poll.began))
    if stop.is_set():
        raise Unanswered(f"reload {reload_id}: interrupted before its outcome", INTERRUPTED)
    if watching_since is not None:
        raise poll.ran_out(f"reload {reload_id} succeeded but was still watched for a rollback when the wait ended")
    raise poll.ran_out(f"reload {reload_id} had no outcome within {timeout:g}s")


class _StatusPoll:
    """The status polling of `reload --wait` and `upgrade --wait`: one ask every `interval`, until the
    deadline (`timeout` from now, which `extend` may push back) or until `stop` is set.

    A status that did not come (a connection error, a swap or a handover in progress, an answer that is
    not a JSON object) is None, and asked again; `last_failure` says why the last one did not. A refusal
    (401, 403) ends the wait (Unanswered), since asking again cannot change it: what was `triggered`
    (a reload, an upgrade) may have brought settings under which these credentials no longer read the
    status. `refused_for` says how long connections have been refused in a row.
    """

    def __init__(
        self, client: httpx.Client, triggered: str, timeout: float, interval: float, stop: threading.Event
    ) -> None:
        self.client = client
        self.triggered = triggered  # "reload <id>", "upgrade <id>": what the wait is for
        self.began = time.monotonic()
        self.deadline = self.began + timeout
        self.interval = interval
        self.stop = stop
        self.last_failure: str | None = None
        self._refused_since: float | None = None  # the first of the refused asks in a row
        self._refused = False  # whether the last ask was refused

    def answers(self) -> Iterator[dict[str, Any] | None]:
        """Each ask's status body, or None; bounded by the deadline and `stop`."""
        while time.monotonic() < self.deadline and not self.stop.is_set():
            yield self._ask()
            self.stop.wait(self.interval)

    def extend(self, deadline: float) -> None:
        """Wait at least until `deadline` (a `time.monotonic()` value); an earlier one changes nothing."""
        self.deadline = max(self.deadline, deadline)

    def refused_for(self) -> float:
        """Seconds the address has refused connections, if the last ask was refused (else 0).

        Only an answer ends a run of refusals: an ask that failed otherwise (a timeout) leaves it running.
        """
        if not self._refused or self._refused_since is None:
            return 0.0
        return time.monotonic() - self._refused_since

    def _ask(self) -> dict[str, Any] | None:
        import httpx  # here, not at the top: the server's master never needs it (memory)

        self._refused = False
        self.last_failure = None
        try:
            response = self.client.get(STATUS_PATH)
        except httpx.ConnectError as exc:
            self._refused = True
            self._refused_since = self._refused_since or time.monotonic()
            self.last_failure = f"cannot connect: {exc}"
            return None
        except httpx.HTTPError as exc:
            self.last_failure = str(exc) or type(exc).__name__
            return None
        self._refused_since = None
        if response.status_code in (401, 403):
            raise Unanswered(
                f"{self.triggered} was triggered, but the status now refuses these credentials "
                f"({response.status_code}: {_detail(response)}): its settings may have changed who may read it "
                "(tokens, trusted_networks, allowed_hosts); ask 'pypnm status' with the new ones",
                2,
            )
        body = _json_object(response) if response.status_code == 200 else None
        if body is None:
            self.last_failure = f"the status answered {response.status_code} with no JSON object"
        return body

    def ran_out(self, what: str) -> Unanswered:
        """The end of a wait that saw no outcome: `what` happened, and why the status last did not come."""
        failure = f" (the status last failed: {self.last_failure})" if self.last_failure else ""
        return Unanswered(f"{what}{failure}", 2, unknown=True)


@contextlib.contextmanager
def _expected(url: object) -> Iterator[None]:
    """A status of another shape than pypnm's (another service on the port, a proxy's page, a pypnm too
    old or too new) ends the command in one line, not a traceback."""
    try:
        yield
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise Unanswered(
            f"{url}: the status is not what pypnm answers ({type(exc).__name__}: {exc}): is pypnm serving there?", 2
        ) from None


def _json_object(response: httpx.Response) -> dict[str, Any] | None:
    try:
        body = response.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def _phase(reload_id: str, info: dict[str, Any], record: dict[str, Any] | None, elapsed: float) -> str:
    """The progress line: queued -> validating -> swapping, with the generation and the time so far."""
    if record is None or not record.get("started_at"):
        return f"reload {reload_id}: queued ({elapsed:.1f} s)"  # behind another reload, or its minimum interval
    if record.get("stability") == "watching":
        watch = info.get("rollback_watch") or {}
        crashes = len(watch.get("crashes", [])) if watch.get("reload") == reload_id else 0
        if watch.get("reload") == reload_id and watch.get("rollback"):
            return (
                f"reload {reload_id}: generation {record.get('generation')} crashed {crashes} times: "
                f"rolling back (reload {watch['rollback']}) ({elapsed:.1f} s)"
            )
        return (
            f"reload {reload_id}: generation {record.get('generation')} serving, watched for crashes for "
            f"{record.get('rollback_window'):g} s (rollback_window), {crashes} so far ({elapsed:.1f} s)"
        )
    state = info.get("reload_state") or "validating"
    done = f"validating {record['validated_ms']:.0f} ms -> " if record.get("validated_ms") is not None else ""
    return f"reload {reload_id}: {done}{state} generation {record.get('generation')} ({elapsed:.1f} s)"


def _ended(reload_id: str, record: dict[str, Any]) -> _Outcome:
    if record["outcome"] != "succeeded":
        return _Outcome(1, f"reload {reload_id} {record['outcome']}: {record.get('reason')}")
    if record.get("stability") == "rolled_back":
        by = record.get("rolled_back_by")
        return _Outcome(1, f"reload {reload_id} rolled back (by reload {by}): {record.get('stability_detail')}")
    if record.get("stability") == "unstable":
        return _Outcome(1, f"reload {reload_id} unstable: {record.get('stability_detail')}")
    total = record.get("duration_ms") or 0.0
    validated = record.get("validated_ms")
    # The phases go last: scripts that read "succeeded: generation N serving" keep working.
    phases = f": validating {validated:.0f} ms, swapping {total - validated:.0f} ms" if validated is not None else ""
    serving = f"generation {record.get('generation')} serving ({total:.0f} ms{phases})"
    if record.get("stability") == "stable":  # after the phases: the line's start stays what scripts read
        serving += f", stable for {record.get('rollback_window'):g} s"
    elif record.get("stability") == "replaced":
        serving += f", {record.get('stability_detail')}"
    warnings = [f"warning: {warning}" for warning in record.get("warnings", [])]
    return _Outcome(0, f"reload {reload_id} succeeded: {serving}", warnings)


def _ended_replaced(reload_id: str, first: dict[str, Any], last: dict[str, Any]) -> _Outcome:
    """The outcome of a reload whose generation a later one replaced within its window, once that one (`last`)
    settled: a rollback of it went back past this reload's code too."""
    if last.get("stability") in ("rolled_back", "unstable"):
        ended = _ended(str(last.get("id")), last)
        return _Outcome(
            1,
            f"reload {reload_id} succeeded, but its generation {first.get('generation')} was "
            f"{first.get('stability_detail')}, and then: {ended.message}",
        )
    return _ended(reload_id, first)


class _Console:
    """Lines that stay, and on a terminal one status line of what is in progress, redrawn in place.

    The status line is rewritten after a carriage return and padded with spaces over the previous
    one (no escape sequences), and cut to the terminal's width so that it never wraps. When stdout
    is not a terminal only the lines that stay are written: one per outcome.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._live = stream.isatty()
        self._lock = threading.Lock()  # reloads in parallel report from their threads
        self._in_progress: dict[str, str] = {}  # status text by instance
        self._drawn = 0  # characters of the status line on the screen

    def progress(self, key: str, text: str) -> None:
        if not self._live:
            return
        with self._lock:
            self._in_progress[key] = text
            self._draw()

    def finish(self, key: str, lines: list[str] | None = None) -> None:
        """`key` is no longer in progress; write `lines` for good."""
        with self._lock:
            self._in_progress.pop(key, None)
            if self._drawn:
                self._stream.write("\r" + " " * self._drawn + "\r")
                self._drawn = 0
            for line in lines or []:
                self._stream.write(line + "\n")
            if self._in_progress:
                self._draw()
            self._stream.flush()

    def _draw(self) -> None:
        text = " | ".join(self._in_progress.values())
        width = max(20, shutil.get_terminal_size().columns - 1)
        if len(text) > width:
            text = text[: width - 3] + "..."
        self._stream.write("\r" + text.ljust(self._drawn))
        self._drawn = len(text)
        self._stream.flush()


# ----- rolling reload across instances -------------------------------------------------------------


def _rolling_reload(args: argparse.Namespace, targets: list[_Target], verify: ssl.SSLContext | bool) -> int:
    """Reload the instances in order, at most --parallel at once, starting none after the first failure.

    Reloads in flight when one fails still run to their outcome, and are reported. Ctrl-C stops
    the roll: the threads stop polling, and the summary says whose outcome is unknown. It is
    taken as a signal that sets `stop` (`_stop_on_sigint`), not as a KeyboardInterrupt, which
    Python may raise in the middle of the thread pool's own locking and leave the roll stuck.
    """
    console = _Console(sys.stdout)
    stop = threading.Event()
    outcomes: dict[str, _Outcome] = {}  # by URL, in the order they ended
    with contextlib.ExitStack() as stack:
        # Every client first: a URL or a token refusal that would stop the roll stops it before it starts.
        clients = {target.url: stack.enter_context(_client(args, target, verify)) for target in targets}
        waiting = list(clients)
        pool = stack.enter_context(ThreadPoolExecutor(max_workers=args.parallel, thread_name_prefix="reload"))
        stack.enter_context(_stop_on_sigint(stop))
        running: dict[Future[_Outcome], str] = {}
        while (waiting or running) and not stop.is_set():
            failed = any(outcome.code for outcome in outcomes.values())
            while waiting and len(running) < args.parallel and not failed:
                url = waiting.pop(0)
                future = pool.submit(_reload_instance, clients[url], url, args.timeout, console, stop, args.wait_stable)
                running[future] = url
            if not running:
                break
            done, _ = wait(running, timeout=STOP_CHECK, return_when=FIRST_COMPLETED)
            for future in done:
                url = running.pop(future)
                outcome = outcomes[url] = future.result()
                console.finish(url, [f"{url}: {line}" for line in (outcome.message, *outcome.warnings)])
        for future, url in running.items():  # stopped: each says it was interrupted (a request under way first ends)
            outcomes[url] = future.result()
        console.finish("")
    sys.stdout.write(_roll_summary(list(clients), outcomes, waiting))
    if stop.is_set():
        return INTERRUPTED
    codes = {outcome.code for outcome in outcomes.values()}
    return 1 if 1 in codes else max(codes, default=0)


@contextlib.contextmanager
def _stop_on_sigint(stop: threading.Event) -> Iterator[None]:
    """While the roll runs, Ctrl-C (SIGINT) sets `stop` instead of raising KeyboardInterrupt."""
    previous = signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _reload_instance(
    client: httpx.Client, url: str, timeout: float, console: _Console, stop: threading.Event, stable: bool
) -> _Outcome:
    try:
        reload_id = _get(client, RELOAD_PATH, "reload").headers.get("X-Reload-Id")
        if not reload_id:
            return _Outcome(2, _UNTRACKED)
        return _await_outcome(
            client, reload_id, timeout, lambda text: console.progress(url, f"{url}: {text}"), stop, stable=stable
        )
    except Unanswered as exc:
        return _Outcome(exc.code, str(exc), unknown=exc.unknown)


def _roll_summary(urls: list[str], outcomes: dict[str, _Outcome], not_attempted: list[str]) -> str:
    reloaded = [url for url in urls if url in outcomes and outcomes[url].code == 0]
    # A reload whose outcome the wait did not see (timed out) is not filed as failed: it may still
    # be running and succeed. Like an interrupted one, its instance's status tells how it ended.
    unknown = [url for url, outcome in outcomes.items() if outcome.unknown and outcome.code != INTERRUPTED]
    failed = [url for url, outcome in outcomes.items() if outcome.code not in (0, INTERRUPTED) and url not in unknown]
    interrupted = [url for url, outcome in outcomes.items() if outcome.code == INTERRUPTED]
    if failed or unknown:
        first = next(url for url in outcomes if url in failed or url in unknown)
        head = f"rolling reload stopped at {first}: {outcomes[first].message}"
    elif interrupted:
        head = f"rolling reload interrupted: {len(reloaded)} of {len(urls)} instances reloaded"
    else:
        head = f"rolling reload done: {len(reloaded)} of {len(urls)} instances reloaded"
    lines = [head]
    groups = [("reloaded", reloaded), ("failed", failed), ("not attempted", not_attempted)]
    if interrupted:  # triggered, outcome not seen: `pypnm status` tells how they ended
        groups.insert(2, ("interrupted, outcome unknown", interrupted))
    if unknown:
        groups.insert(2, ("timed out, outcome unknown (may still be running: see pypnm status --url URL)", unknown))
    for label, group in groups:
        lines.append(f"{label} ({len(group)}): {', '.join(group) or '-'}")
    return "\n".join(lines) + "\n"


# ----- upgrade ---------------------------------------------------------------------------------------


def upgrade(args: argparse.Namespace) -> int:
    """Ask one instance's master to hand over to a new master; with --wait, report how it ended."""
    targets = _targets(args)
    if _several(args):
        raise Unanswered("pypnm upgrade talks to one instance: upgrade a fleet one --url at a time", 2)
    with _client(args, targets[0], _tls_verify(args)) as client:
        upgrade_id = _get(client, UPGRADE_PATH, "upgrade").headers.get("X-Upgrade-Id")
        if not upgrade_id:
            raise Unanswered(_UNTRACKED, 2)
        if not args.wait:
            sys.stdout.write(f"upgrade triggered (id {upgrade_id})\n")
            return 0
        code, message = _await_upgrade(client, upgrade_id, args.timeout)
    sys.stdout.write(message + "\n")
    return code


def _await_upgrade(client: httpx.Client, upgrade_id: str, timeout: float) -> tuple[int, str]:
    """Poll the status (whichever master answers it) until the upgrade has an outcome.

    Both masters share the listening sockets, so the address never refuses a connection during
    an upgrade, unless the new master listens elsewhere (host or port changed) and the old one
    has left: then the outcome cannot be read here, and the command says where to look.
    """
    # The masters may be handing over: a failed ask is asked again.
    poll = _StatusPoll(client, f"upgrade {upgrade_id}", timeout, 0.2, threading.Event())
    for info in poll.answers():
        if poll.refused_for() >= UPGRADE_GONE:
            raise Unanswered(
                f"upgrade {upgrade_id}: {client.base_url} stopped answering before the outcome was seen; "
                "if host or port changed, the new master serves there: ask 'pypnm status --url NEW_URL'",
                2,
            )
        with _expected(client.base_url):
            record = (info or {}).get("upgrade") or {}
            if record.get("id") == upgrade_id and record.get("outcome"):
                return _upgrade_outcome(record)
    raise poll.ran_out(f"upgrade {upgrade_id} had no outcome within {timeout:g}s")


def _upgrade_outcome(record: dict[str, Any]) -> tuple[int, str]:
    was, now = record.get("from") or {}, record.get("to") or {}
    if record["outcome"] != "succeeded":
        return 1, f"upgrade {record['id']} failed: {record.get('reason')}; master pid {was.get('pid')} keeps serving"
    return 0, (
        f"upgrade {record['id']} succeeded: master pid {was.get('pid')} (pypnm {was.get('version')}) -> "
        f"pid {now.get('pid')} (pypnm {now.get('version')})"
    )


# ----- status ----------------------------------------------------------------------------------------


def status(args: argparse.Namespace) -> int:
    targets = _targets(args)
    verify = _tls_verify(args)
    if _several(args):
        return _fleet_status(args, targets, verify)
    with _client(args, targets[0], verify) as client:
        url, info, error = _instance_status(targets[0].url, client)
    if error is not None:
        raise error
    assert info is not None
    if args.json:
        sys.stdout.write(json.dumps(info, indent=2) + "\n")
        return 0
    with _expected(url):
        text = _format_status(info)
    sys.stdout.write(text)
    return 0


def _fleet_status(args: argparse.Namespace, targets: list[_Target], verify: ssl.SSLContext | bool) -> int:
    """One row (or JSON object) per instance; an instance that does not answer is a row saying why."""
    with contextlib.ExitStack() as stack:
        clients = [(target.url, stack.enter_context(_client(args, target, verify))) for target in targets]
        with ThreadPoolExecutor(max_workers=min(STATUS_CONCURRENCY, len(clients))) as pool:
            answers = list(pool.map(lambda entry: _instance_status(*entry), clients))
    if args.json:
        listed = [
            {"url": url, **info} if info is not None else {"url": url, "error": str(error)}
            for url, info, error in answers
        ]
        sys.stdout.write(json.dumps(listed, indent=2) + "\n")
    else:
        sys.stdout.write(_status_table(answers))
    codes = {error.code for _, _, error in answers if error is not None}
    return 1 if 1 in codes else max(codes, default=0)


def _instance_status(url: str, client: httpx.Client) -> tuple[str, dict[str, Any] | None, Unanswered | None]:
    try:
        info = _json_object(_get(client, STATUS_PATH, "status"))
    except Unanswered as exc:
        return url, None, exc
    if info is None:
        return url, None, Unanswered(f"{url}: the status answered with no JSON object: is pypnm serving there?", 2)
    try:
        with _expected(url):
            _status_row(url, info)  # the fields a row reads are there, of their types
    except Unanswered as exc:
        return url, None, exc
    return url, info, None


def _status_table(answers: list[tuple[str, dict[str, Any] | None, Unanswered | None]]) -> str:
    rows = [("INSTANCE", "GENERATION", "CODE_VERSION", "LAST_RELOAD", "WORKERS", "STATE")]
    for url, info, error in answers:
        rows.append(_status_row(url, info) if info is not None else (url, "-", "-", "-", "-", f"error: {error}"))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]) - 1)]
    return "".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1] + "\n"
        for row in rows
    )


def _status_row(url: str, info: dict[str, Any]) -> tuple[str, str, str, str, str, str]:
    supervised = info.get("mode") == "supervised"
    last = info.get("last_reload") or {}
    serving = [worker for worker in info.get("workers", []) if worker.get("state") == "serving"]
    return (
        url,
        str(info.get("generation") or "-"),
        str(info.get("generation_code_version") or info.get("code_version") or "-"),
        str(last.get("outcome") or "-"),
        str(len(serving)) if supervised else "-",
        str(info.get("reload_state") if supervised else info.get("mode")),
    )


def _format_status(info: dict[str, Any]) -> str:
    lines = [
        f"mode:         {info.get('mode')}",
        f"version:      {info.get('version')} (code {info.get('code_version')})",
    ]
    if info.get("mode") != "supervised":
        lines.append(f"pid:          {info.get('pid')} since {info.get('started_at')}")
        return "\n".join(lines) + "\n"
    master = info.get("master") or {}
    lines.append(
        f"master:       pid {master.get('pid')} (pypnm {master.get('version')}) since {master.get('started_at')}"
    )
    lines.append(f"generation:   {info.get('generation')} (reload state: {info.get('reload_state')})")
    for worker in info.get("workers", []):
        lines.append(
            f"worker:       pid {worker['pid']} generation {worker['generation']} {worker['state']} "
            f"code {worker['code_version']} since {worker['started_at']}"
        )
    last = info.get("last_reload")
    if last:
        outcome = last.get("outcome") or "in progress"
        lines.append(
            f"last reload:  {last['id']} {outcome} via {last['source']} at {last.get('finished_at')}"
            f" ({last.get('duration_ms')} ms)"
        )
        if last.get("reason"):
            lines.append(f"  reason:     {last['reason']}")
        lines.extend(f"  warning:    {warning}" for warning in last.get("warnings") or [])
    watch = info.get("rollback_watch")
    if watch:
        kept = watch.get("kept_generation")
        lines.append(
            f"watching:     generation {watch.get('generation')} for {watch.get('window'):g} s (rollback_window), "
            f"{len(watch.get('crashes', []))} of {watch.get('rollback_crashes')} crashes"
            + (f", generation {kept}'s snapshot kept" if kept is not None else ", nothing to roll back to")
        )
    if info.get("pending_rollback"):
        lines.append(f"queued:       {info['pending_rollback']} (rollback, next)")
    if info.get("pending_reload"):
        lines.append(f"queued:       {info['pending_reload']}")
    profile = info.get("runtime_profile")
    if isinstance(profile, dict):
        lines.append(f"profile:      {_format_profile(profile)}")
    upgraded = info.get("upgrade")
    if upgraded:
        was, now = upgraded.get("from") or {}, upgraded.get("to") or {}
        lines.append(
            f"last upgrade: {upgraded['id']} {upgraded.get('outcome') or 'in progress'} via {upgraded['source']}: "
            f"pid {was.get('pid')} (pypnm {was.get('version')}) -> pid {now.get('pid')} (pypnm {now.get('version')})"
        )
        if upgraded.get("reason"):
            lines.append(f"  reason:     {upgraded['reason']}")
    return "\n".join(lines) + "\n"


def _format_profile(profile: dict[str, Any]) -> str:
    """The runtime profile on one line: workers and where the count came from, the machine, the limits."""
    setting = "auto, " if profile.get("workers_setting") == "auto" else ""
    workers = profile.get("active_workers")
    requests = profile.get("active_limit_max_requests") or 0
    memory = profile.get("limit_worker_memory") or 0
    limits = [
        f"recycle after {requests} requests (+0..{profile.get('limit_max_requests_jitter')})" if requests else "",
        f"recycle past {memory / 1024**2:.0f} MiB RSS" if memory else "",
    ]
    return (
        f"{workers} worker{'' if workers == 1 else 's'} ({setting}from {profile.get('active_source')}) on "
        f"{profile.get('detected_cpu_count')} CPUs, {profile.get('detected_total_memory_gib')} GiB; "
        + "; ".join(limit for limit in limits if limit)
        + ("; " if any(limits) else "")
        + f"worker_timeout {profile.get('worker_timeout')}s"
    )
