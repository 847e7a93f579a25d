"""Benchmark: what a pick, a pick+release cycle and a full-range refresh cost.

Run against the installed wheel:  python bench/bench_pick.py [--picks 1000]

Prints medians and percentiles; asserts nothing (speed goals live here, not in
tests). Uses a private registry and state folder under a temporary directory,
and the range 30000-36000 (6,001 ports) unless told otherwise.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from dynamic_port_manager import DynamicPortManager


def summary(label: str, seconds: list[float]) -> None:
    us = sorted(s * 1e6 for s in seconds)
    q = statistics.quantiles(us, n=100)
    print(
        f"{label:<44} n={len(us):>5}  median={statistics.median(us):8.1f} us"
        f"  p90={q[89]:8.1f} us  p99={q[98]:8.1f} us  max={us[-1]:8.1f} us"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--start", type=int, default=30000)
    parser.add_argument("--end", type=int, default=36000)
    parser.add_argument("--picks", type=int, default=1000)
    parser.add_argument("--durable", action="store_true", help="fsync every save")
    parser.add_argument("--dir", default=None, help="where state files go (default: $TMPDIR)")
    args = parser.parse_args()
    print(
        f"range {args.start}-{args.end} ({args.end - args.start + 1} ports), "
        f"durable={args.durable}, folder={args.dir or tempfile.gettempdir()}"
    )

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        common = dict(
            registry_dir=root / "registry",
            console_log=False,
            refresh_interval=3600,
            durable=args.durable,
        )

        # 1. Picks that hold their ports: one manager per service, each with its
        #    own state file, all in one host registry (the registry grows to
        #    --picks leases, so later picks pay for a bigger table).
        managers = [
            DynamicPortManager(args.start, args.end, json_path=root / f"svc{i}.json", **common)
            for i in range(args.picks)
        ]
        held, hold_times = [], []
        for m in managers:
            t0 = time.perf_counter()
            held.append(m.pick_port())
            hold_times.append(time.perf_counter() - t0)
        assert len(set(held)) == len(held), "duplicate port handed out"
        summary(f"pick, holding (1..{args.picks} leases held)", hold_times)

        # 2. Full-range refresh with all those leases in place.
        refresh_times = []
        for m in managers[:200]:
            t0 = time.perf_counter()
            m.refresh()
            refresh_times.append(time.perf_counter() - t0)
        summary("refresh (kernel scan + save), one manager", refresh_times)
        for m in managers:
            m.stop()

        # 3. Pick + release cycles on one manager (the common test-fixture use).
        m = DynamicPortManager(args.start, args.end, json_path=root / "cycle.json", **common)
        cycle_times = []
        for _ in range(args.picks):
            t0 = time.perf_counter()
            m.pick_port()
            m.release_port()
            cycle_times.append(time.perf_counter() - t0)
        summary("pick + release cycle, one manager", cycle_times)

        # 4. Moving the active port (pick while holding: old one released).
        move_times = []
        for _ in range(args.picks):
            t0 = time.perf_counter()
            m.pick_port()
            move_times.append(time.perf_counter() - t0)
        summary("pick that moves the active port", move_times)
        m.stop()


if __name__ == "__main__":
    main()
