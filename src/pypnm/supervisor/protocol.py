"""Every message the supervisor's processes exchange, typed, with one encode and one decode per channel.

Three channels, one JSON object per message, UTF-8:

- **fork template** (master <-> template, a SOCK_SEQPACKET socketpair): one datagram is one
  message, so the kernel keeps message boundaries; file descriptors travel beside a
  `SpawnRequest` as SCM_RIGHTS ancillary data (the worker's channel first, then the
  listeners). The template says `TemplateHello` once its modules are imported, then answers
  each `SpawnRequest` with `Spawned` or `SpawnRefused`, and reports each worker's end with
  `WorkerExited` (its wait status: only the template, the workers' parent, can read it).
  End-of-file: the peer is gone. A `ZygoteRequest` (its fd: the zygote's own channel) asks the
  template, or for an incremental import the previous generation's zygote, to fork a
  generation's zygote: it imports the app, says `ZygoteReady` or `ZygoteFailed` on its own
  channel, and from then on speaks this same channel's protocol with the master (spawn
  requests answered by forking a worker, its workers' exits reported). A `StandbyRequest` asks
  the serving generation's zygote to fork the next reload's zygote ahead of it: that standby says
  `StandbyReady` on its own channel, then waits there for the reload's `ZygoteRequest` (no fd)
  and answers it as a zygote. A zygote of an older pypnm refuses the command (`SpawnRefused`).
- **worker** (master <-> each worker, a SOCK_STREAM socketpair): JSON lines, one message per
  line ending in "\\n". The master sends commands (`StartAccepting`, `StopAccepting`, `Close`,
  `Heartbeat`), the worker answers with events (`WorkerReady` or `WorkerFailed`, `WorkerAccepting`,
  `WorkerStoppedAccepting`, `WorkerClosing`, `HeartbeatAnswer`, `WorkerLimitReached`). End-of-file:
  the worker is gone. `Heartbeat` goes only to a worker whose `WorkerReady` said `heartbeat: true`:
  a worker of an older pypnm never announces it, so it is never asked, and never taken for hung.
  `WorkerLimitReached` is sent only by a worker whose spec set `limit_max_requests`, a field an
  older master never sends: so an older master never receives the event it would not know.
- **control** (a worker or the CLI -> the master, a Unix socket in the runtime directory):
  JSON lines, one request and one answer per connection (`ReloadRequest` -> `ReloadAccepted`,
  `UpgradeRequest` -> `UpgradeAccepted`, `StatusRequest` -> `StatusAnswer`, any -> `Refused`).
  A master that predates `UpgradeRequest` refuses it as an unknown command: a clear error.
- **handover** (an old master <-> the new master it started for a self-upgrade, a SOCK_SEQPACKET
  socketpair; upgrade.py): the old master sends `HandoverOffer` with its listening sockets as
  SCM_RIGHTS ancillary data; the new one answers `HandoverServing` once its first generation
  serves, or `HandoverFailed`; the old one then confirms with `HandoverComplete` (it has told
  systemd, and stops accepting). End-of-file: the peer is gone. The two masters run different
  pypnm versions by design, so this channel follows the version rules below like the others.

Versions. The processes on either end may run different pypnm code: the fork template is a
fresh interpreter that imports pypnm as installed *now* (after `pip install -U pypnm` it is
newer than its master), its workers inherit its code, and a worker serves the generation's
snapshot, whose `pypnm.api.web_service` asks the master over the control channel. So every
message carries `"v": PROTOCOL_VERSION`. The rules:

- an additive change (a new optional field, a new message kind nobody must understand) keeps
  the version: readers ignore fields they do not know;
- an incompatible change raises the version; a reader refuses a message whose version it does
  not know with one `ProtocolError` that names both versions, never guessing at its meaning;
- a message without "v" is version 1: version 1 is exactly the format pypnm spoke before the
  field existed, so an older master and newer workers (or the other way round) still
  understand each other.

The wire names are version 1's and stay as they are even where the Python names say it
better (`StopAccepting` is "drain" on the wire, `StartAccepting` is "serve"): renaming them
would be an incompatible change.

Anything undecodable (not JSON, not an object, a missing or mistyped field, an unknown kind)
raises `ProtocolError` with a one-line message saying which channel and what is wrong.
Hand-written rather than pydantic: the template imports this module before it forks every
worker, and a few explicit field checks cost nothing there.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, TypeVar

PROTOCOL_VERSION = 1
# The oldest version this code still reads; raise it only when dropping support for old peers.
MIN_PROTOCOL_VERSION = 1
VERSION_KEY = "v"
# Larger than any message but a status answer (a spawn request carries the worker spec).
MAX_MESSAGE = 64 * 1024
# A status answer (20 reloads, each with its reason) may be longer; only the master sends one.
MAX_ANSWER = 1024 * 1024
# The longest reason a message carries (why a generation, a spawn or an upgrade failed): an app's
# error can be of any size (an exception holding a megabyte of text), a message cannot. The whole
# reason is in the log of the process that met it.
MAX_REASON = 4096

Channel = Literal["fork template", "worker", "control", "handover"]


def cut_reason(reason: str) -> str:
    """`reason` as a message carries it: at most MAX_REASON characters, and then how many more there were."""
    if len(reason) <= MAX_REASON:
        return reason
    return f"{reason[:MAX_REASON]} … ({len(reason) - MAX_REASON} more characters: the whole reason is in the log)"


class ProtocolError(ValueError):
    """A message that cannot be read: garbled, of an unknown kind, or from an incompatible version."""

    def __init__(self, channel: Channel, problem: str) -> None:
        super().__init__(f"{channel} channel: {problem}")
        self.channel = channel


# ----- the worker spec (carried by SpawnRequest) -----------------------------------------------


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs, sent by the master; the same for every worker of a generation."""

    app: str
    generation: int
    snapshot_dir: str
    packages: list[str]
    source_dirs: dict[str, str]  # snapshot path -> original path, to report files as the operator knows them
    env: dict[str, str] = field(default_factory=dict)
    check_paths: list[str] = field(default_factory=list)
    log_level: str = "info"
    graceful_timeout: float = 30.0
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    limit_request_line_size: int = 16384
    limit_request_header_size: int = 65536
    timeout_request_header: float = 10.0
    limit_concurrency: int = 1000
    # Worker recycling: after limit_max_requests + a random 0..jitter requests (0: never) the worker says so.
    limit_max_requests: int = 0
    limit_max_requests_jitter: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def drain_seconds(self) -> int:
        """The seconds a stopping worker gives its requests: uvicorn takes whole ones, so `graceful_timeout` rounded
        up; the master kills a worker only after this long, never sooner than its uvicorn would give up."""
        return max(1, math.ceil(self.graceful_timeout))

    @classmethod
    def from_dict(cls, data: dict[str, Any], channel: Channel = "fork template") -> WorkerSpec:
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as exc:  # a required field missing
            raise ProtocolError(channel, f"bad worker spec: {exc}") from None


