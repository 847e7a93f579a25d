"""pytest plugin: ports for tests that no other test, worker or run can be handed.

Loaded through the ``pytest11`` entry point (off with ``-p no:dynamic_port_manager``).
Every port comes from the host-wide lease registry (``$DPM_REGISTRY_DIR`` or
the default folder), so pytest-xdist workers, concurrent pytest runs and any
other program using dynamic-port-manager never get the same port at once.
A port is leased to the test's process and released at the test's teardown
(or, if the process dies, reclaimed by the next pick).

Fixtures: ``free_port`` (an int), ``free_port_factory`` (call it for more),
``free_port_range`` (call it with ``n`` for ``n`` consecutive ports, a ``range``),
``listening_socket`` (a socket already listening on a leased port).
Options: ``dpm_port_range`` (ini) / ``--dpm-port-range`` (default 20000-29999,
below Linux's ephemeral range) and ``dpm_host`` (ini, the address of
``listening_socket``, default 127.0.0.1; empty: dual-stack on every address).
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

import pytest

from . import DynamicPortManager, NoFreePortError, release_lease

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
    """One state file per user under the temp folder: never in the project's folder."""
    return Path(tempfile.gettempdir()) / f"dynamic-port-manager-{os.getuid()}-pytest" / "ports.json"


@pytest.fixture(scope="session")
def _dpm_manager(pytestconfig: pytest.Config) -> Iterator[DynamicPortManager]:
    start, end = port_range(pytestconfig)
    manager = DynamicPortManager(start, end, state_path(), refresh_interval=60, console_log=False)
    try:
        yield manager
    finally:
        manager.stop()


@pytest.fixture
def free_port_factory(_dpm_manager: DynamicPortManager) -> Iterator[Callable[[], int]]:
    """Call it for a free port, leased to this test until its teardown."""
    leased: list[int] = []

    def pick() -> int:
        # Leased to this process, not as the manager's one active port: a test
        # may hold many, and a worker that dies gives them back.
        port = _dpm_manager.pick_port(pid=os.getpid())
        leased.append(port)
        return port

    yield pick
    for port in leased:
        release_lease(port, registry_dir=_dpm_manager.registry_dir)


# How many first ports free_port_range tries before it gives up: each failed
# try keeps its ports leased until the search ends, so the next starts higher.
RANGE_TRIES = 64


@pytest.fixture
def free_port_range(_dpm_manager: DynamicPortManager) -> Iterator[Callable[[int], range]]:
    """Call it with ``n`` for ``n`` consecutive free ports (a ``range``), all
    leased to this test until its teardown: for code that takes a port range."""
    leased: list[int] = []
    pid = os.getpid()

    def lease_window(first: int, last: int) -> list[int]:
        """Leases every port of ``first..=last``, or none (NoFreePortError)."""
        got: list[int] = []
        path = state_path().with_name(f"range-{pid}.json")
        with DynamicPortManager(
            first,
            last,
            path,
            refresh_interval=60,
            backup_max=0,
            console_log=False,
            registry_dir=_dpm_manager.registry_dir,
        ) as window:
            try:
                for _ in range(last - first + 1):
                    got.append(window.pick_port(pid=pid))
            except NoFreePortError:
                for port in got:
                    release_lease(port, registry_dir=_dpm_manager.registry_dir)
                raise
        return got

    def block(n: int) -> range:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"free_port_range: n must be an int >= 1, got {n!r}")
        tried: list[int] = []  # first ports of failed tries, held so the next pick moves on
        try:
            for _ in range(RANGE_TRIES):
                first = _dpm_manager.pick_port(pid=pid)  # the lowest port no one holds
                if first + n - 1 > _dpm_manager.end:
                    tried.append(first)
                    break  # every later first port is higher still
                try:
                    rest = lease_window(first + 1, first + n - 1) if n > 1 else []
                except NoFreePortError:
                    tried.append(first)
                    continue
                leased.extend([first, *rest])
                return range(first, first + n)
        finally:
            for port in tried:
                release_lease(port, registry_dir=_dpm_manager.registry_dir)
        raise NoFreePortError(
            f"free_port_range: no {n} consecutive free ports in "
            f"{_dpm_manager.start}-{_dpm_manager.end} (dpm_port_range)"
        )

    yield block
    for port in leased:
        release_lease(port, registry_dir=_dpm_manager.registry_dir)


@pytest.fixture
def free_port(free_port_factory: Callable[[], int]) -> int:
    """A free TCP port, leased to this test until its teardown."""
    return free_port_factory()


@pytest.fixture
def listening_socket(
    _dpm_manager: DynamicPortManager, pytestconfig: pytest.Config
) -> Iterator[socket.socket]:
    """A socket already listening on a leased port (``pick_socket``): no race to bind."""
    host = str(pytestconfig.getini("dpm_host")) or None
    sock = _dpm_manager.pick_socket(pid=os.getpid(), host=host)
    port = sock.getsockname()[1]
    try:
        with sock:
            yield sock
    finally:
        release_lease(port, registry_dir=_dpm_manager.registry_dir)
