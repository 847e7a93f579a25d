"""Files that are not what they seem (issue 7, items 1-5).

FIFOs, devices, sockets and folders at the state file's path, links planted
at every name the library writes, folders another user owns, and savers
killed mid-save. Whatever could hang runs in a child process with a timeout,
so a regression fails the test instead of stopping the run. Each test's five
ports are leased through the pytest plugin: ``BASE`` to ``BASE + 4``, in its
children too.
"""

from __future__ import annotations

import json
import os
import random
import socket
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dynamic_port_manager import DynamicPortManager, RegistryError
from router_helpers import cli, port_block

# A child that has not answered by then is hanging (each does well under 5 s).
HANG = 60
# Far above what a manager needs (~40 MB), far below reading 50 MB or a
# device without a bound (800 MB to gigabytes before the fix).
RSS_LIMIT_KIB = 250 * 1024
PRECIOUS = b"precious content, 24 bytes"
# The lock file of a folder's state files (one per folder).
FOLDER_LOCK = ".dynamic_port_manager.lock"
BASE = 0  # the first of this test's five ports, set by _ports


@pytest.fixture(autouse=True)
def _ports() -> None:
    global BASE
    BASE = port_block(5)[0]


def manager(path: Path | str, lo: int, hi: int, **kwargs: Any) -> DynamicPortManager:
    kwargs.setdefault("console_log", False)
    return DynamicPortManager(lo, hi, path, **kwargs)