# ----- fork template channel -----------------------------------------------------------------------


@dataclass(frozen=True)
class TemplateHello:
    """template -> master, once: its modules are imported and it is ready to fork.

    `renice`: it can give a lowered nice value back (CAP_SYS_NICE or RLIMIT_NICE allow it), so
    candidates may run niced until they serve (a template of an older pypnm leaves it out: False).
    """

    pid: int
    renice: bool = False


@dataclass(frozen=True)
class ZygoteRequest:
    """master -> template or zygote: fork a zygote that imports `spec`'s app; its channel travels beside.

    `nice`: added to the nice value while the zygote imports and its workers validate (0: none).
    `drop`: sent to a previous generation's zygote, the modules its child drops from `sys.modules`
    and imports again from the new snapshot (incremental); None: a clean import.
    """

    spec: WorkerSpec
    nice: int = 0
    drop: list[str] | None = None


@dataclass(frozen=True)
class StandbyRequest:
    """master -> the serving generation's zygote: fork the next reload's zygote ahead of it (a standby).

    The standby drops `drop` (what the last reload dropped: the file edited last is the likeliest to
    be edited again) and collects what it held, says `StandbyReady` on its own channel (the fd
    beside this message), then waits there for the next reload's `ZygoteRequest`, whose `drop`
    must be the same, and goes on as that reload's zygote (template.py, "Standby").
    """

    drop: list[str]
    nice: int = 0


