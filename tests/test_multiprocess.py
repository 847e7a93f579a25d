"""Uniqueness across real processes and threads, and reclaiming a killed holder's port.

Every process gets the test's private registry through ``DPM_REGISTRY_DIR``
(set by the ``registry`` fixture, inherited by children).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dynamic_port_manager import DynamicPortManager, NoFreePortError, list_leases
from router_helpers import base_for_children

# The first of this test's 100 ports (leased through the plugin), set by
# _ports; its child processes read it from $DPM_TEST_BASE.
BASE = 0


@pytest.fixture(autouse=True)
def _ports(monkeypatch: pytest.MonkeyPatch) -> None:
    global BASE
    BASE = base_for_children(monkeypatch, 100)


# One child process: two managers (each with its own state file) that pick,
# move and release in a shared range, recording every port they hold in a
# claims folder with O_EXCL, so two holders of one port at once cannot both
# succeed. A claim is made after pick_port() returns and dropped before the
# next call, so a claim file always names a port its child really holds.
CHILD = r"""
import json, os, socket, sys, time
from pathlib import Path
from dynamic_port_manager import DynamicPortManager

index, count, lo, hi, rounds = map(int, sys.argv[1:6])
work = Path(sys.argv[6])
claims, violations = work / "claims", work / "violations"
deadline = time.monotonic() + 60

def wait_for(predicate, what):
    while not predicate():
        if time.monotonic() > deadline:
            sys.exit(f"child {index}: timed out waiting for {what}")
        time.sleep(0.005)

owned = {}

