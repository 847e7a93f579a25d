"""Ctrl-C while an event is in Python's logging reaches the caller.

A real child process logs through a handler whose ``emit`` sleeps; SIGINT is
sent while it sleeps there. The library method that logged (constructor,
``pick_port``, ``release_port``, ``refresh``, ``stop``, ``__exit__``) must
raise the ``KeyboardInterrupt`` to its caller, with no stray traceback, and
the process must go on to exit. Every wait is bounded; a hang fails the test.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from helpers_child import interrupt_when, run_child

CHILD = """
import json, logging, socket, sys, time
from dynamic_port_manager import DynamicPortManager, list_leases

path, port, method = sys.argv[1], int(sys.argv[2]), sys.argv[3]

class Slow(logging.Handler):
    armed = None  # the event whose record sleeps

    def emit(self, record):
        if record.event == Slow.armed:
            Slow.armed = None
            print("in-emit", flush=True)
            # SIGINT ends it with KeyboardInterrupt. In short sleeps: a signal
            # handled just before a sleep starts does not cut that sleep short.
            for _ in range(6000):
                time.sleep(0.1)

log = logging.getLogger("dynamic_port_manager")
log.setLevel(logging.INFO)
log.addHandler(Slow())

def new():
    return DynamicPortManager(port, port, path, refresh_interval=3600, console_log=False)

out = {"method": method}
m = None
try:
    if method == "constructor":
        Slow.armed = "start"
        m = new()
    else:
        m = new()
        if method == "pick_port":
            Slow.armed = "pick"
            m.pick_port()
        elif method == "release_port":
            m.pick_port()
            Slow.armed = "release"
            m.release_port()
        elif method == "refresh":
            with socket.socket() as s:  # the scan sees a change: REFRESH
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("127.0.0.1", port))
                s.listen()
                Slow.armed = "refresh"
                m.refresh()
        elif method == "stop":
            m.pick_port()
            Slow.armed = "stop"
            m.stop()
        elif method == "__exit__":
            with m:
                m.pick_port()
                Slow.armed = "stop"
    out["raised"] = None
except KeyboardInterrupt:
    out["raised"] = "KeyboardInterrupt"
if m is not None:
    m.stop()
    out["after"] = m.active_port
out["leases"] = [lease["port"] for lease in list_leases()]
print(json.dumps(out), flush=True)
"""

# Each method, and the event whose record the handler is in when Ctrl-C comes.
METHODS = {
    "constructor": "START",
    "pick_port": "PICK",
    "release_port": "RELEASE",
    "refresh": "REFRESH",
    "stop": "STOP",
    "__exit__": "STOP",
}


@pytest.mark.parametrize("method", METHODS)
def test_ctrl_c_in_a_log_handler_reaches_the_caller(
    method: str, tmp_path: Path, registry: Path, free_port: int
) -> None:
    code, stdout, stderr = interrupt_when(
        [sys.executable, "-c", CHILD, str(tmp_path / "s.json"), str(free_port), method],
        "in-emit",
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert code == 0, stderr
    out = json.loads(stdout.splitlines()[-1])
    assert out["raised"] == "KeyboardInterrupt", (out, stderr)
    # Kept and raised to the caller, not printed as a stray traceback.
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    # The interrupted record is not lost: its console line is on stderr
    # (console_log=False applies to events that reached logging).
    assert f"| {METHODS[method]:<10} |" in stderr, stderr
    # Nothing is left held once the manager is stopped.
    assert out.get("after") is None and out["leases"] == [], out


UNCAUGHT_CHILD = """
import logging, sys, time
from dynamic_port_manager import DynamicPortManager

class Slow(logging.Handler):
    def emit(self, record):
        if record.event == "pick":
            print("in-emit", flush=True)
            for _ in range(6000):
                time.sleep(0.1)

log = logging.getLogger("dynamic_port_manager")
log.setLevel(logging.INFO)
log.addHandler(Slow())
m = DynamicPortManager(int(sys.argv[2]), int(sys.argv[2]), sys.argv[1], refresh_interval=3600)
m.pick_port()
"""


def test_an_uncaught_ctrl_c_ends_the_program_as_python_does(
    tmp_path: Path, registry: Path, free_port: int
) -> None:
    script = tmp_path / "app.py"  # a file, so the traceback shows its lines
    script.write_text(UNCAUGHT_CHILD)
    code, _, stderr = interrupt_when(
        [sys.executable, str(script), str(tmp_path / "s.json"), str(free_port)], "in-emit"
    )
    # One traceback, the caller's: KeyboardInterrupt at `m.pick_port()`.
    assert code != 0
    assert stderr.count("Traceback") == 1, stderr
    assert stderr.rstrip().endswith("KeyboardInterrupt"), stderr
    assert "m.pick_port()" in stderr and "Exception ignored" not in stderr, stderr


EXIT_CHILD = """
import logging, sys
from dynamic_port_manager import DynamicPortManager

class Exit(logging.Handler):
    def emit(self, record):
        if record.event == "pick":
            sys.exit(3)

log = logging.getLogger("dynamic_port_manager")
log.setLevel(logging.INFO)
log.addHandler(Exit())
m = DynamicPortManager(int(sys.argv[2]), int(sys.argv[2]), sys.argv[1], console_log=False)
try:
    m.pick_port()
except SystemExit as e:
    print("SystemExit", e.code, "active", m.active_port, flush=True)
    raise
"""


def test_sys_exit_in_a_log_handler_ends_the_program(
    tmp_path: Path, registry: Path, free_port: int
) -> None:
    result = run_child(EXIT_CHILD, tmp_path / "s.json", free_port)
    # Raised to the caller of pick_port (which still got its port), then
    # ends the program with the handler's code, as sys.exit does.
    assert result.stdout.split() == ["SystemExit", "3", "active", str(free_port)], result
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr
