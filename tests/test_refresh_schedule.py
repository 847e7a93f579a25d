"""One refresh thread per process serves every manager by its next due time:
making and stopping managers does not wake it, and a manager made after
others were stopped is still refreshed on its own interval.

Ports come from the project's own plugin (``free_port_factory``); the
managers under test use a private registry (the ``registry`` fixture).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="/proc/<pid>/task")


def run_script(script: str, *args: object) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", script, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "panicked" not in result.stderr, result.stderr
    out: dict = json.loads(result.stdout.strip().splitlines()[-1])
    return out


# The refresh thread's voluntary context switches (each a wake-up) while the
# program makes, uses and stops 100 managers, beside one that stays.
MAKE_AND_STOP = r"""
import json, os, sys, time
from pathlib import Path
from dynamic_port_manager import DynamicPortManager

low, work = int(sys.argv[1]), Path(sys.argv[2])
opts = dict(console_log=False, refresh_interval=3600)
stays = DynamicPortManager(low, low + 9, work / "stays.json", **opts)

def refresher():
    # The thread names itself once it runs (bounded: it starts in milliseconds).
    for _ in range(500):
        for task in Path(f"/proc/{os.getpid()}/task").iterdir():
            if (task / "comm").read_text().startswith("dynamic-port-ma"):
                return task
        time.sleep(0.01)
    raise SystemExit("no refresh thread")

def status(task):
    fields = dict(
        line.split(":", 1) for line in (task / "status").read_text().splitlines() if ":" in line
    )
    return fields["State"].split()[0], int(fields["voluntary_ctxt_switches"])

task = refresher()
# Until it sleeps for its next due time (bounded, as above).
for _ in range(500):
    state, before = status(task)
    if state == "S":
        break
    time.sleep(0.01)
for i in range(100):
    m = DynamicPortManager(low, low + 9, work / f"m{i}.json", **opts)
    m.pick_port()
    m.stop()
state, after = status(task)
stays.stop()
print(json.dumps({"state": state, "wakeups": after - before}))
"""


def test_making_and_stopping_managers_does_not_wake_the_refresh_thread(
    free_port_factory: Callable[[], int], tmp_path: Path, registry: Path
) -> None:
    out = run_script(MAKE_AND_STOP, free_port_factory(), tmp_path)
    assert out["state"] == "S"
    # Nothing was due (an hour's interval): one spurious wake-up is the kernel's.
    assert out["wakeups"] <= 1, out


# A manager stopped leaves the thread asleep until that manager's next due
# time; one made after, due later, must still be refreshed on its own
# interval: a listener opened after its start shows in its state file.
REFRESHED_AFTER_STOP = r"""
import json, socket, sys, time
from pathlib import Path
from dynamic_port_manager import DynamicPortManager

low, work = int(sys.argv[1]), Path(sys.argv[2])
gone = DynamicPortManager(low, low, work / "gone.json", console_log=False, refresh_interval=0.3)
gone.stop()
time.sleep(0.1)
m = DynamicPortManager(low, low, work / "later.json", console_log=False, refresh_interval=0.3)
with socket.socket() as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", low))
    s.listen()
    seen = False
    # Bounded: a refresh every 0.3 s shows it within the first few.
    for _ in range(300):
        disk = json.loads((work / "later.json").read_text())
        if low in disk["used_ports"]:
            seen = True
            break
        time.sleep(0.05)
m.stop()
print(json.dumps({"seen": seen}))
"""


def test_a_manager_made_after_another_stopped_is_refreshed_on_its_interval(
    free_port_factory: Callable[[], int], tmp_path: Path, registry: Path
) -> None:
    out = run_script(REFRESHED_AFTER_STOP, free_port_factory(), tmp_path)
    assert out["seen"], "the refresh thread never refreshed the later manager"
