"""Issue 6: the no-duplicates promise for every way a process is born and dies.

fork (os.fork, multiprocessing), exit with busy threads, holders that died,
Ctrl-C during a lock wait, and many managers in one process. Every scenario
runs in real processes; the test's private registry reaches them through
``DPM_REGISTRY_DIR``.
"""

from __future__ import annotations

import fcntl
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dynamic_port_manager import DynamicPortManager, list_leases
from router_helpers import base_for_children, sleeping

# The first of this test's 500 ports (leased through the plugin), set by
# _ports; its child processes read it from $DPM_TEST_BASE.
BASE = 0


@pytest.fixture(autouse=True)
def _ports(monkeypatch: pytest.MonkeyPatch) -> None:
    global BASE
    BASE = base_for_children(monkeypatch, 500)


def run_script(script: str, *args: object, timeout: float = 90) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", script, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for sign in ("panicked", "Traceback"):
        assert sign not in result.stderr, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


# The parent picks P and forks; the child does one thing with the inherited
# manager and exits the way the test names. Then a newcomer picks.
FORK_THEN = r"""
import os as _os; BASE = int(_os.environ["DPM_TEST_BASE"])
import gc, json, os, sys
from dynamic_port_manager import DynamicPortManager, list_leases

work, action = sys.argv[1], sys.argv[2]
pm = DynamicPortManager(BASE, BASE + 9, f"{work}/s.json", console_log=False)
parent_port = pm.pick_port()
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(r)
    seen = {"active": pm.active_port}
    if action == "pick":
        seen["picked"] = pm.pick_port()
        seen["leases"] = [l for l in list_leases() if l["port"] == seen["picked"]]
    elif action == "release":
        seen["released"] = pm.release_port()
    elif action == "stop":
        pm.stop()
    elif action == "with":
        with pm:
            pass
    elif action == "gc":
        del pm
        gc.collect()
    os.write(w, json.dumps(seen).encode())
    os.close(w)
    sys.exit(0)  # a normal exit: atexit hooks and finalizers run
os.close(w)
child = json.loads(os.read(r, 65536))
_, status = os.waitpid(pid, 0)
mine = [l for l in list_leases() if l["port"] == parent_port]
newcomer = DynamicPortManager(BASE, BASE + 9, f"{work}/other.json", console_log=False)
print(json.dumps({
    "status": os.waitstatus_to_exitcode(status),
    "parent_port": parent_port,
    "parent_active": pm.active_port,
    "parent_lease_pids": [l["pid"] for l in mine],
    "me": os.getpid(),
    "child": child,
    "child_pid": pid,
    "newcomer": newcomer.pick_port(),
}))
newcomer.stop()
pm.stop()
"""


@pytest.mark.parametrize("action", ["exit", "pick", "release", "stop", "with", "gc"])
def test_a_forked_child_never_touches_the_parents_lease(
    tmp_path: Path, registry: Path, action: str
) -> None:
    out = run_script(FORK_THEN, tmp_path, action)
    assert out["status"] == 0
    assert out["child"]["active"] is None, "the parent's port is not the child's"
    assert out["parent_active"] == out["parent_port"]
    assert out["parent_lease_pids"] == [out["me"]], "the parent's lease survives the child"
    assert out["newcomer"] != out["parent_port"]
    if action == "pick":
        picked = out["child"]["picked"]
        assert picked != out["parent_port"]
        assert [lease["pid"] for lease in out["child"]["leases"]] == [out["child_pid"]]
    if action == "release":
        assert out["child"]["released"] is False


MP_CHILDREN = r"""
import os as _os; BASE = int(_os.environ["DPM_TEST_BASE"])
import json, multiprocessing as mp, os, socket, sys

work = sys.argv[1]
from dynamic_port_manager import DynamicPortManager, list_leases
pm = DynamicPortManager(BASE, BASE + 39, f"{work}/s.json", refresh_interval=0.05,
                        console_log=False)
parent_port = pm.pick_port()

def worker(barrier, queue):
    result = {"pid": os.getpid()}
    try:
        port = pm.pick_port()
        result["port"] = port
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
        except OSError as e:
            result["bind_error"] = e.errno
        result["lease_pids"] = [l["pid"] for l in list_leases() if l["port"] == port]
        barrier.wait(timeout=60)  # everyone holds their port bound at once
    except Exception as e:
        result["error"] = repr(e)
    queue.put(result)

if __name__ == "__main__":
    ctx = mp.get_context("fork")
    barrier, queue = ctx.Barrier(8), ctx.Queue()
    procs = [ctx.Process(target=worker, args=(barrier, queue)) for _ in range(8)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    print(json.dumps({"parent_port": parent_port, "parent_active": pm.active_port,
                      "results": results, "codes": [p.exitcode for p in procs]}))
    pm.stop()
"""


