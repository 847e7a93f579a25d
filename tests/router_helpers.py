"""Helpers shared by the router, server and CLI tests (imported, not a conftest)."""

from __future__ import annotations

import os
import pty
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Callable

import pytest
from dynamic_port_manager import DynamicPortManager, list_leases
from fastapi import APIRouter, FastAPI

ROOT = Path(__file__).resolve().parent.parent
ENV_VARS = ("DPM_START", "DPM_END", "DPM_JSON_PATH", "DPM_REFRESH_INTERVAL", "DPM_HISTORY_MAX")


#: The running test's ``free_port_range`` (the plugin's fixture), handed over
#: by the autouse fixture in conftest.py for ``port_block``.
lease_range: Callable[[int], range] | None = None


def port_block(size: int = 8) -> tuple[int, int]:
    """First and last of ``size`` consecutive ports leased to the running test
    through the project's pytest plugin (``free_port_range``): no other test,
    xdist worker or run sharing the registry is handed any of them."""
    assert lease_range is not None, "port_block() is for use inside a test"
    block = lease_range(size)
    return block.start, block[-1]


def base_for_children(monkeypatch: pytest.MonkeyPatch, size: int) -> int:
    """The first of ``size`` ports leased to the running test (``port_block``),
    also in ``$DPM_TEST_BASE`` for its child processes."""
    base = port_block(size)[0]
    monkeypatch.setenv("DPM_TEST_BASE", str(base))
    return base


def new_manager(state_path: Path, start: int, end: int, **options: Any) -> DynamicPortManager:
    return DynamicPortManager(start, end, state_path, console_log=False, **options)


def app_with(router: APIRouter, **kwargs: Any) -> FastAPI:
    app = FastAPI(**kwargs)
    app.include_router(router, prefix="/api/v1")
    return app


def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No DPM_* setting of the developer's shell leaks into a test."""
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)


def cli_path() -> str:
    """The installed console script, next to the interpreter running the tests."""
    script = Path(sys.executable).parent / "dynamic-port-manager"
    found = str(script) if script.exists() else shutil.which("dynamic-port-manager")
    assert found, "the dynamic-port-manager console script is not installed"
    return found


def cli(*args: str, timeout: float = 60, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [cli_path(), *args], capture_output=True, text=True, timeout=timeout, **kwargs
    )


def wait_until(predicate: Callable[[], bool], timeout: float = 20.0) -> bool:
    """Polls ``predicate`` until it holds or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def sleeping(pid: int, tid: int | None = None) -> bool:
    """Whether thread ``tid`` of process ``pid`` (its main thread by default)
    sleeps in the kernel (nanosleep): the core's wait for a held lock tries it
    and sleeps between tries, so a pick sleeping there is waiting for the lock."""
    try:
        wchan = Path(f"/proc/{pid}/task/{tid or pid}/wchan").read_text()
    except OSError:
        return False
    return "nanosleep" in wchan


class LineReader:
    """Reads a child's output on a thread, so a test can wait for a line with a deadline."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.put(line)

    def wait_for(self, needle: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no line with {needle!r} in {timeout}s; got {self.seen}")
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            self.seen.append(line)
            if needle in line:
                return line

    def drain(self) -> list[str]:
        """Every line read, once the stream has ended (or gone quiet for 0.5 s)."""
        lines = list(self.seen)
        try:
            while True:
                lines.append(self.lines.get(timeout=0.5))
        except queue.Empty:
            return lines


class Served:
    """A server process and the URL it printed."""

    def __init__(self, proc: subprocess.Popen[str], url: str) -> None:
        self.proc = proc
        self.url = url
        self.port = int(url.rsplit(":", 1)[1])


@contextmanager
def running_server(
    command: list[str], cwd: Path, env: dict[str, str] | None = None
) -> Iterator[Served]:
    """The server ``command`` runs, once it has printed its URL; killed if
    still up when the block ends, and it must not have printed a traceback."""
    proc = subprocess.Popen(
        command,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    errors = LineReader(proc.stderr)  # type: ignore[arg-type]
    try:
        line = LineReader(proc.stdout).wait_for("Serving on")  # type: ignore[arg-type]
        match = re.search(r"http://127\.0\.0\.1:\d+", line)
        assert match, line
        yield Served(proc, match.group(0))
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        assert "Traceback" not in "".join(errors.drain())


@contextmanager
def listening(port: int = 0) -> Iterator[socket.socket]:
    """A real listening socket on 127.0.0.1 (another program holding a port)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do
    try:
        sock.bind(("127.0.0.1", port))
        sock.listen(1)
        yield sock
    finally:
        sock.close()


def can_bind(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def lease_on(port: int, registry: Path) -> dict[str, Any] | None:
    """The registry's lease on ``port``, if any."""
    leases = list_leases(registry_dir=registry)
    return next((lease for lease in leases if lease["port"] == port), None)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def start_default_manager(monkeypatch: pytest.MonkeyPatch, state_path: Path) -> DynamicPortManager:
    """The default router's manager, made afresh from DPM_* variables for this
    test, with one pick and release behind it (history and a backup to show)."""
    import api_ports

    clean_env(monkeypatch)
    start, end = port_block(3)
    monkeypatch.setenv("DPM_START", str(start))
    monkeypatch.setenv("DPM_END", str(end))
    monkeypatch.setenv("DPM_JSON_PATH", str(state_path))
    api_ports.close_manager()
    manager = api_ports.get_manager()
    manager.pick_port()
    manager.release_port()
    return manager


def read_terminal(argv: list[str]) -> str:
    """What ``argv`` prints with a terminal as its stdout."""
    primary, secondary = pty.openpty()
    try:
        proc = subprocess.Popen(argv, stdout=secondary, stderr=subprocess.PIPE)
        os.close(secondary)
        assert proc.wait(timeout=60) == 0
        chunks = []
        while True:  # until the pty reports EOF (EIO) once the child has exited
            try:
                chunk = os.read(primary, 65536)
            except OSError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(primary)
    return b"".join(chunks).decode().replace("\r\n", "\n")


@contextmanager
def gunicorn_preloaded(
    app: str, workers: int, bind_port: int, cwd: Path, env: dict[str, str], *options: str
) -> Iterator[subprocess.Popen[str]]:
    """``gunicorn --preload`` with ``workers`` uvicorn workers serving ``app``
    on 127.0.0.1:``bind_port`` (output in ``.stdout``), stopped with SIGTERM
    when the block ends (killed if still up 30 s later)."""
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "--preload",
            "-w",
            str(workers),
            "-k",
            "uvicorn.workers.UvicornWorker",
            "--bind",
            f"127.0.0.1:{bind_port}",
            *options,
            app,
        ],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        yield server
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.communicate()
