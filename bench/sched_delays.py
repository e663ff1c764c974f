"""Which process kept pypnm's serving workers waiting for a core during reloads: `perf sched` read against its log.

The window p99 of 10 reloads moves by tenths from run to run with the same code; the kernel's own
record of who waited for a core, and behind whom, shows changes that the request latencies hide.
This runs `reload_bench.py` once (`--only pypnm-4 --reload-import incremental --no-inflight
--no-broken --keep` by default, or the arguments after `--`; `--run` picks the pypnm server to
read when they run several) while `perf sched record -a` records every context switch on the
machine, then reads `perf sched timehist`:

- each wake-up of a serving worker (a worker of the generation that serves, from the swap that
  made it serve to its generation's drain, by the master's log) that waited over `--over` ms for a
  core;
- what ran on that core meanwhile, by role: another serving worker, a candidate or exiting worker,
  a zygote, the master, the benchmark's client (`python`), a kernel thread;
- those delays per second inside the reload windows (the first second after each trigger) and
  outside them, and per 50 ms after the trigger.

Needs `perf` (Debian: linux-perf) and the right to trace the scheduler (root, or
kernel.perf_event_paranoid <= -1). Run it on an otherwise idle machine, as the benchmark.
"""

from __future__ import annotations

import argparse
import bisect
import json
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from reload_bench import WINDOW, parse_log_line  # the window the benchmark reports on, its log reading
from reload_bench import parse_args as bench_parse_args
from reload_bench import runs as bench_runs

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_BENCH = ["--app", "big", "--reloads", "10", "--only", "pypnm-4", "--reload-import", "incremental"]
DEFAULT_BENCH += ["--no-inflight", "--no-broken"]
BIN = 0.05


@dataclass(frozen=True)
class Switch:
    """One line of `perf sched timehist`: a task that ran `run` ms until `end`, after waiting `delay` ms for a core."""

    end: float  # wall clock, seconds
    cpu: str
    comm: str
    pid: int
    delay: float  # ms runnable before it ran
    run: float  # ms it ran

    @property
    def start(self) -> float:
        return self.end - self.run / 1000

    @property
    def woken(self) -> float:
        return self.start - self.delay / 1000


class Roles:
    """Who each pid was, from the master's log: master, template, zygote, and each generation's workers."""

    def __init__(self, log: list[str]) -> None:
        self.role: dict[int, str] = {}
        self.workers: dict[int, int] = {}  # worker pid -> generation
        self.serving_since: dict[int, float] = {}  # generation -> the swap that made it serve
        self.drained_at: dict[int, float] = {}
        for line in log:
            parsed = parse_log_line(line)
            if parsed is None:
                continue
            self.role.setdefault(parsed.pid, parsed.role)
            message = parsed.message
            if spawned := re.match(r"worker spawned pid=(\d+) generation=(\d+)", message):
                self.workers[int(spawned.group(1))] = int(spawned.group(2))
            elif zygote := re.match(r"zygote imported pid=(\d+)", message):
                self.role[int(zygote.group(1))] = "zygote"
            elif template := re.match(r"fork template started pid=(\d+)", message):
                self.role[int(template.group(1))] = "template"
            elif swapped := re.search(r"swapped in .*generation (\d+) serving", message):
                self.serving_since[int(swapped.group(1))] = parsed.wall
            elif drained := re.match(r"generation (\d+) drained", message):
                self.drained_at[int(drained.group(1))] = parsed.wall

    def serving(self, pid: int, when: float) -> bool:
        generation = self.workers.get(pid)
        if generation is None or generation not in self.serving_since:
            return False
        return self.serving_since[generation] <= when < self.drained_at.get(generation, float("inf"))

    def name(self, switch: Switch) -> str:
        if switch.pid in self.workers:
            return "serving worker" if self.serving(switch.pid, switch.start) else "candidate or exiting worker"
        return self.role.get(switch.pid, switch.comm)


def read_timehist(text: str, offset: float) -> list[Switch]:
    switches = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 6 or not parts[1].startswith("["):
            continue
        task = re.search(r"^(.*)\[(\d+)(?:/(\d+))?\]$", parts[2])
        try:
            end, delay, run = float(parts[0]) + offset, float(parts[-2]), float(parts[-1])
        except ValueError:
            continue
        if task is None:
            continue
        pid = int(task.group(3) or task.group(2))
        switches.append(Switch(end, parts[1], task.group(1), pid, delay, run))
    return switches


def largest(amounts: dict[str, float], count: int) -> list[tuple[str, float]]:
    return sorted(amounts.items(), key=lambda item: -item[1])[:count]


