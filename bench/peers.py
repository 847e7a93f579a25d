"""Benchmark: this package side by side with the other ways to get a free port.

    pip install .[bench]        # portpicker (with its portserver), ephemeral-port-reserve
    python bench/peers.py [--dir /dev/shm] [--n 300]

In one run, the same operations through:
- ``DynamicPortManager`` (ours), state files and lease registry in a temporary
  folder under ``--dir`` (default: the system's temporary folder);
- portpicker with a ``portserver`` that this script starts itself on a unix
  socket in a temporary folder (``PORTSERVER_ADDRESS`` points at it), serving
  the same port range: the one other allocator that never hands out a port
  twice across processes;
- plain ``socket.bind(("127.0.0.1", 0))`` then close: the floor, and it collides;
- ``ephemeral_port_reserve.reserve()``: bind(0) left in TIME_WAIT.

Operations:
(a) a held pick: one more port while every port picked before stays held (ours:
    a new manager plus its first pick, and a first pick on managers made
    beforehand; each manager has its own state file, all share one registry);
(b) a pick + release cycle (ours: on one existing manager, timed after
    ``backup_max`` cycles so backups are being recycled, as in a long run);
(c) ours only: a pick in a 6,001-port range that is 98% leased, against the
    same pick in an empty one;
(d) 8 processes x 100 picks each, all held at once: ports handed to two
    holders (every process reports its ports before any releases one) and
    throughput.

Prints a table of medians and p99s, each with its ratio to portserver's held
pick, and the file system the state files are on. Asserts nothing: speed goals
are read from the figures, never enforced by a test.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import platform
import queue
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any, Callable

OURS = "dynamic-port-manager"
PORTSERVER = "portpicker + portserver"
BIND0 = "socket.bind(0) + close"
EPHEMERAL = "ephemeral-port-reserve"
TOOLS = (OURS, PORTSERVER, BIND0, EPHEMERAL)
NEW = OURS + ": new manager + first pick"
MADE = OURS + ": first pick, manager made before"


@dataclass
class Row:
    operation: str
    tool: str
    samples: list[float] = field(default_factory=list)  # seconds
    note: str = ""

    def median_us(self) -> float:
        return quantile(self.samples, 0.5) * 1e6

    def p99_us(self) -> float:
        return quantile(self.samples, 0.99) * 1e6


def quantile(samples: list[float], q: float) -> float:
    """Nearest-rank quantile (the median of an even count is the lower middle)."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


# ---------------------------------------------------------------- the peers


