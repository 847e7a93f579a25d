"""Temporary file names no one else can predict (issue 15, item 10).

A save writes `.<name>.<pid>.<random>.tmp` (12 random letters), made with
O_EXCL, then puts it in place. Another user of a shared sticky folder can
no longer plant a FIFO at the name a saver will use and so stop its saves;
leftovers of killed savers, of the current form and of the older
`.<name>.<pid>.tmp`, are still swept.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from dynamic_port_manager import DynamicPortManager

# A child that has not answered by then is hanging (each does well under 5 s).
HANG = 60
NOBODY = 65534


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def temporaries(folder: Path) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.endswith(".tmp"))


def test_leftovers_of_killed_savers_are_swept_in_both_forms(
    state_path: Path, free_port: int
) -> None:
    folder = state_path.parent
    folder.mkdir(parents=True)
    dead = dead_pid()
    name = state_path.name
    leftovers = [f".{name}.{dead}.tmp", f".{name}.{dead}.qwertyuiopas.tmp"]
    # Not a state file's (no `.json`, no lock beside it): a user's own file.
    foreign = f".notes.txt.{dead}.qwertyuiopas.tmp"
    for leftover in [*leftovers, foreign]:
        (folder / leftover).write_text("{")
    m = DynamicPortManager(free_port, free_port, state_path, console_log=False)
    try:
        assert temporaries(folder) == [foreign]
        # ...and at refresh, for ones left while the manager runs.
        for leftover in leftovers:
            (folder / leftover).write_text("{")
        m.refresh()
        assert temporaries(folder) == [foreign]
    finally:
        m.stop()


SAVER = """
import json, os, sys
from dynamic_port_manager import DynamicPortManager
port, path = int(sys.argv[1]), sys.argv[2]
m = DynamicPortManager(port, port, path, console_log=False, backup_max=2)
for _ in range(6):
    m.pick_port()
    m.release_port()
m.stop()
print(json.dumps({"pid": os.getpid()}))
"""


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_each_save_writes_a_name_no_one_could_predict(state_path: Path, free_port: int) -> None:
    trace = state_path.parent.parent / "trace"
    done = subprocess.run(
        [
            "strace",
            "-f",
            "-qq",
            "-s",
            "4096",
            "-e",
            "trace=openat,rename,renameat,renameat2",
            "-o",
            str(trace),
            sys.executable,
            "-c",
            SAVER,
            str(free_port),
            str(state_path),
        ],
        capture_output=True,
        text=True,
        timeout=HANG,
    )
    if done.returncode != 0 and "ptrace" in done.stderr:
        pytest.skip(f"strace cannot trace here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    pid = json.loads(done.stdout.strip().splitlines()[-1])["pid"]
    name = state_path.name
    mentioned = re.findall(rf'"(\.{re.escape(name)}\.[^"/]*\.tmp)"', trace.read_text())
    # Each save makes or recycles one temporary file and moves it into place.
    temps = set(mentioned)
    assert len(temps) >= 12, mentioned
    form = re.compile(rf"\.{re.escape(name)}\.{pid}\.[a-z]{{12}}\.tmp")
    assert all(form.fullmatch(t) for t in temps), sorted(temps)
    assert not (state_path.parent / f".{name}.{pid}.tmp").exists()


@pytest.fixture
def shared_folder() -> Iterator[Path]:
    """A folder like /tmp: anyone may make files in it, only their owner may
    remove them (sticky). Outside pytest's private tmp_path, so that another
    user can reach it."""
    folder = Path(tempfile.mkdtemp(prefix="dpm-shared-"))
    os.chmod(folder, 0o1777)
    yield folder
    shutil.rmtree(folder)


AS_NOBODY = """
import json, os, sys
from dynamic_port_manager import DynamicPortManager
port, path = int(sys.argv[1]), sys.argv[2]
print(os.getpid(), flush=True)
sys.stdin.readline()  # the FIFO is planted
m = DynamicPortManager(port, port, path, console_log=False)
try:
    picked = m.pick_port()
    error = m.get_state()["last_error"]
finally:
    m.stop()
print(json.dumps({"picked": picked, "error": error}))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="a saver of another uid needs root to start")
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv is not installed")
def test_a_fifo_another_user_planted_at_the_old_name_does_not_stop_saves(
    shared_folder: Path, free_port_factory: Callable[[], int]
) -> None:
    port = free_port_factory()
    registry = shared_folder / "registry"
    registry.mkdir(mode=0o700)
    os.chown(registry, NOBODY, NOBODY)
    state_path = shared_folder / "svc.json"
    env = {**os.environ, "DPM_REGISTRY_DIR": str(registry), "HOME": str(shared_folder)}
    saver = subprocess.Popen(
        [
            "setpriv",
            f"--reuid={NOBODY}",
            f"--regid={NOBODY}",
            "--clear-groups",
            sys.executable,
            "-c",
            textwrap.dedent(AS_NOBODY),
            str(port),
            str(state_path),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert saver.stdin is not None and saver.stdout is not None
        first = saver.stdout.readline()
        assert first.strip().isdigit(), first + (saver.stderr.read() if saver.stderr else "")
        # Planted by root (another user than the saver) at the name earlier
        # versions would have saved through: the saver may not remove it.
        planted = shared_folder / f".svc.json.{int(first)}.tmp"
        os.mkfifo(planted, 0o666)
        saver.stdin.write("go\n")
        saver.stdin.flush()
        out, err = saver.communicate(timeout=HANG)
    finally:
        if saver.poll() is None:
            saver.kill()
            saver.wait()
    assert saver.returncode == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result == {"picked": port, "error": None}, err
    saved = json.loads(state_path.read_text())
    assert saved["history"][0]["new"] == port
    assert stat.S_ISFIFO(planted.lstat().st_mode), "the planted FIFO was touched"
