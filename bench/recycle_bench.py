"""Recycling benchmark: pypnm serve --workers 2 recycling a worker every ~100 requests, under load.

One pypnm server serves the reload benchmark's app (bench/app.py) under the same open-loop
load (reload_bench.LoadGenerator: keep-alive and fresh connections alternately). First a
steady phase without recycling; then a reload turns `limit_max_requests` on (the settings
file is rewritten, then SIGHUP), and the recycling phase runs for `--seconds`. Reported:
failed requests, recycles seen in the master's log, and the p99 latency of the recycling
phase against the steady phase's (target: 0 failed, p99 <= 1.5x steady). The few seconds
around the reload that switches recycling on belong to neither phase. See bench/README.md.

    python bench/recycle_bench.py                        # 20 s steady, 60 s recycling every 100 requests, 100 req/s
    python bench/recycle_bench.py --seconds 30 --limit 50 --rate 150
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from reload_bench import (
    SERVERS,
    AppChoice,
    LoadGenerator,
    Sample,
    Server,
    _setting,
    kinds,
    msecs,
    parse_log_line,
    percentile,
)

SWITCH_SETTLE = 3.0  # seconds after the reload that turns recycling on, left out of both phases
RECYCLED = re.compile(r"worker recycled pid=\d+ generation=\d+: (served \d+ requests \(limit \d+\)|RSS .*?):")


def settings_file(path: Path, limit: int, jitter: int | None) -> None:
    lines = [f"limit_max_requests = {limit}"]
    if jitter is not None:
        lines.append(f"limit_max_requests_jitter = {jitter}")
    scratch = path.with_suffix(".tmp")
    scratch.write_text("\n".join(lines) + "\n")
    os.replace(scratch, path)


def recycle_times(lines: list[str], wall_to_monotonic: float) -> list[float]:
    """When the master logged each recycle, on the load generator's clock."""
    times = []
    for line in lines:
        parsed = parse_log_line(line)
        if parsed and RECYCLED.search(parsed.message):
            times.append(parsed.wall - wall_to_monotonic)
    return times


def describe(name: str, samples: list[Sample]) -> tuple[str, float | None]:
    latencies = [s.latency for s in samples]
    p99 = percentile(latencies, 99)
    failed = Counter(s.error for s in samples if s.error)
    text = (
        f"{name}: {len(samples)} requests, failed: {kinds(dict(failed))}; "
        f"p50 {msecs(percentile(latencies, 50))} p99 {msecs(p99)} max {msecs(max(latencies, default=None))}"
    )
    return text, p99


