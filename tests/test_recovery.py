"""Damaged state files, unwritable folders, and files of the original module.

A damaged file is set aside (never deleted) and the state rebuilt from the
newest valid backup, else fresh; a state file that cannot be written never
crashes the host program.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dynamic_port_manager import DynamicPortManager, RegistryError, list_leases
from router_helpers import port_block

JALALI_RE = re.compile(
    r"^\d{4}/\d{2}/\d{2} \d{2}:\d{2} "
    r"(shanbe|yekshanbe|doshanbe|seshanbe|chaharshanbe|panjshanbe|jome)$"
)
LOGGER = "dynamic_port_manager"

# The state file layout of SPEC Part 1, as the original pure-Python module wrote it.
ORIGINAL_FILE = {
    "current_port": 3000,
    "free_ports": [8001, 8002, 8003],
    "used_ports": [3000],
    "port_usage": {"3000": 3, "8001": 1},
    "history": [
        {"time": "1403/05/01 12:00 doshanbe", "prev": None, "new": 3000},
        {"time": "1403/05/01 12:10 doshanbe", "prev": 3000, "new": 8001},
    ],
    "last_checked": "1403/05/01 12:10 doshanbe",
    "change_count": 2,
    "last_error": None,
    "last_error_time": None,
    "settings": {
        "port_range": [3000, 9000],
        "json_path": "utils/port_state/dynamic_ports_service1.json",
        "history_max": 50,
    },
}


def manager(path: Path, lo: int, hi: int, **kwargs: Any) -> DynamicPortManager:
    kwargs.setdefault("console_log", False)
    return DynamicPortManager(lo, hi, path, **kwargs)


def seed(path: Path, lo: int, hi: int, picks: int = 3) -> dict[str, Any]:
    """Makes a state file with history and backups; returns the newest backup's content."""
    m = manager(path, lo, hi)
    try:
        for _ in range(picks):
            m.pick_port()
    finally:
        m.stop()
    names = m.backups()
    assert len(names) >= 2
    newest = json.loads((m.backup_dir / names[-1]).read_text())
    assert newest["change_count"] == picks
    return newest


def set_aside(path: Path) -> list[Path]:
    return sorted(path.parent.glob(path.name + ".corrupt-*"))


def core_messages(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER]


def valid_bytes() -> bytes:
    return json.dumps(ORIGINAL_FILE, indent=2).encode()


def wrong(**changes: Any) -> bytes:
    return json.dumps({**ORIGINAL_FILE, **changes}).encode()