@dataclass(frozen=True)
class StandbyReady:
    """standby -> master, first on its channel: `drop` is dropped and released; it waits for its ZygoteRequest."""

    pid: int
    took_ms: dict[str, int] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class ZygoteReady:
    """zygote -> master, first on its channel: the app is imported; `reimported` modules (None: clean import)."""

    pid: int
    nice: int
    reimported: int | None = None
    # How long each step took, in order: "drop", "release" or "full release" (reimport.py), "import", "routes".
    took_ms: dict[str, int] = field(default_factory=dict, hash=False)
    # (reused, built): the pydantic adapters of FastAPI's fields (field_adapters.py); None where not reused.
    adapters: tuple[int, int] | None = None
    # The CPU time it used over those steps: far below their sum, it waited for the CPU (priority.py);
    # a zygote of an older pypnm leaves it out: None.
    cpu_ms: int | None = None
    # (reused, built): FastAPI's route contexts (route_contexts.py); None where not reused, or an older pypnm.
    contexts: tuple[int, int] | None = None


@dataclass(frozen=True)
class ZygoteFailed:
    """zygote -> master, first on its channel: the app cannot be imported; `reason` is the reload's reason."""

    reason: str


@dataclass(frozen=True)
class SpawnRequest:
    """master -> template: fork a worker running `spec`; the fds travel beside this message."""

    spec: WorkerSpec


@dataclass(frozen=True)
class Spawned:
    """template -> master: the worker's pid."""

    pid: int


@dataclass(frozen=True)
class SpawnRefused:
    """template -> master: the fork failed; `error` says why."""

    error: str


@dataclass(frozen=True)
class WorkerExited:
    """template -> master: a worker it forked has ended; `status` is its wait status (os.waitpid)."""

    pid: int
    status: int


TemplateMessage = (
    TemplateHello
    | SpawnRequest
    | Spawned
    | SpawnRefused
    | WorkerExited
    | ZygoteRequest
    | ZygoteReady
    | ZygoteFailed
    | StandbyRequest
    | StandbyReady
)


def encode_template(message: TemplateMessage) -> bytes:
    """One datagram (no terminator: SOCK_SEQPACKET keeps the boundary)."""
    match message:
        case TemplateHello(pid=pid, renice=renice):
            body: dict[str, Any] = {"ready": True, "pid": pid}
            if renice:  # left out when False: exactly version 1's hello of before
                body["renice"] = True
        case ZygoteRequest(spec=spec, nice=nice, drop=drop):
            body = {"cmd": "zygote", "spec": spec.as_dict(), "nice": nice}
            if drop is not None:
                body["drop"] = drop
        case ZygoteReady(
            pid=pid,
            nice=nice,
            reimported=reimported,
            took_ms=took_ms,
            adapters=adapters,
            cpu_ms=cpu_ms,
            contexts=contexts,
        ):
            body = {"zygote": pid, "nice": nice, "reimported": reimported}
            if took_ms:
                body["took_ms"] = took_ms
            if adapters is not None:
                body["adapters"] = list(adapters)
            if cpu_ms is not None:
                body["cpu_ms"] = cpu_ms
            if contexts is not None:
                body["contexts"] = list(contexts)
        case ZygoteFailed(reason=reason):
            body = {"zygote_failed": cut_reason(reason)}
        case StandbyRequest(drop=drop, nice=nice):
            body = {"cmd": "standby", "drop": drop, "nice": nice}
        case StandbyReady(pid=pid, took_ms=took_ms):
            body = {"standby": pid, "took_ms": took_ms}
        case SpawnRequest(spec=spec):
            body = {"cmd": "spawn", "spec": spec.as_dict()}
        case Spawned(pid=pid):
            body = {"pid": pid}
        case SpawnRefused(error=error):
            body = {"error": cut_reason(error)}
        case WorkerExited(pid=pid, status=status):
            body = {"exited": pid, "status": status}
    return _dump(body)


