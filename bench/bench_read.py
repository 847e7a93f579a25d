"""What a read costs when nothing changed: `get_state()` on a manager whose
state file no one wrote since, beside `json.loads` of the same state (the part
of a read that is the answer's own size, not the freshness check).

    python bench/bench_read.py [--reads 2000]

Each read first checks whether any process saved the file since (a `pread`
of its slot's change counter and a `stat`), then answers from memory. The
difference of the two columns is that check plus the copy out of the core.
Printed for a small range (11 ports) and the default one (6,001 ports).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

from dynamic_port_manager import DynamicPortManager


def median_us(f: object, n: int) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter_ns()
        f()  # type: ignore[operator]
        times.append(time.perf_counter_ns() - t)
    return statistics.median(times) / 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reads", type=int, default=2000)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="dpm-bench-read-")
    os.environ.setdefault("DPM_REGISTRY_DIR", os.path.join(work, "registry"))
    print(f"# load {os.getloadavg()[0]:.1f}; {args.reads} reads each; medians")
    print("range, get_state() us, json.loads of its answer us, check + copy us")
    for start, end in ((43000, 43010), (3000, 9000)):
        m = DynamicPortManager(start, end, os.path.join(work, f"s{end}.json"), console_log=False)
        m.pick_port()
        text = json.dumps(m.get_state())
        read = median_us(m.get_state, args.reads)
        parse = median_us(lambda text=text: json.loads(text), args.reads)
        print(f"{end - start + 1}, {read:.1f}, {parse:.1f}, {read - parse:.1f}")
        m.stop()


if __name__ == "__main__":
    main()
