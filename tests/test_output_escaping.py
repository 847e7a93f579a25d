"""A file name may hold any byte but "/" and NUL (issue 7, item 13): whatever the
library prints must not let one forge a log line or steer a terminal. Control
characters are written out in the console line and the logging message, and
log_json() stays one record per line even for str.splitlines()."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import pytest
from dynamic_port_manager import DynamicPortManager
from router_helpers import port_block

# Newline, carriage return, an ANSI colour, the line/paragraph separators, NEL
# (C1, a line end for splitlines), DEL, and a tab.
HOSTILE = "a\nFORGED LINE\rb\x1b[31mred\u2028c\u2029d\x85e\x7ff\tg.json"
WRITTEN_OUT = r"a\nFORGED LINE\rb\x1b[31mred\u2028c\u2029d\x85e\x7ff\tg.json"


def hidden(text: str) -> list[str]:
    """Characters that end a line or steer a terminal."""
    return [c for c in text if unicodedata.category(c) in ("Cc", "Zl", "Zp")]


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def records() -> Iterator[Records]:
    handler = Records()
    logger = logging.getLogger("dynamic_port_manager")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(old_level)


@pytest.fixture
def hostile_path(tmp_path: Path, registry: Path) -> Path:
    """A damaged state file under a hostile name: the recovery note names it."""
    path = tmp_path / HOSTILE
    path.write_text("not json")
    return path


def test_console_lines_and_logging_messages_write_control_characters_out(
    hostile_path: Path, records: Records
) -> None:
    start, end = port_block(4)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        # Forced on: with a handler on the logger (and pytest's on the root),
        # the default rule would leave the events to the records alone.
        m = DynamicPortManager(start, end, hostile_path, console_log=True)
        m.pick_port()
        m.stop()
    lines = err.getvalue().split("\n")
    assert lines.pop() == ""  # every line ends with its newline
    messages = [r.getMessage() for r in records.records]
    # One console line per event, and one logging record each.
    assert len(lines) == len(messages) >= 4  # RECOVER, START, PICK, STOP
    assert [line.split(" | ")[1].strip() for line in lines] == [
        msg.split(" | ")[0] for msg in messages
    ]
    for line in lines:
        assert line.startswith("[") and " | Note:" in line, line
        assert hidden(line) == [], line
        assert line.splitlines() == [line]
    for msg in messages:
        assert hidden(msg) == [], msg
    # The name is there, readable, in the recovery's line and record.
    assert any(WRITTEN_OUT in line for line in lines)
    assert any(WRITTEN_OUT in msg for msg in messages)
    formatted = logging.Formatter("%(levelname)s %(message)s").format(records.records[0])
    assert len(formatted.splitlines()) == 1


def test_log_json_is_one_line_for_splitlines_and_parses_to_the_exact_path(
    hostile_path: Path,
) -> None:
    start, end = port_block(4)
    with DynamicPortManager(start, end, hostile_path, console_log=False) as m:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            record = m.log_json()
    text = out.getvalue()
    assert text.endswith("\n")
    assert len(text.splitlines()) == 1, text  # U+2028/2029/0085 were written raw
    assert hidden(text[:-1]) == []
    assert r"\u2028" in text and r"\u0085" in text and r"\u001b" in text
    parsed = json.loads(text)
    assert parsed == record
    assert parsed["dpm.state_file"] == str(hostile_path)