def decode_template(data: bytes) -> TemplateMessage:
    # Version 1 tells its kinds apart by shape, not by a kind field; kept so as to stay version 1.
    channel: Channel = "fork template"
    body = _load(data, channel)
    if "cmd" in body:
        if body["cmd"] not in ("spawn", "zygote", "standby"):
            raise ProtocolError(channel, f"unknown command {body['cmd']!r}")
        if body["cmd"] == "standby":
            drop = _module_names(body.get("drop"), channel)
            if drop is None:
                raise ProtocolError(channel, "field 'drop' is missing: a standby request names the modules to drop")
            return StandbyRequest(drop, _get(body, "nice", int, channel))
        spec = WorkerSpec.from_dict(_get(body, "spec", dict, channel), channel)
        if body["cmd"] == "spawn":
            return SpawnRequest(spec)
        return ZygoteRequest(spec, _get(body, "nice", int, channel), _module_names(body.get("drop"), channel))
    if "zygote_failed" in body:
        return ZygoteFailed(_get(body, "zygote_failed", str, channel))
    if "zygote" in body:
        reimported = body.get("reimported")
        if reimported is not None and not isinstance(reimported, int):
            raise ProtocolError(channel, "field 'reimported' must be an integer or null")
        took_ms = _milliseconds(body.get("took_ms", {}), channel)
        cpu_ms = body.get("cpu_ms")
        if cpu_ms is not None and not _is_count(cpu_ms):
            raise ProtocolError(channel, "field 'cpu_ms' must be a count of milliseconds, null or absent")
        return ZygoteReady(
            _get(body, "zygote", int, channel),
            _get(body, "nice", int, channel),
            reimported,
            took_ms,
            _reused_built(body, "adapters", channel),
            cpu_ms,
            _reused_built(body, "contexts", channel),
        )
    if "standby" in body:
        return StandbyReady(_get(body, "standby", int, channel), _milliseconds(body.get("took_ms", {}), channel))
    if "error" in body:
        return SpawnRefused(_get(body, "error", str, channel))
    if "exited" in body:
        return WorkerExited(_get(body, "exited", int, channel), _get(body, "status", int, channel))
    if body.get("ready") is True:
        return TemplateHello(_get(body, "pid", int, channel), body.get("renice") is True)
    if "pid" in body:
        return Spawned(_get(body, "pid", int, channel))
    raise ProtocolError(channel, f"unknown message with fields {sorted(body)}")


def _module_names(value: object, channel: Channel) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, list) and all(isinstance(name, str) for name in value):
        return [str(name) for name in value]
    raise ProtocolError(channel, "field 'drop' must be a list of module names or absent")


def _milliseconds(value: object, channel: Channel) -> dict[str, int]:
    if isinstance(value, dict) and all(_is_count(ms) for ms in value.values()):
        return {str(step): int(ms) for step, ms in value.items()}
    raise ProtocolError(channel, "field 'took_ms' must map step names to milliseconds or be absent")


def _reused_built(body: dict[str, Any], name: str, channel: Channel) -> tuple[int, int] | None:
    counts = body.get(name)
    if counts is None:
        return None
    if isinstance(counts, list) and len(counts) == 2 and all(_is_count(n) for n in counts):
        return counts[0], counts[1]
    raise ProtocolError(channel, f"field '{name}' must be two counts [reused, built], null or absent")


# ----- worker channel ----------------------------------------------------------------------------


@dataclass(frozen=True)
class StartAccepting:
    """master -> worker: the generation is validated; start accepting on the listeners."""


@dataclass(frozen=True)
class StopAccepting:
    """master -> worker: stop accepting now; finish what is in flight (the drain has begun)."""


@dataclass(frozen=True)
class Close:
    """master -> worker: its draining generation is over the cap; report what is open, cut it, leave."""


@dataclass(frozen=True)
class Heartbeat:
    """master -> worker: answer from the event loop (HeartbeatAnswer); sent only to workers that announced it."""


WorkerCommand = StartAccepting | StopAccepting | Close | Heartbeat


@dataclass(frozen=True)
class WorkerReady:
    """worker -> master: validated (imported, lifespan started, checks answered), waiting to accept.

    `restart_only`: the new code's reading of the settings only a restart applies, when it has one.
    `heartbeat`: it answers `Heartbeat` (a worker of an older pypnm leaves it out: False).
    """

    restart_only: dict[str, Any] | None = None
    heartbeat: bool = False


@dataclass(frozen=True)
class WorkerFailed:
    """worker -> master: this generation cannot serve; `reason` is what the reload records."""

    reason: str


@dataclass(frozen=True)
class WorkerAccepting:
    """worker -> master: accepting on the listeners."""


@dataclass(frozen=True)
class WorkerStoppedAccepting:
    """worker -> master: no longer accepting (answer to StopAccepting)."""


@dataclass(frozen=True)
class WorkerClosing:
    """worker -> master: answer to Close, with what it still had open and is now cutting."""

    connections: int
    requests: int


@dataclass(frozen=True)
class HeartbeatAnswer:
    """worker -> master: its event loop ran the Heartbeat command."""