def bind0() -> int:
    """What many test suites do: ask the kernel for a port, close, use the number."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def ephemeral_reserve() -> int:
    import ephemeral_port_reserve  # type: ignore[import-untyped]

    port: int = ephemeral_port_reserve.reserve()
    return port


def portserver_pick(start: int, end: int) -> int:
    import portpicker  # type: ignore[import-untyped]

    port: int = portpicker.pick_unused_port()
    # portpicker silently falls back to bind(0) when the server gives nothing;
    # a port outside the server's pool would mean we measured the fallback.
    if not start <= port <= end:
        raise RuntimeError(f"portpicker returned {port}, not from the portserver's pool")
    return port


def portserver_command() -> list[str]:
    """How to run the portserver that the installed portpicker ships.

    portpicker 1.6 installs it as the script ``portserver.py`` beside the
    interpreter (not as a module); later versions may ship a module.
    """
    import importlib.util

    if importlib.util.find_spec("portserver") is not None:
        return [sys.executable, "-m", "portserver"]
    candidates = [
        Path(sysconfig.get_path("scripts")) / "portserver.py",
        Path(sys.executable).parent / "portserver.py",
    ]
    found = shutil.which("portserver.py") or shutil.which("portserver")
    if found:
        candidates.append(Path(found))
    for path in candidates:
        if path.is_file():
            return [sys.executable, str(path)]
    raise SystemExit("portserver not found: pip install .[bench] (portpicker ships it)")


@contextmanager
def running_portserver(start: int, end: int) -> Iterator[str]:
    """Starts a portserver for ``start-end`` on a unix socket in its own temporary
    folder (short path: sockets allow ~107 bytes), sets PORTSERVER_ADDRESS."""
    with tempfile.TemporaryDirectory(prefix="portserver-") as folder:
        address = os.path.join(folder, "portserver.sock")
        log_path = Path(folder) / "portserver.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [
                    *portserver_command(),
                    f"--portserver_static_pool={start}-{end}",
                    f"--portserver_address={address}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        try:
            deadline = time.monotonic() + 20
            while b"Serving on" not in log_path.read_bytes():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"portserver did not start:\n{log_path.read_text()}")
                time.sleep(0.02)
            os.environ["PORTSERVER_ADDRESS"] = address
            yield address
        finally:
            os.environ.pop("PORTSERVER_ADDRESS", None)
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# ------------------------------------------------------------------- ours


def ours_options(registry: Path) -> dict[str, Any]:
    # A long refresh interval keeps the background thread out of the timings.
    return dict(registry_dir=registry, console_log=False, refresh_interval=3600)


# ------------------------------------------------------------- file system


def create_cost_us(folder: Path, n: int = 50) -> float:
    """The median cost of making one empty file in `folder` right now. Every
    new state file makes one; on ext4 without a journal (this machine's /tmp)
    it grows from tens to hundreds of microseconds for minutes after many
    files there were deleted (a test run, a build), because allocation skips
    recently freed inodes one by one. Printed so that a run says which it met."""
    probe = folder / "create-probe"
    probe.mkdir()
    samples = []
    for i in range(n):
        t0 = time.perf_counter()
        fd = os.open(probe / f"f{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        samples.append(time.perf_counter() - t0)
        os.close(fd)
    return quantile(samples, 0.5) * 1e6


def file_system(folder: Path) -> str:
    """The file system `folder` is on, from /proc/mounts (longest mount point
    that contains it) and from `stat -f -c %T` where that exists."""
    real = os.path.realpath(folder)
    best: tuple[str, str, str, str] | None = None
    try:
        with open("/proc/mounts") as mounts:
            for line in mounts:
                device, mount, fstype, options = line.split()[:4]
                mount = mount.replace("\\040", " ")
                inside = real == mount or real.startswith(mount.rstrip("/") + "/")
                if inside and (best is None or len(mount) >= len(best[1])):
                    best = (device, mount, fstype, options)
    except OSError:
        pass
    stat_f = ""
    if shutil.which("stat"):
        out = subprocess.run(
            ["stat", "-f", "-c", "%T", real], capture_output=True, text=True, check=False
        )
        stat_f = out.stdout.strip()
    if best is None:
        return f"stat -f: {stat_f or 'unknown'}"
    device, mount, fstype, options = best
    return f"{fstype} ({device} on {mount}, {options}; stat -f: {stat_f or 'n/a'})"


# ------------------------------------------------------------ operations


def held_picks(root: Path, args: argparse.Namespace, rows: dict[tuple[str, str], Row]) -> None:
    """(a) Picks that stay held, in rounds that take turns between the tools so
    a burst of load from elsewhere on the machine hits them all alike."""
    from dynamic_port_manager import DynamicPortManager

    new_row = rows[("a", NEW)]
    made_row = rows[("a", MADE)]
    held: list[Any] = []
    registry = root / "a" / "registry"
    opts = ours_options(registry)
    rounds = 5
    per_round = max(1, args.n // rounds)
    count = 0
    for _ in range(rounds):
        for _ in range(per_round):
            path = root / "a" / f"new{count}.json"
            t0 = time.perf_counter()
            m = DynamicPortManager(args.start, args.end, json_path=path, **opts)
            m.pick_port()
            new_row.samples.append(time.perf_counter() - t0)
            held.append(m)
            count += 1
        made = [
            DynamicPortManager(
                args.start, args.end, json_path=root / "a" / f"made{count + i}.json", **opts
            )
            for i in range(per_round)
        ]
        for m in made:
            made_row.samples.append(timed(m.pick_port)[0])
        held.extend(made)
        count += per_round
        for _ in range(per_round):
            rows[("a", PORTSERVER)].samples.append(
                timed(lambda: portserver_pick(args.start, args.end))[0]
            )
        sockets_row = rows[("a", BIND0)]
        for _ in range(per_round):
            sockets_row.samples.append(timed(bind0)[0])
        for _ in range(per_round):
            rows[("a", EPHEMERAL)].samples.append(timed(ephemeral_reserve)[0])
    ports = [m.active_port for m in held]
    if len(set(ports)) != len(ports) or None in ports:
        raise SystemExit("ours: a port was handed out twice (or not at all) in (a)")
    new_row.note = made_row.note = f"registry grows to {len(held)} leases"
    for m in held:
        m.stop()


def cycles(root: Path, args: argparse.Namespace, rows: dict[tuple[str, str], Row]) -> None:
    """(b) pick + release, over and over, on one holder."""
    import portpicker
    from dynamic_port_manager import DynamicPortManager

    m = DynamicPortManager(
        args.start,
        args.end,
        json_path=root / "b" / "cycle.json",
        **ours_options(root / "b" / "reg"),
    )
    # Past backup_max (20) saves, every save recycles the oldest backup: the
    # steady state of a long-running service, which is what we time.
    for _ in range(25):
        m.pick_port()
        m.release_port()

    def ours_cycle() -> None:
        m.pick_port()
        m.release_port()

    def portpicker_cycle() -> None:
        portpicker.return_port(portserver_pick(args.start, args.end))

    rounds = 5
    per_round = max(1, args.n // rounds)
    for _ in range(rounds):
        for tool, fn in ((OURS, ours_cycle), (PORTSERVER, portpicker_cycle), (BIND0, bind0)):
            row = rows[("b", tool)]
            for _ in range(per_round):
                row.samples.append(timed(fn)[0])
    m.stop()
    rows[("b", PORTSERVER)].note = "return_port() keeps it in-process; the next pick reuses it"
    rows[("b", BIND0)].note = "bind(0) + close is already a cycle"


def full_range(root: Path, args: argparse.Namespace, rows: dict[tuple[str, str], Row]) -> float:
    """(c) The same pick in an empty range and in one that is mostly leased.
    Returns how long filling the range took (through the public API)."""
    from dynamic_port_manager import DynamicPortManager

    size = args.end - args.start + 1
    to_hold = int(size * args.held)

    def moving_picks(folder: Path, row: Row, hold: int) -> float:
        opts = ours_options(folder / "reg")
        fill_began = time.perf_counter()
        # Leases held by this process until it exits (the registry goes with
        # the temporary folder), 100 per filler manager: each state file lists
        # the leases taken through it, and one file listing them all would
        # make the set-up, not the timed pick, slow.
        for first in range(0, hold, 100):
            filler = DynamicPortManager(
                args.start, args.end, json_path=folder / f"filler{first}.json", **opts
            )
            for _ in range(min(100, hold - first)):
                filler.pick_port(pid=os.getpid())
            filler.stop()
        fill = time.perf_counter() - fill_began
        m = DynamicPortManager(args.start, args.end, json_path=folder / "m.json", **opts)
        for _ in range(25):  # past backup_max, as in (b)
            m.pick_port()
        for _ in range(args.n):
            row.samples.append(timed(m.pick_port)[0])
        m.stop()
        return fill

    moving_picks(root / "c-empty", rows[("c0", OURS)], 0)
    fill = moving_picks(root / "c-held", rows[("c98", OURS)], to_hold)
    rows[("c98", OURS)].note = f"{to_hold:,} of {size:,} ports leased"
    rows[("c0", OURS)].note = f"0 of {size:,} ports leased"
    return fill


def concurrent_worker(
    tool: str,
    index: int,
    picks: int,
    start: int,
    end: int,
    root: str,
    barrier: Barrier,
    results: mp.Queue[Any],
) -> None:
    """One of the (d) processes: `picks` picks, all held until every process has
    reported its ports (so a port in two reports was held twice at once)."""
    managers: list[Any] = []
    if tool == OURS:
        from dynamic_port_manager import DynamicPortManager

        opts = ours_options(Path(root) / "reg")
        managers = [
            DynamicPortManager(
                start, end, json_path=Path(root) / f"p{index}" / f"s{i}.json", **opts
            )
            for i in range(picks)
        ]
        pickers: list[Callable[[], int]] = [m.pick_port for m in managers]
    elif tool == PORTSERVER:
        pickers = [lambda: portserver_pick(start, end)] * picks
    elif tool == BIND0:
        pickers = [bind0] * picks
    else:
        pickers = [ephemeral_reserve] * picks
    barrier.wait(timeout=300)  # everyone set up: go
    began = time.monotonic()
    times, ports = [], []
    for pick in pickers:
        dt, port = timed(pick)
        times.append(dt)
        ports.append(port)
    ended = time.monotonic()
    results.put((index, ports, times, began, ended))
    barrier.wait(timeout=300)  # every report is in: now release
    for m in managers:
        m.stop()


def concurrent(
    root: Path, args: argparse.Namespace, rows: dict[tuple[str, str], Row]
) -> dict[str, tuple[float, int]]:
    """(d) Returns {tool: (picks per second, ports held twice)}."""
    ctx = mp.get_context("spawn")
    summary: dict[str, tuple[float, int]] = {}
    for tool in TOOLS:
        barrier = ctx.Barrier(args.procs)
        results: mp.Queue[Any] = ctx.Queue()
        folder = root / "d" / tool.split()[0].replace(".", "_")
        procs = [
            ctx.Process(
                target=concurrent_worker,
                args=(tool, i, args.picks, args.start, args.end, str(folder), barrier, results),
            )
            for i in range(args.procs)
        ]
        for p in procs:
            p.start()
        reports = []
        try:
            for _ in procs:
                reports.append(results.get(timeout=600))
        except queue.Empty:
            raise SystemExit(f"(d) {tool}: a worker did not report") from None
        for p in procs:
            p.join(timeout=120)
            if p.exitcode != 0:
                raise SystemExit(f"(d) {tool}: a worker failed (exit code {p.exitcode})")
        ports = [port for r in reports for port in r[1]]
        row = rows[("d", tool)]
        row.samples = [t for r in reports for t in r[2]]
        wall = max(r[4] for r in reports) - min(r[3] for r in reports)
        twice = len(ports) - len(set(ports))
        summary[tool] = (len(ports) / wall, twice)
        row.note = f"{len(ports) / wall:,.0f} picks/s; ports held twice: {twice}"
    return summary


# ------------------------------------------------------------------ report


def us(value: float) -> str:
    return f"{value:.1f}" if value < 10 else f"{value:,.0f}"


def print_table(
    rows: dict[tuple[str, str], Row],
    args: argparse.Namespace,
    concurrency: dict[str, tuple[float, int]],
) -> None:
    """One line per operation, one column per tool; a cell is the median in us
    (its ratio to portserver's held-pick median) and the p99 in us."""
    reference = rows[("a", PORTSERVER)].median_us()

    def cell(key: tuple[str, str] | None) -> str:
        if key is None:
            return ""
        row = rows[key]
        if not row.samples:
            return "n/a"
        med = row.median_us()
        return f"{us(med)} ({med / reference:.2f}x), p99 {us(row.p99_us())}"

    size = args.end - args.start + 1
    each = {tool: ("a", tool) for tool in TOOLS if tool != OURS}
    lines: list[tuple[str, dict[str, tuple[str, str]]]] = [
        ("(a) held pick (ours: new manager + its first pick)", {OURS: ("a", NEW), **each}),
        ("(a) held pick (ours: first pick, manager made before)", {OURS: ("a", MADE)}),
        ("(b) pick + release cycle", {tool: ("b", tool) for tool in TOOLS}),
        (f"(c) pick, empty {size:,}-port range", {OURS: ("c0", OURS)}),
        (f"(c) pick, same range {args.held:.0%} leased", {OURS: ("c98", OURS)}),
        (
            f"(d) {args.procs} processes x {args.picks} held picks at once",
            {tool: ("d", tool) for tool in TOOLS},
        ),
    ]
    print("| operation | " + " | ".join(TOOLS) + " |")
    print("| --- |" + " --- |" * len(TOOLS))
    for label, keys in lines:
        print(f"| {label} | " + " | ".join(cell(keys.get(tool)) for tool in TOOLS) + " |")
    print(
        "| (d) picks/s; ports held twice | "
        + " | ".join(f"{concurrency[t][0]:,.0f}/s; {concurrency[t][1]}" for t in TOOLS)
        + " |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dir", default=None, help="where state files + registry go")
    parser.add_argument("--start", type=int, default=20000)
    parser.add_argument("--end", type=int, default=26000, help="6,001 ports by default")
    parser.add_argument("--n", type=int, default=300, help="timed picks per case (a-c)")
    parser.add_argument("--procs", type=int, default=8, help="(d) processes")
    parser.add_argument("--picks", type=int, default=100, help="(d) picks per process")
    parser.add_argument("--held", type=float, default=0.98, help="(c) share of the range leased")
    args = parser.parse_args()
    if not 1 <= args.start <= args.end <= 65535:
        parser.error("need 1 <= --start <= --end <= 65535")
    pool = args.end - args.start + 1
    if 2 * args.n + args.procs * args.picks + 10 > pool:
        parser.error("the range is too small for --n and --procs x --picks")

    import dynamic_port_manager

    versions = [f"dynamic-port-manager {dynamic_port_manager.__version__}"]
    for dist in ("portpicker", "ephemeral-port-reserve"):
        try:
            from importlib.metadata import version

            versions.append(f"{dist} {version(dist)}")
        except Exception:
            raise SystemExit(f"{dist} is missing: pip install .[bench]") from None

    began = time.monotonic()
    rows: dict[tuple[str, str], Row] = {}
    for op, tools in (
        ("a", (NEW, MADE)),
        ("a", (PORTSERVER, BIND0, EPHEMERAL)),
        ("b", (OURS, PORTSERVER, BIND0, EPHEMERAL)),
        ("c0", (OURS,)),
        ("c98", (OURS,)),
        ("d", TOOLS),
    ):
        for tool in tools:
            rows[(op, tool)] = Row(op, tool)
    rows[("b", EPHEMERAL)].note = "nothing to release: the port leaves TIME_WAIT in 60 s"

    with tempfile.TemporaryDirectory(prefix="dpm-peers-", dir=args.dir) as tmp:
        root = Path(tmp)
        fs = file_system(root)
        fstype = fs.split(" ", 1)[0]
        print(
            f"state files + registry in {root}: {fs}\n"
            f"{platform.node()}: {os.cpu_count()} cores, Linux {platform.release()}, "
            f"Python {platform.python_version()}; {', '.join(versions)}\n"
            f"range {args.start}-{args.end} ({pool:,} ports), "
            f"portserver serving the same range\n"
            f"making an empty file there costs {create_cost_us(root):.0f} us now "
            "(a new manager makes two files)",
            flush=True,
        )
        with running_portserver(args.start, args.end):
            held_picks(root, args, rows)
            print(f"(a) done at {time.monotonic() - began:.0f} s", flush=True)
            cycles(root, args, rows)
            print(f"(b) done at {time.monotonic() - began:.0f} s", flush=True)
            fill = full_range(root, args, rows)
            print(f"(c) done at {time.monotonic() - began:.0f} s", flush=True)
            concurrency = concurrent(root, args, rows)
            print(f"(d) done at {time.monotonic() - began:.0f} s\n", flush=True)

    print(
        "Medians in us (ratio to portserver's held-pick median), then p99 in us; "
        f"state files on {fstype}.\n"
    )
    print_table(rows, args, concurrency)
    print(
        f"\n(a) Every port stays held. Ours: one state file per manager, all in one folder, "
        f"one registry ({rows[('a', NEW)].note}).\n"
        "(b) Ours: one manager, after backup_max cycles (backups are being recycled). "
        "portpicker: return_port() keeps the port in-process and the next pick reuses it "
        "without asking the server. ephemeral-port-reserve has nothing to release.\n"
        f"(c) Ours only: {rows[('c98', OURS)].note} through pick_port(pid=...) "
        f"(that took {fill:.1f} s); the pick there costs "
        f"{rows[('c98', OURS)].median_us() / rows[('c0', OURS)].median_us():.1f}x "
        "the same pick in the empty range.\n"
        "(d) Every process reports its ports while still holding all of them; "
        "a port in two reports was held twice at once.\n"
        f"command: python bench/peers.py {' '.join(sys.argv[1:])}".rstrip()
    )


if __name__ == "__main__":
    main()
