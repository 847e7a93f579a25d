"""A system call a signal interrupted (EINTR) is tried again, never reported
(issue 15, item 3): every other open and stat of a manager's life fails with
EINTR, injected by strace into a running process, and every pick, release
and restart still succeeds with the state file's history intact.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

# A child that has not answered by then is hanging (each does well under 5 s).
HANG = 60

CHILD = """
import json, sys
from pathlib import Path
from dynamic_port_manager import DynamicPortManager
port, path = int(sys.argv[1]), Path(sys.argv[2])
print("ready", flush=True)
sys.stdin.readline()  # strace is attached
counts, errors = [], []
for _ in range(3):
    m = DynamicPortManager(port, port, path, console_log=False)
    try:
        m.pick_port()
        m.release_port()
        state = m.get_state()
    finally:
        m.stop()
    counts.append(json.loads(path.read_text())["change_count"])
    errors.append(state["last_error"])
print(json.dumps({"counts": counts, "errors": errors}))
"""


def attached(pid: int) -> bool:
    """Whether every thread of `pid` is being traced."""
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
            if re.search(r"^TracerPid:\s+0$", status, re.M):
                return False
    except OSError:
        return False
    return True


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_interrupted_opens_and_stats_are_tried_again(
    state_path: Path, free_port_factory: Callable[[], int]
) -> None:
    port = free_port_factory()
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(port), str(state_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    tracer = None
    try:
        assert proc.stdout.readline() == "ready\n"
        # Imports are done: from here on, every second open or stat fails once.
        calls = "openat,open,newfstatat,fstat,statx"
        tracer = subprocess.Popen(
            [
                "strace",
                "-f",
                "-qq",
                "-o",
                os.devnull,
                "-e",
                f"trace={calls}",
                "-e",
                f"inject={calls}:error=EINTR:when=1+2",
                "-p",
                str(proc.pid),
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        # Bounded by the child's own state: attached, or strace gave up.
        for _ in range(HANG * 20):
            if attached(proc.pid) or tracer.poll() is not None:
                break
            time.sleep(0.05)
        if not attached(proc.pid):
            pytest.skip("strace cannot attach here (ptrace not allowed?)")
        proc.stdin.write("go\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=HANG)
    finally:
        for p in (proc, tracer):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    assert proc.returncode == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    # Each life picks and releases: two more changes, none lost or undone.
    assert result == {"counts": [2, 4, 6], "errors": [None, None, None]}, err