@dataclass(frozen=True)
class WorkerLimitReached:
    """worker -> master, once: it has served `requests` requests, its `limit` (limit_max_requests + its jitter).

    The master recycles it: a replacement first, then this one drains (lifecycle.py).
    """

    requests: int
    limit: int


WorkerEvent = (
    WorkerReady
    | WorkerFailed
    | WorkerAccepting
    | WorkerStoppedAccepting
    | WorkerClosing
    | HeartbeatAnswer
    | WorkerLimitReached
)
WorkerMessage = WorkerCommand | WorkerEvent

_COMMANDS: dict[str, WorkerCommand] = {
    "serve": StartAccepting(),
    "drain": StopAccepting(),
    "close": Close(),
    "heartbeat": Heartbeat(),
}
_COMMAND_NAMES = {type(command): name for name, command in _COMMANDS.items()}


def encode_worker(message: WorkerMessage) -> bytes:
    """One JSON line."""
    match message:
        case StartAccepting() | StopAccepting() | Close() | Heartbeat():
            body: dict[str, Any] = {"cmd": _COMMAND_NAMES[type(message)]}
        case WorkerReady(restart_only=restart_only, heartbeat=heartbeat):
            body = {"event": "ready", "restart_only": restart_only}
            if heartbeat:  # left out when False: exactly version 1's "ready" of before
                body["heartbeat"] = True
        case WorkerFailed(reason=reason):
            body = {"event": "failed", "reason": cut_reason(reason)}
        case WorkerAccepting():
            body = {"event": "serving"}
        case WorkerStoppedAccepting():
            body = {"event": "draining"}
        case WorkerClosing(connections=connections, requests=requests):
            body = {"event": "closing", "connections": connections, "requests": requests}
        case HeartbeatAnswer():
            body = {"event": "heartbeat"}
        case WorkerLimitReached(requests=requests, limit=limit):
            body = {"event": "limit", "requests": requests, "limit": limit}
    return _dump(body) + b"\n"


def decode_worker(line: bytes) -> WorkerMessage:
    channel: Channel = "worker"
    body = _load(line, channel)
    if "cmd" in body:
        command = _COMMANDS.get(body["cmd"]) if isinstance(body["cmd"], str) else None
        if command is None:
            raise ProtocolError(channel, f"unknown command {body['cmd']!r}")
        return command
    kind = _get(body, "event", str, channel)
    if kind == "ready":
        restart_only = body.get("restart_only")
        if restart_only is not None and not isinstance(restart_only, dict):
            raise ProtocolError(channel, "field 'restart_only' must be an object or null")
        return WorkerReady(restart_only, body.get("heartbeat") is True)
    if kind == "failed":
        return WorkerFailed(_get(body, "reason", str, channel))
    if kind == "serving":
        return WorkerAccepting()
    if kind == "draining":
        return WorkerStoppedAccepting()
    if kind == "closing":
        return WorkerClosing(_get(body, "connections", int, channel), _get(body, "requests", int, channel))
    if kind == "heartbeat":
        return HeartbeatAnswer()
    if kind == "limit":
        return WorkerLimitReached(_get(body, "requests", int, channel), _get(body, "limit", int, channel))
    raise ProtocolError(channel, f"unknown event {kind!r}")


# ----- control channel ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ReloadRequest:
    """Start a reload. `deadline`: when the caller stops waiting, on CLOCK_MONOTONIC (see control.py)."""

    source: str = "control"
    request_id: str | None = None  # the HTTP request that asked, to tie the master's log to the access log
    deadline: float | None = None


@dataclass(frozen=True)
class UpgradeRequest:
    """Start a self-upgrade (a new master in a fresh interpreter); fields as ReloadRequest's."""

    source: str = "control"
    request_id: str | None = None
    deadline: float | None = None


@dataclass(frozen=True)
class StatusRequest:
    """Ask for the master's status view."""

    deadline: float | None = None


@dataclass(frozen=True)
class ReloadAccepted:
    """The reload is queued (or joined the queued one); its id."""

    reload_id: str


@dataclass(frozen=True)
class UpgradeAccepted:
    """The upgrade started (or one already running was joined); its id."""

    upgrade_id: str


@dataclass(frozen=True)
class StatusAnswer:
    """The master's status view, as `/status` shows it (status.py)."""

    status: dict[str, Any]


