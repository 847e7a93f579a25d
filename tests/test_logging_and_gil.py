"""Events as logging records and console lines; the GIL, deadlocks and shutdown.

Whatever can hang runs in a child process with a timeout, so a deadlock fails
the test instead of hanging the suite.
"""

from __future__ import annotations

import json
import logging
import os
import re
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest
from dynamic_port_manager import DynamicPortManager, NoFreePortError, list_leases
from helpers_child import child_env, run_child
from router_helpers import base_for_children, sleeping

# The first of this test's 100 ports (leased through the plugin), set by
# _ports; its child processes read it from $DPM_TEST_BASE.
BASE = 0


@pytest.fixture(autouse=True)
def _ports(monkeypatch: pytest.MonkeyPatch) -> None:
    global BASE
    BASE = base_for_children(monkeypatch, 100)


LOGGER = "dynamic_port_manager"
EVENTS = {"START", "PICK", "RELEASE", "REFRESH", "RECLAIM", "RECOVER", "ERROR", "STOP"}
LINE_RE = re.compile(
    r"^\[(?P<time>\d{4}/\d{2}/\d{2} \d{2}:\d{2} "
    r"(?:shanbe|yekshanbe|doshanbe|seshanbe|chaharshanbe|panjshanbe|jome))\] "
    r"\| (?P<event>[A-Z]+ *) "
    r"\| Active:(?P<active>\d+|None) "
    r"\| (?P<free>Free:\[[^\]]*\](?:\(\d+\))?) *"
    r"\| (?P<used>Used:\[[^\]]*\](?:\(\d+\))?) *"
    r"\| Note:(?P<note>.*)$"
)


def no_crash(stderr: str) -> None:
    for sign in (
        "Traceback",
        "Fatal Python error",
        "panicked",
        "Exception ignored",
        "Segmentation",
    ):
        assert sign not in stderr, stderr