def claim(k, port):
    try:
        fd = os.open(claims / str(port), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        (violations / f"{port}-by-{index}.{k}").write_text("held twice")
        return
    os.write(fd, f"{index}.{k}".encode())
    os.close(fd)
    owned[k] = port

def unclaim(k):
    port = owned.pop(k, None)
    if port is not None:
        os.unlink(claims / str(port))

managers = [
    DynamicPortManager(
        lo, hi, work / f"state_{index}_{k}.json", refresh_interval=0.2, console_log=False
    )
    for k in range(2)
]
(work / "ready" / str(index)).touch()
wait_for(lambda: len(os.listdir(work / "ready")) == count, "the others to start")

for round in range(rounds):
    for k, m in enumerate(managers):
        unclaim(k)
        if round == 2 and k == index % 2:
            assert m.release_port() is True
        else:
            claim(k, m.pick_port())

for k, m in enumerate(managers):
    if m.active_port is None:
        claim(k, m.pick_port())

# The holder can really serve on what it holds.
listeners = []
for m in managers:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", m.active_port))
    s.listen()
    listeners.append(s)

held = {"pid": os.getpid(), "ports": [m.active_port for m in managers]}
tmp = work / "held" / f".{index}.tmp"
tmp.write_text(json.dumps(held))
tmp.rename(work / "held" / f"{index}.json")
wait_for(lambda: (work / "go").exists(), "the parent's go")
for s in listeners:
    s.close()
for m in managers:
    m.stop()
"""

HOLDER = r"""
import sys, time
from pathlib import Path
from dynamic_port_manager import DynamicPortManager

port, state, picked = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
m = DynamicPortManager(port, port, state, refresh_interval=60, console_log=False)
assert m.pick_port() == port
picked.write_text(str(port))
time.sleep(120)
"""


def wait_until(predicate, what: str, timeout: float = 30.0, procs=()) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        for p in procs:
            if p.poll() is not None and p.returncode != 0:
                pytest.fail(f"a child exited with {p.returncode} while waiting for {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def test_eight_processes_with_different_files_never_hold_one_port_twice(
    tmp_path: Path, registry: Path
) -> None:
    count, lo, hi, rounds = 8, BASE, BASE + 29, 5
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    for sub in ("claims", "violations", "ready", "held", "logs"):
        (tmp_path / sub).mkdir()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i in range(count):
            log = open(tmp_path / "logs" / f"{i}.txt", "wb")  # noqa: SIM115
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(script), str(i), str(count), str(lo), str(hi)]
                    + [str(rounds), str(tmp_path)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
            log.close()
        held_dir = tmp_path / "held"
        wait_until(
            lambda: len(list(held_dir.glob("*.json"))) == count,
            "every child to report what it holds",
            timeout=60,
            procs=procs,
        )
        # All children are alive and holding now.
        assert all(p.poll() is None for p in procs)
        reports = [json.loads((held_dir / f"{i}.json").read_text()) for i in range(count)]
        assert [r["pid"] for r in reports] == [p.pid for p in procs]
        held = [port for r in reports for port in r["ports"]]
        assert len(held) == 2 * count
        assert len(set(held)) == len(held), f"a port is held twice: {sorted(held)}"
        assert all(lo <= port <= hi for port in held)
        assert sorted(os.listdir(tmp_path / "violations")) == []
        assert {int(name) for name in os.listdir(tmp_path / "claims")} == set(held)
        # The registry agrees: one live lease per held port, in its holder's name.
        leases = list_leases()
        assert sorted(lease["port"] for lease in leases) == sorted(held)
        owner_pid = {port: r["pid"] for r in reports for port in r["ports"]}
        for lease in leases:
            assert lease["pid"] == owner_pid[lease["port"]]
            assert lease["alive"] is True
        (tmp_path / "go").touch()
        for i, p in enumerate(procs):
            rc = p.wait(timeout=30)
            assert rc == 0, (tmp_path / "logs" / f"{i}.txt").read_text()
        assert list_leases() == []
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)


@contextlib.contextmanager
def holder_of(
    port: int, tmp_path: Path, refresh_interval: float
) -> Iterator[tuple[subprocess.Popen[bytes], DynamicPortManager]]:
    """A child process that picks `port` and holds it, and a manager of our own
    whose range is that one port; both cleaned up afterwards."""
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    picked = tmp_path / "picked"
    holder = subprocess.Popen(
        [sys.executable, str(script), str(port), str(tmp_path / "holder.json"), str(picked)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    m = None
    try:
        wait_until(picked.exists, "the holder to pick", procs=[holder])
        m = DynamicPortManager(
            port, port, tmp_path / "mine.json", refresh_interval=refresh_interval, console_log=False
        )
        yield holder, m
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(timeout=10)
        if m is not None:
            m.stop()


def test_a_killed_holders_port_is_reclaimed_by_the_next_refresh(
    tmp_path: Path, registry: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dynamic_port_manager")
    port = BASE
    with holder_of(port, tmp_path, refresh_interval=0.1) as (holder, m):
        # While the holder lives, its lease keeps the port from everyone else.
        with pytest.raises(NoFreePortError):
            m.pick_port()
        assert [(lease["port"], lease["pid"]) for lease in list_leases()] == [(port, holder.pid)]
        caplog.clear()
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)

        # No pick from here on: the background refresh alone must reclaim it.
        def reclaimed() -> bool:
            return list_leases() == [] and port in m.get_state()["free_ports"]

        def logged() -> bool:
            notes = [r.getMessage() for r in caplog.records if r.name == "dynamic_port_manager"]
            return any("RECLAIM" in n and str(port) in n and str(holder.pid) in n for n in notes)

        wait_until(reclaimed, "the refresh to reclaim the dead holder's lease", timeout=15)
        # The refresh logs once its locks are let go, a moment after the state
        # shows the port free (CI once looked in between).
        wait_until(logged, "the RECLAIM record naming the port and the pid", timeout=15)
        assert m.pick_port() == port


def test_a_pick_in_an_exhausted_range_reclaims_a_dead_holders_port_at_once(
    tmp_path: Path, registry: Path
) -> None:
    port = BASE + 10
    # A long interval: no refresh will come to help.
    with holder_of(port, tmp_path, refresh_interval=3600) as (holder, m):
        with pytest.raises(NoFreePortError):
            m.pick_port()
        holder.kill()
        holder.wait(timeout=10)
        assert m.pick_port() == port
        (lease,) = list_leases()
        assert lease["pid"] == os.getpid()


def test_threads_with_their_own_managers_never_hold_one_port_twice(
    tmp_path: Path, registry: Path
) -> None:
    threads_n, lo, hi, rounds = 12, BASE, BASE + 29, 6
    managers = [
        DynamicPortManager(
            lo, hi, tmp_path / f"t{i}.json", refresh_interval=0.05, console_log=False
        )
        for i in range(threads_n)
    ]
    claims: dict[int, int] = {}
    claims_lock = threading.Lock()
    violations: list[str] = []
    errors: list[BaseException] = []
    start = threading.Barrier(threads_n, timeout=30)

    def work(i: int, m: DynamicPortManager) -> None:
        try:
            start.wait()
            for _ in range(rounds):
                old = m.active_port
                if old is not None:
                    with claims_lock:
                        if claims.get(old) == i:
                            del claims[old]
                port = m.pick_port()
                with claims_lock:
                    if port in claims:
                        violations.append(f"{port}: thread {i} and thread {claims[port]}")
                    else:
                        claims[port] = i
        except BaseException as e:  # reported below
            errors.append(e)

    workers = [threading.Thread(target=work, args=(i, m)) for i, m in enumerate(managers)]
    try:
        for t in workers:
            t.start()
        for t in workers:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in workers), "a picking thread hung"
        assert errors == []
        assert violations == []
        held = [m.active_port for m in managers]
        assert None not in held
        assert len(set(held)) == threads_n
        assert sorted(lease["port"] for lease in list_leases()) == sorted(held)
        assert all(m.get_state()["change_count"] == rounds for m in managers)
    finally:
        for m in managers:
            m.stop()
    assert list_leases() == []


SHARED_FILE_CHILD = r"""
import os, sys, time
from pathlib import Path
from dynamic_port_manager import DynamicPortManager

index, count, lo, hi, picks = map(int, sys.argv[1:6])
path, ready = sys.argv[6], Path(sys.argv[7])
m = DynamicPortManager(lo, hi, path, history_max=1000, console_log=False)
(ready / str(index)).touch()
deadline = time.monotonic() + 60
while len(os.listdir(ready)) < count:
    assert time.monotonic() < deadline, "the others never started"
    time.sleep(0.005)
for _ in range(picks):
    m.pick_port()
m.stop()
"""


def test_processes_sharing_one_state_file_lose_no_update(tmp_path: Path, registry: Path) -> None:
    count, lo, hi, picks = 4, BASE + 20, BASE + 39, 10
    script = tmp_path / "shared.py"
    script.write_text(SHARED_FILE_CHILD)
    ready = tmp_path / "ready"
    ready.mkdir()
    path = tmp_path / "state" / "shared.json"
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(i), str(count), str(lo), str(hi), str(picks)]
            + [str(path), str(ready)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for i in range(count)
    ]
    try:
        for p in procs:
            _, err = p.communicate(timeout=60)
            assert p.returncode == 0, err.decode()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
    state = json.loads(path.read_text())
    # Every pick and every release at stop is in the shared record, none lost.
    assert state["change_count"] == count * (picks + 1)
    assert len(state["history"]) == count * (picks + 1)
    assert sum(state["port_usage"].values()) == count * picks
    assert sum(1 for h in state["history"] if h["new"] is None) == count
    assert state["last_error"] is None
    assert list_leases() == []


def test_threads_sharing_one_manager_hold_at_most_one_port(tmp_path: Path, registry: Path) -> None:
    threads_n, rounds = 8, 10
    m = DynamicPortManager(
        BASE + 40, BASE + 59, tmp_path / "one.json", refresh_interval=0.05, console_log=False
    )
    errors: list[BaseException] = []
    start = threading.Barrier(threads_n, timeout=30)
    counts = {"picks": 0, "releases": 0}
    counts_lock = threading.Lock()

    def work(i: int) -> None:
        try:
            start.wait()
            for r in range(rounds):
                if (i + r) % 3 == 0:
                    released = m.release_port()
                    with counts_lock:
                        counts["releases"] += int(released)
                else:
                    m.pick_port()
                    with counts_lock:
                        counts["picks"] += 1
                held = [lease["port"] for lease in list_leases()]
                assert len(held) <= 1, held
        except BaseException as e:  # reported below
            errors.append(e)

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads_n)]
    try:
        for t in workers:
            t.start()
        for t in workers:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in workers), "a thread hung"
        assert errors == []
        leases = list_leases()
        assert [lease["port"] for lease in leases] == (
            [] if m.active_port is None else [m.active_port]
        )
        state = m.get_state()
        assert state["change_count"] == counts["picks"] + counts["releases"]
        assert state["stats"]["picks"] == counts["picks"]
    finally:
        m.stop()
    assert list_leases() == []


# A parent that used the registry before forking (a pre-forking server such as
# gunicorn --preload, or multiprocessing's fork start method), then forked
# workers that each pick with managers of their own.
FORKING_PARENT = r"""
import json, os, sys, time
from pathlib import Path
from dynamic_port_manager import DynamicPortManager

work, lo, hi, count, rounds = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), 8, 10
claims, violations = work / "claims", work / "violations"
claims.mkdir(); violations.mkdir()
before_fork = DynamicPortManager(lo, hi, work / "parent.json", console_log=False)
before_fork.pick_port()
go = time.monotonic() + 0.5
pids = []
for i in range(count):
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            managers = [
                DynamicPortManager(lo, hi, work / f"w{i}_{k}.json", console_log=False)
                for k in range(2)
            ]
            owned = {}
            while time.monotonic() < go:
                pass
            for _ in range(rounds):
                for k, m in enumerate(managers):
                    port = owned.pop(k, None)
                    if port is not None:
                        os.unlink(claims / str(port))
                    port = m.pick_port()
                    try:
                        os.close(os.open(claims / str(port), os.O_CREAT | os.O_EXCL))
                        owned[k] = port
                    except FileExistsError:
                        (violations / f"{port}-{i}.{k}").touch()
            # Give up the claims first: once stop() releases a port, another
            # worker may rightly take it.
            for port in owned.values():
                os.unlink(claims / str(port))
            for m in managers:
                m.stop()
        except BaseException as e:
            (violations / f"error-{i}").write_text(repr(e))
            code = 1
        os._exit(code)
    pids.append(pid)