@dataclass(frozen=True)
class Refused:
    """The master cannot or will not do it; `error` says why."""

    error: str


ControlRequest = ReloadRequest | UpgradeRequest | StatusRequest
ControlAnswer = ReloadAccepted | UpgradeAccepted | StatusAnswer | Refused
ControlMessage = ControlRequest | ControlAnswer


def encode_control(message: ControlMessage) -> bytes:
    """One JSON line."""
    match message:
        case ReloadRequest(source=source, request_id=request_id, deadline=deadline):
            body: dict[str, Any] = {"cmd": "reload", "source": source}
            if request_id is not None:
                body["request_id"] = request_id
            if deadline is not None:
                body["deadline"] = deadline
        case UpgradeRequest(source=source, request_id=request_id, deadline=deadline):
            body = {"cmd": "upgrade", "source": source}
            if request_id is not None:
                body["request_id"] = request_id
            if deadline is not None:
                body["deadline"] = deadline
        case StatusRequest(deadline=deadline):
            body = {"cmd": "status"} if deadline is None else {"cmd": "status", "deadline": deadline}
        case ReloadAccepted(reload_id=reload_id):
            body = {"reload_id": reload_id}
        case UpgradeAccepted(upgrade_id=upgrade_id):
            body = {"upgrade_id": upgrade_id}
        case StatusAnswer(status=status):
            body = dict(status)
        case Refused(error=error):
            body = {"error": cut_reason(error)}
    return _dump(body) + b"\n"


def decode_control(line: bytes) -> ControlMessage:
    # Version 1: requests carry "cmd"; answers are told apart by shape, the status being the bare view.
    channel: Channel = "control"
    body = _load(line, channel)
    if "cmd" in body:
        command = body["cmd"]
        deadline = _deadline(body)
        if command in ("reload", "upgrade"):
            request_id = body.get("request_id")
            kind = ReloadRequest if command == "reload" else UpgradeRequest
            return kind(
                source=str(body.get("source", "control")),
                request_id=str(request_id) if request_id else None,
                deadline=deadline,
            )
        if command == "status":
            return StatusRequest(deadline)
        raise ProtocolError(channel, f"unknown command {command!r}")
    if "error" in body:
        return Refused(str(body["error"]))
    if "reload_id" in body:
        return ReloadAccepted(_get(body, "reload_id", str, channel))
    if "upgrade_id" in body:
        return UpgradeAccepted(_get(body, "upgrade_id", str, channel))
    if "reload_state" in body:  # the view, without the channel's "v" (_load took it out)
        return StatusAnswer(body)
    raise ProtocolError(channel, f"unknown message with fields {sorted(body)}")


# ----- handover channel (self-upgrade: old master <-> new master) -----------------------------------


@dataclass(frozen=True)
class HandoverOffer:
    """old -> new, first: who hands over, and where it listened; the listening sockets travel beside it.

    `host`/`port` are the old master's settings: the new master binds anew when its own differ
    (unless `activated`: the sockets came from systemd and the settings do not choose them).
    `generation` is the one that serves: the new master numbers its own from the next one on, so
    that generation numbers keep rising across an upgrade (0 from a pypnm that did not send it).
    """

    upgrade_id: str
    source: str
    requested_at: str
    pid: int
    version: str
    host: str
    port: int
    activated: bool = False
    generation: int = 0


@dataclass(frozen=True)
class HandoverServing:
    """new -> old: its first generation serves; the old master may stop accepting and leave.

    `takes_reload`: it runs a reload the old master held for it (`HandoverComplete.reload`); a new
    master of an older pypnm does not say so, and would drop it.
    """

    pid: int
    version: str
    takes_reload: bool = False


@dataclass(frozen=True)
class HandoverFailed:
    """new -> old: it cannot serve (and exits); `reason` is what the upgrade records."""

    reason: str


@dataclass(frozen=True)
class ForwardedReload:
    """A reload the old master was asked for while the upgrade ran (it held it): the new master runs it."""

    id: str
    source: str
    requested_at: str
    coalesced: int = 0


@dataclass(frozen=True)
class HandoverComplete:
    """old -> new: systemd was told the new main pid, and the old master stops accepting now.

    `reload`: the reload it was asked for meanwhile, for the new master to run (an older master
    sends none: that reload was then its own, and ran there).
    """

    reload: ForwardedReload | None = None


HandoverMessage = HandoverOffer | HandoverServing | HandoverFailed | HandoverComplete


