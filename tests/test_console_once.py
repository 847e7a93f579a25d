"""Each event reaches a terminal once: the coloured console line while the
application has not configured ``logging``, its handlers once it has
(``console_log=None``, the default); ``True``/``False`` force the line.

Fresh interpreters, reading what they write on stderr: pytest's own log
capture would count as configured logging in this process.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from router_helpers import port_block

LINE_RE = re.compile(r"^\[\d{4}/\d{2}/\d{2} \d{2}:\d{2} [a-z]+\] \| (?P<event>[A-Z]+) +\| Active:")
RECORD_RE = re.compile(r"^(?:INFO|WARNING|ERROR):dynamic_port_manager:(?P<event>[A-Z]+) \| Active:")

# Every kind of line the events below make: START, PICK (twice), RELEASE,
# an ERROR (a range whose only port, the last of the first range, another
# program listens on), STOP.
CHILD = """
import logging, socket, sys
from dynamic_port_manager import DynamicPortManager, NoFreePortError

path, lo, hi, when, console = sys.argv[1:6]
console_log = {"auto": None, "on": True, "off": False}[console]
if when == "before":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
m = DynamicPortManager(int(lo), int(hi), path, refresh_interval=3600, console_log=console_log)
m.pick_port()
if when == "between":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
m.pick_port()
m.release_port()
busy = int(hi)  # never picked above; below the ephemeral range (no WARNING event)
with socket.socket() as s:
    s.bind(("127.0.0.1", busy)); s.listen()
    lonely = DynamicPortManager(busy, busy, path + ".2", refresh_interval=3600,
                                console_log=console_log)
    try:
        lonely.pick_port()
        raise SystemExit("picked a port another program listens on")
    except NoFreePortError:
        pass
    lonely.stop()
m.stop()
"""
EVENTS = ["START", "PICK", "PICK", "RELEASE", "START", "ERROR", "STOP", "STOP"]


def run(tmp_path: Path, lo: int, when: str, console: str = "auto") -> list[str]:
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            CHILD,
            str(tmp_path / "s.json"),
            str(lo),
            str(lo + 9),
            when,
            console,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=None,
    )
    assert result.returncode == 0, result.stderr
    return result.stderr.splitlines()


def kinds(lines: list[str]) -> list[tuple[str, str]]:
    """Each stderr line as (console|record, event); anything else fails the test."""
    found = []
    for line in lines:
        if match := LINE_RE.match(line):
            found.append(("console", match["event"]))
        elif match := RECORD_RE.match(line):
            found.append(("record", match["event"]))
        else:
            raise AssertionError(f"an unexpected line on stderr: {line!r}")
    return found


def test_unconfigured_logging_prints_the_console_line_only(tmp_path: Path, registry: Path) -> None:
    # No bare `ERROR | Active:None ...` from Python's last-resort handler either.
    base = port_block(10)[0]
    lines = run(tmp_path, base, "never")
    assert kinds(lines) == [("console", e) for e in EVENTS]


def test_configured_logging_gets_each_event_once_as_a_record(
    tmp_path: Path, registry: Path
) -> None:
    base = port_block(10)[0]
    lines = run(tmp_path, base, "before")
    assert kinds(lines) == [("record", e) for e in EVENTS]


def test_the_rule_is_decided_per_event(tmp_path: Path, registry: Path) -> None:
    # Logging configured after the first pick: from then on, records only.
    base = port_block(10)[0]
    lines = run(tmp_path, base, "between")
    assert kinds(lines) == [("console", "START"), ("console", "PICK")] + [
        ("record", e) for e in EVENTS[2:]
    ]


def test_console_log_true_forces_the_line_beside_the_records(
    tmp_path: Path, registry: Path
) -> None:
    base = port_block(10)[0]
    found = kinds(run(tmp_path, base, "before", "on"))
    assert [e for source, e in found if source == "console"] == EVENTS
    assert [e for source, e in found if source == "record"] == EVENTS


def test_console_log_false_prints_nothing_unconfigured(tmp_path: Path, registry: Path) -> None:
    # The package's NullHandler keeps the records (the ERROR too) off stderr.
    base = port_block(10)[0]
    assert run(tmp_path, base, "never", "off") == []


def test_console_log_false_leaves_the_records(tmp_path: Path, registry: Path) -> None:
    base = port_block(10)[0]
    assert kinds(run(tmp_path, base, "before", "off")) == [("record", e) for e in EVENTS]