def test_multiprocessing_fork_children_picking_through_an_inherited_manager(
    tmp_path: Path, registry: Path
) -> None:
    out = run_script(MP_CHILDREN, tmp_path)
    results = out["results"]
    assert out["codes"] == [0] * 8
    assert [r for r in results if "error" in r or "bind_error" in r] == []
    ports = [r["port"] for r in results]
    assert len(set(ports)) == 8, ports
    assert out["parent_port"] not in ports
    assert out["parent_active"] == out["parent_port"]
    for r in results:
        assert r["lease_pids"] == [r["pid"]], r


# 200 forks while a refresh thread runs every 50 ms and a Python thread picks
# and releases in a loop; each child uses the library once and exits.
BUSY_FORKS = r"""
import os as _os; BASE = int(_os.environ["DPM_TEST_BASE"])
import json, os, sys, threading, time
from dynamic_port_manager import DynamicPortManager

work = sys.argv[1]
busy = DynamicPortManager(BASE, BASE + 19, f"{work}/busy.json", refresh_interval=0.05,
                          console_log=False)
others = [DynamicPortManager(BASE + 20, BASE + 39, f"{work}/o{i}.json", refresh_interval=0.05,
                             console_log=False) for i in range(3)]
stop = threading.Event()

def churn():
    while not stop.is_set():
        busy.pick_port()
        busy.release_port()

threading.Thread(target=churn, daemon=True).start()
children = []
for i in range(200):
    pid = os.fork()
    if pid == 0:
        what = i % 3
        if what == 0:
            busy.get_state()
        elif what == 1:
            DynamicPortManager(BASE + 40, BASE + 59, f"{work}/c{i}.json", console_log=False).stop()
        os._exit(0) if i % 2 else sys.exit(0)
    children.append(pid)
deadline = time.monotonic() + 10
alive = set(children)
while alive and time.monotonic() < deadline:
    for pid in list(alive):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            alive.discard(pid)
    time.sleep(0.01)
for pid in alive:
    os.kill(pid, 9)
    os.waitpid(pid, 0)
stop.set()
print(json.dumps({"stuck": len(alive)}))
"""


@pytest.mark.slow
def test_forks_during_busy_refresh_and_picking_never_hang_the_child(
    tmp_path: Path, registry: Path
) -> None:
    out = run_script(BUSY_FORKS, tmp_path, timeout=120)
    assert out["stuck"] == 0


BUSY_EXIT = r"""
import os as _os; BASE = int(_os.environ["DPM_TEST_BASE"])
import json, sys, threading, time
from dynamic_port_manager import DynamicPortManager

work = sys.argv[1]
pm = DynamicPortManager(BASE, BASE + 9, f"{work}/s.json", refresh_interval=0.05,
                        console_log=False)
other = DynamicPortManager(BASE, BASE + 9, f"{work}/t.json", console_log=False)
other.pick_port()

def sleeper():
    while True:
        time.sleep(0.001)

def picker():
    while True:
        other.get_state()

threading.Thread(target=sleeper, daemon=True).start()
for _ in range(4):  # threads inside the library when the interpreter exits
    threading.Thread(target=picker, daemon=True).start()
print(json.dumps({"port": pm.pick_port()}), flush=True)
"""


def test_exit_with_busy_daemon_threads_gives_the_lease_back(tmp_path: Path, registry: Path) -> None:
    started = time.monotonic()
    out = run_script(BUSY_EXIT, tmp_path)
    elapsed = time.monotonic() - started
    assert list_leases() == [], "every lease of the exited process is given back"
    assert elapsed < 20, f"exit took {elapsed:.1f} s"
    # The port is free for the next one at once.
    pm = DynamicPortManager(BASE, BASE + 9, tmp_path / "next.json", console_log=False)
    assert out["port"] == BASE + 1  # `other` held BASE
    assert pm.pick_port() == BASE
    pm.stop()