def run(args: argparse.Namespace, workdir: Path) -> int:
    config = workdir / "pypnm.toml"
    workdir.mkdir(parents=True)
    settings_file(config, 0, None)
    env = {f"PYPNM_{name.upper()}": value for name, value in args.pypnm_setting}
    env |= {"PYPNM_CONFIG": str(config), "PYPNM_WATCH_CONFIG": "false"}  # SIGHUP is the one trigger
    load_before = os.getloadavg()[0]
    server = Server(SERVERS["pypnm"], workdir, AppChoice("small", 0), env)
    load: LoadGenerator | None = None
    wall_to_monotonic = time.time() - time.monotonic()
    try:
        sys.stderr.write(f"starting pypnm on port {server.port} (pid {server.pid})\n")
        server.wait_ready("r000")
        time.sleep(1.5)  # let both workers come up
        load = LoadGenerator(server.base_url, args.rate)
        load.start()
        time.sleep(1.0)  # warm the clients' connections
        steady = (time.monotonic(), time.monotonic() + args.steady)
        time.sleep(args.steady)
        sys.stderr.write(f"steady phase done; turning on limit_max_requests = {args.limit}\n")
        settings_file(config, args.limit, args.jitter)
        os.kill(server.pid, signal.SIGHUP)
        time.sleep(SWITCH_SETTLE)
        recycling = (time.monotonic(), time.monotonic() + args.seconds)
        time.sleep(args.seconds)
        sys.stderr.write("recycling phase done\n")
    finally:
        if load is not None:
            load.stop()
        server.stop()
    samples = [s for s in (load.samples if load else []) if s.kind != "slow"]
    lines = server.log_lines()
    recycles = [t for t in recycle_times(lines, wall_to_monotonic) if recycling[0] <= t < recycling[1]]
    steady_samples = [s for s in samples if steady[0] <= s.sent < steady[1]]
    recycling_samples = [s for s in samples if recycling[0] <= s.sent < recycling[1]]
    # Requests sent within 1 s after a recycle (nearly all of them at this pace) and those sent in the 0.5 s
    # before: the replacement's bring-up runs then, on the same CPUs.
    near = [s for s in recycling_samples if any(-0.5 <= s.sent - t < 1.0 for t in recycles)]
    all_failed = Counter(s.error for s in samples if s.error)

    steady_text, steady_p99 = describe("steady (no recycling)", steady_samples)
    recycling_text, recycling_p99 = describe(f"recycling ({len(recycles)} recycles)", recycling_samples)
    near_text, near_p99 = describe("  of which near a recycle (-0.5 s .. +1 s)", near)
    ratio = recycling_p99 / steady_p99 if recycling_p99 and steady_p99 else None
    # Where the tail sits: requests by when they were sent, from the nearest recycle line (logged once
    # the replacement accepts: before it, the replacement is being forked and brought up; after it,
    # the old worker drains).
    offsets = ((-1.0, -0.5), (-0.5, -0.25), (-0.25, 0.0), (0.0, 0.25), (0.25, 0.5), (0.5, 1.0))
    by_offset = []
    for low, high in offsets:
        latencies = [s.latency for s in recycling_samples if any(low <= s.sent - t < high for t in recycles)]
        by_offset.append(f"[{low:+.2f},{high:+.2f}) s: {len(latencies)} p99 {msecs(percentile(latencies, 99))}")
    print(
        "\n".join(
            [
                "",
                f"=== pypnm serve --workers 2, limit_max_requests = {args.limit}"
                f" (jitter {'a tenth' if args.jitter is None else args.jitter}), {args.rate:g} requests/s ===",
                f"machine: {os.cpu_count()} CPUs, load average {load_before:.2f} before, "
                f"{os.getloadavg()[0]:.2f} after",
                steady_text,
                recycling_text,
                near_text,
                "  p99 by send time from the nearest recycle line: " + "; ".join(by_offset),
                f"recycles: {len(recycles)} in {args.seconds:g} s ({len(recycles) / args.seconds:.2f}/s; "
                f"the {SWITCH_SETTLE:g} s after the reload that turned it on are in neither phase)",
                f"failed requests over the whole run: {kinds(dict(all_failed))}",
                f"recycling p99 / steady p99 = {ratio:.2f}x" if ratio else "recycling p99 / steady p99: -",
                "targets: 0 failed "
                + ("MET" if not all_failed else "MISSED")
                + "; p99 <= 1.5x steady "
                + ("MET" if ratio is not None and ratio <= 1.5 else "MISSED"),
            ]
        )
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "rate": args.rate,
                    "limit": args.limit,
                    "recycles": len(recycles),
                    "failed": dict(all_failed),
                    "steady_p99": steady_p99,
                    "recycling_p99": recycling_p99,
                    "near_recycle_p99": near_p99,
                    "ratio": ratio,
                },
                indent=2,
            )
        )
    return 0 if not all_failed and ratio is not None and ratio <= 1.5 else 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rate", type=float, default=100.0, help="requests per second in total (default 100)")
    parser.add_argument("--limit", type=int, default=100, help="limit_max_requests while recycling (default 100)")
    parser.add_argument(
        "--jitter", type=int, default=None, help="limit_max_requests_jitter (default: the setting's, a tenth)"
    )
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the recycling phase (default 60)")
    parser.add_argument("--steady", type=float, default=20.0, help="length of the steady phase (default 20)")
    parser.add_argument(
        "--pypnm-setting",
        action="append",
        type=_setting,
        default=[],
        metavar="NAME=VALUE",
        help="a pypnm setting, passed as PYPNM_NAME (repeatable), e.g. 'check_paths=[\"/\"]'",
    )
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory with the server log")
    args = parser.parse_args(argv)
    if not 10 <= args.rate <= 1000:
        parser.error("--rate must be between 10 and 1000")
    if not 10 <= args.limit <= 1_000_000:
        parser.error("--limit must be between 10 and 1000000")
    if not 5 <= args.seconds <= 600 or not 5 <= args.steady <= 600:
        parser.error("--seconds and --steady must be between 5 and 600")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="pypnm-recycle-bench-"))
    try:
        return run(args, scratch / "pypnm")
    finally:
        if args.keep:
            sys.stderr.write(f"server log kept in {scratch}\n")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
