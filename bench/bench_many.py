"""Benchmark: many managers in one process on one shared state file.

Run against the installed wheel:  python bench/bench_many.py [--managers 1000]

Each manager picks one port (6,001-port range by default), then the process
idles for `--idle` seconds with the default 10 s refresh interval. Prints the
resident memory the managers added, the descriptors open, and the CPU used
while idle (as a share of one core). Asserts nothing: speed and size goals
live here, not in tests. Uses a private registry and state folder.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

from dynamic_port_manager import DynamicPortManager


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--managers", type=int, default=1000)
    parser.add_argument("--start", type=int, default=30000)
    parser.add_argument("--end", type=int, default=36000)
    parser.add_argument("--idle", type=float, default=12.0, help="seconds to idle")
    parser.add_argument("--dir", default=None, help="where state files go (default: $TMPDIR)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        os.environ["DPM_REGISTRY_DIR"] = str(Path(tmp) / "registry")
        state = Path(tmp) / "shared.json"
        # One manager first, so the figures below are the managers' own cost
        # and not the first import and thread start-up.
        first = DynamicPortManager(args.start, args.end, state, console_log=False)
        first.pick_port()
        rss0, fds0 = rss_mb(), open_fds()
        started = time.perf_counter()
        managers = [
            DynamicPortManager(args.start, args.end, state, console_log=False)
            for _ in range(args.managers - 1)
        ]
        for m in managers:
            m.pick_port()
        made = time.perf_counter() - started
        rss1, fds1 = rss_mb(), open_fds()
        cpu0, wall0 = cpu_seconds(), time.perf_counter()
        time.sleep(args.idle)
        cpu1, wall1 = cpu_seconds(), time.perf_counter()
        rss2 = rss_mb()
        idle_share = (cpu1 - cpu0) / (wall1 - wall0) * 100
        started = time.perf_counter()
        for m in [first, *managers]:
            m.stop()
        stopped = time.perf_counter() - started
        print(f"{args.managers} managers on one state file, range {args.start}-{args.end}")
        print(f"  create + pick each:     {made:8.2f} s ({made / args.managers * 1e3:.2f} ms each)")
        print(
            f"  RSS growth:             {rss1 - rss0:8.1f} MB (after {args.idle:.0f} s idle: "
            f"{rss2 - rss0:.1f} MB)"
        )
        print(f"  open descriptors:       {fds1} (before the managers: {fds0})")
        print(f"  idle CPU:               {idle_share:8.2f} % of one core over {args.idle:.0f} s")
        print(f"  stop all:               {stopped:8.2f} s")


if __name__ == "__main__":
    main()