def encode_handover(message: HandoverMessage) -> bytes:
    """One datagram (SOCK_SEQPACKET keeps the boundary)."""
    match message:
        case HandoverOffer():
            body: dict[str, Any] = {"handover": "offer", **asdict(message)}
        case HandoverServing(pid=pid, version=version, takes_reload=takes_reload):
            body = {"handover": "serving", "pid": pid, "version": version, "takes_reload": takes_reload}
        case HandoverFailed(reason=reason):
            body = {"handover": "failed", "reason": cut_reason(reason)}
        case HandoverComplete(reload=reload):
            body = {"handover": "complete"} if reload is None else {"handover": "complete", "reload": asdict(reload)}
    return _dump(body)


def decode_handover(data: bytes) -> HandoverMessage:
    channel: Channel = "handover"
    body = _load(data, channel)
    kind = _get(body, "handover", str, channel)
    if kind == "offer":
        return HandoverOffer(
            upgrade_id=_get(body, "upgrade_id", str, channel),
            source=_get(body, "source", str, channel),
            requested_at=_get(body, "requested_at", str, channel),
            pid=_get(body, "pid", int, channel),
            version=_get(body, "version", str, channel),
            host=_get(body, "host", str, channel),
            port=_get(body, "port", int, channel),
            activated=body.get("activated") is True,
            generation=body["generation"] if type(body.get("generation")) is int else 0,
        )
    if kind == "serving":
        return HandoverServing(
            _get(body, "pid", int, channel), _get(body, "version", str, channel), body.get("takes_reload") is True
        )
    if kind == "failed":
        return HandoverFailed(_get(body, "reason", str, channel))
    if kind == "complete":
        return HandoverComplete(_forwarded(body.get("reload"), channel))
    raise ProtocolError(channel, f"unknown message {kind!r}")


# ----- framing and fields ------------------------------------------------------------------------


def _forwarded(value: object, channel: Channel) -> ForwardedReload | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ProtocolError(channel, f"field 'reload' is {type(value).__name__}, not an object")
    coalesced = value.get("coalesced", 0)
    return ForwardedReload(
        _get(value, "id", str, channel),
        _get(value, "source", str, channel),
        _get(value, "requested_at", str, channel),
        coalesced if _is_count(coalesced) else 0,
    )


def _dump(body: dict[str, Any]) -> bytes:
    return json.dumps({**body, VERSION_KEY: PROTOCOL_VERSION}).encode()


def _load(data: bytes, channel: Channel) -> dict[str, Any]:
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise ProtocolError(channel, f"not JSON ({exc}): {data[:80]!r}") from None
    except RecursionError:  # arrays or objects nested thousands deep: no message of ours is
        raise ProtocolError(channel, f"nested too deep to be a message: {data[:80]!r}") from None
    if not isinstance(body, dict):
        raise ProtocolError(channel, f"a message is a JSON object, not {type(body).__name__}")
    version = body.get(VERSION_KEY, 1)
    if not isinstance(version, int) or isinstance(version, bool):
        raise ProtocolError(channel, f"protocol version {version!r} is not a number")
    if not MIN_PROTOCOL_VERSION <= version <= PROTOCOL_VERSION:
        raise ProtocolError(
            channel,
            f"the peer speaks protocol version {version}, this pypnm speaks {MIN_PROTOCOL_VERSION}"
            f"{'' if MIN_PROTOCOL_VERSION == PROTOCOL_VERSION else f'-{PROTOCOL_VERSION}'}: "
            "the two processes run incompatible pypnm versions; restart pypnm so that all of them run one",
        )
    body.pop(VERSION_KEY, None)
    return body


_T = TypeVar("_T")


def _is_count(value: object) -> bool:
    """A whole number of things or milliseconds: an int, not a bool (JSON's true is Python's 1), not negative."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _get(body: dict[str, Any], name: str, kind: type[_T], channel: Channel) -> _T:
    value = body.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        shown = "missing" if name not in body else f"{type(value).__name__}, not {kind.__name__}"
        raise ProtocolError(channel, f"field {name!r} is {shown}")
    return value


def _deadline(body: dict[str, Any]) -> float | None:
    deadline = body.get("deadline")
    if isinstance(deadline, int | float) and not isinstance(deadline, bool):
        return float(deadline)
    return None  # none, or not a number: such a request never expires (as version 1 masters read it)
