"""Where a pick goes in system calls: syscalls and bytes written per operation.

    python bench/pick_syscalls.py [--dir /dev/shm] [--n 100]

Needs strace. The operations run in a child process; everything they need is
set up first (managers that hold ports, a registry with 98% of a 6,001-port
range leased), and only then does strace attach, so the counts are those of
the timed operations alone. Prints, per operation: system calls (total and the
most frequent), bytes written per file kind (state file, registry, lock
files) and bytes read. Counts, not times: strace slows every call down.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

START, END = 20000, 26000


def child(root: Path, n: int, held: float) -> None:
    """Sets up, says "ready", waits for "go", then runs each operation n times
    between markers that strace sees as writes to /dev/null."""
    from dynamic_port_manager import DynamicPortManager

    def opts(registry: Path) -> dict[str, Any]:
        return dict(registry_dir=registry, console_log=False, refresh_interval=3600)

    reg = root / "reg"
    # n managers already holding a port each, and n made but not yet picking.
    holding = [
        DynamicPortManager(START, END, json_path=root / f"h{i}.json", **opts(reg)) for i in range(n)
    ]
    for m in holding:
        m.pick_port()
    made = [
        DynamicPortManager(START, END, json_path=root / f"m{i}.json", **opts(reg)) for i in range(n)
    ]
    mover = DynamicPortManager(START, END, json_path=root / "mover.json", **opts(reg))
    cycler = DynamicPortManager(START, END, json_path=root / "cycler.json", **opts(reg))
    for _ in range(25):  # past backup_max: backups are being recycled
        mover.pick_port()
        cycler.pick_port()
        cycler.release_port()
    full_reg = root / "full" / "reg"
    hold = int((END - START + 1) * held)
    fillers = []
    for first in range(0, hold, 100):  # 100 leases per filler's state file, as in peers.py
        filler = DynamicPortManager(
            START, END, json_path=root / "full" / f"filler{first}.json", **opts(full_reg)
        )
        for _ in range(min(100, hold - first)):
            filler.pick_port(pid=os.getpid())
        fillers.append(filler)
    crowded = DynamicPortManager(START, END, json_path=root / "full" / "m.json", **opts(full_reg))
    for _ in range(25):
        crowded.pick_port()

    fresh: list[Any] = []

    def new_and_pick(i: int) -> None:
        m = DynamicPortManager(START, END, json_path=root / f"n{i}.json", **opts(reg))
        m.pick_port()
        fresh.append(m)

    def cycle(_: int) -> None:
        cycler.pick_port()
        cycler.release_port()

    operations: list[tuple[str, Callable[[int], object]]] = [
        (f"new manager + first pick ({n}+ held)", new_and_pick),
        ("first pick, manager made before", lambda i: made[i].pick_port()),
        ("pick that moves the active port", lambda _: mover.pick_port()),
        ("pick + release cycle", cycle),
        (f"pick that moves, range {held:.0%} leased", lambda _: crowded.pick_port()),
    ]
    marker = os.open(os.devnull, os.O_WRONLY)
    print("ready", flush=True)
    sys.stdin.readline()
    for name, op in operations:
        os.write(marker, f"@@begin {n} {name}".encode())
        for i in range(n):
            op(i)
        os.write(marker, b"@@end")
    os.close(marker)
    for m in [*holding, *made, *fresh, *fillers, mover, cycler, crowded]:
        m.stop()


LINE = re.compile(r"^\d+\s+(?:<\.\.\. (\w+) resumed>|(\w+)\()")
RESULT = re.compile(r"=\s+(-?\d+)")
FD_PATH = re.compile(r"^\d+\s+\w+\((\d+)<([^>]*)>")
WRITES = {"write", "pwrite64", "writev", "pwritev", "pwritev2"}
READS = {"read", "pread64", "readv", "preadv", "preadv2"}


def file_kind(path: str) -> str:
    name = os.path.basename(path)
    if name.endswith(".lock"):
        return "lock files"
    if name.startswith("leases"):
        return "registry"
    if name.endswith(".tmp") or name.endswith(".json"):
        return "state file"
    return "other"


def summarize(trace: Path) -> list[tuple[str, int, Counter[str], Counter[str], int]]:
    """(operation, n, syscalls, bytes written per file kind, bytes read) per block."""
    blocks = []
    current: tuple[str, int, Counter[str], Counter[str], list[int]] | None = None
    pending: dict[str, str] = {}  # pid -> fd path of an unfinished write
    for line in trace.read_text(errors="replace").splitlines():
        if "@@begin" in line:
            n, name = line.split("@@begin ", 1)[1].split('"', 1)[0].split(" ", 1)
            current = (name, int(n), Counter(), Counter(), [0])
            continue
        if "@@end" in line:
            if current:
                blocks.append((current[0], current[1], current[2], current[3], current[4][0]))
            current = None
            continue
        if current is None:
            continue
        match = LINE.match(line)
        if not match:
            continue
        resumed, name = match.group(1), match.group(2)
        pid = line.split(None, 1)[0]
        if name:  # a call starts on this line (it may finish on a later one)
            current[2][name] += 1
            fd = FD_PATH.match(line)
            if name in WRITES or name in READS:
                pending[pid] = fd.group(2) if fd else ""
        call = resumed or name
        if "<unfinished" in line or call not in WRITES | READS:
            continue
        result = RESULT.search(line.rsplit(")", 1)[-1])
        if not result or int(result.group(1)) < 0:
            continue
        if call in WRITES:
            current[3][file_kind(pending.get(pid, ""))] += int(result.group(1))
        else:
            current[4][0] += int(result.group(1))
    return blocks


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dir", default=None, help="where state files + registry go")
    parser.add_argument("--n", type=int, default=100, help="operations of each kind")
    parser.add_argument("--held", type=float, default=0.98, help="share leased in the last case")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(Path(args.child), args.n, args.held)
        return
    if not shutil.which("strace"):
        raise SystemExit("needs strace (apt-get install strace)")
    with tempfile.TemporaryDirectory(prefix="dpm-syscalls-", dir=args.dir) as tmp:
        root = Path(tmp)
        trace = root / "strace.log"
        proc = subprocess.Popen(
            [sys.executable, __file__, "--child", str(root / "w"), "--n", str(args.n)]
            + ["--held", str(args.held)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdin and proc.stdout
        if proc.stdout.readline().strip() != "ready":
            raise SystemExit("the child failed during set-up")
        # -f on a running process attaches to all of its threads.
        tracer = subprocess.Popen(
            ["strace", "-f", "-qq", "-y", "-s", "64", "-o", str(trace), "-p", str(proc.pid)],
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not attached(proc.pid):
            if time.monotonic() > deadline:
                raise SystemExit("strace did not attach (ptrace not allowed here?)")
            time.sleep(0.05)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        if proc.wait(timeout=900) != 0:
            raise SystemExit("the child failed")
        tracer.wait(timeout=60)
        blocks = summarize(trace)
        print(f"state files + registry under {root} (strace -f, per operation)\n")
        print("| operation | syscalls | most frequent | written: state / registry / locks | read |")
        print("| --- | ---: | --- | ---: | ---: |")
        for name, n, calls, written, read in blocks:
            top = ", ".join(f"{c} {v / n:.1f}" for c, v in calls.most_common(6))
            w = " / ".join(
                f"{written[k] / n:,.0f}" for k in ("state file", "registry", "lock files")
            )
            print(f"| {name} | {sum(calls.values()) / n:.1f} | {top} | {w} B | {read / n:,.0f} B |")


def attached(pid: int) -> bool:
    """Whether every thread of `pid` is being traced."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
        for tid in tasks:
            status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
            if re.search(r"^TracerPid:\s+0$", status, re.M):
                return False
    except OSError:
        return False
    return True


if __name__ == "__main__":
    main()