def analyse(switches: list[Switch], roles: Roles, triggers: list[float], over: float) -> None:
    # One core runs one task at a time: its switches, in the order of their ends, are in the order of
    # their starts too, so those that ran while a task waited are found by bisection, not a scan.
    by_cpu: dict[str, list[Switch]] = defaultdict(list)
    for switch in sorted(switches, key=lambda s: s.end):
        by_cpu[switch.cpu].append(switch)
    ends = {cpu: [s.end for s in on_cpu] for cpu, on_cpu in by_cpu.items()}
    span = (min(s.end for s in switches), max(s.end for s in switches))
    inside: dict[str, float] = defaultdict(float)
    outside: dict[str, float] = defaultdict(float)
    waited = {"inside": 0.0, "outside": 0.0}
    per_bin: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for switch in switches:
        if switch.delay <= over or not roles.serving(switch.pid, switch.start):
            continue
        trigger = next((t for t in triggers if t <= switch.woken < t + WINDOW), None)
        blame = inside if trigger is not None else outside
        waited["inside" if trigger is not None else "outside"] += switch.delay
        on_cpu = by_cpu[switch.cpu]
        for index in range(bisect.bisect_right(ends[switch.cpu], switch.woken), len(on_cpu)):  # what ran meanwhile
            other = on_cpu[index]
            if other.start >= switch.start:
                break
            overlap = min(other.end, switch.start) - max(other.start, switch.woken)
            if overlap > 0 and other is not switch:
                blame[roles.name(other)] += overlap * 1000
                if trigger is not None:
                    per_bin[int((switch.woken - trigger) / BIN)][roles.name(other)] += overlap * 1000
    seconds_in = WINDOW * len(triggers)
    seconds_out = max(span[1] - span[0] - seconds_in, 1e-9)
    for label, blame, seconds in (("inside", inside, seconds_in), ("outside", outside, seconds_out)):
        print(
            f"{label} the reload windows ({seconds:.0f} s): serving workers waited "
            f"{waited[label] / seconds:.1f} ms per second in wake-ups over {over:g} ms; behind:"
        )
        for role, ms in largest(blame, 8):
            print(f"  {role:28} {ms / seconds:6.1f} ms/s")
    print("after the trigger, summed over the reloads (ms of waiting, behind whom):")
    for index in range(int(WINDOW / BIN)):
        blame = per_bin[index]
        top = ", ".join(f"{role} {ms:.0f}" for role, ms in largest(blame, 3))
        print(f"  {index * BIN * 1000:4.0f}-{(index + 1) * BIN * 1000:4.0f} ms: {sum(blame.values()):6.1f}  {top}")


def run_bench(bench_args: list[str]) -> str:
    """reload_bench.py with `bench_args`, its output shown as it comes; that output."""
    with subprocess.Popen(
        [sys.executable, str(BENCH_DIR / "reload_bench.py"), *bench_args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # where it says which directory it kept
        text=True,
    ) as bench:
        assert bench.stdout is not None
        lines = []
        for line in bench.stdout:  # ends when the benchmark exits (it bounds its own run)
            print(line, end="", flush=True)
            lines.append(line)
    return "".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--over", type=float, default=1.0, help="count wake-ups that waited over this many ms")
    parser.add_argument(
        "--run",
        help="the run to read when the benchmark ran several servers, by its name in reload_bench.py's "
        "report (e.g. 'pypnm-4[incremental]'); the others' processes still count as what ran on a core",
    )
    parser.add_argument("bench", nargs="*", help="reload_bench.py's arguments (after --); --keep is added")
    args = parser.parse_args(argv)
    bench_args = [*(args.bench or DEFAULT_BENCH), "--keep"]
    names = [name for name, _, _ in bench_runs(bench_parse_args(bench_args))]
    if args.run is None and len(names) != 1:
        parser.error(f"the benchmark will run {', '.join(names)}: name the one to read with --run")
    if args.run is not None and args.run not in names:
        parser.error(f"--run {args.run}: the benchmark will run {', '.join(names)}")
    if not (args.run or names[0]).startswith("pypnm"):
        parser.error("the run to read must be a pypnm server's: only its log says which pid is a serving worker")
    with tempfile.TemporaryDirectory(prefix="pypnm-sched-") as scratch:
        data = Path(scratch) / "perf.data"
        offset = time.time() - time.monotonic()  # perf's -k mono clock to the log's wall clock
        recorder = subprocess.Popen(
            ["perf", "sched", "record", "-k", "mono", "-a", "-o", str(data)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            out = run_bench(bench_args)  # its exit code says whether targets were met: not ours to judge
        finally:
            recorder.send_signal(signal.SIGINT)  # perf writes its data and exits
            recorder.wait(timeout=60)
        kept = re.search(r"server logs kept in (\S+)", out)
        if kept is None or not data.exists():
            print("the benchmark or perf failed: nothing to read", file=sys.stderr)
            return 1
        timehist = subprocess.run(
            ["perf", "sched", "timehist", "-i", str(data)], capture_output=True, text=True, check=True, timeout=600
        ).stdout
    run = Path(kept.group(1)) / (args.run or names[0])
    if not (run / "rounds.json").exists():
        print(f"{run.name} did not run (see the benchmark's output above): nothing to read", file=sys.stderr)
        return 1
    rounds = json.loads((run / "rounds.json").read_text())
    triggers = [r["trigger_wall"] for r in rounds if r["kind"] == "reload"]
    roles = Roles((run / "server.log").read_text(errors="replace").splitlines())
    print(f"\n=== {run.name}: serving workers' waits for a core (perf sched) ===")
    analyse(read_timehist(timehist, offset), roles, triggers, args.over)
    return 0


if __name__ == "__main__":
    sys.exit(main())
