"""pytest plugin: ports for tests that no other test, worker or run can be handed.

Loaded through the ``pytest11`` entry point (off with ``-p no:dynamic_port_manager``).
Every port comes from the host-wide lease registry (``$DPM_REGISTRY_DIR`` or
the default folder), so pytest-xdist workers, concurrent pytest runs and any
other program using dynamic-port-manager never get the same port at once.
A port is leased to the test's process and given back at the test's teardown
(released 60 s later, past TIME_WAIT; if the process dies, reclaimed by the
next pick). Each session starts at a random port of the range.

Fixtures: ``free_port`` (an int), ``free_port_factory`` (call it for more),
``free_port_range`` (call it with ``n`` for ``n`` consecutive ports, a ``range``),
``listening_socket`` (a socket already listening on a leased port).
Options: ``dpm_port_range`` (ini) / ``--dpm-port-range`` (default 20000-29999,
below Linux's ephemeral range) and ``dpm_host`` (ini, the address of
``listening_socket``, default 127.0.0.1; empty: dual-stack on every address).
"""

from __future__ import annotations

import logging
import math
import os
import random
import socket
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Callable, TypeVar

import pytest

from . import DynamicPortManager, NoFreePortError, port_owners, release_lease

DEFAULT_RANGE = "20000-29999"


def pytest_addoption(parser: pytest.Parser) -> None:
    help_range = "ports the dynamic_port_manager fixtures hand out, START-END (default %s)"
    parser.addini("dpm_port_range", help_range % DEFAULT_RANGE, default=DEFAULT_RANGE)
    help_host = "address listening_socket binds (default 127.0.0.1; empty: every address)"
    parser.addini("dpm_host", help_host, default="127.0.0.1")
    parser.getgroup("dynamic_port_manager").addoption(
        "--dpm-port-range", dest="dpm_port_range", metavar="START-END", help=help_range % "ini"
    )


def pytest_configure(config: pytest.Config) -> None:
    port_range(config)  # a bad range is a usage error before any test runs


def port_range(config: pytest.Config) -> tuple[int, int]:
    """The configured range: the command line wins over the ini file."""
    text = config.getoption("dpm_port_range") or str(config.getini("dpm_port_range"))
    start, _, end = text.strip().partition("-")
    try:
        first, last = int(start), int(end or start)
    except ValueError:
        raise pytest.UsageError(f"dpm_port_range: expected START-END, got {text!r}") from None
    if not 1 <= first <= last <= 65535:
        raise pytest.UsageError(f"dpm_port_range: expected 1 <= START <= END <= 65535: {text!r}")
    return first, last


def state_path() -> Path:
    """A name in the plugin's per-user folder under the temp folder (never
    the project's): its state files are named beside it."""
    return Path(tempfile.gettempdir()) / f"dynamic-port-manager-{os.getuid()}-pytest" / "ports.json"


class _NotOurs(logging.Filter):
    """Drops the records of the plugin's own managers (their state files live
    in the plugin's folder): a test that captures the package's log sees the
    events of the code under test only."""

    def filter(self, record: logging.LogRecord) -> bool:
        folder = str(state_path().parent) + os.sep
        return not str(getattr(record, "state_file", "")).startswith(folder)


# A port a test gave back stays leased this long before it is handed out
# again: the kernel keeps the port's closed connections (TIME_WAIT) for 60 s,
# and a server binding without SO_REUSEADDR cannot have it until then.
COOL_SECONDS = 60.0
COOL_MAX = 64  # ports a test held, past which they are released at once
T = TypeVar("T")


class _Ports:
    """Picks from a random point of the range onwards, then from its start:
    separate runs that keep their leases in separate registries (each test run
    with its own ``DPM_REGISTRY_DIR``) rarely meet; within one registry no two
    picks ever do."""

    def __init__(self, start: int, end: int) -> None:
        self.start, self.end = start, end
        self.pivot = pivot = random.randint(start, end)
        folder = state_path().parent
        self.paths = [folder / f"ports-{os.getpid()}.json"]
        self.parts = [self._manager(pivot, end, self.paths[0])]
        if pivot > start:
            self.paths.append(folder / f"ports-{os.getpid()}-wrap.json")
            self.parts.append(self._manager(start, pivot - 1, self.paths[1]))
        self.registry_dir = self.parts[0].registry_dir
        self.cooling: deque[tuple[float, int]] = deque()  # (given back at, port)

    @staticmethod
    def _manager(start: int, end: int, path: Path) -> DynamicPortManager:
        return DynamicPortManager(
            start, end, path, refresh_interval=60, backup_max=0, console_log=False
        )

    def pick_port(self, pid: int) -> int:
        """The lowest free port from the pivot on, else from the range's start."""
        return self._first(lambda part: part.pick_port(pid=pid))

    def pick_socket(self, pid: int, host: str | None) -> socket.socket:
        return self._first(lambda part: part.pick_socket(pid=pid, host=host))

    def _first(self, pick: Callable[[DynamicPortManager], T]) -> T:
        for attempt in range(2):
            for part in self.parts:
                try:
                    return pick(part)
                except NoFreePortError:
                    if part is self.parts[-1] and (attempt or not self.cooling):
                        raise
            self.thaw_all()  # no port free but the cooling ones: take them back
        raise AssertionError("unreachable")

    def give_back(self, ports: list[int]) -> None:
        """Released ``COOL_SECONDS`` from now (or when nothing else is free)."""
        now = time.monotonic()
        self.cooling.extend((now, port) for port in ports)
        self._thaw(now - COOL_SECONDS)

    def _thaw(self, given_before: float) -> None:
        while self.cooling and self.cooling[0][0] <= given_before:
            release_lease(self.cooling.popleft()[1], registry_dir=self.registry_dir)

    def thaw_all(self) -> None:
        self._thaw(math.inf)

    def stop(self) -> None:
        self.thaw_all()
        for part, path in zip(self.parts, self.paths):
            part.stop()
            path.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def _dpm_manager(pytestconfig: pytest.Config) -> Iterator[_Ports]:
    start, end = port_range(pytestconfig)
    logger = logging.getLogger("dynamic_port_manager")
    quiet = _NotOurs()
    logger.addFilter(quiet)
    ports = _Ports(start, end)
    try:
        yield ports
    finally:
        ports.stop()
        logger.removeFilter(quiet)


