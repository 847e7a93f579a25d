"""What a new manager costs: its constructor and first pick, the first pick of
a manager made beforehand, and the memory each one keeps.

    python bench/bench_new_manager.py [--dir /dev/shm] [--n 300]

Every manager has its own state file, all in one folder, one registry, as in
bench/peers.py's (a). Prints medians in us and the RSS growth per manager.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", default=None, help="where state files + registry go")
    parser.add_argument("--n", type=int, default=300, help="managers per case")
    args = parser.parse_args()

    from dynamic_port_manager import DynamicPortManager

    with tempfile.TemporaryDirectory(prefix="dpm-new-", dir=args.dir) as tmp:
        root = Path(tmp)
        opts = dict(registry_dir=root / "reg", console_log=False, refresh_interval=3600)
        held = [DynamicPortManager(20000, 26000, json_path=root / "warm.json", **opts)]
        held[0].pick_port()
        rss_before = rss_bytes()
        new: list[float] = []
        for i in range(args.n):
            t0 = time.perf_counter()
            m = DynamicPortManager(20000, 26000, json_path=root / f"new{i}.json", **opts)
            m.pick_port()
            new.append(time.perf_counter() - t0)
            held.append(m)
        per_manager = (rss_bytes() - rss_before) / args.n
        made = [
            DynamicPortManager(20000, 26000, json_path=root / f"made{i}.json", **opts)
            for i in range(args.n)
        ]
        first: list[float] = []
        for m in made:
            t0 = time.perf_counter()
            m.pick_port()
            first.append(time.perf_counter() - t0)
        for m in held + made:
            m.stop()
    print(f"folder: {args.dir or tempfile.gettempdir()}, {args.n} managers per case")
    print(f"new manager + first pick      median {statistics.median(new) * 1e6:8.0f} us")
    print(f"first pick, manager made before median {statistics.median(first) * 1e6:6.0f} us")
    print(f"memory kept per new manager   {per_manager / 1024:8.1f} KiB (RSS growth)")


if __name__ == "__main__":
    main()
