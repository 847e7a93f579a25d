"""Benchmark: one state file shared by many managers.

    python bench/bench_shared_file.py [--dir /dev/shm] [--leases 5900] [--procs 8]

Two measures, each in the same run as its reference:
- a pick + release on a state file that ``--leases`` other managers (in this
  process, each holding a port) share, against the same on a file no one
  else uses: the pick's median and the ratio; beside each, the floor of a
  pick on a file of that size (bench/floor, built with cargo: a save by
  exchange of a file of the state file's size, plus a probe and a lock), so
  that what the kernel must copy is told from what we add;
- ``--procs`` processes making 100 managers each on one shared state file,
  each picking and holding a port, all at once: picks per second, and ports
  held twice (every process reports its ports while it still holds them all);
  then, if portpicker is installed, as many processes taking 100 ports each
  from portpicker's portserver serving the same range (held until all have
  reported), in the same run.

Prints figures and the load average; asserts nothing.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from floor import FLOOR, build_floor, have_portpicker, run_floor  # noqa: E402
from peers import portserver_pick, running_portserver  # noqa: E402

START, END = 20000, 26000


def options(root: str) -> dict[str, Any]:
    return dict(
        json_path=os.path.join(root, "shared.json"),
        registry_dir=os.path.join(root, "reg"),
        console_log=False,
        refresh_interval=3600,
    )


def pick_with(others: int, folder: str, cycles: int = 200) -> tuple[float, int]:
    """The median pick on a file ``others`` managers share, and the file's size."""
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
    me.pick_port()
    size = os.path.getsize(options(root)["json_path"])
    me.release_port()
    for m in held:
        m.stop()
    me.stop()
    return statistics.median(times) * 1e6, size


def pick_floor(binary: Path | None, folder: str, size: int) -> tuple[float, float] | None:
    """A save by exchange of a ``size``-byte file, and that plus a probe and a
    lock (a pick's floor), medians in us, from bench/floor."""
    if binary is None:
        return None
    root = Path(tempfile.mkdtemp(dir=folder))
    r = run_floor(binary, root / "floor", size, 300, END)
    save = float(r["save_exchange"][0])
    return save, save + float(r["probe"][0]) + float(r["lock_unlock"][0])


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


def portserver_worker(root: str, picks: int, go: float, results: Any, done: Any) -> None:
    while time.time() < go:
        time.sleep(0.001)
    t0 = time.perf_counter()
    held = [portserver_pick(START, END) for _ in range(picks)]
    took = time.perf_counter() - t0
    results.put((took, held))
    done.wait()  # the portserver holds each port for this process while it lives


def processes(procs: int, folder: str, picks: int = 100, target: Any = worker) -> tuple[float, int]:
    root = tempfile.mkdtemp(dir=folder)
    results: Any = mp.Queue()
    done = mp.Event()
    go = time.time() + 1.0
    workers = [
        mp.Process(target=target, args=(root, picks, go, results, done)) for _ in range(procs)
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
    parser.add_argument("--no-floor", action="store_true", help="skip bench/floor (needs cargo)")
    args = parser.parse_args()
    binary = None
    if not args.no_floor:
        target = (
            Path(os.environ["CARGO_TARGET_DIR"]) / "floor"
            if os.environ.get("CARGO_TARGET_DIR")
            else FLOOR / "target"
        )
        binary = build_floor(target)

    def against(ours: float, size: int) -> str:
        floor = pick_floor(binary, args.dir, size)
        if floor is None:
            return f"{ours:.0f} us ({size:,} B file)"
        return (
            f"{ours:.0f} us ({size:,} B file; floor: save by exchange {floor[0]:.0f} us, "
            f"+ probe + lock {floor[1]:.0f} us; ours {ours / floor[1]:.2f}x it)"
        )

    for _ in range(args.rounds):
        alone, alone_size = pick_with(0, args.dir)
        shared, shared_size = pick_with(args.leases, args.dir)
        print(f"pick on a file no one else uses: {against(alone, alone_size)}")
        print(
            f"pick with {args.leases:,} leases on the file: {against(shared, shared_size)}; "
            f"{shared / alone:.2f}x the first; load {os.getloadavg()[0]:.2f}"
        )
    with_portserver = have_portpicker()
    for _ in range(args.rounds):
        rate, twice = processes(args.procs, args.dir)
        line = (
            f"{args.procs} processes x 100 held picks on one state file: {rate:,.0f} "
            f"picks/s, ports held twice: {twice}"
        )
        if with_portserver:
            with running_portserver(START, END):
                ps_rate, ps_twice = processes(args.procs, args.dir, target=portserver_worker)
            line += (
                f"; portserver: {ps_rate:,.0f} picks/s (held twice: {ps_twice}); "
                f"ours {rate / ps_rate:.2f}x its rate"
            )
        print(f"{line}; load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