@pytest.fixture
def free_port_factory(_dpm_manager: _Ports) -> Iterator[Callable[[], int]]:
    """Call it for a free port, leased to this test until its teardown."""
    leased: list[int] = []

    def pick() -> int:
        # Leased to this process, not as the manager's one active port: a test
        # may hold many, and a worker that dies gives them back.
        port = _dpm_manager.pick_port(os.getpid())
        leased.append(port)
        return port

    yield pick
    _dpm_manager.give_back(leased)


# How many free-looking blocks free_port_range tries to lease (one may be taken
# meanwhile) and how long it waits for other workers to give ports back.
RANGE_TRIES = 64
RANGE_WAIT = 120.0
RANGE_PIECE = 128


@pytest.fixture
def free_port_range(_dpm_manager: _Ports) -> Iterator[Callable[[int], range]]:
    """Call it with ``n`` for ``n`` consecutive free ports (a ``range``), all
    leased to this test until its teardown: for code that takes a port range."""
    leased: list[int] = []
    pid = os.getpid()

    def lease_window(first: int, last: int) -> list[int]:
        """Leases every port of ``first..=last``, or none (NoFreePortError)."""
        got: list[int] = []
        try:
            # In pieces: each pick saves the piece's state file, whose size
            # grows with the piece.
            for low in range(first, last + 1, RANGE_PIECE):
                high = min(low + RANGE_PIECE - 1, last)
                path = state_path().with_name(f"range-{pid}-{low}.json")
                with DynamicPortManager(
                    low,
                    high,
                    path,
                    refresh_interval=60,
                    backup_max=0,
                    console_log=False,
                    registry_dir=_dpm_manager.registry_dir,
                ) as window:
                    for _ in range(high - low + 1):
                        got.append(window.pick_port(pid=pid))
                path.unlink(missing_ok=True)
        except NoFreePortError:
            for port in got:
                release_lease(port, registry_dir=_dpm_manager.registry_dir)
            raise
        return got

    def gap(first: int, n: int) -> int | None:
        """The first port of ``n`` consecutive ones from ``first`` on (up to the
        range's end) that no lease and no socket holds, looked up in chunks."""
        end = _dpm_manager.end
        while first + n - 1 <= end:
            last = min(end, first + max(4 * n, 2048))
            owners = port_owners(range(first, last + 1), registry_dir=_dpm_manager.registry_dir)
            start = first  # of the run of unused ports being measured
            for used in sorted({owner["port"] for owner in owners}) + [last + 1]:
                if used - start >= n:
                    return start
                start = max(start, used + 1)
            if last == end:
                return None
            first = start  # the run at the chunk's end may go on past it
        return None

    def search(n: int) -> range | None:
        """A block of ``n`` leased ports, or None: from the session's random
        starting point on, then from the range's start."""
        for origin in dict.fromkeys([_dpm_manager.pivot, _dpm_manager.start]):
            first = gap(origin, n)
            for _ in range(RANGE_TRIES):
                if first is None:
                    break
                try:
                    ports = lease_window(first, first + n - 1)
                except NoFreePortError:  # taken meanwhile, or a port never handed out
                    first = gap(first + 1, n)
                    continue
                leased.extend(ports)
                return range(first, first + n)
        return None

    def block(n: int) -> range:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"free_port_range: n must be an int >= 1, got {n!r}")
        fits = n <= _dpm_manager.end - _dpm_manager.start + 1
        found = search(n) if fits else None
        if found is None and fits and _dpm_manager.cooling:
            _dpm_manager.thaw_all()  # ports given back lately are in the way: take them
            found = search(n)
        # Other workers may hold the ports for now: wait for them, a while.
        deadline = time.monotonic() + RANGE_WAIT
        while found is None and fits and time.monotonic() < deadline:
            time.sleep(0.5)
            found = search(n)
        if found is None:
            raise NoFreePortError(
                f"free_port_range: no {n} consecutive free ports in "
                f"{_dpm_manager.start}-{_dpm_manager.end} (dpm_port_range)"
            )
        return found

    yield block
    # A big block (a range for a manager under test) goes back at once:
    # holding thousands of ports for a minute would starve other workers.
    if len(leased) <= COOL_MAX:
        _dpm_manager.give_back(leased)
    else:
        for port in leased:
            release_lease(port, registry_dir=_dpm_manager.registry_dir)


@pytest.fixture
def free_port(free_port_factory: Callable[[], int]) -> int:
    """A free TCP port, leased to this test until its teardown."""
    return free_port_factory()


@pytest.fixture
def listening_socket(_dpm_manager: _Ports, pytestconfig: pytest.Config) -> Iterator[socket.socket]:
    """A socket already listening on a leased port (``pick_socket``): no race to bind."""
    host = str(pytestconfig.getini("dpm_host")) or None
    sock = _dpm_manager.pick_socket(os.getpid(), host)
    port = sock.getsockname()[1]
    try:
        with sock:
            yield sock
    finally:
        _dpm_manager.give_back([port])
