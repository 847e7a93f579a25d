"""A new manager takes no scan of the host on its way: its first pick is
confirmed by a bind probe, the refresh thread scans the range right after, and
a read that finds no scan yet takes it itself. Until a scan has looked, the
state claims nothing it did not look at.

Ports come from the project's own plugin (``free_port_factory``), leased to
this test in the plugin's registry; the managers under test use a private
registry (the ``registry`` fixture), where those ports are just ports.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from dynamic_port_manager import DynamicPortManager

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the kernel's socket tables")


def consecutive(factory: Callable[[], int], n: int) -> int:
    """The first of `n` consecutive ports, all leased to this test."""
    held: list[int] = []
    for _ in range(20 * n):
        held.append(factory())
        held.sort()
        for i in range(len(held) - n + 1):
            if held[i + n - 1] - held[i] == n - 1:
                return held[i]
    pytest.fail(f"no {n} consecutive ports from the plugin in {len(held)} picks")


@contextmanager
def listening(port: int) -> Iterator[socket.socket]:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do
        s.bind(("127.0.0.1", port))
        s.listen()
        yield s


def test_a_listener_from_before_the_manager_is_used_right_after_construction(
    free_port_factory: Callable[[], int], state_path: Path
) -> None:
    low = consecutive(free_port_factory, 3)
    with listening(low + 1):
        with DynamicPortManager(
            low, low + 2, state_path, refresh_interval=3600, console_log=False
        ) as m:
            state = m.get_state()
            assert low + 1 in state["used_ports"], state["used_ports"]
            assert low + 1 not in state["free_ports"]
            assert state["last_checked"] is not None


# In a process that cannot start threads of its own size (the Rust runtime
# asks for RUST_MIN_STACK bytes of stack for each, more than the address space
# holds) the manager works without its refresh thread, and nothing scans
# unless a call does: the pick has only its bind probe, and the read has to
# scan for itself.
NO_REFRESH_THREAD = """
import json, socket, sys
from dynamic_port_manager import DynamicPortManager
from dynamic_port_manager._core import _refresh_thread_running

low, high, path, held = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4:]
listeners = []
for port in held:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", int(port)))
    s.listen()
    listeners.append(s)
m = DynamicPortManager(low, high, path, refresh_interval=3600, console_log=False)
assert not _refresh_thread_running()
picked = m.pick_port()
with open(path) as f:
    disk = json.load(f)
for s in listeners:
    s.close()
state = m.get_state()
m.stop()
print(json.dumps({"picked": picked, "disk": disk, "state": state}))
"""


def run_without_refresh_thread(low: int, high: int, path: Path, *held: int) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", NO_REFRESH_THREAD, str(low), str(high), str(path)]
        + [str(p) for p in held],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "RUST_MIN_STACK": str(1 << 48)},
    )
    assert result.returncode == 0, result.stderr
    out: dict = json.loads(result.stdout.splitlines()[-1])
    return out


def test_a_pick_skips_a_listener_on_the_lowest_port_when_no_scan_ran(
    free_port_factory: Callable[[], int], state_path: Path
) -> None:
    low = consecutive(free_port_factory, 3)
    out = run_without_refresh_thread(low, low + 2, state_path, low)
    assert out["picked"] == low + 1
    # What the pick's probe saw is recorded.
    assert out["disk"]["used_ports"] == [low, low + 1]
    # The read scanned: the listener has closed since.
    assert out["state"]["used_ports"] == [low + 1]
    assert out["state"]["free_ports"] == [low, low + 2]


def test_until_a_scan_the_state_keeps_what_the_file_said(
    free_port_factory: Callable[[], int], state_path: Path
) -> None:
    low = consecutive(free_port_factory, 3)
    # A first manager saw a listener on the highest port and saved it so.
    with listening(low + 2):
        with DynamicPortManager(
            low, low + 2, state_path, refresh_interval=3600, console_log=False
        ) as m:
            assert low + 2 in m.get_state()["used_ports"]
    before = json.loads(state_path.read_text())
    assert before["used_ports"] == [low + 2]
    # Gone now, but no scan has looked: a new process's pick keeps the file's
    # word on it until its read scans.
    out = run_without_refresh_thread(low, low + 2, state_path)
    assert out["picked"] == low
    assert out["disk"]["used_ports"] == [low, low + 2]
    assert out["state"]["used_ports"] == [low]
    assert out["state"]["free_ports"] == [low + 1, low + 2]