def child(code: str, *args: object) -> dict[str, Any]:
    """Runs `code` in a new interpreter (args as sys.argv[1:]); returns the JSON
    its last output line holds. A child that hangs fails the test (TimeoutExpired)."""
    prelude = (
        "import json, os, sys\nfrom dynamic_port_manager import DynamicPortManager\n"
        f"BASE = {BASE}\n"
        # This process's own peak (VmHWM): getrusage's ru_maxrss would carry
        # the forking parent's peak across exec.
        "def peak_rss_kib():\n"
        "    status = open('/proc/self/status').read()\n"
        "    return int(status.split('VmHWM:')[1].split()[0])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=HANG,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def temporaries(folder: Path) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.endswith(".tmp"))


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.fixture
def victim(tmp_path: Path) -> Iterator[Path]:
    """A file no save may ever reach; checked unchanged after every test using it."""
    path = tmp_path / "victim"
    path.write_bytes(PRECIOUS)
    yield path
    assert path.read_bytes() == PRECIOUS, "written through a link"


# ---- 1. FIFOs and endless devices at the state path ----------------------


@pytest.mark.parametrize("kind", ["fifo", "socket", "folder", "/dev/null"])
def test_1_2_6_something_not_a_regular_file_at_json_path_is_refused_and_left_alone(
    kind: str, state_path: Path
) -> None:
    # Items 1 (FIFO: the constructor hung), 2 (/dev/null replaced as root) and
    # 6 (socket, folder: history started over). Nothing there is read,
    # renamed or replaced, and the backups of the file it replaced are kept.
    state_path.parent.mkdir(parents=True)
    sock = None
    if kind == "/dev/null":
        target = Path("/dev/null")
    else:
        m = manager(state_path, BASE, BASE + 4)
        m.pick_port()  # a file with a backup
        m.stop()
        backups_before = sorted(os.listdir(state_path.parent / "backups"))
        state_path.unlink()
        target = state_path
        if kind == "fifo":
            os.mkfifo(state_path)
        elif kind == "socket":
            sock = socket.socket(socket.AF_UNIX)
            # By its name from inside its folder: a pytest-xdist worker's tmp_path
            # is longer than AF_UNIX's 108 bytes.
            here = os.getcwd()
            os.chdir(state_path.parent)
            try:
                sock.bind(state_path.name)
            finally:
                os.chdir(here)
        else:
            state_path.mkdir()
    mode = os.lstat(target).st_mode
    try:
        result = child(
            """
            try:
                DynamicPortManager(BASE, BASE + 4, sys.argv[1], console_log=False)
                print(json.dumps({"raised": None}))
            except Exception as e:
                print(json.dumps({"raised": type(e).__name__, "message": str(e)}))
            """,
            target,
        )
    finally:
        if sock is not None:
            sock.close()
        if kind == "/dev/null" and not stat.S_ISCHR(os.lstat("/dev/null").st_mode):
            os.unlink("/dev/null")  # put the host's /dev/null back before failing
            os.mknod("/dev/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
            os.chmod("/dev/null", 0o666)
    assert result["raised"] == "ValueError", result
    assert "json_path" in result["message"] and str(target) in result["message"]
    after = os.lstat(target).st_mode
    assert stat.S_IFMT(after) == stat.S_IFMT(mode), "replaced"
    if kind != "/dev/null":
        assert sorted(os.listdir(state_path.parent / "backups")) == backups_before
        assert not [n for n in os.listdir(state_path.parent) if ".corrupt-" in n]


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom"])
def test_1_a_link_to_an_endless_device_is_not_read(device: str, state_path: Path) -> None:
    state_path.parent.mkdir(parents=True)
    state_path.symlink_to(device)
    result = child(
        """
        m = DynamicPortManager(BASE, BASE + 4, sys.argv[1], console_log=False)
        port = m.pick_port()
        s = m.get_state()
        m.stop()
        rss = peak_rss_kib()
        print(json.dumps({"port": port, "error": s["last_error"], "rss": rss}))
        """,
        state_path,
    )
    assert result["rss"] < RSS_LIMIT_KIB, result
    assert result["port"] == BASE
    assert "symbolic link" in result["error"], result
    assert stat.S_ISCHR(os.stat(device).st_mode)
    # The link itself was replaced by the state (nothing written through it).
    assert json.loads(state_path.read_text())["history"][-1]["prev"] == BASE


def test_1_an_oversized_state_file_is_set_aside_not_read_whole(state_path: Path) -> None:
    m = manager(state_path, BASE, BASE + 4)
    m.pick_port()
    m.stop()
    with open(state_path, "ab") as f:  # still valid JSON: trailing blanks
        f.write(b" " * (50 * 1024 * 1024))
    result = child(
        """
        m = DynamicPortManager(BASE, BASE + 4, sys.argv[1], console_log=False)
        s = m.get_state()
        m.stop()
        rss = peak_rss_kib()
        print(json.dumps({"error": s["last_error"], "rss": rss, "count": s["change_count"]}))
        """,
        state_path,
    )
    assert result["rss"] < RSS_LIMIT_KIB, result
    assert "larger than 16 MiB" in result["error"], result
    aside = [n for n in os.listdir(state_path.parent) if ".corrupt-" in n]
    assert len(aside) == 1 and os.path.getsize(state_path.parent / aside[0]) > 50 * 1024 * 1024
    assert os.path.getsize(state_path) < 1024 * 1024


RUNNING_FILE_BECOMES_FIFO = """
m = DynamicPortManager(BASE, BASE + 4, sys.argv[1], console_log=False)
first = m.pick_port()
os.unlink(sys.argv[1])
os.mkfifo(sys.argv[1])
m.refresh()
second = m.pick_port()
s = m.get_state()
print(json.dumps({"ports": [first, second], "error": s["last_error"],
                  "active": s["error_active"], "count": s["change_count"]}))
m.stop()
"""


def test_1_a_running_manager_whose_file_becomes_a_fifo_keeps_working(state_path: Path) -> None:
    result = child(RUNNING_FILE_BECOMES_FIFO, state_path)
    assert result["ports"] == [BASE, BASE + 1]
    assert result["count"] == 2, "kept the state in memory"
    assert "FIFO" in result["error"] and result["active"] is True, result
    assert stat.S_ISFIFO(os.lstat(state_path).st_mode), "left as it is"


def test_1_the_cli_state_command_on_a_fifo_answers(state_path: Path) -> None:
    state_path.parent.mkdir(parents=True)
    os.mkfifo(state_path)
    done = cli("state", "--state", str(state_path), "--range", f"{BASE}-{BASE + 4}", timeout=HANG)
    assert done.returncode == 0, done.stderr
    assert "FIFO" in json.loads(done.stdout)["last_error"]
    assert stat.S_ISFIFO(os.lstat(state_path).st_mode)


def test_1_the_router_serves_a_manager_whose_file_became_a_fifo(state_path: Path) -> None:
    result = child(
        """
        import api_ports
        from fastapi import FastAPI
        from fastapi.testclient import TestClient
        m = DynamicPortManager(BASE, BASE + 4, sys.argv[1], console_log=False)
        app = FastAPI()
        app.include_router(api_ports.create_router(m), prefix="/api/v1")
        client = TestClient(app)
        m.pick_port()
        os.unlink(sys.argv[1])
        os.mkfifo(sys.argv[1])
        codes = {}
        for method, path in [("get", "state"), ("post", "pick"), ("get", "free"),
                             ("get", "history"), ("get", "backup/list"), ("get", "metrics")]:
            r = getattr(client, method)("/api/v1/port/" + path)
            codes[path] = r.status_code
            if path == "metrics":
                metrics = r.text
        state = client.get("/api/v1/port/state").json()
        m.stop()
        print(json.dumps({"codes": codes, "error": state["last_error"], "metrics": metrics}))
        """,
        state_path,
    )
    assert set(result["codes"].values()) == {200}, result["codes"]
    assert "FIFO" in result["error"]
    assert "dpm_error_active 1.0" in result["metrics"]


@pytest.mark.parametrize("names", [("leases-0.json", "leases-1.json"), ("leases.lock",)])
def test_1_3_a_fifo_in_the_registry_does_not_hang_the_constructor(
    names: tuple[str, ...], tmp_path: Path, registry: Path
) -> None:
    registry.mkdir(mode=0o700)
    for name in names:
        os.mkfifo(registry / name)
    result = child(
        """
        m = DynamicPortManager(BASE, BASE + 4, sys.argv[1], console_log=False)
        try:
            port = m.pick_port()
        except Exception as e:
            port = type(e).__name__
        print(json.dumps({"port": port, "error": m.get_state()["last_error"]}))
        m.stop()
        """,
        tmp_path / "s.json",
    )
    # Slots that are not regular files are set aside and remade; a lock file
    # that is not one is refused (and left for its owner to look at).
    assert result["port"] == ("RegistryError" if names == ("leases.lock",) else BASE), result
    assert names[0] in result["error"], result


# ---- 2. /dev/null: see the parametrized test above ------------------------


# ---- 3. writes never follow links ----------------------------------------


def test_3_a_link_at_the_temporary_file_name_is_not_written_through(
    state_path: Path, victim: Path
) -> None:
    m = manager(state_path, BASE, BASE + 4)
    planted = state_path.parent / f".{state_path.name}.{os.getpid()}.tmp"
    planted.symlink_to(victim)
    try:
        port = m.pick_port()
    finally:
        m.stop()
    assert json.loads(state_path.read_text())["history"][0]["new"] == port
    # Left alone: saves write to names no one can guess (test_temp_names.py).
    assert planted.is_symlink()


def test_3_a_link_at_the_lock_file_name_is_not_written_through(
    state_path: Path, victim: Path
) -> None:
    state_path.parent.mkdir(parents=True)
    (state_path.parent / FOLDER_LOCK).symlink_to(victim)
    # Where earlier versions kept a lock per state file: never opened now.
    Path(f"{state_path}.lock").symlink_to(victim)
    m = manager(state_path, BASE, BASE + 4)
    try:
        m.pick_port()
        error = m.get_state()["last_error"]
    finally:
        m.stop()
    assert "lock" in error and "symbolic link" in error, error


@pytest.mark.parametrize("name", ["leases-0.json", "leases-1.json", "leases.log", "leases.lock"])
def test_3_links_in_the_registry_are_not_written_through(
    name: str, state_path: Path, registry: Path, victim: Path
) -> None:
    registry.mkdir(mode=0o700)
    (registry / name).symlink_to(victim)
    result = child(
        """
        try:
            m = DynamicPortManager(BASE, BASE + 4, sys.argv[1], console_log=False)
            picks = []
            for _ in range(3):
                try:
                    picks.append(m.pick_port())
                except Exception as e:
                    picks.append(type(e).__name__)
            print(json.dumps({"picks": picks, "error": m.get_state()["last_error"]}))
            m.stop()
        except Exception as e:
            print(json.dumps({"raised": type(e).__name__, "message": str(e)}))
        """,
        state_path,
    )
    # A slot planted as a link is set aside and remade; a lock file that is
    # a link cannot be locked safely: the registry is refused, and says why.
    if name == "leases.lock":
        assert result["picks"] == ["RegistryError"] * 3, result
        assert "leases.lock is a symbolic link" in result["error"], result
    elif name == "leases-1.json":
        # The spare full table: not read or written until the change log is
        # folded into it, and then set aside and remade like the others.
        assert result["picks"] == [BASE, BASE + 1, BASE], result  # each pick moves
    else:
        assert result["picks"] == [BASE, BASE + 1, BASE], result  # each pick moves
        assert "moved aside" in result["error"], result
        assert not (registry / name).is_symlink()


def test_3_a_backups_folder_that_is_a_link_is_not_used(state_path: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    state_path.parent.mkdir(parents=True)
    (state_path.parent / "backups").symlink_to(elsewhere)
    m = manager(state_path, BASE, BASE + 4)
    try:
        m.pick_port()
        m.pick_port()
        error = m.get_state()["last_error"]
        assert m.backups() == []
    finally:
        m.stop()
    assert os.listdir(elsewhere) == []
    assert "backups" in error and "symbolic link" in error, error
    assert json.loads(state_path.read_text())["change_count"] == 3


def test_3_a_state_folder_the_user_linked_is_followed_but_backups_are_not(
    tmp_path: Path, registry: Path
) -> None:
    # `port_state -> shared/port_state` is a deployment's own layout, not an
    # attack: the state lands in the folder it reaches (pinned once opened).
    shared = tmp_path / "shared"
    shared.mkdir()
    (tmp_path / "port_state").symlink_to(shared)
    m = manager(tmp_path / "port_state" / "s.json", BASE, BASE + 4)
    try:
        port = m.pick_port()
        m.pick_port()
        assert m.get_state()["last_error"] is None
    finally:
        m.stop()
    assert json.loads((shared / "s.json").read_text())["history"][0]["new"] == port
    assert (shared / "backups").is_dir() and not (shared / "backups").is_symlink()


def test_3_a_registry_folder_that_is_a_link_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(RegistryError, match="symbolic link"):
        manager(tmp_path / "s.json", BASE, BASE + 4, registry_dir=link)
    assert os.listdir(real) == []


def test_3_a_registry_folder_swapped_for_a_link_later_is_not_followed(tmp_path: Path) -> None:
    reg, moved, decoy = tmp_path / "reg", tmp_path / "moved", tmp_path / "decoy"
    decoy.mkdir(mode=0o700)
    m = manager(tmp_path / "s.json", BASE, BASE + 4, registry_dir=reg)
    try:
        port = m.pick_port()
        reg.rename(moved)
        reg.symlink_to(decoy)
        # Reopened at the path, with every check again: the link is refused.
        with pytest.raises(RegistryError, match="symbolic link"):
            m.pick_port()
        assert m.active_port == port
    finally:
        m.stop()
    assert os.listdir(decoy) == []


# ---- 4. folders another user owns or can write ---------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")
def test_3_4_a_registry_folder_another_user_owns_is_refused(tmp_path: Path) -> None:
    # As one planted in a sticky /tmp at the default registry's name would be.
    planted = tmp_path / "planted"
    planted.mkdir(mode=0o700)
    os.chown(planted, 65534, 65534)
    with pytest.raises(RegistryError, match="owned by uid 65534"):
        manager(tmp_path / "s.json", BASE, BASE + 4, registry_dir=planted)
    assert os.listdir(planted) == []


def plant_foreign_backup(state_path: Path) -> Path:
    """A state with history and backups, then a forged backup that sorts newest."""
    m = manager(state_path, BASE, BASE + 4)
    for _ in range(3):
        m.pick_port()
    m.stop()
    forged = json.loads(state_path.read_text())
    forged["change_count"] = 999
    planted = state_path.parent / "backups" / f"{state_path.stem}_29991231_235959.json"
    planted.write_text(json.dumps(forged))
    state_path.write_text("{damaged")
    return planted


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")
def test_4_a_backups_folder_another_user_owns_is_not_used(state_path: Path) -> None:
    planted = plant_foreign_backup(state_path)
    backups = planted.parent
    for path in [backups, *backups.iterdir()]:
        os.chown(path, 65534, 65534)
    m = manager(state_path, BASE, BASE + 4)
    s = m.get_state()
    m.stop()
    assert s["change_count"] != 999
    assert "uid 65534" in s["last_error"] or "uid 65534" in json.dumps(s["history"]), s
    assert json.loads(planted.read_text())["change_count"] == 999  # left untouched


def test_4_a_backups_folder_others_can_write_is_not_used(state_path: Path) -> None:
    planted = plant_foreign_backup(state_path)
    os.chmod(planted.parent, 0o777)
    m = manager(state_path, BASE, BASE + 4)
    s = m.get_state()
    m.stop()
    assert s["change_count"] != 999
    assert "writable by other users" in s["last_error"], s


# ---- 5. temporary files of killed savers ---------------------------------

SAVER = """
import sys
from dynamic_port_manager import DynamicPortManager
BASE = int(sys.argv[2])
m = DynamicPortManager(BASE, BASE + 4, sys.argv[1], console_log=False, backup_max=3)
print("ready", flush=True)
while True:
    m.pick_port()
    m.release_port()
"""


@pytest.mark.slow
def test_5_temporary_files_of_killed_savers_are_removed(state_path: Path) -> None:
    manager(state_path, BASE, BASE + 4).stop()
    # One left by a saver long gone, so the count before cleanup is never 0.
    (state_path.parent / f".{state_path.name}.{dead_pid()}.tmp").write_text("{")
    for _ in range(50):
        saver = subprocess.Popen(
            [sys.executable, "-c", SAVER, state_path, str(BASE)], stdout=subprocess.PIPE, text=True
        )
        assert saver.stdout is not None
        assert saver.stdout.readline() == "ready\n"
        # 0-30 ms into the loop: some kills land between a temporary file's
        # creation and its rename.
        time.sleep(random.uniform(0, 0.03))
        saver.kill()
        saver.wait(timeout=HANG)
        saver.stdout.close()
    left_by_kills = len(temporaries(state_path.parent))
    m = manager(state_path, BASE, BASE + 4)
    assert temporaries(state_path.parent) == [], f"{left_by_kills} before start"
    # ...and at refresh, for one left while this manager runs.
    (state_path.parent / f".{state_path.name}.{dead_pid()}.tmp").write_text("{")
    m.refresh()
    assert temporaries(state_path.parent) == []
    assert json.loads(state_path.read_text())["settings"]["port_range"] == [BASE, BASE + 4]
    m.stop()


def test_5_damaged_copies_set_aside_stay_bounded(state_path: Path) -> None:
    m = manager(state_path, BASE, BASE + 4)
    try:
        for _ in range(8):
            state_path.write_text("{damaged")
            m.pick_port()  # reads the file first: sets it aside, rewrites it
        assert "damaged" in m.get_state()["last_error"]
    finally:
        m.stop()
    aside = [n for n in os.listdir(state_path.parent) if ".corrupt-" in n]
    assert len(aside) == 5, aside
