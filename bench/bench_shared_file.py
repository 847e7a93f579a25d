"""Benchmark: one state file shared by many managers.

    python bench/bench_shared_file.py [--dir /dev/shm] [--leases 5900] [--procs 8]

Two measures, each in the same run as its reference:
- a pick + release on a state file that ``--leases`` other managers (in this
  process, each holding a port) share, against the same on a file no one
  else uses: the pick's median and the ratio;
- ``--procs`` processes making 100 managers each on one shared state file,
  each picking and holding a port, all at once: picks per second, and ports
  held twice (every process reports its ports while it still holds them all).

Prints figures and the load average; asserts nothing.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from collections import Counter
from typing import Any

START, END = 20000, 26000


def options(root: str) -> dict[str, Any]:
    return dict(
        json_path=os.path.join(root, "shared.json"),
        registry_dir=os.path.join(root, "reg"),
        console_log=False,
        refresh_interval=3600,
    )


def pick_with(others: int, folder: str, cycles: int = 200) -> float:
    from dynamic_port_manager import DynamicPortManager

    root = tempfile.mkdtemp(dir=folder)
    held = []
    for _ in range(others):
        m = DynamicPortManager(START, END, **options(root))
        m.pick_port()
        held.append(m)
    me = DynamicPortManager(START, END, **options(root))
    for _ in range(20):  # past backup_max: backups are recycled
        me.pick_port()
        me.release_port()
    times = []
    for _ in range(cycles):
        t = time.perf_counter()
        me.pick_port()
        times.append(time.perf_counter() - t)
        me.release_port()
    for m in held:
        m.stop()
    me.stop()
    return statistics.median(times) * 1e6


def worker(root: str, picks: int, go: float, results: Any, done: Any) -> None:
    from dynamic_port_manager import DynamicPortManager

    while time.time() < go:
        time.sleep(0.001)
    t0 = time.perf_counter()
    held = []
    for _ in range(picks):
        m = DynamicPortManager(START, END, **options(root))
        m.pick_port()
        held.append(m)
    took = time.perf_counter() - t0
    results.put((took, [m.active_port for m in held]))
    done.wait()  # every port stays held until all have reported


def processes(procs: int, folder: str, picks: int = 100) -> tuple[float, int]:
    root = tempfile.mkdtemp(dir=folder)
    results: Any = mp.Queue()
    done = mp.Event()
    go = time.time() + 1.0
    workers = [
        mp.Process(target=worker, args=(root, picks, go, results, done)) for _ in range(procs)
    ]
    for w in workers:
        w.start()
    reports = [results.get(timeout=300) for _ in workers]
    done.set()
    for w in workers:
        w.join()
    ports = Counter(p for _, held in reports for p in held)
    twice = sum(n - 1 for n in ports.values() if n > 1)
    return sum(ports.values()) / max(took for took, _ in reports), twice


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dir", default=tempfile.gettempdir())
    parser.add_argument("--leases", type=int, default=5900)
    parser.add_argument("--procs", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    for _ in range(args.rounds):
        alone = pick_with(0, args.dir)
        shared = pick_with(args.leases, args.dir)
        print(
            f"pick on a file no one else uses: {alone:.0f} us; with {args.leases:,} "
            f"leases on the file: {shared:.0f} us ({shared / alone:.2f}x); "
            f"load {os.getloadavg()[0]:.2f}"
        )
    for _ in range(args.rounds):
        rate, twice = processes(args.procs, args.dir)
        print(
            f"{args.procs} processes x 100 held picks on one state file: {rate:,.0f} "
            f"picks/s, ports held twice: {twice}; load {os.getloadavg()[0]:.2f}"
        )


if __name__ == "__main__":
    main()
