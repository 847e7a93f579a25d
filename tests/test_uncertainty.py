"""An error is not evidence: what could not be checked is unknown, and unknown
is never acted on as if it were known (issue: faults, pid reuse and odd names
never cost another process its lease or a file its history).

Every test runs real processes; faults are provoked for real (a descriptor
limit with setrlimit) or injected at one system call with strace where it is
installed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from dynamic_port_manager import DynamicPortManager, NoFreePortError, list_leases

STRACE = shutil.which("strace")
needs_strace = pytest.mark.skipif(
    STRACE is None, reason="strace is not installed (.ci/run installs it with apt-get)"
)
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (CI runs as root)")


def python(code: str, *args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Runs `code` in a fresh interpreter (the test's environment: its registry)."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=60,
        **kwargs,  # type: ignore[arg-type]
    )


@contextmanager
def holder(state: Path, start: int, end: int, picks: int = 1) -> Iterator[list[int]]:
    """A live process holding `picks` ports of start-end (for_pid leases after
    the first, so it holds them all), until the block ends."""
    code = f"""
        import os, sys
        from dynamic_port_manager import DynamicPortManager
        m = DynamicPortManager({start}, {end}, {str(state)!r}, console_log=False)
        ports = [m.pick_port()] + [m.pick_port(pid=os.getpid()) for _ in range({picks} - 1)]
        print(" ".join(map(str, ports)), flush=True)
        sys.stdin.read()
    """
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, "the holder did not start"
        yield [int(p) for p in line.split()]
    finally:
        proc.kill()
        proc.wait(timeout=30)


def leased_ports() -> list[int]:
    return sorted(lease["port"] for lease in list_leases())


def strace_inject(syscall: str, error: str, path: Path, when: str = "1") -> list[str]:
    """A strace prefix that fails the `when`-th `syscall` on `path` with `error`."""
    assert STRACE is not None
    return [
        STRACE,
        "-f",
        "-qq",
        "-o",
        os.devnull,
        "-P",
        str(path),
        "-e",
        f"trace={syscall}",
        "-e",
        f"inject={syscall}:error={error}:when={when}",
    ]


# ---- 1. out of descriptors: unknown, not dead ---------------------------


def test_1_a_process_out_of_descriptors_never_takes_another_holders_lease(
    state_path: Path, free_port_factory: Callable[[], int]
) -> None:
    base = free_port_factory()
    with holder(state_path, base, base) as held:
        assert held == [base]
        # A process at its descriptor limit: every probe, every /proc read and
        # every pidfd fails with EMFILE. Its pick must fail, not sweep.
        done = python(
            f"""
            import os, resource
            from dynamic_port_manager import DynamicPortManager, NoFreePortError
            m = DynamicPortManager({base}, {base}, {str(state_path)!r}, console_log=False)
            used = len(os.listdir("/proc/self/fd"))
            resource.setrlimit(resource.RLIMIT_NOFILE, (used, used))
            try:
                print("picked", m.pick_port())
            except NoFreePortError as e:
                print("none", e)
            except OSError as e:
                print("error", e)
            """
        )
        assert done.returncode == 0, done.stderr
        assert not done.stdout.startswith("picked"), done.stdout
        # The live holder's lease is intact, and nobody else is handed its port.
        assert leased_ports() == [base]
        m = DynamicPortManager(base, base, state_path.with_name("other.json"), console_log=False)
        try:
            with pytest.raises(NoFreePortError):
                m.pick_port()
        finally:
            m.stop()


# ---- 2. a failed open of the lease table is not damage ------------------


CHANGE_TABLE = """
import sys
from dynamic_port_manager import DynamicPortManager
c = DynamicPortManager(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], console_log=False)
c.pick_port()
c.stop()
"""


def test_2_emfile_reopening_the_lease_table_never_sets_it_aside(
    state_path: Path, registry: Path, free_port_factory: Callable[[], int]
) -> None:
    base = free_port_factory()
    other = str(state_path.with_name("b.json"))
    with holder(state_path, base, base + 3, picks=3) as held:
        assert leased_ports() == sorted(held)
        # B opens the registry, then another process changes the table (a new
        # slot file that B must open again), then B is out of descriptors.
        code = f"""
            import os, resource, subprocess, sys
            from dynamic_port_manager import DynamicPortManager
            m = DynamicPortManager({base}, {base + 3}, {other!r}, console_log=False)
            m.pick_port()
            m.release_port()
            subprocess.run(
                [sys.executable, "-c", sys.argv[1], "{base}", "{base + 3}", {other!r} + ".c"],
                check=True,
            )
            used = len(os.listdir("/proc/self/fd"))
            resource.setrlimit(resource.RLIMIT_NOFILE, (used, used))
            try:
                print("picked", m.pick_port())
            except Exception as e:
                print("error", type(e).__name__, e)
        """
        done = python(code, CHANGE_TABLE)
        assert done.returncode == 0, done.stderr
        # Nothing was set aside as damaged, and every lease of the live holder
        # is still there: none of its ports can be handed out again.
        assert not list(registry.glob("*corrupt*")), os.listdir(registry)
        assert set(held) <= set(leased_ports()), done.stdout
        if done.stdout.startswith("picked"):
            assert int(done.stdout.split()[1]) not in held


# ---- 3. a transient read error at start never rolls a file back ---------


@needs_strace
@pytest.mark.parametrize("syscall,error", [("read", "EIO"), ("read", "ENOMEM")])
@pytest.mark.parametrize("backup_max", [10, 0])
def test_3_a_read_error_at_start_leaves_the_state_file_as_it_is(
    state_path: Path,
    free_port_factory: Callable[[], int],
    syscall: str,
    error: str,
    backup_max: int,
) -> None:
    base = free_port_factory()
    m = DynamicPortManager(base, base + 2, state_path, backup_max=backup_max, console_log=False)
    for _ in range(6):
        m.pick_port()
    m.stop()
    before = json.loads(state_path.read_text())
    assert before["change_count"] == 7  # six picks and the release at stop
    code = f"""
        from dynamic_port_manager import DynamicPortManager
        m = DynamicPortManager({base}, {base + 2}, {str(state_path)!r},
                               backup_max={backup_max}, console_log=False)
        print(m.get_state()["last_error"])
        m.stop()
    """
    done = subprocess.run(
        [*strace_inject(syscall, error, state_path), sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    after = json.loads(state_path.read_text())
    assert after["change_count"] >= before["change_count"], done.stdout
    assert after["history"][: len(before["history"])] == before["history"]


# ---- 4. a lock not taken is an error, never a skip ----------------------


def test_4_a_fifo_at_the_lock_files_name_stops_saves_and_sets_last_error(
    state_path: Path, free_port_factory: Callable[[], int]
) -> None:
    base = free_port_factory()
    state_path.parent.mkdir(parents=True)
    os.mkfifo(state_path.parent / ".dynamic_port_manager.lock")
    m = DynamicPortManager(base, base + 1, state_path, console_log=False)
    try:
        port = m.pick_port()
        state = m.get_state()
        assert "cannot lock state file" in state["last_error"]
        assert state["error_active"] is True
        assert state["history"][-1]["new"] == port
        assert not state_path.exists(), "written without its lock"
    finally:
        m.stop()


def _hold_whole_lock_file(lock_file: Path) -> subprocess.Popen[str]:
    """Another process holding every slot of the folder lock (an OFD lock on
    the whole file), until killed."""
    code = f"""
        import fcntl, os, struct, sys
        fd = os.open({str(lock_file)!r}, os.O_RDWR | os.O_CREAT, 0o600)
        F_OFD_SETLKW = 38
        fcntl.fcntl(fd, F_OFD_SETLKW, struct.pack("hhqqi", fcntl.F_WRLCK, 0, 0, 0, 0))
        print("locked", flush=True)
        sys.stdin.read()
    """
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline() == "locked\n"
    return proc


# ---- 5. Ctrl-C ends a wait for the state file's lock --------------------


@pytest.mark.parametrize("where", ["constructor", "pick"])
def test_5_ctrl_c_ends_a_wait_for_the_state_files_lock(
    state_path: Path, free_port_factory: Callable[[], int], where: str
) -> None:
    base = free_port_factory()
    state_path.parent.mkdir(parents=True)
    if where == "pick":
        DynamicPortManager(base, base + 1, state_path, console_log=False).stop()
    locker = _hold_whole_lock_file(state_path.parent / ".dynamic_port_manager.lock")
    code = f"""
        import sys
        from dynamic_port_manager import DynamicPortManager
        print("ready", flush=True)
        try:
            m = DynamicPortManager({base}, {base + 1}, {str(state_path)!r}, console_log=False)
            m.pick_port()
        except KeyboardInterrupt:
            print("interrupted", flush=True)
            sys.exit(3)
    """
    try:
        if where == "pick":
            # The constructor must get past its own wait first: it does not
            # here, so the pick case makes the manager before the lock is held.
            code = f"""
                import sys
                from dynamic_port_manager import DynamicPortManager
                m = DynamicPortManager({base}, {base + 1}, {str(state_path)!r},
                                       console_log=False)
                print("ready", flush=True)
                sys.stdin.readline()  # the lock is held now
                try:
                    m.pick_port()
                except KeyboardInterrupt:
                    print("interrupted", flush=True)
                    sys.exit(3)
            """
            locker.kill()
            locker.wait()
        proc = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline() == "ready\n"
        if where == "pick":
            locker = _hold_whole_lock_file(state_path.parent / ".dynamic_port_manager.lock")
            proc.stdin.write("go\n")
            proc.stdin.flush()
        time.sleep(0.5)  # let it reach the lock wait (it would wait 30 s)
        proc.send_signal(signal.SIGINT)
        # Well within the 30 s the wait would last without Ctrl-C.
        out = proc.stdout.read()
        proc.wait(timeout=15)
        assert proc.returncode == 3, out
        assert "interrupted" in out
        # Nothing half done: no lease was left by the interrupted call.
        assert leased_ports() == []
    finally:
        locker.kill()
        locker.wait()


# ---- 6. identity survives pid reuse across fork generations -------------


@needs_root
def test_6_a_grandchild_given_its_grandparents_pid_is_not_the_grandparent(
    tmp_path: Path, registry: Path, free_port_factory: Callable[[], int]
) -> None:
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("no unshare (util-linux)")
    base = free_port_factory()
    state = tmp_path / "s.json"
    # In a new pid namespace, ns_last_pid makes the next fork take a chosen
    # pid: the grandchild gets its dead grandparent's pid, as on a busy host.
    code = f"""
        import os, sys, time
        from dynamic_port_manager import DynamicPortManager
        def set_next(pid):
            with open("/proc/sys/kernel/ns_last_pid", "w") as f:
                f.write(str(pid - 1))
        r, w = os.pipe()
        grandparent = os.fork()
        if grandparent == 0:
          try:
            m = DynamicPortManager({base}, {base}, {str(state)!r}, console_log=False)
            m.pick_port()
            m.release_port()
            me = os.getpid()
            child = os.fork()
            if child == 0:
                time.sleep(0.3)  # the grandparent is gone by then
                set_next(me)
                grandchild = os.fork()
                if grandchild == 0:
                    assert os.getpid() == me, (os.getpid(), me)
                    port = m.pick_port()
                    os.write(w, f"{{port}}\\n".encode())
                    time.sleep(30)
                    os._exit(0)
                os._exit(0)
          finally:
            os._exit(0)
        # Reaped at once, so its pid is free for the grandchild.
        os.waitpid(grandparent, 0)
        line = os.read(r, 100).decode()
        print("held", line, flush=True)
        other = DynamicPortManager({base}, {base}, {str(tmp_path / "o.json")!r}, console_log=False)
        try:
            print("picked", other.pick_port(), flush=True)
        except Exception as e:
            print("refused", type(e).__name__, flush=True)
        os._exit(0)
    """
    proc = subprocess.run(
        [unshare, "--pid", "--fork", "--mount-proc", sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if "ns_last_pid" in proc.stderr or proc.returncode != 0 and "held" not in proc.stdout:
        pytest.skip(f"cannot choose pids here: {proc.stderr[-300:]}")
    assert f"held {base}" in proc.stdout, proc.stdout + proc.stderr
    # The grandchild is alive and holds the port: no one else gets it.
    assert "refused NoFreePortError" in proc.stdout, proc.stdout + proc.stderr


# ---- 7. a '#' in a state file's name -------------------------------------


def test_7_a_hash_in_a_state_files_name_never_mixes_owners(
    tmp_path: Path, free_port_factory: Callable[[], int]
) -> None:
    base = free_port_factory()
    plain = tmp_path / "a.json"
    hashed = tmp_path / "a.json#x.json"
    a = DynamicPortManager(base, base + 2, plain, console_log=False)
    try:
        a.pick_port()
        with holder(hashed, base, base + 2) as held:
            assert [v["port"] for v in a.get_state()["leases"]] != held
            assert held[0] not in [v["port"] for v in a.get_state()["leases"]]
        # The holder was killed; a pick through a.json reclaims its port,
        # and a.json's history never records that other file's reclaim.
        a.pick_port()
        a.refresh()
        history = json.loads(plain.read_text())["history"]
        assert {"prev": held[0], "new": None} not in [
            {"prev": h["prev"], "new": h["new"]} for h in history
        ], history
    finally:
        a.stop()


# ---- 8. same-stem state files never share backups -----------------------


def test_8_same_stem_state_files_never_restore_or_rotate_each_others_backups(
    tmp_path: Path, free_port_factory: Callable[[], int]
) -> None:
    base = free_port_factory()
    json_file = tmp_path / "a.json"
    other = tmp_path / "a.state"
    b = DynamicPortManager(base, base + 3, other, backup_max=3, console_log=False)
    for _ in range(8):
        b.pick_port()
    b.stop()
    theirs = set(os.listdir(tmp_path / "backups"))
    a = DynamicPortManager(base, base + 3, json_file, backup_max=3, console_log=False)
    for _ in range(2):
        a.pick_port()
    a.stop()
    mine = set(os.listdir(tmp_path / "backups")) - theirs
    assert theirs <= set(os.listdir(tmp_path / "backups")), "rotation deleted a.state's backups"
    own_count = json.loads(json_file.read_text())["change_count"]
    json_file.write_text("{ damaged")
    # A new process (this one's view of the file remembers its state).
    done = python(
        f"""
        import json
        from dynamic_port_manager import DynamicPortManager
        a = DynamicPortManager({base}, {base + 3}, {str(json_file)!r}, backup_max=3,
                               console_log=False)
        print(json.dumps(a.get_state()))
        a.stop()
        """
    )
    assert done.returncode == 0, done.stderr
    state = json.loads(done.stdout)
    assert state["change_count"] < own_count + 2, state["last_error"]
    assert state["settings"]["json_path"].endswith("a.json")
    restored = [name for name in mine if name in (state["last_error"] or "")]
    assert restored, state["last_error"]


# ---- 9. exit gives back every lease, even one being taken ---------------


def test_9_exit_with_threads_picking_leaves_no_lease(
    tmp_path: Path, registry: Path, free_port_factory: Callable[[], int]
) -> None:
    base = free_port_factory()
    code = f"""
        import os, threading, time
        from dynamic_port_manager import DynamicPortManager
        def loop(i):
            m = DynamicPortManager({base}, {base + 40}, {str(tmp_path)!r} + f"/t{{i}}.json",
                                   console_log=False)
            while True:
                try:
                    m.pick_port()
                except Exception:
                    pass
        for i in range(4):
            threading.Thread(target=loop, args=(i,), daemon=True).start()
        time.sleep(0.3)
        print(os.getpid())
    """
    for _ in range(6):
        done = python(code)
        assert done.returncode == 0, done.stderr
        pid = int(done.stdout)
        assert [lease for lease in list_leases() if lease["pid"] == pid] == []


# ---- 10. another user cannot deny service -------------------------------


@needs_root
def test_10_a_squatted_default_registry_moves_to_the_users_own_folder(
    free_port_factory: Callable[[], int],
) -> None:
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("no setpriv")
    base = free_port_factory()
    uid = 65534  # nobody
    squatted = Path(f"/tmp/dynamic-port-manager-{uid}")
    # That user's own registry, if an earlier run left one: out of the way
    # for the test, back afterwards.
    kept = squatted.with_name(squatted.name + f".kept-by-test-{os.getpid()}")
    if squatted.exists() or squatted.is_symlink():
        squatted.rename(kept)
    # A home the other user can reach (pytest's tmp_path is root's, 0700).
    home = Path(tempfile.mkdtemp(prefix="dpm-other-user-"))
    os.chown(home, uid, uid)
    state = home / "s.json"
    squatted.mkdir(mode=0o755)  # root's folder at nobody's default name
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DPM_", "XDG_"))}
        env["HOME"] = str(home)
        done = subprocess.run(
            [
                setpriv,
                f"--reuid={uid}",
                f"--regid={uid}",
                "--clear-groups",
                sys.executable,
                "-c",
                textwrap.dedent(
                    f"""
                    import logging
                    logging.basicConfig(level=logging.WARNING)
                    from dynamic_port_manager import DynamicPortManager
                    m = DynamicPortManager({base}, {base}, {str(state)!r}, console_log=False)
                    print("picked", m.pick_port(), m.registry_dir, flush=True)
                    m.stop()
                    """
                ),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert done.returncode == 0, done.stderr
        assert "picked" in done.stdout
        assert str(squatted) not in done.stdout.split()[-1]
        assert str(home) in done.stdout
        assert "cannot be used" in done.stderr and str(squatted) in done.stderr, done.stderr
    finally:
        squatted.rmdir()
        shutil.rmtree(home, ignore_errors=True)
        if kept.exists() or kept.is_symlink():
            kept.rename(squatted)


# ---- a failed first use in a forked child is tried again ----------------


def test_a_forked_childs_failed_first_use_is_tried_again(
    state_path: Path, free_port_factory: Callable[[], int]
) -> None:
    base = free_port_factory()
    done = python(
        f"""
        import os, resource
        from dynamic_port_manager import DynamicPortManager
        m = DynamicPortManager({base}, {base + 3}, {str(state_path)!r}, console_log=False)
        m.pick_port()
        child = os.fork()
        if child == 0:
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            used = len(os.listdir("/proc/self/fd"))
            resource.setrlimit(resource.RLIMIT_NOFILE, (used - 1, hard))
            try:
                m.pick_port()
                print("first: picked", flush=True)
            except OSError as e:
                print("first: failed", type(e).__name__, flush=True)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            print("then:", m.pick_port(), flush=True)
            os._exit(0)
        os.waitpid(child, 0)
        m.stop()
        """
    )
    assert done.returncode == 0, done.stderr
    assert "first: failed" in done.stdout, done.stdout  # the fault took
    assert "then: " in done.stdout, done.stdout + done.stderr
