"""pytest plugin: ports for tests that no other test, worker or run can be handed.

Loaded through the ``pytest11`` entry point (off with ``-p no:dynamic_port_manager``).
Every port comes from the host-wide lease registry (``$DPM_REGISTRY_DIR`` or
the default folder), so pytest-xdist workers, concurrent pytest runs and any
other program using dynamic-port-manager never get the same port at once.
A port is leased to the test's process and released at the test's teardown
(or, if the process dies, reclaimed by the next pick).

Fixtures: ``free_port`` (an int), ``free_port_factory`` (call it for more),
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

from . import DynamicPortManager, release_lease

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
