"""Benchmark: does a pick cost more on a host full of other programs' sockets?

    python bench/bench_foreign_sockets.py [--dir /dev/shm] [--n 200] [--counts 5000,50000]

Opens listening TCP sockets that are not ours, on loopback addresses
(127.0.1.x), each bound to port 0 (so the kernel gives each a port of its
ephemeral range, /proc/sys/net/ipv4/ip_local_port_range), held by helper
processes (the file-descriptor limit is per process: each helper raises its
RLIMIT_NOFILE to the hard limit and holds at most that many). The managed range
is 6,001 ports outside the ephemeral range, so none of those sockets is in it.

Times, with those sockets open and with none (a quiet host), in alternating
rounds so that load from elsewhere on the machine hits both alike:
- a new manager + its first pick (each its own state file, one registry);
- ``refresh()`` on a manager made beforehand (it scans the kernel's tables).

Prints medians and the ratio to the quiet host's. Asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HELPER = r"""
import os, resource, socket, sys
count, address = int(sys.argv[1]), sys.argv[2]
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
held = []
for _ in range(count):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((address, 0))
    s.listen(1)
    held.append(s)
print("ready", flush=True)
sys.stdin.read()
"""


def ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(x) for x in f.read().split())
        return low, high
    except OSError:
        return 32768, 60999


def managed_range(size: int = 6001) -> tuple[int, int]:
    """`size` ports just below the ephemeral range (or above it), never below 1024."""
    low, high = ephemeral_range()
    if low - 1 - 1024 >= size:
        end = low - 1000 if low - 1000 - size >= 1024 else low - 1
        return end - size + 1, end
    if 65535 - high >= size:
        return high + 1, high + size
    raise SystemExit(f"no {size}-port range outside the ephemeral range {low}-{high}")


class ForeignSockets:
    """`count` listening sockets held by helper processes until close()."""

    def __init__(self, count: int) -> None:
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        low, high = ephemeral_range()
        # Below the fd limit (Python's own files) and below the ports one
        # address has in the ephemeral range.
        per_helper = max(1, min(hard - 100, (high - low + 1) - 1000, 15000))
        self.helpers: list[subprocess.Popen[str]] = []
        left, index = count, 0
        while left > 0:
            n = min(left, per_helper)
            address = f"127.0.1.{index + 1}"
            proc = subprocess.Popen(
                [sys.executable, "-c", HELPER, str(n), address],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            self.helpers.append(proc)
            left -= n
            index += 1
        for proc in self.helpers:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if line.strip() != "ready":
                self.close()
                raise SystemExit(f"a helper could not open its sockets (exit {proc.wait()})")

    def close(self) -> None:
        for proc in self.helpers:
            if proc.stdin is not None:
                proc.stdin.close()
        for proc in self.helpers:
            proc.wait(timeout=60)


def listening_count() -> int:
    """TCP sockets in LISTEN on the host (IPv4 + IPv6), from /proc."""
    total = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f, None)
                total += sum(1 for line in f if line.split()[3] == "0A")
        except OSError:
            pass
    return total


def measure(root: Path, tag: str, start: int, end: int, n: int) -> tuple[list[float], list[float]]:
    """n new managers + first pick, and n refresh() calls on one manager."""
    from dynamic_port_manager import DynamicPortManager

    opts: dict[str, Any] = dict(registry_dir=root / "reg", console_log=False, refresh_interval=3600)
    new: list[float] = []
    made = []
    for i in range(n):
        t0 = time.perf_counter()
        m = DynamicPortManager(start, end, json_path=root / f"{tag}-{i}.json", **opts)
        m.pick_port()
        new.append(time.perf_counter() - t0)
        made.append(m)
    for m in made:
        m.stop()
    refresh: list[float] = []
    with DynamicPortManager(start, end, json_path=root / f"{tag}-r.json", **opts) as m:
        m.pick_port()
        for _ in range(n):
            t0 = time.perf_counter()
            m.refresh()
            refresh.append(time.perf_counter() - t0)
    return new, refresh


def median_us(samples: list[float]) -> float:
    return statistics.median(samples) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", default=None, help="where state files + registry go")
    parser.add_argument("--n", type=int, default=200, help="samples per case and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--counts", default="5000,50000", help="foreign sockets per case")
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    start, end = managed_range()
    low, high = ephemeral_range()
    import dynamic_port_manager

    print(f"module: {dynamic_port_manager.__file__}")
    print(
        f"managed range {start}-{end}; ephemeral range {low}-{high}; "
        f"listening sockets on the host before: {listening_count()}; "
        f"load {os.getloadavg()[0]:.2f}"
    )
    quiet_new: list[float] = []
    quiet_refresh: list[float] = []
    busy: dict[int, tuple[list[float], list[float]]] = {c: ([], []) for c in counts}
    with tempfile.TemporaryDirectory(prefix="dpm-foreign-", dir=args.dir) as tmp:
        root = Path(tmp)
        measure(root, "warm", start, end, 20)
        for r in range(args.rounds):
            new, refresh = measure(root, f"quiet{r}", start, end, args.n)
            quiet_new += new
            quiet_refresh += refresh
            for count in counts:
                foreign = ForeignSockets(count)
                try:
                    seen = listening_count()
                    new, refresh = measure(root, f"busy{count}-{r}", start, end, args.n)
                finally:
                    foreign.close()
                busy[count][0].extend(new)
                busy[count][1].extend(refresh)
                if r == 0:
                    print(f"  with {count:,} foreign sockets open: {seen:,} listening on the host")
    qn, qr = median_us(quiet_new), median_us(quiet_refresh)
    print(f"\n{'host':<34}{'new manager + pick':>22}{'refresh()':>22}")
    print(f"{'quiet':<34}{qn:>15.0f} us     {qr:>15.0f} us")
    for count in counts:
        bn, br = median_us(busy[count][0]), median_us(busy[count][1])
        label = f"{count:,} listening sockets outside"
        print(f"{label:<34}{bn:>8.0f} us ({bn / qn:4.2f}x){br:>8.0f} us ({br / qr:4.2f}x)")
    print(f"(medians of {args.rounds} x {args.n} samples; load now {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