def wait_until(predicate: Any, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def listen(port: int) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do
    s.bind(("127.0.0.1", port))
    s.listen()
    return s


# ---------------------------------------------------------------- logging records


def test_every_event_is_a_logging_record(
    tmp_path: Path,
    registry: Path,
    caplog: pytest.LogCaptureFixture,
    free_port_range: Callable[[int], range],
) -> None:
    block = free_port_range(10)  # before the capture: the plugin's own records are not ours
    caplog.set_level(logging.INFO, logger=LOGGER)
    lo, hi = block.start, block[-1]
    m = DynamicPortManager(lo, hi, tmp_path / "s.json", refresh_interval=0.05, console_log=False)
    try:
        first = m.pick_port()
        second = m.pick_port()
        assert m.release_port() is True
        # A listener appears in the range: the next refresh changes the lists.
        seen = len(caplog.records)
        with listen(hi):
            # The REFRESH that saw it: the one used port, nothing active.
            wait_until(
                lambda: any(
                    r.getMessage().startswith("REFRESH | Active:None |") and r.used_count == 1
                    for r in caplog.records[seen:]
                ),
                "a REFRESH record of the listener",
            )
            assert hi in m.get_state()["used_ports"]
            lonely = DynamicPortManager(hi, hi, tmp_path / "lonely.json", console_log=False)
            with pytest.raises(NoFreePortError):
                lonely.pick_port()
            lonely.stop()
    finally:
        m.stop()
    records = [r for r in caplog.records if r.name == LOGGER]
    kinds = [r.getMessage().split(" | ", 1)[0] for r in records]
    assert set(kinds) <= EVENTS, kinds
    assert {"START", "PICK", "RELEASE", "REFRESH", "ERROR", "STOP"} <= set(kinds)
    for record, kind in zip(records, kinds):
        expected = logging.ERROR if kind == "ERROR" else logging.INFO
        assert record.levelno == expected, (kind, record.levelname)
    picks = [r.getMessage() for r in records if r.getMessage().startswith("PICK")]
    assert f"Active:{first}" in picks[0] and f"Active:{second}" in picks[1]
    errors = [r.getMessage() for r in records if r.getMessage().startswith("ERROR")]
    assert any("no free port" in e for e in errors), errors


def test_a_logging_level_set_after_import_takes_effect(tmp_path: Path, registry: Path) -> None:
    code = """
import os as _os; BASE = int(_os.environ["DPM_TEST_BASE"])
import json, logging, socket, sys
import dynamic_port_manager
from dynamic_port_manager import DynamicPortManager, NoFreePortError

seen = []

class Collect(logging.Handler):
    def emit(self, record):
        seen.append((record.levelname, record.getMessage().split(" | ")[0]))

log = logging.getLogger("dynamic_port_manager")
log.addHandler(Collect())
log.propagate = False
m = DynamicPortManager(BASE + 20, BASE + 29, sys.argv[1], console_log=False)
m.pick_port()                      # logger at the default WARNING: nothing
marks = [len(seen)]
log.setLevel(logging.INFO)         # after import and after the first records
m.pick_port()
marks.append(len(seen))
log.setLevel(logging.ERROR)
m.pick_port()                      # INFO dropped again
marks.append(len(seen))
with socket.socket() as s:
    s.bind(("127.0.0.1", BASE + 30)); s.listen()
    lonely = DynamicPortManager(BASE + 30, BASE + 30, sys.argv[1] + ".2", console_log=False)
    try:
        lonely.pick_port()
    except NoFreePortError:
        pass
    lonely.stop()
marks.append(len(seen))
log.setLevel(logging.NOTSET)       # inherit from the root logger
logging.getLogger().setLevel(logging.DEBUG)
m.pick_port()
marks.append(len(seen))
m.stop()
print(json.dumps({"seen": seen, "marks": marks}))
"""
    result = run_child(code, tmp_path / "s.json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    seen, marks = out["seen"], out["marks"]
    assert marks[0] == 0, seen
    assert ["INFO", "PICK"] in seen[marks[0] : marks[1]]
    assert all(level == "ERROR" for level, _ in seen[marks[1] : marks[3]]), seen
    assert ["ERROR", "ERROR"] in seen[marks[2] : marks[3]]
    assert ["INFO", "PICK"] in seen[marks[3] : marks[4]]


# ---------------------------------------------------------------- console lines

CONSOLE_CHILD = """
import logging, socket, sys, threading, time
from dynamic_port_manager import DynamicPortManager, NoFreePortError

# Records go nowhere but to this handler, which notes when the background
# refresh has reported (its console line is written in the same call); only
# the core's own console line reaches stderr.
refreshed = threading.Event()
class Note(logging.Handler):
    def emit(self, record):
        if getattr(record, "event", None) == "refresh":
            refreshed.set()
logging.getLogger("dynamic_port_manager").addHandler(Note())
logging.getLogger("dynamic_port_manager").setLevel(logging.INFO)
path, lo, hi, console = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
m = DynamicPortManager(lo, hi, path, refresh_interval=0.05, console_log=console)
first = m.pick_port()
second = m.pick_port()
m.release_port()
with socket.socket() as s:
    s.bind(("127.0.0.1", hi)); s.listen()
    deadline = time.monotonic() + 15
    while hi not in m.get_state()["used_ports"]:
        assert time.monotonic() < deadline, "no refresh saw the listener"
        time.sleep(0.01)
    assert refreshed.wait(15), "the refresh that saw the listener said nothing"
    lonely = DynamicPortManager(hi, hi, path + ".lonely", console_log=console)
    try:
        lonely.pick_port()
    except NoFreePortError:
        pass
    lonely.stop()
m.stop()
print(first, second)
"""


def test_console_lines_follow_the_spec_format_without_colour_off_a_terminal(
    tmp_path: Path, registry: Path
) -> None:
    lo, hi = BASE + 40, BASE + 49
    result = run_child(CONSOLE_CHILD, tmp_path / "s.json", lo, hi, 1, env=child_env())
    assert result.returncode == 0, result.stderr
    first, second = map(int, result.stdout.split())
    lines = result.stderr.splitlines()
    assert lines, "no console line at all"
    assert "\x1b" not in result.stderr
    parsed = []
    for line in lines:
        match = LINE_RE.match(line)
        assert match, f"not a console line: {line!r}"
        parts = line.split(" | ")
        assert len(parts[1]) == 10, line  # the event name is padded to 10
        assert len(parts[3]) >= 24 and len(parts[4]) >= 23, line
        parsed.append(match)
    events = [m["event"].strip() for m in parsed]
    assert set(events) <= EVENTS
    assert {"START", "PICK", "RELEASE", "REFRESH", "ERROR", "STOP"} <= set(events), events
    picks = [m for m in parsed if m["event"].strip() == "PICK"]
    assert [int(m["active"]) for m in picks] == [first, second]
    assert f"Used:[{first}]" == picks[0]["used"]
    assert picks[0]["free"] == f"Free:[{lo + 1}...{hi}]({hi - lo})"
    release = next(m for m in parsed if m["event"].strip() == "RELEASE")
    assert release["active"] == "None"
    assert release["free"] == f"Free:[{lo}...{hi}]({hi - lo + 1})"
    assert release["used"] == "Used:[]"
    assert parsed[0]["event"].strip() == "START"
    assert parsed[-1]["event"].strip() == "STOP"


def test_no_console_line_with_console_log_false(tmp_path: Path, registry: Path) -> None:
    result = run_child(CONSOLE_CHILD, tmp_path / "s.json", BASE + 50, BASE + 59, 0, env=child_env())
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_no_colour_with_no_color_set_off_a_terminal(tmp_path: Path, registry: Path) -> None:
    env = child_env(NO_COLOR="1")
    result = run_child(CONSOLE_CHILD, tmp_path / "s.json", BASE + 60, BASE + 69, 1, env=env)
    assert result.returncode == 0, result.stderr
    assert "PICK" in result.stderr and "\x1b" not in result.stderr


def run_on_a_terminal(args: list[str], env: dict[str, str], timeout: float = 60) -> str:
    """Runs the child with a pseudo-terminal as its stderr; returns what it wrote there."""
    pty = pytest.importorskip("pty")
    try:
        master, slave = pty.openpty()
    except OSError as e:
        pytest.skip(f"no pseudo-terminal here: {e}")
    proc = subprocess.Popen(
        [sys.executable, "-c", CONSOLE_CHILD, *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=slave,
        env=env,
    )
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail("the child on a terminal hung")
            # poll, not select: the test process may hold descriptors past 1024.
            waiter = select.poll()
            waiter.register(master, select.POLLIN)
            if not waiter.poll(min(left, 1.0) * 1000):
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the terminal's other side is closed
                break
            if not data:
                break
            chunks.append(data)
        assert proc.wait(timeout=max(deadline - time.monotonic(), 1)) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        os.close(master)
        if proc.stdout:
            proc.stdout.close()
    return b"".join(chunks).decode(errors="replace")


@pytest.mark.parametrize(
    ("no_color", "coloured"), [(None, True), ("1", False), ("", True)], ids=["unset", "1", "empty"]
)
def test_colour_on_a_terminal_unless_no_color(
    tmp_path: Path, registry: Path, no_color: str | None, coloured: bool
) -> None:
    base = {None: BASE + 70, "1": BASE + 80, "": BASE + 90}[no_color]
    args = [str(tmp_path / "s.json"), str(base), str(base + 9), "1"]
    text = run_on_a_terminal(args, child_env(NO_COLOR=no_color))
    assert "PICK" in text and "START" in text
    assert ("\x1b[" in text) is coloured, repr(text[:300])
    if coloured:
        # Only the event name is coloured; the rest of the line is the plain format.
        plain = re.sub(r"\x1b\[[0-9;]*m", "", text)
        lines = [line for line in plain.replace("\r\n", "\n").splitlines() if line]
        assert lines and all(LINE_RE.match(line) for line in lines), lines


# ---------------------------------------------------------------- GIL

# Holds a lock file: the registry's with flock, a state folder's with a
# record lock of the whole file (which every state file's slot lock meets).
LOCK_HOLDER = """
import fcntl, select, sys
with open(sys.argv[1], "a+") as f:
    if sys.argv[2] == "flock":
        fcntl.flock(f, fcntl.LOCK_EX)
    else:
        fcntl.lockf(f, fcntl.LOCK_EX, 0, 0)
    print("locked", flush=True)
    ready, _, _ = select.select([sys.stdin], [], [], 20)
    print("released-by-parent" if ready else "released-by-timeout", flush=True)
"""


def read_line(stream: Any, timeout: float) -> str:
    waiter = select.poll()  # not select: descriptors past 1024 here
    waiter.register(stream, select.POLLIN)
    if not waiter.poll(timeout * 1000):
        pytest.fail("the lock holder said nothing")
    return stream.readline().strip()


@pytest.mark.parametrize("lock", ["state file", "registry"])
def test_python_threads_run_while_pick_port_waits_for_a_lock(
    tmp_path: Path, registry: Path, lock: str
) -> None:
    """Another process holds a lock pick_port() needs. While the picking thread
    waits, a second Python thread counts through a pure-Python loop, and only
    then does the main thread (running Python code) tell the holder to let go:
    if pick_port() kept the GIL while it waits, none of that could happen."""
    m = DynamicPortManager(BASE, BASE + 9, tmp_path / "s.json", refresh_interval=3600)
    lock_path = (
        m.state_path.parent / ".dynamic_port_manager.lock"
        if lock == "state file"
        else registry / "leases.lock"
    )
    assert lock_path.exists()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            LOCK_HOLDER,
            str(lock_path),
            "flock" if lock == "registry" else "range",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert read_line(holder.stdout, 30) == "locked"
        entering = threading.Event()
        done = threading.Event()
        picked: list[int] = []

        tids: list[int] = []

        def pick() -> None:
            tids.append(threading.get_native_id())
            entering.set()
            picked.append(m.pick_port())
            done.set()

        counts: list[int] = []

        def count() -> None:
            n = 0
            while n < 1_000_000 and not done.is_set():
                n += 1
            counts.append(n)

        picker = threading.Thread(target=pick, daemon=True)
        picker.start()
        assert entering.wait(30)
        # The picker is in the core, sleeping between tries of the held lock.
        wait_until(lambda: sleeping(os.getpid(), tids[0]), "pick_port() waiting for the lock")
        counter = threading.Thread(target=count, daemon=True)
        counter.start()
        counter.join(timeout=30)
        assert counts == [1_000_000], counts
        assert not done.is_set(), "pick_port() did not wait for the lock; nothing was tested"
        assert holder.stdin is not None
        holder.stdin.write("go\n")
        holder.stdin.flush()
        picker.join(timeout=30)
        assert done.is_set(), "pick_port() never finished"
        assert read_line(holder.stdout, 30) == "released-by-parent"
        assert picked == [BASE]
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.wait(timeout=10)
        for stream in (holder.stdin, holder.stdout):
            if stream:
                stream.close()
        m.stop()


# ---------------------------------------------------------------- deadlock and exit

DEADLOCK_CHILD = """
import logging, socket, sys, threading, time
from dynamic_port_manager import DynamicPortManager

work, lo, hi = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
managers = [
    DynamicPortManager(lo, hi, f"{work}/d{i}.json", refresh_interval=0.05, console_log=False)
    for i in range(2)
]
guard = threading.Lock()
kinds = []

class Busy(logging.Handler):
    # Does real work while logging holds this handler's lock: formats, and calls
    # back into both managers (a manager that logged while holding its own lock
    # would deadlock here against a thread waiting for that lock).
    def emit(self, record):
        self.format(record)
        for m in managers:
            m.get_state()
        with guard:
            kinds.append(record.getMessage().split(" | ")[0])

log = logging.getLogger("dynamic_port_manager")
log.addHandler(Busy())
log.setLevel(logging.INFO)
listener = None
for i in range(150):
    for m in managers:
        m.pick_port()
    if i % 10 == 0:
        if listener is None:
            listener = socket.socket(); listener.bind(("127.0.0.1", hi)); listener.listen()
        else:
            listener.close(); listener = None
    managers[i % 2].release_port()
    log.info("main thread %d", i)
    time.sleep(0.003)  # long enough for several 50 ms refreshes to see the listener come and go
if listener is not None:
    listener.close()
for m in managers:
    m.stop()
print(kinds.count("REFRESH"), len(kinds))
"""


def test_a_busy_logging_handler_does_not_deadlock_picks_and_refreshes(
    tmp_path: Path, registry: Path
) -> None:
    result = run_child(DEADLOCK_CHILD, tmp_path, BASE + 20, BASE + 29, timeout=60)
    assert result.returncode == 0, result.stderr
    no_crash(result.stderr)
    refreshes, total = map(int, result.stdout.split())
    assert total > 600  # START x2, 300 PICK, 150 RELEASE, 150 main-thread records, ...
    assert refreshes > 0, "the refresh thread never logged while the main thread worked"


EXIT_CHILD = """
import os as _os; BASE = int(_os.environ["DPM_TEST_BASE"])
import logging, sys, time
from dynamic_port_manager import DynamicPortManager
from dynamic_port_manager._core import _refresh_thread_running

logging.basicConfig(level=logging.INFO, stream=sys.stderr)
work = sys.argv[1]
fast = [
    DynamicPortManager(BASE + 40, BASE + 49, f"{work}/f{i}.json", refresh_interval=0.05)
    for i in range(3)
]
slow = DynamicPortManager(BASE + 40, BASE + 49, f"{work}/slow.json", refresh_interval=3600)
for m in fast + [slow]:
    m.pick_port()
time.sleep(0.3)
assert _refresh_thread_running()
print("exiting", flush=True)
# No stop(): the atexit hook must end the refresh thread, not the hour-long interval.
"""


def test_exit_without_stop_ends_the_refresh_thread_cleanly(tmp_path: Path, registry: Path) -> None:
    result = run_child(EXIT_CHILD, tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "exiting"
    no_crash(result.stderr)
    assert "REFRESH" in result.stderr or "PICK" in result.stderr
    # No port stays held by the process that is gone.
    assert all(lease["alive"] is False for lease in list_leases()), list_leases()


STOP_CHILD = """
import os as _os; BASE = int(_os.environ["DPM_TEST_BASE"])
import sys
import dynamic_port_manager
from dynamic_port_manager import DynamicPortManager
from dynamic_port_manager._core import _refresh_thread_running

m = DynamicPortManager(BASE + 60, BASE + 69, sys.argv[1], refresh_interval=3600, console_log=False)
m.pick_port()
assert _refresh_thread_running()
m.stop()                         # must not wait for the hour-long interval
dynamic_port_manager._shutdown() # nor must the shutdown of the thread
assert not _refresh_thread_running()
m.stop()
print("ok")
"""


def test_stop_and_shutdown_return_without_waiting_for_the_interval(
    tmp_path: Path, registry: Path
) -> None:
    result = run_child(STOP_CHILD, tmp_path / "s.json", timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
    no_crash(result.stderr)
    assert list_leases() == []


CLOSED_STDERR_CHILD = """
import os as _os; BASE = int(_os.environ["DPM_TEST_BASE"])
import json, sys, time
from dynamic_port_manager import DynamicPortManager, list_leases

assert sys.stderr is None  # the interpreter started with descriptor 2 closed
m = DynamicPortManager(BASE + 70, BASE + 79, sys.argv[1], refresh_interval=0.05)
ports = [m.pick_port() for _ in range(20)]
time.sleep(0.2)
m.release_port()
m.stop()
print(json.dumps(ports))
"""


def test_a_closed_stderr_does_not_take_the_program_down(tmp_path: Path, registry: Path) -> None:
    path = tmp_path / "s.json"
    result = subprocess.run(
        [sys.executable, "-c", CLOSED_STDERR_CHILD, str(path)],
        stdout=subprocess.PIPE,
        text=True,
        timeout=60,
        preexec_fn=lambda: os.close(2),
    )
    assert result.returncode == 0
    assert len(json.loads(result.stdout)) == 20
    state = json.loads(path.read_text())
    assert state["change_count"] == 21
    assert list_leases() == []


RAISING_FILTER_CHILD = """
import os as _os; BASE = int(_os.environ["DPM_TEST_BASE"])
import json, logging, sys
from dynamic_port_manager import DynamicPortManager, list_leases

class Boom(logging.Filter):
    def filter(self, record):
        raise RuntimeError("a filter that fails")

log = logging.getLogger("dynamic_port_manager")
log.setLevel(logging.INFO)
m = DynamicPortManager(BASE + 80, BASE + 89, sys.argv[1], refresh_interval=3600, console_log=False)
log.addFilter(Boom())
out = {}
try:
    out["picked"] = m.pick_port()
except BaseException as e:
    out["pick_error"] = type(e).__name__
out["active"] = m.active_port
out["leases"] = [lease["port"] for lease in list_leases()]
try:
    m.stop()
except BaseException as e:
    out["stop_error"] = type(e).__name__
out["stopped"] = m.stopped
print(json.dumps(out))
"""


def test_a_failing_logging_filter_never_leaves_a_pick_half_done(
    tmp_path: Path, registry: Path
) -> None:
    result = run_child(RAISING_FILTER_CHILD, tmp_path / "s.json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.splitlines()[-1])
    assert out.get("pick_error") != "SystemError", out
    assert out.get("stop_error") != "SystemError", out
    if "pick_error" in out:
        # The pick failed as a whole: no port is held.
        assert out["active"] is None and out["leases"] == [], out
    else:
        assert out["active"] == out["picked"] and out["leases"] == [out["picked"]], out
    assert out["stopped"] is True
