"""Console lines and log_json() go through sys.stderr / sys.stdout, so Python-level
redirection (contextlib, pytest's capsys, a web framework's capture) sees them."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

from dynamic_port_manager import DynamicPortManager
from router_helpers import port_block


def test_console_lines_follow_a_redirected_sys_stderr(tmp_path: Path, registry: Path) -> None:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        # Forced on: pytest's log capture is a handler on the root logger, which
        # the default rule reads as an application that configured logging.
        m = DynamicPortManager(
            *port_block(10), tmp_path / "s.json", refresh_interval=3600, console_log=True
        )
        port = m.pick_port()
        m.stop()
    lines = err.getvalue().splitlines()
    assert [line.split(" | ")[1].strip() for line in lines] == ["START", "PICK", "STOP"]
    assert f"Active:{port}" in lines[1]
    assert "\x1b" not in err.getvalue()  # a StringIO is no terminal


def test_log_json_follows_a_redirected_sys_stdout(tmp_path: Path, registry: Path) -> None:
    m = DynamicPortManager(*port_block(10), tmp_path / "s.json", console_log=False)
    try:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            record = m.log_json()
        assert json.loads(out.getvalue()) == record
        assert record["dpm.state_file"] == str(tmp_path / "s.json")
    finally:
        m.stop()
