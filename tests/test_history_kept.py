"""History that is not kept (issue 7, items 6-10): a state file missing or
unreadable at start, backups named by a wrong clock, idle saves rotating real
changes away, backup names shared by two files, and errors that never end.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import pytest
from dynamic_port_manager import DynamicPortManager
from router_helpers import port_block


def manager(path: Path | str, lo: int, hi: int, **kwargs: Any) -> DynamicPortManager:
    kwargs.setdefault("console_log", False)
    return DynamicPortManager(lo, hi, path, **kwargs)


def seed(path: Path | str, lo: int, hi: int, picks: int) -> None:
    m = manager(path, lo, hi)
    for _ in range(picks):
        m.pick_port()
    m.stop()


def backup_counts(folder: Path, stem: str) -> dict[str, int]:
    """change_count of each backup of `stem` in `folder`."""
    return {
        name: json.loads((folder / name).read_text())["change_count"]
        for name in os.listdir(folder)
        if name.startswith(stem + "_")
    }


# ---- 6. a missing or unreadable file at start: the best backup -----------


@pytest.mark.parametrize("how", ["deleted", "dangling link", "link loop"])
def test_6_a_missing_or_unreadable_file_at_start_is_restored_from_the_best_backup(
    how: str, state_path: Path, tmp_path: Path
) -> None:
    base = port_block(5)[0]
    seed(state_path, base, base + 4, picks=4)
    counts = backup_counts(state_path.parent / "backups", state_path.stem)
    best = max(counts, key=lambda name: (counts[name], name))
    state_path.unlink()
    nowhere = tmp_path / "nowhere.json"
    if how == "dangling link":
        state_path.symlink_to(nowhere)
    elif how == "link loop":
        state_path.symlink_to(state_path)
    m = manager(state_path, base, base + 4)
    s = m.get_state()
    m.stop()
    assert s["change_count"] == counts[best] > 0
    assert len(s["history"]) == counts[best]
    assert f"restored from backup {best}" in s["last_error"], s["last_error"]
    assert not nowhere.exists(), "written through the dangling link"
    assert not state_path.is_symlink()


def test_6_a_file_deleted_while_running_is_reported_and_rewritten(state_path: Path) -> None:
    base = port_block(5)[0]
    m = manager(state_path, base, base + 4)
    m.pick_port()
    state_path.unlink()
    m.pick_port()
    s = m.get_state()
    m.stop()
    assert "was deleted" in s["last_error"], s["last_error"]
    assert json.loads(state_path.read_text())["change_count"] == s["change_count"] + 1


# ---- 7. backup names from a wrong clock only break ties ------------------


def test_7_recovery_takes_the_highest_change_count_whatever_the_names_say(
    state_path: Path,
) -> None:
    base = port_block(5)[0]
    seed(state_path, base, base + 4, picks=1)
    backups = state_path.parent / "backups"
    template = json.loads(state_path.read_text())
    for name in os.listdir(backups):
        (backups / name).unlink()

    def backup(stamp: str, count: int) -> None:
        content = dict(template, change_count=count)
        (backups / f"{state_path.stem}_{stamp}.json").write_text(json.dumps(content))

    backup("20271125_120000", 60)  # the clock was a year ahead
    backup("20261125_120000", 62)  # corrected, the real newest state
    backup("20261125_115959", 62)  # the same state, named a second earlier
    backup("20261125_115900", 61)
    state_path.write_text("{damaged")
    m = manager(state_path, base, base + 4)
    s = m.get_state()
    m.stop()
    assert s["change_count"] == 62
    assert f"{state_path.stem}_20261125_120000.json" in s["last_error"], s["last_error"]


# ---- 8. an idle manager writes nothing ------------------------------------


def test_8_an_idle_refresh_writes_nothing_but_last_checked_moves(state_path: Path) -> None:
    base = port_block(4)[0]
    m = manager(state_path, base, base + 3, refresh_interval=0.05)
    try:
        m.pick_port()
        before = os.stat(state_path)
        backups = m.backups()
        # Five background refreshes, each seen by the moment it stamped.
        seen = {m.get_state()["last_checked_unix"]}
        deadline = time.monotonic() + 30
        while len(seen) < 6:
            assert time.monotonic() < deadline, f"{len(seen) - 1} refreshes ran in 30 s"
            time.sleep(0.01)
            seen.add(m.get_state()["last_checked_unix"])
        after = os.stat(state_path)
        assert m.backups() == backups
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    finally:
        m.stop()


def test_8_a_lock_file_that_cannot_be_used_stops_every_save_and_says_so(
    state_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    base = port_block(4)[0]
    caplog.set_level(logging.INFO, logger="dynamic_port_manager")
    # A link planted at the folder lock's name: the lock is never taken through
    # it, and without the lock the state file is never written (two managers
    # saving unlocked lose each other's history).
    state_path.parent.mkdir(parents=True)
    (state_path.parent / ".dynamic_port_manager.lock").symlink_to(state_path.parent / "elsewhere")
    m = manager(state_path, base, base + 3, refresh_interval=0.05)
    try:
        port = m.pick_port()
        state = m.get_state()
        assert state["error_active"] is True
        assert "cannot lock state file" in state["last_error"], state["last_error"]
        assert ".dynamic_port_manager.lock" in state["last_error"]
        # The pick itself holds: memory has it, the registry leases it.
        assert state["current_port"] == port
        assert [h["new"] for h in state["history"]] == [port]
        seen = len(caplog.records)
        m.refresh()
        # The refresh ran (the background thread's records name no caller)...
        [refreshed] = [
            r
            for r in caplog.records[seen:]
            if r.funcName == "test_8_a_lock_file_that_cannot_be_used_stops_every_save_and_says_so"
        ]
        assert "cannot lock state file" in refreshed.getMessage()
        assert "not written" in refreshed.getMessage()
        # ...and wrote nothing.
        assert not state_path.exists()
        assert m.backups() == []
    finally:
        m.stop()
    assert not (state_path.parent / "elsewhere").exists()
    assert not state_path.exists()


# ---- 9. names that differ only in bytes that are not UTF-8 ---------------


def test_9_state_files_differing_only_in_non_utf8_bytes_keep_their_own_backups(
    tmp_path: Path, registry: Path
) -> None:
    # os.fsdecode gives the str Python itself uses for such a name.
    base = port_block(10)[0]
    first = os.fsdecode(os.fsencode(tmp_path) + b"/s\xff.json")
    second = os.fsdecode(os.fsencode(tmp_path) + b"/s\xfe.json")
    a = manager(first, base, base + 9)
    b = manager(second, base, base + 9)
    try:
        ports_a = [a.pick_port() for _ in range(4)]
        port_b = b.pick_port()
        # Each file shows its own manager's lease only.
        assert [v["port"] for v in a.get_state()["leases"]] == ports_a[-1:]
        assert [v["port"] for v in b.get_state()["leases"]] == [port_b]
        assert not set(a.backups()) & set(b.backups())
    finally:
        a.stop()
        b.stop()
    del a, b  # this process's views of the files go with them
    count_b = json.loads(Path(second).read_text())["change_count"]
    Path(second).write_text("{damaged")
    again = manager(second, base, base + 9)
    s = again.get_state()
    again.stop()
    assert s["change_count"] == count_b - 1, s["last_error"]  # b's own last backup
    assert all(entry["new"] in (port_b, None) for entry in s["history"])


# ---- 10. errors that end, and errors at start-up -------------------------


def test_10_error_active_is_set_by_a_failure_and_cleared_by_the_next_clean_save(
    state_path: Path,
) -> None:
    base = port_block(5)[0]
    m = manager(state_path, base, base + 4)
    try:
        m.pick_port()
        assert m.get_state()["error_active"] is False
        state_path.unlink()
        os.mkfifo(state_path)  # a save cannot replace it
        m.pick_port()
        broken = m.get_state()
        assert broken["error_active"] is True and "FIFO" in broken["last_error"]
        assert m.log_json()["dpm.error_active"] is True
        state_path.unlink()
        m.pick_port()
        fixed = m.get_state()
    finally:
        m.stop()
    assert fixed["error_active"] is False
    assert fixed["last_error"] == broken["last_error"], "kept, as past"
    on_disk = json.loads(state_path.read_text())
    assert on_disk["error_active"] is False


def test_10_a_registry_error_at_start_is_kept_when_a_state_file_exists(
    state_path: Path, registry: Path
) -> None:
    base = port_block(5)[0]
    seed(state_path, base, base + 4, picks=2)
    for slot in ("leases-0.json", "leases-1.json"):
        (registry / slot).write_text("{damaged")
    m = manager(state_path, base, base + 4)
    s = m.get_state()
    m.stop()
    assert "lease registry" in s["last_error"], s["last_error"]
    assert s["error_active"] is True
    assert s["change_count"] >= 2, "the file's own state was adopted"
