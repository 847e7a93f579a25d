"""Benchmark: what `owners()` (who holds each used port) costs for a 6,001-port range.

Run against the installed wheel:  python bench/bench_owners.py [--rounds 200]

The cost is the kernel's socket dump plus a walk of /proc/<pid>/fd that stops
once every socket has a holder; the holder here is a process started last
(the highest pid), so the walk reads nearly every process's descriptors.
Prints medians and percentiles with the host's process and descriptor counts;
asserts nothing. Private registry under a temporary directory.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dynamic_port_manager import DynamicPortManager

HOLDER = """
import socket, sys
held = []
for port in map(int, sys.argv[1:]):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
        s.listen()
        held.append(s)
    except OSError:
        s.close()
print(len(held), flush=True)
sys.stdin.read()
"""


def host_size() -> tuple[int, int]:
    """Processes on the host, and the descriptors this user can see."""
    pids = [p for p in os.listdir("/proc") if p.isdigit()]
    fds = 0
    for pid in pids:
        try:
            fds += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            pass
    return len(pids), fds


def timed(label: str, call: object, rounds: int) -> None:
    assert callable(call)
    call()  # warm up
    us = []
    for _ in range(rounds):
        t = time.perf_counter()
        rows = call()
        us.append((time.perf_counter() - t) * 1e6)
    us.sort()
    q = statistics.quantiles(us, n=100)
    print(
        f"{label:<52} used={len(rows):>3}  median={statistics.median(us):8.1f} us"
        f"  p90={q[89]:8.1f} us  max={us[-1]:8.1f} us"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--start", type=int, default=30000)
    parser.add_argument("--end", type=int, default=36000)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--held", type=int, default=50, help="listeners a subprocess holds")
    args = parser.parse_args()
    processes, fds = host_size()
    print(
        f"range {args.start}-{args.end} ({args.end - args.start + 1} ports); "
        f"host: {processes} processes, {fds} descriptors visible"
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        manager = DynamicPortManager(
            args.start,
            args.end,
            root / "owners.json",
            registry_dir=root / "registry",
            console_log=False,
            refresh_interval=3600,
        )
        try:
            timed("owners(), nothing of ours in the range", manager.owners, args.rounds)
            leased = [manager.pick_port(pid=os.getpid()) for _ in range(args.held)]
            timed(f"owners(), {args.held} leases, no sockets", manager.owners, args.rounds)
            step = (args.end - args.start) // args.held
            ports = [args.start + 1 + i * step for i in range(args.held)]
            ports = [p for p in ports if p not in leased]
            holder = subprocess.Popen(
                [sys.executable, "-c", HOLDER, *map(str, ports)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            try:
                assert holder.stdout is not None
                bound = int(holder.stdout.readline())
                label = f"owners(), + {bound} listeners of the newest process"
                timed(label, manager.owners, args.rounds)
                timed("owners([one of them])", lambda: manager.owners(ports[:1]), args.rounds)
            finally:
                holder.communicate("", timeout=30)
        finally:
            manager.stop()


if __name__ == "__main__":
    main()
