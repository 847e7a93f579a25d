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
- a new manager + its first pick (each its own state file, one registry),
  and the process's CPU time per manager over the loop, all threads (the
  refresh thread's first scan of each new state file included);
- ``refresh()`` on a manager made beforehand (it scans the kernel's tables).

With ``--exact``, also what the other read-only way of asking the kernel
would cost and miss: sock_diag exact lookups (a request without NLM_F_DUMP
per port and family, on 127.0.0.1 and ::1, sent in batches) against the
filtered dump, for ranges of several sizes, and which listeners each finds.

Prints medians and the ratio to the quiet host's. Asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import statistics
import struct
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


def cpu_seconds() -> float:
    """This process's CPU time so far, every thread."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(
    root: Path, tag: str, start: int, end: int, n: int
) -> tuple[list[float], list[float], float]:
    """n new managers + first pick, n refresh() calls on one manager, and the
    CPU time per new manager (every thread, until their first scans ran)."""
    from dynamic_port_manager import DynamicPortManager

    opts: dict[str, Any] = dict(registry_dir=root / "reg", console_log=False, refresh_interval=3600)
    new: list[float] = []
    made = []
    cpu0 = cpu_seconds()
    for i in range(n):
        t0 = time.perf_counter()
        m = DynamicPortManager(start, end, json_path=root / f"{tag}-{i}.json", **opts)
        m.pick_port()
        new.append(time.perf_counter() - t0)
        made.append(m)
    # The refresh thread's first scans, if it has not run them yet, are part
    # of what the managers cost: a read waits for them (or takes them).
    for m in made:
        m.get_state()
    cpu = (cpu_seconds() - cpu0) / n
    for m in made:
        m.stop()
    refresh: list[float] = []
    with DynamicPortManager(start, end, json_path=root / f"{tag}-r.json", **opts) as m:
        m.pick_port()
        for _ in range(n):
            t0 = time.perf_counter()
            m.refresh()
            refresh.append(time.perf_counter() - t0)
    return new, refresh, cpu


def median_us(samples: list[float]) -> float:
    return statistics.median(samples) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", default=None, help="where state files + registry go")
    parser.add_argument("--n", type=int, default=200, help="samples per case and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--counts", default="5000,50000", help="foreign sockets per case")
    parser.add_argument("--exact", action="store_true", help="also weigh exact lookups")
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
    quiet: Samples = ([], [], [])
    busy: dict[int, Samples] = {c: ([], [], []) for c in counts}
    exact: dict[int, list[str]] = {0: []}
    with tempfile.TemporaryDirectory(prefix="dpm-foreign-", dir=args.dir) as tmp:
        root = Path(tmp)
        measure(root, "warm", start, end, 20)
        for r in range(args.rounds):
            add(quiet, measure(root, f"quiet{r}", start, end, args.n))
            if args.exact and r == 0:
                exact[0] = exact_vs_dump(start)
            for count in counts:
                foreign = ForeignSockets(count)
                try:
                    seen = listening_count()
                    add(busy[count], measure(root, f"busy{count}-{r}", start, end, args.n))
                    if args.exact and r == 0:
                        exact[count] = exact_vs_dump(start)
                finally:
                    foreign.close()
                if r == 0:
                    print(f"  with {count:,} foreign sockets open: {seen:,} listening on the host")
    qn, qr, qc = (median_us(x) for x in quiet)
    print(f"\n{'host':<34}{'new manager + pick':>22}{'CPU per manager':>22}{'refresh()':>22}")
    print(f"{'quiet':<34}{qn:>15.0f} us     {qc:>15.0f} us     {qr:>15.0f} us")
    for count in counts:
        bn, br, bc = (median_us(x) for x in busy[count])
        label = f"{count:,} listening sockets outside"
        print(
            f"{label:<34}{bn:>8.0f} us ({bn / qn:4.2f}x){bc:>8.0f} us ({bc / qc:4.2f}x)"
            f"{br:>8.0f} us ({br / qr:4.2f}x)"
        )
    print(
        f"(medians of {args.rounds} x {args.n} samples, CPU of {args.rounds} loops; "
        f"load now {os.getloadavg()[0]:.2f})"
    )
    if args.exact:
        print("\nexact lookups (127.0.0.1 and ::1 per port) against the filtered dump:")
        for count, lines in exact.items():
            print(f"  {count:,} foreign sockets:")
            for line in lines:
                print(f"    {line}")
        for line in what_exact_lookups_find():
            print(line)


Samples = tuple[list[float], list[float], list[float]]


def add(into: Samples, got: tuple[list[float], list[float], float]) -> None:
    new, refresh, cpu = got
    into[0].extend(new)
    into[1].extend(refresh)
    into[2].append(cpu)


# ------------------------------------------------ sock_diag exact lookups

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 1
NLM_F_DUMP = 0x300
LOOPBACK = [
    (socket.AF_INET, socket.inet_pton(socket.AF_INET, "127.0.0.1")),
    (socket.AF_INET6, socket.inet_pton(socket.AF_INET6, "::1")),
]


def diag_request(family: int, port: int, src: bytes, flags: int, bytecode: bytes = b"") -> bytes:
    """nlmsghdr + inet_diag_req_v2 (LISTEN only) [+ a bytecode attribute]."""
    body = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 0, 0, 1 << 10)
    # idiag_sport, dport, src, dst, if, cookie (none: ~0)
    body += struct.pack(">HH", port, 0) + src.ljust(16, b"\0") + b"\0" * 16
    body += struct.pack("=III", 0, 0xFFFFFFFF, 0xFFFFFFFF)
    if bytecode:
        body += struct.pack("=HH", 4 + len(bytecode), 1) + bytecode
    return struct.pack("=IHHII", 16 + len(body), SOCK_DIAG_BY_FAMILY, flags, 0, 0) + body


def replies(data: bytes) -> tuple[list[int], int]:
    """Ports found and messages that end a request (a socket, an error, DONE)."""
    found, ends, at = [], 0, 0
    while at + 16 <= len(data):
        length, kind = struct.unpack_from("=IH", data, at)
        if kind == SOCK_DIAG_BY_FAMILY:
            found.append(struct.unpack_from(">H", data, at + 20)[0])
        if kind in (2, 3, SOCK_DIAG_BY_FAMILY):
            ends += 1
        at += (length + 3) & ~3
    return found, ends


def exact_lookups(ports: range, addresses: list[tuple[int, bytes]]) -> list[int]:
    """One exact request per port and address, 256 to a send."""
    found: list[int] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        asks = [(f, p, a) for p in ports for f, a in addresses]
        for i in range(0, len(asks), 256):
            batch = asks[i : i + 256]
            s.send(b"".join(diag_request(f, p, a, NLM_F_REQUEST) for f, p, a in batch))
            ends = 0
            while ends < len(batch):
                got, n = replies(s.recv(65536))
                found += got
                ends += n
    return found


def filtered_dump(first: int, last: int) -> list[int]:
    """What the scan asks: LISTEN, source port in [first, last], per family."""
    ge = struct.pack("=BBHBBH", 2, 8, 20, 0, 0, first)
    le = struct.pack("=BBHBBH", 3, 8, 12, 0, 0, last)
    found: list[int] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG) as s:
        for family in (socket.AF_INET, socket.AF_INET6):
            s.send(diag_request(family, 0, b"", NLM_F_REQUEST | NLM_F_DUMP, ge + le))
            done = False
            while not done:
                data = s.recv(65536)
                got, _ = replies(data)
                found += got
                at = 0
                while at + 16 <= len(data):
                    length, kind = struct.unpack_from("=IH", data, at)
                    done = done or kind in (2, 3)
                    at += (length + 3) & ~3
    return found


def exact_vs_dump(first: int) -> list[str]:
    lines = []
    for size in (10, 100, 1000, 6001):
        ports = range(first, first + size)
        t0 = time.perf_counter()
        exact_lookups(ports, LOOPBACK)
        t1 = time.perf_counter()
        filtered_dump(first, first + size - 1)
        t2 = time.perf_counter()
        per = (t1 - t0) / (2 * size) * 1e6
        lines.append(
            f"{size:>5} ports: exact {(t1 - t0) * 1e6:>9.0f} us ({per:.1f} us a lookup), "
            f"dump {(t2 - t1) * 1e6:>7.0f} us"
        )
    return lines


def what_exact_lookups_find() -> list[str]:
    """Listeners the filtered dump finds, and whether exact lookups do."""
    lines = ["what each finds (one listener on a port of its own):"]
    cases: list[tuple[str, int, str, dict[str, Any]]] = [
        ("127.0.0.1", socket.AF_INET, "127.0.0.1", {}),
        ("0.0.0.0", socket.AF_INET, "0.0.0.0", {}),
        ("127.0.1.5", socket.AF_INET, "127.0.1.5", {}),
        ("[::] dual-stack", socket.AF_INET6, "::", {"v6only": 0}),
        ("0.0.0.0 bound to lo", socket.AF_INET, "0.0.0.0", {"device": b"lo"}),
    ]
    for name, family, address, how in cases:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, how.get("v6only", 1))
            if "device" in how:
                try:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, how["device"])
                except OSError as e:
                    lines.append(f"  {name:<22} (cannot bind to a device here: {e})")
                    continue
            s.bind((address, 0))
            s.listen()
            port = s.getsockname()[1]
            exact = bool(exact_lookups(range(port, port + 1), LOOPBACK))
            dump = bool(filtered_dump(port, port))
            lines.append(
                f"  {name:<22} exact lookups: {'found' if exact else 'MISSED'}, "
                f"dump: {'found' if dump else 'MISSED'}"
            )
    return lines


if __name__ == "__main__":
    main()
