"""Benchmark: picks from many processes at once, each with its own state file.

Run against the installed wheel:  python bench/bench_concurrent.py [--procs 8] [--picks 300]

Every process moves its active port --picks times in one shared range while
the others do the same; the parent then checks that no port was ever handed
to two live managers (each child claims its port with an O_EXCL file). Prints
throughput and per-pick percentiles; asserts only uniqueness.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from pathlib import Path


def worker(root: str, index: int, start: int, end: int, picks: int, go: float) -> None:
    from dynamic_port_manager import DynamicPortManager

    claims = Path(root) / "claims"
    manager = DynamicPortManager(
        start,
        end,
        json_path=Path(root) / f"svc{index}.json",
        registry_dir=Path(root) / "registry",
        refresh_interval=3600,
        console_log=False,
    )
    times, duplicates, held = [], 0, None
    while time.time() < go:
        time.sleep(0.001)
    for _ in range(picks):
        if held is not None:
            os.unlink(claims / str(held))  # before the pick that releases it
        t0 = time.perf_counter()
        port = manager.pick_port()
        times.append(time.perf_counter() - t0)
        try:
            os.close(os.open(claims / str(port), os.O_CREAT | os.O_EXCL))
            held = port
        except FileExistsError:
            duplicates += 1
            held = None
    if held is not None:
        os.unlink(claims / str(held))
    manager.stop()
    (Path(root) / f"out{index}.json").write_text(json.dumps([times, duplicates]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--procs", type=int, default=8)
    parser.add_argument("--picks", type=int, default=300)
    parser.add_argument("--start", type=int, default=30000)
    parser.add_argument("--end", type=int, default=36000)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as root:
        (Path(root) / "claims").mkdir()
        go = time.time() + 1.0
        ctx = mp.get_context("spawn")
        procs = [
            ctx.Process(target=worker, args=(root, i, args.start, args.end, args.picks, go))
            for i in range(args.procs)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=600)
        wall = time.time() - go
        results = [json.loads((Path(root) / f"out{i}.json").read_text()) for i in range(args.procs)]
    times = sorted(t * 1e6 for r in results for t in r[0])
    duplicates = sum(r[1] for r in results)
    q = statistics.quantiles(times, n=100)
    print(
        f"{args.procs} processes x {args.picks} moving picks, range {args.start}-{args.end}: "
        f"{len(times) / wall:,.0f} picks/s overall; per pick "
        f"median={statistics.median(times):.0f} us p90={q[89]:.0f} us p99={q[98]:.0f} us; "
        f"ports held twice: {duplicates}"
    )
    assert duplicates == 0, "a port was handed to two live managers"


if __name__ == "__main__":
    main()
