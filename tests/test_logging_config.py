"""Log records a JSON pipeline can use, and that never vanish.

Each event is a record of the ``dynamic_port_manager`` logger with the
event's fields in ``extra`` and the caller's source line as origin (the
background refresh thread's: the package's ``__init__.py``);
``logging.config.dictConfig`` with its default ``disable_existing_loggers``
does not silence the package or the router; ``log_json()`` is an ECS
document with the package's own keys under ``dpm.``.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

import dynamic_port_manager
import pytest
from dynamic_port_manager import DynamicPortManager
from helpers_child import run_child

LOGGER = "dynamic_port_manager"
FIELDS = (
    "event",
    "port",
    "prev",
    "active_port",
    "pid",
    "state_file",
    "service",
    "free_count",
    "used_count",
    "jalali_time",
)
ECS_KEYS = {
    "@timestamp",
    "message",
    "ecs.version",
    "event.action",
    "log.level",
    "log.logger",
    "log.origin.file.name",
    "log.origin.file.line",
    "log.origin.function",
    "process.pid",
}


class Keep(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def of(self, event: str) -> list[logging.LogRecord]:
        return [r for r in self.records if getattr(r, "event", None) == event]


@pytest.fixture
def kept() -> Iterator[Keep]:
    logger = logging.getLogger(LOGGER)
    handler, level = Keep(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


def two_ports(free_port_factory: Callable[[], int]) -> tuple[int, int]:
    """A range whose ends no other test is handed (usually two ports)."""
    a, b = free_port_factory(), free_port_factory()
    return min(a, b), max(a, b)


def line_after(marker: str) -> int:
    """The line number of the line after the one containing ``marker`` in this file."""
    lines = Path(__file__).read_text().splitlines()
    found = (i for i, text in enumerate(lines, 1) if marker in text and "line_after" not in text)
    return next(found) + 1


def test_records_carry_the_events_fields_and_the_callers_line(
    tmp_path: Path, registry: Path, kept: Keep, free_port_factory: Callable[[], int]
) -> None:
    lo, hi = two_ports(free_port_factory)
    kept.records.clear()  # the fixture's own picks
    path = tmp_path / "s.json"
    m = DynamicPortManager(lo, hi, path, refresh_interval=3600, console_log=False)
    try:
        # first pick
        first = m.pick_port()
        second = m.pick_port()
        assert m.release_port() is True
    finally:
        m.stop()
    (start,) = kept.of("start")
    pick1, pick2 = kept.of("pick")
    (release,) = kept.of("release")
    (stop,) = kept.of("stop")
    for record in kept.records:
        for field in FIELDS:
            assert hasattr(record, field), (record.getMessage(), field)
        assert record.state_file == str(path)
        assert record.service == path.stem.removeprefix("dynamic_ports_")
        assert record.name == LOGGER
        # The caller's line, never the Rust source.
        assert record.pathname == __file__, record.pathname
        assert record.filename == "test_logging_config.py"
        assert record.funcName == "test_records_carry_the_events_fields_and_the_callers_line"
    assert pick1.lineno == line_after("# first pick")
    assert pick2.lineno == pick1.lineno + 1
    assert start.lineno == pick1.lineno - 3  # the constructor's line
    assert (pick1.port, pick1.prev, pick1.active_port) == (first, None, first)
    assert (pick2.port, pick2.prev, pick2.active_port) == (second, first, second)
    assert pick1.pid == os.getpid() and start.port is None
    assert (release.port, release.active_port) == (second, None)
    assert (stop.port, stop.prev) == (None, None)
    assert pick1.used_count == 1 and pick1.free_count == hi - lo
    assert "/" in pick1.jalali_time
    # The message is still the one-line summary, with nothing to format.
    assert pick1.getMessage().startswith(f"PICK | Active:{first} |")
    assert pick1.args == ()


def test_a_pick_for_another_pid_names_that_pid(
    tmp_path: Path, registry: Path, free_port: int, kept: Keep
) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with DynamicPortManager(free_port, free_port, tmp_path / "s.json", console_log=False) as m:
            port = m.pick_port(pid=child.pid)
        (pick,) = kept.of("pick")
        assert (pick.port, pick.pid, pick.prev, pick.active_port) == (port, child.pid, None, None)
    finally:
        child.kill()
        child.wait()


def test_the_background_threads_records_come_from_the_package(
    tmp_path: Path, registry: Path, free_port: int, kept: Keep
) -> None:
    m = DynamicPortManager(
        free_port, free_port, tmp_path / "s.json", refresh_interval=0.05, console_log=False
    )
    try:
        with socket.socket() as s:
            # A listener appears: the refresh thread's next scan sees it.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", free_port))
            s.listen()
            deadline = time.monotonic() + 15
            while not [r for r in kept.of("refresh") if r.used_count == 1]:
                assert time.monotonic() < deadline, "no REFRESH record of the listener"
                time.sleep(0.01)
    finally:
        m.stop()
    record = [r for r in kept.of("refresh") if r.used_count == 1][0]
    assert record.pathname == dynamic_port_manager.__file__
    assert record.filename == "__init__.py"
    assert record.funcName == "(background refresh)"
    assert record.used_count == 1 and record.port is None


DICTCONFIG_CHILD = """
import json, logging, logging.config, sys
import api_ports  # the router, imported before logging is configured, as apps do
from api_ports import create_router
from dynamic_port_manager import DynamicPortManager
from fastapi import FastAPI
from fastapi.testclient import TestClient

