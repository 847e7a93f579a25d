"""`pick_socket()`: the port comes back already bound, so no one can take it first."""

from __future__ import annotations

import errno
import logging
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from dynamic_port_manager import DynamicPortManager, list_leases
from router_helpers import new_manager, port_block

# Another program: binds (and listens on) each port it reads, answers "bound"
# or the errno name. It never asks the manager.
THIEF = """
import errno, socket, sys
held = []
for line in sys.stdin:
    s = socket.socket()
    # As servers do: a TIME_WAIT left on the port by an earlier test is no obstacle.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("0.0.0.0", int(line)))
        s.listen()
        held.append(s)
        print("bound", flush=True)
    except OSError as e:
        s.close()
        print(errno.errorcode[e.errno], flush=True)
"""


class Thief:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", THIEF], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.stolen: list[int] = []

    def take(self, port: int) -> str:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(f"{port}\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline().strip()
        if answer == "bound":
            self.stolen.append(port)
        return answer

    def close(self) -> None:
        assert self.proc.stdin
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture
def thief() -> Iterator[Thief]:
    t = Thief()
    try:
        yield t
    finally:
        t.close()


@pytest.fixture
def manager(state_path: Path) -> Iterator[DynamicPortManager]:
    start, end = port_block(12)
    m = new_manager(state_path, start, end)
    try:
        yield m
    finally:
        m.stop()


def leased_ports() -> set[int]:
    return {lease["port"] for lease in list_leases()}


def test_the_socket_listens_dual_stack_on_the_active_port(manager: DynamicPortManager) -> None:
    with manager.pick_socket() as sock:
        port = sock.getsockname()[1]
        assert manager.active_port == port
        assert sock.family == socket.AF_INET6
        assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
        assert sock.get_inheritable() is False
        for address in ("127.0.0.1", "::1"):
            with socket.create_connection((address, port), timeout=10):
                conn, _ = sock.accept()
                conn.close()


def test_connections_it_accepts_send_at_once(manager: DynamicPortManager) -> None:
    """TCP_NODELAY on the listener, inherited by what it accepts: a server
    handed the descriptor (uvicorn --fd takes it for a Unix socket and sets
    nothing) does not hold each keep-alive answer back ~40 ms."""
    for host in (None, "127.0.0.1"):
        with manager.pick_socket(host=host) as sock:
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
            port = sock.getsockname()[1]
            with socket.create_connection(("127.0.0.1", port), timeout=10):
                conn, _ = sock.accept()
                with conn:
                    assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        manager.release_port()


def test_host_backlog_and_reuse_port_are_passed_on(manager: DynamicPortManager) -> None:
    with manager.pick_socket(host="127.0.0.1", backlog=3, reuse_port=True) as sock:
        assert sock.family == socket.AF_INET
        assert sock.getsockname()[0] == "127.0.0.1"
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
        # Another socket with SO_REUSEPORT (same user) may share the port: that is the option.
        with socket.socket() as twin:
            twin.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            twin.bind(("127.0.0.1", sock.getsockname()[1]))


@pytest.mark.parametrize("for_pid", [False, True])
def test_an_address_it_cannot_bind_gives_the_port_back(
    manager: DynamicPortManager, for_pid: bool
) -> None:
    with pytest.raises(OSError) as caught:
        # TEST-NET-1: never an address of this host (and nothing is sent to it).
        manager.pick_socket(pid=os.getpid() if for_pid else None, host="192.0.2.1")
    assert caught.value.errno == errno.EADDRNOTAVAIL
    assert manager.active_port is None
    assert not leased_ports() & set(range(manager.start, manager.end + 1))


def test_closing_the_socket_keeps_the_lease_release_port_ends_it(
    manager: DynamicPortManager,
) -> None:
    sock = manager.pick_socket()
    port = sock.getsockname()[1]
    sock.close()
    assert port in leased_ports() and manager.active_port == port
    assert manager.release_port() is True
    assert port not in leased_ports()


def test_with_pid_the_lease_is_that_process_and_the_active_port_is_unchanged(
    manager: DynamicPortManager,
) -> None:
    active = manager.pick_port()
    with manager.pick_socket(pid=os.getpid()) as sock:
        port = sock.getsockname()[1]
        assert port != active and manager.active_port == active
        lease = next(lease for lease in list_leases() if lease["port"] == port)
        assert lease["pid"] == os.getpid()


def test_a_plain_pick_can_lose_the_race_pick_socket_cannot(
    manager: DynamicPortManager, thief: Thief
) -> None:
    # The plain way: a number, then a bind. Another program binds in between.
    port = manager.pick_port()
    assert thief.take(port) == "bound"
    with socket.socket() as late, pytest.raises(OSError) as lost:
        late.bind(("127.0.0.1", port))
    assert lost.value.errno == errno.EADDRINUSE

    # pick_socket: bound before it returns; the other program gets nothing.
    with manager.pick_socket() as sock:
        mine = sock.getsockname()[1]
        assert mine != port
        assert thief.take(mine) == "EADDRINUSE"
        with socket.create_connection(("127.0.0.1", mine), timeout=10):
            conn, _ = sock.accept()
            conn.close()


class StealOnPick(logging.Handler):
    """Has the thief bind each port the manager hands out, the moment the pick
    is logged (inside the pick, before pick_socket can bind): the race lost,
    deterministically, ``times`` times."""

    def __init__(self, thief: Thief, times: int) -> None:
        super().__init__()
        self.thief = thief
        self.times = times

    def emit(self, record: logging.LogRecord) -> None:
        found = re.search(r"PICK .*Note:(?:picked|moved from \d+ to) (\d+)", record.getMessage())
        if found and self.times > 0:
            self.times -= 1
            assert self.thief.take(int(found.group(1))) == "bound"


@pytest.fixture
def steal(thief: Thief) -> Iterator[StealOnPick]:
    logger = logging.getLogger("dynamic_port_manager")
    handler = StealOnPick(thief, 0)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.mark.parametrize("for_pid", [False, True])
def test_a_port_taken_between_pick_and_bind_is_given_back_and_another_picked(
    manager: DynamicPortManager, steal: StealOnPick, for_pid: bool
) -> None:
    steal.times = 2
    pid = os.getpid() if for_pid else None
    with manager.pick_socket(pid=pid) as sock:
        port = sock.getsockname()[1]
        assert len(steal.thief.stolen) == 2 and port not in steal.thief.stolen
        assert manager.active_port == (None if for_pid else port)
        in_range = leased_ports() & set(range(manager.start, manager.end + 1))
        assert in_range == {port}, "the stolen ports are no one's lease"
        with socket.create_connection(("127.0.0.1", port), timeout=10):
            conn, _ = sock.accept()
            conn.close()


def test_when_every_pick_is_taken_it_fails_with_eaddrinuse_and_holds_nothing(
    manager: DynamicPortManager, steal: StealOnPick
) -> None:
    steal.times = 1000
    with pytest.raises(OSError) as caught:
        manager.pick_socket()
    assert caught.value.errno == errno.EADDRINUSE
    assert "taken by another program" in str(caught.value)
    assert len(steal.thief.stolen) == 8  # bounded attempts
    assert manager.active_port is None
    assert not leased_ports() & set(range(manager.start, manager.end + 1))
