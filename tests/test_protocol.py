"""The supervisor's wire protocol (supervisor/protocol.py): round-trips, version 1 compatibility, bad input.

In-process and fast: no process is started.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from pypnm.supervisor import protocol
from pypnm.supervisor.protocol import (
    PROTOCOL_VERSION,
    Close,
    ProtocolError,
    Refused,
    ReloadAccepted,
    ReloadRequest,
    Spawned,
    SpawnRefused,
    SpawnRequest,
    StandbyReady,
    StandbyRequest,
    StartAccepting,
    StatusAnswer,
    StatusRequest,
    StopAccepting,
    TemplateHello,
    WorkerAccepting,
    WorkerClosing,
    WorkerFailed,
    WorkerReady,
    WorkerSpec,
    WorkerStoppedAccepting,
    ZygoteFailed,
    ZygoteReady,
    ZygoteRequest,
)

SPEC = WorkerSpec(
    app="pypnm.main:app",
    generation=3,
    snapshot_dir="/snap",
    packages=["pypnm"],
    source_dirs={"/snap": "/src"},
    env={"PYPNM_X": "1"},
    check_paths=["/health"],
    ssl_certfile="c.pem",
)


@pytest.mark.parametrize(
    "message",
    [
        TemplateHello(pid=12),
        TemplateHello(pid=12, renice=True),
        SpawnRequest(SPEC),
        Spawned(pid=13),
        SpawnRefused("OSError: no fork"),
        ZygoteRequest(SPEC, nice=10),
        ZygoteRequest(SPEC, nice=0, drop=["app.routes", "app.main"]),
        ZygoteReady(pid=14, nice=10),
        ZygoteReady(pid=14, nice=0, reimported=3),
        ZygoteReady(pid=14, nice=10, reimported=3, took_ms={"drop": 9, "release": 21, "import": 10, "routes": 120}),
        ZygoteReady(pid=14, nice=10, reimported=None, took_ms={"import": 600, "routes": 50}, adapters=(1237, 406)),
        ZygoteReady(pid=14, nice=10, took_ms={"import": 2100, "routes": 230}, cpu_ms=1550),
        ZygoteReady(pid=14, nice=10, cpu_ms=0),
        ZygoteReady(pid=14, nice=10, reimported=2, adapters=(3, 0), cpu_ms=90, contexts=(420, 2)),
        ZygoteFailed("SyntaxError: invalid syntax (app/main.py, line 3)"),
        StandbyRequest(["app.routes", "app.main"], nice=10),
        StandbyRequest([]),
        StandbyReady(pid=15),
        StandbyReady(pid=15, took_ms={"drop": 2, "release": 21}),
    ],
)
def test_template_messages_round_trip(message: protocol.TemplateMessage) -> None:
    data = protocol.encode_template(message)
    assert not data.endswith(b"\n")  # one datagram, no terminator
    assert protocol.decode_template(data) == message


@pytest.mark.parametrize(
    "message",
    [
        StartAccepting(),
        StopAccepting(),
        Close(),
        WorkerReady(),
        WorkerReady({"workers": 2}),
        WorkerFailed("ImportError: x (app.py, line 3)"),
        WorkerAccepting(),
        WorkerStoppedAccepting(),
        WorkerClosing(connections=2, requests=1),
    ],
)
def test_worker_messages_round_trip(message: protocol.WorkerMessage) -> None:
    line = protocol.encode_worker(message)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert protocol.decode_worker(line) == message


@pytest.mark.parametrize(
    "message",
    [
        ReloadRequest(),
        ReloadRequest("http", "abc", 12.5),
        StatusRequest(),
        StatusRequest(3.0),
        ReloadAccepted("0123456789ab"),
        Refused("the service is stopping"),
        StatusAnswer({"generation": 2, "reload_state": "idle", "workers": []}),
    ],
)
def test_control_messages_round_trip(message: protocol.ControlMessage) -> None:
    line = protocol.encode_control(message)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert protocol.decode_control(line) == message


def test_every_message_carries_the_version() -> None:
    for data in (
        protocol.encode_template(Spawned(1)),
        protocol.encode_worker(StartAccepting()),
        protocol.encode_control(StatusRequest()),
    ):
        assert json.loads(data)["v"] == PROTOCOL_VERSION


def test_the_status_view_does_not_show_the_channels_version() -> None:
    # /status merges the view into its JSON as it is: a "v" there would change the documented answer.
    answer = protocol.decode_control(protocol.encode_control(StatusAnswer({"reload_state": "idle"})))
    assert answer == StatusAnswer({"reload_state": "idle"})


@pytest.mark.parametrize(
    ("decode", "wire", "expected"),
    [
        # Exactly what pypnm sent before messages carried a version: read as version 1.
        (protocol.decode_template, b'{"ready": true, "pid": 7}\n', TemplateHello(7)),
        (protocol.decode_template, b'{"pid": 8}\n', Spawned(8)),
        (protocol.decode_template, b'{"error": "boom"}\n', SpawnRefused("boom")),
        (protocol.decode_worker, b'{"event": "ready", "restart_only": null}\n', WorkerReady()),
        (protocol.decode_worker, b'{"event": "closing", "connections": 1, "requests": 0}\n', WorkerClosing(1, 0)),
        (protocol.decode_worker, b'{"cmd": "drain"}\n', StopAccepting()),
        (
            protocol.decode_control,
            b'{"cmd": "reload", "source": "http", "request_id": "r1"}\n',
            ReloadRequest("http", "r1", None),
        ),
        (protocol.decode_control, b'{"reload_id": "abc"}\n', ReloadAccepted("abc")),
        (protocol.decode_control, b'{"error": "no"}\n', Refused("no")),
    ],
)
def test_messages_without_a_version_are_version_1(decode: Any, wire: bytes, expected: object) -> None:
    assert decode(wire) == expected


def test_unknown_fields_are_ignored() -> None:
    # An additive change keeps the version: an older reader skips what it does not know.
    line = b'{"event": "failed", "reason": "x", "hint": "new field", "v": 1}\n'
    assert protocol.decode_worker(line) == WorkerFailed("x")
    spec = {**SPEC.as_dict(), "a_setting_from_the_future": 1}
    data = json.dumps({"cmd": "spawn", "spec": spec, "v": 1}).encode()
    assert protocol.decode_template(data) == SpawnRequest(SPEC)


@pytest.mark.parametrize("decode", [protocol.decode_template, protocol.decode_worker, protocol.decode_control])
def test_a_newer_version_is_refused_clearly(decode: Any) -> None:
    future = PROTOCOL_VERSION + 1
    with pytest.raises(ProtocolError, match=f"protocol version {future}.*incompatible pypnm versions"):
        decode(json.dumps({"cmd": "status", "event": "serving", "pid": 1, "v": future}).encode())


@pytest.mark.parametrize(
    ("decode", "wire", "problem"),
    [
        (protocol.decode_worker, b'{"event": "exploded", "v": 1}', "unknown event 'exploded'"),
        (protocol.decode_worker, b'{"cmd": "dance"}', "unknown command 'dance'"),
        (protocol.decode_worker, b'{"cmd": ["serve"]}', "unknown command"),
        (protocol.decode_control, b'{"cmd": "shutdown"}', "unknown command 'shutdown'"),
        (protocol.decode_control, b'{"hello": 1}', "unknown message"),
        (protocol.decode_template, b'{"cmd": "exec"}', "unknown command 'exec'"),
        (protocol.decode_template, b'{"something": "else"}', "unknown message"),
    ],
)
def test_unknown_kinds_are_refused(decode: Any, wire: bytes, problem: str) -> None:
    with pytest.raises(ProtocolError, match=problem):
        decode(wire)


@pytest.mark.parametrize(
    ("decode", "wire", "problem"),
    [
        (protocol.decode_worker, b"\x00\xff garbage", "not JSON"),
        (protocol.decode_worker, b"", "not JSON"),
        (protocol.decode_control, b"[1, 2]", "JSON object, not list"),
        (protocol.decode_control, b'"reload"', "JSON object, not str"),
        (protocol.decode_worker, b'{"event": "closing", "connections": "2", "requests": 0}', "'connections' is str"),
        (protocol.decode_worker, b'{"event": "failed"}', "'reason' is missing"),
        (protocol.decode_worker, b'{"event": "ready", "restart_only": [1]}', "'restart_only' must be an object"),
        (protocol.decode_template, b'{"pid": true}', "'pid' is bool, not int"),
        (protocol.decode_template, b'{"cmd": "spawn", "spec": {"app": "x"}}', "bad worker spec"),
        (protocol.decode_template, b'{"cmd": "spawn"}', "'spec' is missing"),
        (protocol.decode_template, b'{"cmd": "standby", "nice": 10}', "'drop' is missing"),
        (protocol.decode_template, b'{"cmd": "standby", "drop": "app", "nice": 10}', "'drop' must be a list"),
        (protocol.decode_template, b'{"standby": 3, "took_ms": {"drop": "2"}}', "'took_ms' must map step names"),
        (protocol.decode_template, b'{"standby": 3, "took_ms": {"drop": -2}}', "'took_ms' must map step names"),
        (protocol.decode_template, b'{"zygote": 3, "nice": 0, "took_ms": {"import": true}}', "'took_ms' must map"),
        (protocol.decode_template, b'{"zygote": 3, "nice": 0, "adapters": [1, -2]}', "'adapters' must be two counts"),
        (protocol.decode_template, b'{"zygote": 3, "nice": 0, "adapters": {"reused": 1}}', "'adapters' must be two"),
        (protocol.decode_template, b'{"zygote": 3, "nice": 0, "contexts": [1, 2, 3]}', "'contexts' must be two counts"),
        (protocol.decode_template, b'{"zygote": 3, "nice": 0, "cpu_ms": -1}', "'cpu_ms' must be a count"),
        (protocol.decode_template, b'{"zygote": 3, "nice": 0, "cpu_ms": true}', "'cpu_ms' must be a count"),
        (protocol.decode_template, b'{"zygote": 3, "nice": 0, "cpu_ms": 1.5}', "'cpu_ms' must be a count"),
        (protocol.decode_control, b'{"cmd": "status", "v": "1"}', "version '1' is not a number"),
        (protocol.decode_control, b'{"cmd": "status", "v": 0}', "protocol version 0"),
        (protocol.decode_control, b"[" * 30000 + b"]" * 30000, "nested too deep"),
        (protocol.decode_handover, b'{"a": ' * 30000 + b"1" + b"}" * 30000, "nested too deep"),
    ],
)
def test_garbage_raises_one_protocol_error(decode: Any, wire: bytes, problem: str) -> None:
    with pytest.raises(ProtocolError, match=problem) as caught:
        decode(wire)
    assert "\n" not in str(caught.value)  # one line, fit for a log line or a reload's reason


def test_a_standby_request_is_a_command_of_its_own() -> None:
    # Not a flag on "zygote", which a zygote of an older pypnm would ignore and import: an unknown
    # command, which it refuses (SpawnRefused), and the master then forks as before.
    wire = protocol.encode_template(StandbyRequest(["app.main"], nice=10))
    assert json.loads(wire)["cmd"] == "standby"
    data = json.dumps({"cmd": "zygote", "spec": SPEC.as_dict(), "nice": 0, "drop": ["app.main", 3]}).encode()
    with pytest.raises(ProtocolError, match="'drop' must be a list of module names"):
        protocol.decode_template(data)


def test_a_protocol_error_names_its_channel() -> None:
    with pytest.raises(ProtocolError, match=r"^control channel: ") as caught:
        protocol.decode_control(b"nope")
    assert caught.value.channel == "control"


def test_a_bad_deadline_never_expires() -> None:
    # As version 1 masters read it: a deadline that is not a number is no deadline.
    assert protocol.decode_control(b'{"cmd": "reload", "deadline": "soon"}') == ReloadRequest(deadline=None)


@pytest.mark.parametrize(("graceful", "seconds"), [(0.5, 1), (1.0, 1), (4.2, 5), (30.0, 30)])
def test_a_worker_is_given_whole_seconds_to_drain_and_never_fewer(graceful: float, seconds: int) -> None:
    """uvicorn takes whole seconds; the master kills a stopping worker only once that time is over."""
    spec = WorkerSpec("app:app", 1, "/snap", [], {}, graceful_timeout=graceful)
    assert spec.drain_seconds() == seconds
