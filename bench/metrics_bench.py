"""Metrics benchmark: steady throughput of pypnm with metrics on vs off, in the same run.

Two supervised pypnm servers run side by side on 127.0.0.1, identical but for
`PYPNM_METRICS_ENABLED` (true / false). A closed-loop load (CONNECTIONS keep-alive
connections, each sending its next request as soon as the last one was answered) drives one
server at a time, in alternating rounds (on, off, on, off, ...), so that drift in the
machine's other load hits both alike. Two ratios are printed, metrics on / off:

- throughput: answers per second, the on-rounds' mean over the off-rounds' mean;
- capacity: the inverse of the workers' CPU time per answer (utime + stime from /proc, over
  the same rounds), i.e. the throughput each would reach with a CPU to itself. On a machine
  with other load the first ratio moves by several percent from run to run; the second
  hardly does, because time the server waits for a CPU is not counted.

Target: >= 0.95.

The client speaks HTTP/1.1 over raw asyncio streams with the request bytes prepared once:
an HTTP library in the same interpreter would cost more per request than the server's
metrics do, and the benchmark would measure the client.

    python bench/metrics_bench.py                    # 6 rounds of 5 s on /ready, 1 worker each
    python bench/metrics_bench.py --rounds 10 --seconds 3 --path /health
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

HOST = "127.0.0.1"  # the only address this benchmark ever talks to
STARTUP_TIMEOUT = 40.0
ANSWER_TIMEOUT = 10.0  # one answer slower than this ends the round as failed


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    workers: list[int] = field(default_factory=list)  # pids, from the status endpoint

    def cpu_seconds(self) -> float:
        """CPU time (user + system) its workers have used so far."""
        total = 0
        for pid in self.workers:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
        return total / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        """SIGTERM to the process we started, then SIGKILL to its own process group if it lingers."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(20)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(5)


def start_server(name: str, metrics: bool, workers: int, scratch: Path) -> Server:
    port = free_port()
    log = scratch / f"{name}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYPNM_")}
    env["PYPNM_METRICS_ENABLED"] = "true" if metrics else "false"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pypnm",
            "serve",
            "--host",
            HOST,
            "--port",
            str(port),
            "--workers",
            str(workers),
            "--no-access-log",
            "--log-level",
            "warning",
        ],
        cwd=scratch,
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    server = Server(name, proc, port, log)
    deadline = time.monotonic() + STARTUP_TIMEOUT
    for _ in range(int(STARTUP_TIMEOUT / 0.1)):
        if proc.poll() is not None:
            raise SystemExit(f"{name} exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://{HOST}:{port}/ready", timeout=1.0).status_code == 200:
                status = httpx.get(f"http://{HOST}:{port}/pypnm/system/webService/status", timeout=5.0).json()
                server.workers = [worker["pid"] for worker in status["workers"]]
                return server
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    server.stop()
    raise SystemExit(f"{name} did not get ready within {STARTUP_TIMEOUT:g}s")