DAMAGE = {
    "garbage": b"\x00\xff\xfe this is not JSON at all",
    "empty": b"",
    "whitespace": b"  \n\t\n",
    "truncated": valid_bytes()[: len(valid_bytes()) // 2],
    "cut-at-one-byte-short": valid_bytes()[:-1],
    "a-list": b"[1, 2, 3]",
    "a-number": b"3000",
    "an-unrelated-object": b'{"ports": [3000, 3001]}',
    "a-key-missing": json.dumps(
        {k: v for k, v in ORIGINAL_FILE.items() if k != "history"}
    ).encode(),
    "port-not-a-number": wrong(current_port="three thousand"),
    "port-out-of-range": wrong(current_port=70000),
    "history-not-a-list": wrong(history="none"),
    "usage-key-not-a-port": wrong(port_usage={"http": 1}),
    "settings-wrong-shape": wrong(settings={"port_range": "3000-9000"}),
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_a_damaged_state_file_is_set_aside_and_restored_from_the_newest_backup(
    state_path: Path, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    base = port_block(10)[0]
    caplog.set_level(logging.INFO, logger=LOGGER)
    lo, hi = base, base + 9
    newest = seed(state_path, lo, hi)
    damaged = DAMAGE[kind]
    state_path.write_bytes(damaged)
    caplog.clear()

    m = manager(state_path, lo, hi)
    try:
        state = m.get_state()
        # History and counts come back from the newest backup.
        assert state["change_count"] == newest["change_count"]
        assert state["history"] == newest["history"]
        assert state["port_usage"] == newest["port_usage"]
        # The damaged bytes are kept beside the state file, not deleted.
        (aside,) = set_aside(state_path)
        assert aside.read_bytes() == damaged
        # last_error says what happened: the file was damaged, where it went, what came back.
        error = state["last_error"]
        assert isinstance(error, str)
        assert aside.name in error
        assert m.backups()[-1] in error
        assert JALALI_RE.match(state["last_error_time"])
        records = core_messages(caplog)
        assert any(
            ("RECOVER" in r.getMessage() or "ERROR" in r.getMessage())
            and aside.name in r.getMessage()
            for r in records
        ), [r.getMessage() for r in records]
        # The state file is whole again, and the manager goes on from the backup.
        assert json.loads(state_path.read_text()) == state
        m.pick_port()
        assert m.get_state()["change_count"] == newest["change_count"] + 1
        assert m.get_state()["history"][: len(newest["history"])] == newest["history"]
    finally:
        m.stop()


@pytest.mark.parametrize("kind", ["garbage", "empty", "truncated", "an-unrelated-object"])
def test_without_a_valid_backup_the_state_starts_fresh(
    state_path: Path, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    base = port_block(10)[0]
    caplog.set_level(logging.INFO, logger=LOGGER)
    state_path.parent.mkdir(parents=True)
    state_path.write_bytes(DAMAGE[kind])
    m = manager(state_path, base, base + 9)
    try:
        state = m.get_state()
        assert state["change_count"] == 0
        assert state["history"] == []
        assert state["port_usage"] == {}
        (aside,) = set_aside(state_path)
        assert aside.read_bytes() == DAMAGE[kind]
        assert state["last_error"] is not None and aside.name in state["last_error"]
        assert JALALI_RE.match(state["last_error_time"])
        assert any(aside.name in r.getMessage() for r in core_messages(caplog))
        assert m.pick_port() == base
        assert m.get_state()["change_count"] == 1
    finally:
        m.stop()


def test_a_damaged_newest_backup_is_passed_over_for_an_older_valid_one(state_path: Path) -> None:
    base = port_block(10)[0]
    lo, hi = base, base + 9
    seed(state_path, lo, hi, picks=4)
    m0 = manager(state_path, lo, hi)
    m0.stop()  # one more backup; the state file now has the release at stop
    names = m0.backups()
    backup_dir = m0.backup_dir
    # The managers of one process share the file's view while one lives: let
    # it go, so the next one starts from the disk, as a new process would.
    del m0
    older = json.loads((backup_dir / names[-2]).read_text())
    (backup_dir / names[-1]).write_bytes(b'{"current_port": ')
    state_path.write_bytes(b"")
    m = manager(state_path, lo, hi)
    try:
        state = m.get_state()
        assert state["change_count"] == older["change_count"]
        assert state["history"] == older["history"]
        assert names[-2] in state["last_error"]
    finally:
        m.stop()


def test_damage_while_running_is_repaired_from_memory(
    state_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    base = port_block(10)[0]
    caplog.set_level(logging.INFO, logger=LOGGER)
    m = manager(state_path, base, base + 9)
    try:
        m.pick_port()
        m.pick_port()
        before = m.get_state()
        state_path.write_bytes(b"{ broken")
        third = m.pick_port()
        state = m.get_state()
        # Memory is newer than any backup: nothing is lost.
        assert state["change_count"] == 3
        assert state["history"][:2] == before["history"]
        assert state["history"][2]["new"] == third
        (aside,) = set_aside(state_path)
        assert aside.read_bytes() == b"{ broken"
        assert aside.name in state["last_error"]
        assert json.loads(state_path.read_text())["change_count"] == 3
        assert any(aside.name in r.getMessage() for r in core_messages(caplog))
    finally:
        m.stop()


def test_a_file_of_the_original_module_loads_and_continues(state_path: Path) -> None:
    base = port_block(10)[0]
    state_path.parent.mkdir(parents=True)
    state_path.write_text(json.dumps(ORIGINAL_FILE, indent=4))
    m = manager(state_path, base, base + 9)
    try:
        state = m.get_state()
        assert set_aside(state_path) == []
        assert state["last_error"] is None
        assert state["change_count"] == 2
        assert state["history"] == ORIGINAL_FILE["history"]
        assert state["port_usage"] == {"3000": 3, "8001": 1}
        # Our own settings, not the file's.
        assert state["settings"]["port_range"] == [base, base + 9]
        port = m.pick_port()
        state = m.get_state()
        assert state["change_count"] == 3
        assert state["history"][:2] == ORIGINAL_FILE["history"]
        assert state["history"][2]["new"] == port
        assert JALALI_RE.match(state["history"][2]["time"])
        assert state["port_usage"] == {"3000": 3, "8001": 1, str(port): 1}
        on_disk = json.loads(state_path.read_text())
        assert on_disk["history"][:2] == ORIGINAL_FILE["history"]
        # The file written over it was backed up first.
        oldest = m.backups()[0]
        assert json.loads((m.backup_dir / oldest).read_text()) == ORIGINAL_FILE
    finally:
        m.stop()


def test_an_original_file_with_a_longer_history_is_trimmed_to_history_max(
    state_path: Path,
) -> None:
    base = port_block(10)[0]
    state_path.parent.mkdir(parents=True)
    state_path.write_text(json.dumps(ORIGINAL_FILE))
    m = manager(state_path, base, base + 9, history_max=1)
    try:
        state = m.get_state()
        assert state["history"] == ORIGINAL_FILE["history"][-1:]
        assert state["change_count"] == 2
    finally:
        m.stop()


# ---------------------------------------------------------------- unwritable


def writable(folder: Path) -> bool:
    probe = folder / ".write-probe"
    try:
        probe.touch()
    except OSError:
        return False
    probe.unlink()
    return True


@contextlib.contextmanager
def read_only(folder: Path, mode: int = 0o755) -> Iterator[None]:
    """Makes ``folder`` refuse new files, also for root (where chmod does not)."""
    if os.geteuid() != 0:
        folder.chmod(0o555)

        def restore() -> None:
            folder.chmod(mode)

    else:
        chattr = shutil.which("chattr")
        if chattr is None:
            pytest.skip("running as root, where chmod does not stop writes, and no chattr")
        done = subprocess.run([chattr, "+i", str(folder)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"running as root and chattr +i fails here: {done.stderr!r}")

        def restore() -> None:
            subprocess.run([chattr, "-i", str(folder)], check=True)

    try:
        if writable(folder):
            pytest.skip(f"could not make {folder} read-only here")
        yield
    finally:
        restore()


def test_a_read_only_state_folder_does_not_crash_pick_port(
    state_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    base = port_block(10)[0]
    caplog.set_level(logging.INFO, logger=LOGGER)
    m = manager(state_path, base, base + 9)
    try:
        first = m.pick_port()
        on_disk = state_path.read_bytes()
        with read_only(state_path.parent):
            caplog.clear()
            second = m.pick_port()
            assert second != first
            assert m.active_port == second
            state = m.get_state()
            assert state["current_port"] == second
            assert state["last_error"] is not None
            assert str(state_path) in state["last_error"]
            assert JALALI_RE.match(state["last_error_time"])
            errors = [r for r in core_messages(caplog) if r.levelno >= logging.ERROR]
            assert errors and "ERROR" in errors[0].getMessage()
            # The lease is real: no other manager can have the port.
            assert [lease["port"] for lease in list_leases()] == [second]
            assert m.release_port() is True
            assert list_leases() == []
            third = m.pick_port()
            assert state_path.read_bytes() == on_disk
        # Writable again: the next change is saved.
        fourth = m.pick_port()
        saved = json.loads(state_path.read_text())
        assert saved["current_port"] == fourth
        assert saved["history"][-1] == {
            "time": saved["history"][-1]["time"],
            "prev": third,
            "new": fourth,
        }
    finally:
        m.stop()


def test_a_read_only_state_folder_keeps_the_record_in_memory(state_path: Path) -> None:
    base = port_block(10)[0]
    m = manager(state_path, base, base + 9)
    try:
        m.pick_port()
        with read_only(state_path.parent):
            ports = [m.pick_port() for _ in range(3)]
            state = m.get_state()
            assert state["change_count"] == 4
            assert [h["new"] for h in state["history"][-3:]] == ports
            assert state["last_error"] is not None
        m.pick_port()
        saved = json.loads(state_path.read_text())
        # Nothing done while the folder was read-only is lost once it is writable.
        assert saved["change_count"] == 5
        assert [h["new"] for h in saved["history"][1:4]] == ports
    finally:
        m.stop()


def test_a_state_folder_read_only_from_the_start(state_path: Path) -> None:
    base = port_block(10)[0]
    state_path.parent.mkdir(parents=True)
    with read_only(state_path.parent):
        m = manager(state_path, base, base + 9)
        try:
            assert m.get_state()["last_error"] is not None
            first = m.pick_port()
            second = m.pick_port()
            assert (first, second) == (base, base + 1)
            state = m.get_state()
            assert state["change_count"] == 2
            assert [(h["prev"], h["new"]) for h in state["history"]] == [
                (None, first),
                (first, second),
            ]
            assert not state_path.exists()
        finally:
            m.stop()
        assert list_leases() == []


def test_a_state_path_under_a_regular_file_works_from_memory(
    tmp_path: Path, registry: Path, caplog: pytest.LogCaptureFixture
) -> None:
    base = port_block(10)[0]
    caplog.set_level(logging.INFO, logger=LOGGER)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the state folder should be")
    path = blocker / "state.json"
    m = manager(path, base, base + 9)
    try:
        first = m.pick_port()
        second = m.pick_port()
        assert (first, second) == (base, base + 1)
        state = m.get_state()
        assert state["change_count"] == 2
        assert state["last_error"] is not None and str(path) in state["last_error"]
        assert JALALI_RE.match(state["last_error_time"])
        assert any(r.levelno >= logging.ERROR for r in core_messages(caplog))
        assert m.release_port() is True
        assert m.get_state()["change_count"] == 3
        assert blocker.read_text() == "a file where the state folder should be"
    finally:
        m.stop()


def test_an_unwritable_registry_raises_registry_error_and_keeps_the_held_port(
    tmp_path: Path, registry: Path
) -> None:
    base = port_block(10)[0]
    m = manager(tmp_path / "s.json", base, base + 9)
    try:
        held = m.pick_port()
        # The change log exists and would take the change through the open
        # descriptor: unwritable means it, too, refuses writes.
        with read_only(registry, mode=0o700), read_only(registry / "leases.log", mode=0o600):
            with pytest.raises(RegistryError) as info:
                m.pick_port()
            assert isinstance(info.value, OSError)
            assert str(registry) in str(info.value)
            # No unrecorded port was handed out, and the held one is still held.
            assert m.active_port == held
            assert [lease["port"] for lease in list_leases()] == [held]
        assert m.pick_port() != held
    finally:
        m.stop()


def test_a_damaged_registry_is_set_aside_and_live_leases_are_reasserted(
    tmp_path: Path, registry: Path, caplog: pytest.LogCaptureFixture
) -> None:
    base = port_block(10)[0]
    caplog.set_level(logging.INFO, logger=LOGGER)
    m = manager(tmp_path / "s.json", base, base + 9, refresh_interval=0.05)
    try:
        held = m.pick_port()
        damaged = b'{"version": 1, "leases": [{"port": '
        # Damage every file of the table (the full tables and the change log:
        # which one holds what now is the core's business).
        for leases_file in [*registry.glob("leases-*.json"), registry / "leases.log"]:
            leases_file.write_bytes(damaged)
        # The next refresh notices, keeps the evidence, and re-records the lease.
        deadline = time.monotonic() + 15
        while not (
            list(registry.glob("leases*.corrupt-*"))
            and [lease["port"] for lease in list_leases()] == [held]
        ):
            assert time.monotonic() < deadline, list(registry.iterdir())
            time.sleep(0.01)
        asides = list(registry.glob("leases*.corrupt-*"))
        assert asides and all(a.read_bytes() == damaged for a in asides)
        (lease,) = list_leases()
        assert lease["pid"] == os.getpid()
        # The held port is still this manager's: nobody else gets it.
        other = manager(tmp_path / "other.json", base, base + 9)
        try:
            assert other.pick_port() != held
        finally:
            other.stop()
        assert m.active_port == held
        messages = [r.getMessage() for r in core_messages(caplog)]
        assert any("registry" in msg and "ERROR" in msg for msg in messages), messages
    finally:
        m.stop()


def test_an_unusable_registry_folder_fails_at_construction(tmp_path: Path, registry: Path) -> None:
    base = port_block(10)[0]
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(RegistryError):
        manager(tmp_path / "s.json", base, base + 9, registry_dir=blocker / "registry")


def test_a_registry_folder_other_users_can_write_is_refused(tmp_path: Path, registry: Path) -> None:
    base = port_block(10)[0]
    shared = tmp_path / "shared-registry"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(RegistryError, match="other users"):
        manager(tmp_path / "s.json", base, base + 9, registry_dir=shared)
