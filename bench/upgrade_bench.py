"""Self-upgrade benchmark: pypnm's self-upgrade under load against the restart an operator does today.

Two servers of the reload benchmark's app (bench/app.py), each under the same open-loop load:

- `uvicorn-restart`: `uvicorn benchpkg:app --workers 2`, replaced the way `systemctl restart`
  does it: SIGTERM, wait until it has exited, start it again on the same port;
- `pypnm-upgrade`: `pypnm serve --workers 2`, upgraded in place by SIGUSR2 to its master (a new
  master in a fresh interpreter takes the listening socket over; see the README, "Self-upgrade").

Each is replaced `--upgrades` times; the report gives the failed requests and the longest request
in the windows (from the trigger until the replacement serves, plus 1 s), and the windows' p99
against the steady p99. Load, process handling and statistics are the reload benchmark's
(reload_bench.py). See bench/README.md.

    python bench/upgrade_bench.py                     # both servers, 10 replacements each, ~100 req/s
    python bench/upgrade_bench.py --only pypnm-upgrade --upgrades 3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))  # reload_bench, beside this file

import reload_bench as rb

APP = rb.AppChoice("small", 0)  # the reload benchmark's small app (bench/app.py)

WINDOW = 1.0  # seconds after a replacement serves that still count to its window
OPERATION_TIMEOUT = 180.0  # a replacement that takes longer is reported as failed and ends the run


@dataclass
class Operation:
    trigger: float  # monotonic
    done: float | None  # monotonic: the replacement serves (pypnm: the old master has exited)
    old_pid: int
    new_pid: int | None


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def answers(base_url: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(base_url + "/", timeout=2.0, trust_env=False).status_code == 200
    return False


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise RuntimeError(f"{what}: not within {timeout:.0f}s")


class Target:
    """One server under test, started in `workdir` (its log: server.log), replaced by `replace`."""

    name = ""
    title = ""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = rb.free_port()
        self.base_url = f"http://{rb.HOST}:{self.port}"
        rb.AppCopy(workdir, APP)
        self.log_path = workdir / "server.log"
        self._log = self.log_path.open("ab")
        self.process = self._launch()
        wait_for(lambda: answers(self.base_url), rb.STARTUP_TIMEOUT, f"{self.name} start")

    def command(self) -> list[str]:
        raise NotImplementedError

    def _launch(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            self.command(),
            cwd=self.workdir,
            env=rb.clean_env(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def replace(self) -> Operation:
        raise NotImplementedError

    def current_pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        """SIGTERM to the serving master, wait, then SIGKILL to its process group (its own session)."""
        pid = self.current_pid()
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        with contextlib.suppress(RuntimeError):
            wait_for(lambda: not alive(pid), 30, "stop")
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)
        self._log.close()


class UvicornRestart(Target):
    name = "uvicorn-restart"
    title = "uvicorn --workers 2, stopped (SIGTERM, wait) then started again"

    def command(self) -> list[str]:
        return rb._uvicorn("--workers", "2")(self.port, APP.spec)

    def replace(self) -> Operation:
        old = self.process
        trigger = time.monotonic()
        old.send_signal(signal.SIGTERM)
        old.wait(timeout=OPERATION_TIMEOUT)
        self.process = self._launch()
        wait_for(lambda: answers(self.base_url), OPERATION_TIMEOUT, "restart")
        return Operation(trigger, time.monotonic(), old.pid, self.process.pid)


class PypnmUpgrade(Target):
    name = "pypnm-upgrade"
    title = "pypnm serve --workers 2, kill -USR2 <master> (self-upgrade)"

    def __init__(self, workdir: Path) -> None:
        self.pid_file = workdir / "pypnm.pid"
        super().__init__(workdir)

    def command(self) -> list[str]:
        return rb._pypnm("--workers", "2", "--pid-file", str(self.pid_file))(self.port, APP.spec)

    def current_pid(self) -> int:
        return int(self.pid_file.read_text())

    def replace(self) -> Operation:
        old = self.current_pid()
        trigger = time.monotonic()
        os.kill(old, signal.SIGUSR2)

        def handed_over() -> bool:
            with contextlib.suppress(OSError, ValueError):
                if self.current_pid() != old and not alive(old):
                    return True
            if old == self.process.pid:
                self.process.poll()  # the first master is our child: reap it, or it stays a zombie
            return False

        wait_for(handed_over, OPERATION_TIMEOUT, "self-upgrade")
        return Operation(trigger, time.monotonic(), old, self.current_pid())


TARGETS: dict[str, type[Target]] = {"uvicorn-restart": UvicornRestart, "pypnm-upgrade": PypnmUpgrade}


@dataclass
class Result:
    name: str
    title: str
    replacements: int
    rate: float
    requests: int
    failed: dict[str, int]
    failed_in_windows: int
    durations: list[float]  # trigger -> the replacement serves
    longest_in_windows: float | None
    window_p99: float | None
    steady_p99: float | None
    steady_p50: float | None
    pids: list[int]
    load: tuple[float, float]


def run(kind: type[Target], args: argparse.Namespace, workdir: Path) -> Result:
    load_before = os.getloadavg()[0]
    target = kind(workdir)
    load = rb.LoadGenerator(target.base_url, args.rate)
    operations: list[Operation] = []
    pids = [target.current_pid()]
    try:
        load.start()
        time.sleep(args.quiet)
        for number in range(1, args.upgrades + 1):
            operation = target.replace()
            operations.append(operation)
            pids.append(operation.new_pid or 0)
            took = (operation.done or operation.trigger) - operation.trigger
            print(f"  {kind.name}: replacement {number}/{args.upgrades}: {took:.2f}s", file=sys.stderr)
            time.sleep(args.spacing)
    finally:
        load.stop()
        target.stop()
    samples = [s for s in load.samples if s.kind != "slow"]
    windows = [(op.trigger, (op.done or op.trigger) + WINDOW) for op in operations]

    def in_window(sent: float) -> bool:
        return any(start <= sent < end for start, end in windows)

    inside = [s for s in samples if in_window(s.sent)]
    outside = [s for s in samples if not in_window(s.sent)]
    return Result(
        name=kind.name,
        title=kind.title,
        replacements=len(operations),
        rate=args.rate,
        requests=len(samples),
        failed=dict(Counter(s.error for s in samples if s.error)),
        failed_in_windows=sum(1 for s in inside if s.error),
        durations=[(op.done or op.trigger) - op.trigger for op in operations],
        longest_in_windows=max((s.latency for s in inside), default=None),
        window_p99=rb.percentile([s.latency for s in inside if not s.error], 99),
        steady_p99=rb.percentile([s.latency for s in outside if not s.error], 99),
        steady_p50=rb.percentile([s.latency for s in outside if not s.error], 50),
        pids=pids,
        load=(load_before, os.getloadavg()[0]),
    )


def print_report(results: list[Result]) -> None:
    for r in results:
        print(f"=== {r.name}: {r.title} ===")
        print(
            f"{r.replacements} replacements under {r.rate:g} req/s; {r.requests} requests; "
            f"load average {r.load[0]:.2f} before, {r.load[1]:.2f} after"
        )
        durations = sorted(r.durations)
        if durations:
            print(
                f"  trigger -> replacement serves: median {rb.secs(rb.median(durations))}  "
                f"min {rb.secs(durations[0])}  max {rb.secs(durations[-1])}"
            )
        print(f"  failed requests: {rb.kinds(r.failed) if r.failed else 'none'} ({r.failed_in_windows} in windows)")
        print(
            f"  longest request in a window: {rb.msecs(r.longest_in_windows)}; window p99 {rb.msecs(r.window_p99)}, "
            f"steady p99 {rb.msecs(r.steady_p99)} (p50 {rb.msecs(r.steady_p50)})"
        )
        if r.window_p99 is not None and r.steady_p99:
            print(f"  window p99 / steady p99 = {r.window_p99 / r.steady_p99:.2f}x")
        print(f"  master pids: {' -> '.join(map(str, r.pids))}")
    print()
    print("| server | replacements | failed requests | longest request in a window | window p99 / steady p99 |")
    print("|---|---|---|---|---|")
    for r in results:
        shown = f"{r.window_p99 / r.steady_p99:.2f}x" if r.window_p99 is not None and r.steady_p99 else "-"
        shown += f" ({rb.msecs(r.window_p99)} vs {rb.msecs(r.steady_p99)})"
        failed = sum(r.failed.values())
        print(f"| {r.name} | {r.replacements} | {failed} | {rb.msecs(r.longest_in_windows)} | {shown} |")
    pypnm = next((r for r in results if r.name == "pypnm-upgrade"), None)
    if pypnm is not None:
        failed = sum(pypnm.failed.values())
        print(f"target: 0 failed requests for pypnm: {'MET' if failed == 0 else 'MISSED'} ({failed})")
        if pypnm.window_p99 is not None and pypnm.steady_p99:
            ratio = pypnm.window_p99 / pypnm.steady_p99
            print(f"target: window p99 <= 1.5x steady: {'MET' if ratio <= 1.5 else 'MISSED'} ({ratio:.2f}x)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--upgrades", type=int, default=10, help="replacements per server (default 10)")
    parser.add_argument("--rate", type=float, default=100.0, help="requests per second in total (default 100)")
    parser.add_argument("--quiet", type=float, default=8.0, help="seconds of load before the first replacement")
    parser.add_argument("--spacing", type=float, default=3.0, help="seconds of load after each replacement serves")
    parser.add_argument("--only", action="append", choices=sorted(TARGETS), help="run only this server (repeatable)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (server logs)")
    args = parser.parse_args(argv)
    if not 1 <= args.upgrades <= 100:
        parser.error("--upgrades must be 1-100")
    if not 1 <= args.rate <= 2000:
        parser.error("--rate must be 1-2000")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="pypnm-upgrade-bench-"))
    results = []
    try:
        for name in args.only or list(TARGETS):
            print(f"{name}: starting ({scratch / name})", file=sys.stderr)
            results.append(run(TARGETS[name], args, scratch / name))
    finally:
        if args.keep:
            print(f"kept {scratch}", file=sys.stderr)
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    print_report(results)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
