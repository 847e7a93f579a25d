"""The state files of a folder share one lock file, `.dynamic_port_manager.lock`,
which holds each file's change counter in a slot found by hashing its name
(issue 10: a new state file no longer makes a lock file of its own). Two names
may share a slot: that may only cost a re-read, never a change missed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from dynamic_port_manager import DynamicPortManager
from router_helpers import port_block

LO, HI = 0, 0  # this test's range, leased through the plugin by _ports


@pytest.fixture(autouse=True)
def _ports() -> None:
    global LO, HI
    LO, HI = port_block(20)


FOLDER_LOCK = ".dynamic_port_manager.lock"
SLOTS = 4096


def counter_slot(name: str) -> int:
    """The slot of a state file's change counter (FNV-1a of its name)."""
    h = 0xCBF29CE484222325
    for byte in name.encode():
        h = ((h ^ byte) * 0x100000001B3) % 2**64
    return h % SLOTS


def test_state_files_of_a_folder_share_one_lock_file(tmp_path: Path, registry: Path) -> None:
    folder = tmp_path / "port_state"
    managers = [
        DynamicPortManager(LO, HI, folder / f"service{i}.json", console_log=False) for i in range(3)
    ]
    try:
        for m in managers:
            m.pick_port()
    finally:
        for m in managers:
            m.stop()
    names = sorted(p.name for p in folder.iterdir())
    assert names == [
        FOLDER_LOCK,
        "backups",
        "service0.json",
        "service1.json",
        "service2.json",
    ]


# Picks `count` times through its own manager of argv[1] (each pick moves the
# active port: one change each), then prints the change_count it saw last.
PICKER = """
import sys
from dynamic_port_manager import DynamicPortManager
m = DynamicPortManager(int(sys.argv[2]), int(sys.argv[3]), sys.argv[1],
                       console_log=False, history_max=1000, refresh_interval=3600)
sys.stdin.readline()
for _ in range(int(sys.argv[4])):
    m.pick_port()
print(m.get_state()["change_count"], flush=True)
m.stop()
"""


def test_files_sharing_a_counter_slot_miss_none_of_each_others_changes(
    tmp_path: Path, registry: Path
) -> None:
    shared = "shared.json"
    neighbour = next(
        f"n{i}.json" for i in range(100_000) if counter_slot(f"n{i}.json") == counter_slot(shared)
    )
    picks = 60
    # Two processes change one file in turn, a third changes the file that
    # shares its counter slot, all at once.
    jobs = [(shared, picks), (shared, picks), (neighbour, picks)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", PICKER, str(tmp_path / name), str(LO), str(HI), str(n)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for name, n in jobs
    ]
    for proc in procs:
        assert proc.stdin
        proc.stdin.write("go\n")
        proc.stdin.flush()
    for proc in procs:
        proc.communicate(timeout=120)
        assert proc.returncode == 0
    on_disk = {name: json.loads((tmp_path / name).read_text()) for name in (shared, neighbour)}
    # Every change of both processes (their picks, and the release at stop)
    # is in the shared file's one history: a manager that took the
    # neighbour's counter for its own file's would have saved over the other
    # process's changes.
    assert on_disk[shared]["change_count"] == 2 * (picks + 1)
    assert len(on_disk[shared]["history"]) == 2 * (picks + 1)
    assert on_disk[neighbour]["change_count"] == picks + 1


# Holds the slot of one state file in its folder's lock file (a record lock of
# those 8 bytes, which the managers' slot locks meet) until told to let go.
SLOT_HOLDER = """
import fcntl, sys
with open(sys.argv[1], "r+b") as f:
    fcntl.lockf(f, fcntl.LOCK_EX, 8, int(sys.argv[2]))
    print("held", flush=True)
    sys.stdin.readline()
"""


def test_a_held_slot_stops_saves_of_its_file_only(tmp_path: Path, registry: Path) -> None:
    held_name, other_name = "held.json", "other.json"
    assert counter_slot(held_name) != counter_slot(other_name)
    held = DynamicPortManager(LO, HI, tmp_path / held_name, console_log=False)
    other = DynamicPortManager(LO, HI, tmp_path / other_name, console_log=False)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            SLOT_HOLDER,
            str(tmp_path / FOLDER_LOCK),
            str(counter_slot(held_name) * 8),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    picked: list[int] = []
    waiting = threading.Thread(target=lambda: picked.append(held.pick_port()))
    try:
        try:
            assert holder.stdout and holder.stdout.readline().strip() == "held"
            waiting.start()
            # The other file's save never waits for the held slot (it would wait
            # for LOCK_WAIT, 30 s, if the lock were the whole file's).
            done = threading.Event()
            threading.Thread(target=lambda: (other.pick_port(), done.set())).start()
            assert done.wait(10), "a save of another file waited for the held slot"
            waiting.join(0.5)
            assert waiting.is_alive() and not picked, "a save of the held file did not wait"
        finally:
            assert holder.stdin
            holder.stdin.close()
            holder.wait(timeout=30)
        waiting.join(30)
        state = json.loads((tmp_path / held_name).read_text())
        assert picked and picked[0] == state["current_port"]
    finally:
        held.stop()
        other.stop()