class JsonLines(logging.Handler):
    def emit(self, record):
        print(json.dumps({
            "name": record.name, "level": record.levelname, "message": record.getMessage(),
            "event": getattr(record, "event", None), "port": getattr(record, "port", None),
            "filename": record.filename, "funcName": record.funcName,
        }), flush=True)

logging.config.dictConfig({
    "version": 1,
    "handlers": {"lines": {"class": "__main__.JsonLines"}},
    "root": {"level": "INFO", "handlers": ["lines"]},
})
assert logging.getLogger("dynamic_port_manager").disabled
assert logging.getLogger("api_ports").disabled
port = int(sys.argv[2])

def main():
    m = DynamicPortManager(port, port, sys.argv[1], refresh_interval=3600)
    m.pick_port()
    m.stop()
    app = FastAPI()
    app.include_router(create_router(start=port, end=port - 1, json_path=sys.argv[1]))
    with TestClient(app):
        pass

main()
"""


def test_dictconfig_with_its_defaults_does_not_silence_the_events(
    tmp_path: Path, registry: Path, free_port: int
) -> None:
    result = run_child(DICTCONFIG_CHILD, tmp_path / "s.json", free_port, timeout=120)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    events = [r["event"] for r in records if r["name"] == LOGGER]
    assert events == ["start", "pick", "stop"], records
    pick = next(r for r in records if r["event"] == "pick")
    assert (pick["port"], pick["filename"], pick["funcName"]) == (free_port, "<string>", "main")
    # The router's start-up failure, at ERROR.
    errors = [r for r in records if r["name"] == "api_ports"]
    assert [r["level"] for r in errors] == ["ERROR"], records
    assert "could not start" in errors[0]["message"]
    # Logging is configured: no console line beside the records.
    assert "| PICK" not in result.stderr


def test_log_json_is_ecs_with_the_packages_keys_under_dpm(
    tmp_path: Path, registry: Path, free_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    with DynamicPortManager(free_port, free_port, tmp_path / "s.json", console_log=False) as m:
        port = m.pick_port()
        capsys.readouterr()
        record = m.log_json()
        line = inspect.currentframe().f_lineno - 1  # type: ignore[union-attr]
    (printed,) = capsys.readouterr().out.splitlines()
    assert json.loads(printed) == record
    assert record["ecs.version"] == "8.11.0"
    assert record["log.level"] == "info"
    assert record["log.logger"] == LOGGER
    assert record["process.pid"] == os.getpid()
    assert record["log.origin.file.name"] == "test_logging_config.py"
    assert record["log.origin.file.line"] == line
    assert record["log.origin.function"] == "test_log_json_is_ecs_with_the_packages_keys_under_dpm"
    assert record["message"] and record["@timestamp"]
    assert record["event.action"] == record["dpm.event"] == "log_json"
    assert record["dpm.active_port"] == record["dpm.current_port"] == port
    assert record["dpm.state_file"] == str(m.state_path)
    assert record["dpm.service"] == m.service
    assert (record["dpm.free_count"], record["dpm.used_count"]) == (0, 1)
    assert record["dpm.error_active"] is False and record["dpm.last_error"] is None
    assert record["dpm.change_count"] == 1
    for key in record:
        assert key in ECS_KEYS or key.startswith("dpm."), key
