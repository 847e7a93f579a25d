"""A process does not list a state folder (or its backups folder) again for
every new manager while nothing else changed it (issue 10): what it knows is
kept while the folder's times stand still. These tests hold it to the other
half of that bargain: whatever another process changes is still seen.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from dynamic_port_manager import DynamicPortManager
from router_helpers import port_block

LO, HI = 0, 0  # this test's range, leased through the plugin by _ports


@pytest.fixture(autouse=True)
def _ports() -> None:
    global LO, HI
    LO, HI = port_block(10)


# Another process picks through its own manager on the same state file (new
# history, new backups), then exits.
OTHER_PROCESS = """
import sys
from dynamic_port_manager import DynamicPortManager
m = DynamicPortManager(int(sys.argv[3]), int(sys.argv[4]), sys.argv[1], console_log=False)
for _ in range(int(sys.argv[2])):
    m.pick_port()
m.stop()
"""


def manager(path: Path, **kwargs: Any) -> DynamicPortManager:
    kwargs.setdefault("console_log", False)
    return DynamicPortManager(LO, HI, path, **kwargs)


def in_other_process(path: Path, picks: int) -> None:
    command = [sys.executable, "-c", OTHER_PROCESS, str(path), str(picks), str(LO), str(HI)]
    subprocess.run(command, check=True)


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def temporaries(folder: Path) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.endswith(".tmp"))


def test_backups_another_process_took_restore_a_file_deleted_later(state_path: Path) -> None:
    # This process lists the backups folder (a manager of its own there)...
    neighbour = manager(state_path.with_name("neighbour.json"))
    neighbour.pick_port()
    # ...then another process makes history on a state file it never opened.
    in_other_process(state_path, picks=3)
    counts = [
        json.loads(p.read_text())["change_count"]
        for p in (state_path.parent / "backups").glob(f"{state_path.stem}_*.json")
    ]
    assert max(counts) > 0
    state_path.unlink()
    m = manager(state_path)
    try:
        state = m.get_state()
        assert state["change_count"] == max(counts), state
        assert "restored from backup" in (state["last_error"] or "")
    finally:
        m.stop()
        neighbour.stop()


def test_a_killed_savers_temporary_is_swept_by_the_next_manager_of_this_process(
    state_path: Path,
) -> None:
    first = manager(state_path)
    first.pick_port()
    # Planted after this process's sweep: a saver of another state file in
    # the same folder (it has a lock file beside it) that was killed.
    in_other_process(state_path.with_name("other.json"), picks=1)
    planted = state_path.parent / f".other.json.{dead_pid()}.tmp"
    planted.write_text("{")
    second = manager(state_path.with_name("third.json"))
    try:
        assert temporaries(state_path.parent) == []
    finally:
        second.stop()
        first.stop()


def test_the_background_refresh_sweeps_a_temporary_left_while_it_runs(state_path: Path) -> None:
    m = manager(state_path, refresh_interval=0.1)
    try:
        m.pick_port()
        planted = state_path.parent / f".{state_path.name}.{dead_pid()}.tmp"
        planted.write_text("{")
        # No refresh() asked for: the folder changed, the next refresh sweeps.
        deadline = time.monotonic() + 10
        while planted.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not planted.exists(), "still there after 10 s of 0.1 s refreshes"
    finally:
        m.stop()


def test_a_file_that_only_looks_like_a_temporary_is_left_alone(state_path: Path) -> None:
    state_path.parent.mkdir(parents=True)
    # No state file of that name here (no lock file beside it): not ours.
    foreign = state_path.parent / f".notes.txt.{dead_pid()}.tmp"
    foreign.write_text("mine")
    m = manager(state_path)
    try:
        m.refresh()
        assert foreign.read_text() == "mine"
    finally:
        m.stop()


def test_many_managers_in_one_folder_each_keep_their_backups(state_path: Path) -> None:
    """Backups counted from what the process knows (no listing per save) still
    rotate to backup_max, file by file."""
    managers = [manager(state_path.with_name(f"s{i}.json"), backup_max=3) for i in range(5)]
    try:
        for _ in range(6):
            for m in managers:
                m.pick_port()
        for m in managers:
            on_disk = sorted((state_path.parent / "backups").glob(f"{m.state_path.stem}_*.json"))
            assert len(on_disk) == 3, on_disk
            assert [b for b in m.backups()] == [p.name for p in on_disk]
    finally:
        for m in managers:
            m.stop()