codes = [os.waitpid(pid, 0)[1] for pid in pids]
before_fork.stop()
print(json.dumps({"codes": codes, "violations": sorted(os.listdir(violations))}))
"""


def test_workers_forked_after_the_registry_was_used_never_hold_one_port_twice(
    tmp_path: Path, registry: Path
) -> None:
    result = subprocess.run(
        [sys.executable, "-c", FORKING_PARENT, str(tmp_path), str(BASE + 60), str(BASE + 99)],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["violations"] == []
    assert out["codes"] == [0] * 8
    assert list_leases() == []


FORKED_CHILD_EXIT = r"""
import os as _os; BASE = int(_os.environ["DPM_TEST_BASE"])
import os, sys
from dynamic_port_manager import DynamicPortManager

work = sys.argv[1]
parent = DynamicPortManager(BASE + 50, BASE + 59, f"{work}/p.json", console_log=False)
pid = os.fork()
if pid == 0:
    child = DynamicPortManager(BASE + 50, BASE + 59, f"{work}/c.json", console_log=False)
    child.pick_port()
    sys.exit(0)  # an ordinary interpreter exit: the atexit hook stops the refresh thread
_, status = os.waitpid(pid, 0)
parent.stop()
print(os.waitstatus_to_exitcode(status))
"""


def test_a_forked_child_exits_cleanly(tmp_path: Path, registry: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", FORKED_CHILD_EXIT, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "0"
    for sign in ("panicked", "Exception ignored", "Traceback"):
        assert sign not in result.stderr, result.stderr