async def _connection(port: int, request: bytes, until: float, counts: list[int]) -> None:
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        while time.monotonic() < until:
            writer.write(request)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), ANSWER_TIMEOUT)
            if not head.startswith(b"HTTP/1.1 200 "):
                raise RuntimeError(f"unexpected answer: {head[:80]!r}")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await asyncio.wait_for(reader.readexactly(length), ANSWER_TIMEOUT)
            counts[0] += 1
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _round(port: int, path: str, seconds: float, connections: int) -> tuple[int, float]:
    """Load one server for `seconds`; returns (answers, seconds it took)."""
    request = f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n".encode()
    counts = [0]
    started = time.monotonic()
    await asyncio.gather(*(_connection(port, request, started + seconds, counts) for _ in range(connections)))
    return counts[0], time.monotonic() - started


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6, help="rounds per server, alternating (1-50; default 6)")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per round (0.5-60; default 5)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load on each server first (default 2)")
    parser.add_argument("--connections", type=int, default=16, help="keep-alive connections (1-256; default 16)")
    parser.add_argument("--workers", type=int, default=1, help="workers per server (default 1)")
    parser.add_argument("--path", default="/ready", help="the route to request (default /ready, the cheapest)")
    args = parser.parse_args()
    if not (
        1 <= args.rounds <= 50
        and 0.5 <= args.seconds <= 60
        and 1 <= args.connections <= 256
        and 0 <= args.warmup <= 60
        and 1 <= args.workers <= 8
        and args.path.startswith("/")
    ):
        parser.error("a value is out of range (see --help)")

    print(f"load average before: {load_average()} ({os.cpu_count()} CPUs)", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="pypnm-metrics-bench-") as scratch:
        servers = {}
        try:
            for name, metrics in (("on", True), ("off", False)):
                servers[name] = start_server(f"metrics-{name}", metrics, args.workers, Path(scratch))
            rates: dict[str, list[float]] = {"on": [], "off": []}
            cpu_per_answer: dict[str, list[float]] = {"on": [], "off": []}
            sent_to_on = 0
            for name, server in servers.items():
                answers, _ = asyncio.run(_round(server.port, args.path, args.warmup, args.connections))
                sent_to_on += answers if name == "on" else 0
                print(f"warmed up {name}", file=sys.stderr)
            for number in range(args.rounds):
                order = ("on", "off") if number % 2 == 0 else ("off", "on")
                for name in order:
                    cpu = servers[name].cpu_seconds()
                    answers, took = asyncio.run(_round(servers[name].port, args.path, args.seconds, args.connections))
                    cpu_per_answer[name].append((servers[name].cpu_seconds() - cpu) / answers)
                    rates[name].append(rate := answers / took)
                    sent_to_on += answers if name == "on" else 0
                    print(
                        f"round {number + 1} metrics {name}: {rate:.0f} req/s, "
                        f"{cpu_per_answer[name][-1] * 1e6:.0f} us CPU per answer",
                        file=sys.stderr,
                    )
            scrape = httpx.get(f"http://{HOST}:{servers['on'].port}/metrics", timeout=10.0)
        finally:
            for server in servers.values():
                server.stop()

    counted = sum(
        float(line.rsplit(" ", 1)[1])
        for line in scrape.text.splitlines()
        if line.startswith("pypnm_http_requests_total{") and f'route="{args.path}"' in line
    )
    on, off = statistics.fmean(rates["on"]), statistics.fmean(rates["off"])
    ratio = on / off
    pairs = sorted(a / b for a, b in zip(rates["on"], rates["off"], strict=True))
    print(
        f"GET {args.path}, {args.workers} worker(s), {args.connections} keep-alive connections, "
        f"{args.rounds} x {args.seconds:g} s per server, alternating"
    )
    print(f"metrics on:  mean {on:.0f} req/s  (rounds: {', '.join(f'{r:.0f}' for r in rates['on'])})")
    print(f"metrics off: mean {off:.0f} req/s  (rounds: {', '.join(f'{r:.0f}' for r in rates['off'])})")
    print(
        f"throughput ratio on/off: {ratio:.3f}  (per round pair: median {statistics.median(pairs):.3f}, "
        f"min {pairs[0]:.3f}, max {pairs[-1]:.3f})  target >= 0.95: {'MET' if ratio >= 0.95 else 'MISSED'}"
    )
    cpu_on, cpu_off = statistics.fmean(cpu_per_answer["on"]), statistics.fmean(cpu_per_answer["off"])
    capacity = cpu_off / cpu_on
    print(
        f"worker CPU per answer: on {cpu_on * 1e6:.1f} us, off {cpu_off * 1e6:.1f} us; "
        f"capacity ratio on/off: {capacity:.3f}  target >= 0.95: {'MET' if capacity >= 0.95 else 'MISSED'}"
    )
    print(
        f"requests to {args.path} counted by the 'on' server's /metrics: {counted:.0f} "
        f"(answered to the load: {sent_to_on}; the rest are start-up probes)"
    )
    print(f"load average after: {load_average()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
