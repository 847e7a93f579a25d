"""Kill-and-fault rounds: SIGKILL a picker, or fail one of its system calls,
at the k-th system call of its picks, releases and saves, then check every
state file and the registry against the picks that returned.

    python bench/kill_and_fault.py --rounds 200

Each round starts a worker that picks and releases on one of a few state
files shared by all rounds, writing every port a pick returned to a journal
(before the next call). strace attaches to it once it is ready and either
kills it (``signal=KILL``) or fails one call with an errno (``error=...``)
at a random k-th call among the ones that touch files and locks. A holder
process keeps a few ports leased for the whole run. Afterwards:

- duplicates: a pick that returned a port the holder held, or two live
  leases on one port in the registry;
- lost history: a returned pick missing from its state file's history
  (only for rounds whose worker was not killed: a killed worker's last
  change may be in memory only, which the rule allows);
- torn files: a state file or registry that does not parse;
- hangs: a worker that did not finish within the time limit.

Without strace it kills at a random time instead (said in the output).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FAULT_CALLS = "openat,read,write,pwrite64,pread64,renameat2,linkat,unlinkat,fcntl,flock,fsync"
ERRNOS = ["EIO", "EMFILE", "ENOSPC", "EINTR", "ENOMEM", "EAGAIN"]

WORKER = """
import os, sys
from dynamic_port_manager import DynamicPortManager
state, journal, start, end, ops = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
m = DynamicPortManager(start, end, state, history_max=100000, console_log=False)
out = open(journal, "a", buffering=1)
print("ready", flush=True)
sys.stdin.readline()  # strace is attached
for i in range(ops):
    try:
        port = m.pick_port()
        out.write(f"{state} {port}\\n")
        if i % 3 == 2:
            m.release_port()
    except Exception as e:
        out.write(f"# {type(e).__name__}: {e}\\n")
m.stop()
"""

HOLDER = """
import os, sys
from dynamic_port_manager import DynamicPortManager
m = DynamicPortManager(int(sys.argv[2]), int(sys.argv[3]), sys.argv[1], console_log=False)
ports = [m.pick_port(pid=os.getpid()) for _ in range(3)]
print(" ".join(map(str, ports)), flush=True)
sys.stdin.read()
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--ops", type=int, default=12, help="picks per worker")
    ap.add_argument("--files", type=int, default=3, help="state files the rounds share")
    ap.add_argument("--start", type=int, default=42000)
    ap.add_argument("--timeout", type=float, default=40.0)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    strace = shutil.which("strace")
    work = Path(tempfile.mkdtemp(prefix="dpm-kill-fault-"))
    env = {**os.environ, "DPM_REGISTRY_DIR": str(work / "registry")}
    start, end = args.start, args.start + 60
    files = [str(work / "state" / f"s{i}.json") for i in range(args.files)]
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(work / "state" / "holder.json"), str(start), str(end)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert holder.stdout is not None
    held = {int(p) for p in holder.stdout.readline().split()}
    duplicates = hangs = kills = faults = 0
    clean_journals: list[Path] = []
    began = time.monotonic()
    for round_no in range(args.rounds):
        journal = work / f"journal-{round_no}.txt"
        journal.touch()
        worker = subprocess.Popen(
            [
                sys.executable,
                "-c",
                WORKER,
                rng.choice(files),
                str(journal),
                str(start),
                str(end),
                str(args.ops),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert worker.stdout is not None and worker.stdin is not None
        if worker.stdout.readline() != "ready\n":
            worker.wait()
            continue
        kill = rng.random() < 0.5
        k = rng.randint(1, 12 * args.ops)
        tracer = None
        if strace:
            action = "signal=KILL" if kill else f"error={rng.choice(ERRNOS)}"
            tracer = subprocess.Popen(
                [
                    strace,
                    "-qq",
                    "-f",
                    "-o",
                    os.devnull,
                    "-p",
                    str(worker.pid),
                    "-e",
                    f"trace={FAULT_CALLS}",
                    "-e",
                    f"inject={FAULT_CALLS}:{action}:when={k}",
                ],
                stderr=subprocess.DEVNULL,
            )
            time.sleep(0.3)  # attached (strace has no "ready" signal)
        try:
            worker.stdin.write("go\n")
            worker.stdin.flush()
        except BrokenPipeError:
            pass  # the fault hit the worker's own read of "go": it ended
        if not strace and kill:
            time.sleep(rng.random() * 0.05)
            worker.kill()
        try:
            worker.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            hangs += 1
            worker.kill()
            worker.wait()
        if tracer is not None:
            tracer.terminate()
            tracer.wait()
        killed = worker.returncode == -signal.SIGKILL
        kills += killed
        faults += not killed
        if not killed and worker.returncode == 0:
            clean_journals.append(journal)
        returned = [
            line.split()
            for line in journal.read_text().splitlines()
            if line and not line.startswith("#")
        ]
        duplicates += sum(1 for _, port in returned if int(port) in held)
    elapsed = time.monotonic() - began
    torn = 0
    histories: dict[str, collections.Counter[int]] = {}
    for f in files:
        if not os.path.exists(f):
            continue
        try:
            history = json.loads(Path(f).read_text())["history"]
        except (ValueError, KeyError):
            torn += 1
            continue
        histories[f] = collections.Counter(h["new"] for h in history if h["new"] is not None)
    listed = subprocess.run(
        [
            sys.executable,
            "-c",
            "import json; from dynamic_port_manager import list_leases; "
            "print(json.dumps(list_leases()))",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    if listed.returncode != 0:
        torn += 1
    else:
        live = [lease["port"] for lease in json.loads(listed.stdout) if lease["alive"]]
        duplicates += len(live) - len(set(live))
    # Every pick a clean worker saw return, per file, must be in that file's
    # history (killed workers' picks may be there too: never fewer).
    picked: dict[str, collections.Counter[int]] = collections.defaultdict(collections.Counter)
    for journal in clean_journals:
        for line in journal.read_text().splitlines():
            if line and not line.startswith("#"):
                state, port = line.split()
                picked[state][int(port)] += 1
    lost = sum(
        sum((ports - histories.get(state, collections.Counter())).values())
        for state, ports in picked.items()
    )
    holder.kill()
    holder.wait()
    load = os.getloadavg()[0]
    how = "strace at the k-th call" if strace else "random-time SIGKILL (no strace)"
    print(f"# {how}; {kills} killed, {faults} faulted; {elapsed:.0f} s; load {load:.1f}; {work}")
    print("rounds, duplicates, lost history, torn files, hangs")
    print(f"{args.rounds}, {duplicates}, {lost}, {torn}, {hangs}")


if __name__ == "__main__":
    main()
