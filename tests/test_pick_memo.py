"""A pick starts from what the previous pick of this process found in the
registry while the table is unchanged (issue 10: a crowded range must not cost
a walk over every lease per pick). A change by anyone else must end that.
Ports leased through the pytest plugin, below the kernel's ephemeral range
(no outgoing connection can take one between two picks).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from dynamic_port_manager import DynamicPortManager, list_leases
from router_helpers import port_block

LO, HI = 0, 0  # this test's range, leased through the plugin by _ports


@pytest.fixture(autouse=True)
def _ports() -> None:
    global LO, HI
    LO, HI = port_block(10)


# Another process: picks through its own manager when told, reports the port,
# releases it when told.
OTHER = """
import sys
from dynamic_port_manager import DynamicPortManager
m = DynamicPortManager(int(sys.argv[2]), int(sys.argv[3]), sys.argv[1], console_log=False)
for line in sys.stdin:
    if line.strip() == "pick":
        print(m.pick_port(), flush=True)
    elif line.strip() == "release":
        print(m.release_port(), flush=True)
m.stop()
"""


class Other:
    def __init__(self, path: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", OTHER, str(path), str(LO), str(HI)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def ask(self, what: str) -> str:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(what + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def close(self) -> None:
        assert self.proc.stdin
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture
def other(tmp_path: Path, registry: Path) -> Iterator[Other]:
    o = Other(tmp_path / "other.json")
    try:
        yield o
    finally:
        o.close()


def test_a_port_another_process_took_between_two_picks_is_not_picked(
    tmp_path: Path, other: Other
) -> None:
    m = DynamicPortManager(LO, HI, tmp_path / "mine.json", console_log=False)
    try:
        first = m.pick_port(pid=os.getpid())
        taken = int(other.ask("pick"))
        assert taken == first + 1, "the other process took the lowest free port"
        second = m.pick_port(pid=os.getpid())
        assert second == taken + 1
        holders = {lease["port"] for lease in list_leases()}
        assert {first, taken, second} <= holders
    finally:
        m.stop()


def test_a_port_another_process_gave_back_between_two_picks_is_picked_again(
    tmp_path: Path, other: Other
) -> None:
    m = DynamicPortManager(LO, HI, tmp_path / "mine.json", console_log=False)
    try:
        taken = int(other.ask("pick"))
        assert m.pick_port() == taken + 1
        assert other.ask("release") == "True"
        # Moving: the lowest free port is the one just given back.
        assert m.pick_port() == taken
    finally:
        m.stop()