def test_cli_picks_from_exited_shells_return_the_lowest_free_port(
    tmp_path: Path, registry: Path
) -> None:
    cli = shutil.which("dynamic-port-manager")
    assert cli, "the console script is installed"
    state = tmp_path / "cli.json"
    picked = []
    for _ in range(3):
        # The lease belongs to the shell (the CLI's parent), which exits at once.
        result = subprocess.run(
            ["sh", "-c", f'"{cli}" pick --range {BASE}-{BASE + 20} --state "{state}"'],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        picked.append(int(result.stdout.strip()))
    assert picked == [BASE, BASE, BASE]
    history = json.loads(state.read_text())["history"]
    assert any(h["prev"] == BASE and h["new"] is None for h in history), history


PICK_WAITING = r"""
import os as _os; BASE = int(_os.environ["DPM_TEST_BASE"])
import sys
from dynamic_port_manager import DynamicPortManager
pm = DynamicPortManager(BASE, BASE + 9, sys.argv[1], console_log=False)
print("ready", flush=True)
sys.stdin.readline()
try:
    pm.pick_port()
except KeyboardInterrupt:
    print("interrupted", flush=True)
    sys.exit(3)
"""


def test_ctrl_c_interrupts_a_pick_waiting_for_a_held_lock(tmp_path: Path, registry: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", PICK_WAITING, str(tmp_path / "s.json")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdin is not None
    assert proc.stdout.readline().strip() == "ready"
    with open(registry / "leases.lock", "r+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process holds the registry
        proc.stdin.write("go\n")
        proc.stdin.flush()
        deadline = time.monotonic() + 30
        while not sleeping(proc.pid):  # the pick waits for the lock, between tries
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the pick never waited for the lock"
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=10)
        finally:
            proc.kill()
    assert proc.returncode == 3, err
    assert "interrupted" in out
    # Nothing half done: no lease was recorded.
    assert list_leases() == []


MANY_LOW_FDS = r"""
import os as _os; BASE = int(_os.environ["DPM_TEST_BASE"])
import json, os, resource, sys
from dynamic_port_manager import DynamicPortManager, list_leases

work, n = sys.argv[1], int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_NOFILE, (n // 2, n // 2))
managers, failed = [], 0
for i in range(n):
    m = DynamicPortManager(BASE, BASE + n + 20, f"{work}/shared.json",
                           refresh_interval=60, backup_max=2, console_log=False)
    managers.append(m)
    try:
        m.pick_port()
    except Exception:
        failed += 1
held = len([l for l in list_leases() if l["pid"] == os.getpid()])
hog = []
try:
    while True:
        hog.append(os.open("/dev/null", os.O_RDONLY))
except OSError:
    pass
for m in managers:
    m.stop()
for fd in hog:
    os.close(fd)
left = len([l for l in list_leases() if l["pid"] == os.getpid()])
print(json.dumps({"failed": failed, "held": held, "left": left}))
"""


def test_many_managers_on_one_file_share_descriptors_and_stop_without_new_ones(
    tmp_path: Path, registry: Path
) -> None:
    out = run_script(MANY_LOW_FDS, tmp_path, 400, timeout=120)
    assert out == {"failed": 0, "held": 400, "left": 0}


def test_a_damaged_registry_heals_from_live_holders(tmp_path: Path, registry: Path) -> None:
    a = DynamicPortManager(BASE, BASE + 9, tmp_path / "a.json", console_log=False)
    b = DynamicPortManager(BASE, BASE + 9, tmp_path / "b.json", console_log=False)
    pa = a.pick_port()
    pb = b.pick_port()
    # Damage what holds the leases now: the change log (and any full table).
    for name in ("leases.log", "leases-0.json", "leases-1.json"):
        if (registry / name).exists():
            (registry / name).write_bytes(b"\x00garbage\n" * 64)
    list_leases()  # read once: the damage is noticed and set aside
    # Live holders re-record their leases at their next call or refresh.
    a.refresh()
    b.refresh()
    assert sorted(lease["port"] for lease in list_leases()) == sorted([pa, pb])
    c = DynamicPortManager(BASE, BASE + 9, tmp_path / "c.json", console_log=False)
    assert c.pick_port() not in (pa, pb)
    for m in (a, b, c):
        m.stop()


MADE_AT_EXIT = r"""
import os as _os; BASE = int(_os.environ["DPM_TEST_BASE"])
import atexit, sys

work = sys.argv[1]

def late():
    # atexit runs the last registered first: registered before the package
    # was imported, this runs after the package's own hook (_shutdown).
    from dynamic_port_manager import DynamicPortManager, ManagerStoppedError
    m = DynamicPortManager(BASE + 50, BASE + 59, f"{work}/late.json", console_log=False)
    try:
        m.pick_port()
    except ManagerStoppedError:
        # The process is exiting: its leases were given back, and no new one
        # is taken (it would outlive the exit hook).
        print("refused at exit", file=sys.stderr)
    else:
        raise SystemExit("a lease was taken after the exit hook")

atexit.register(late)
from dynamic_port_manager import DynamicPortManager
m = DynamicPortManager(BASE + 50, BASE + 59, f"{work}/main.json", console_log=False)
m.pick_port()
print("{}")
"""


def test_managers_made_during_interpreter_exit_do_not_delay_it(
    tmp_path: Path, registry: Path
) -> None:
    started = time.monotonic()
    run_script(MADE_AT_EXIT, tmp_path)
    assert time.monotonic() - started < 4, "exit waited for a refresh thread"
    assert [lease for lease in list_leases() if lease["alive"]] == []
