"""A pick hands out a port only if a server could bind it now: the bind probe.

The probe binds one IPv6 socket with ``IPV6_V6ONLY`` off (dual-stack) on
``[::]`` where it used to bind two (``0.0.0.0``, and ``[::]`` with
``IPV6_V6ONLY``). These tests hold every kind of socket a port can have and
check that the library's answer is the two-socket probe's, computed here with
Python sockets as the oracle; and, on a process whose IPv6 the kernel refuses
(a seccomp filter: no IPv6 family, no IPv6 address to bind, IPv6 forbidden),
that the library still answers as the two sockets would there.

The library's answer is read through the public API: a new manager whose range
is the one port picks it (free) or raises ``NoFreePortError`` (taken). The
manager runs in a child process that cannot start its refresh thread, so no
scan of the host stands in for the probe (as in tests/test_scan_cost.py).

Ports come from the project's own plugin (``free_port_factory``), leased to
this test in the plugin's registry; the managers under test use a private
registry, where those ports are just ports.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="Linux bind semantics")

# The child: optionally a seccomp filter first (before any thread), then for
# each port the two-socket probe (before and after) and the library's answer.
CHILD = r"""
import ctypes, errno, json, platform, socket, struct, sys

mode, folder, registry, ports = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]

def refuse_ipv6(mode):
    # (audit arch, socket, bind) system call numbers.
    arch, nr_socket, nr_bind = {
        "x86_64": (0xC000003E, 41, 49),
        "aarch64": (0xC00000B7, 198, 200),
    }[platform.machine()]
    nr, arg, value, err = {
        "no-ipv6-family": (nr_socket, 0, socket.AF_INET6, errno.EAFNOSUPPORT),
        "ipv6-forbidden": (nr_socket, 0, socket.AF_INET6, errno.EACCES),
        # Binding an IPv6 address (a 28-byte sockaddr_in6) fails: IPv6 disabled.
        "no-ipv6-address": (nr_bind, 2, 28, errno.EADDRNOTAVAIL),
    }[mode]
    def op(code, k, jt=0, jf=0):
        return struct.pack("HBBI", code, jt, jf, k)
    load, jeq, ret = 0x20, 0x15, 0x06
    allow, fail = 0x7FFF0000, 0x00050000 | err
    prog = b"".join([
        op(load, 4), op(jeq, arch, 0, 5),
        op(load, 0), op(jeq, nr, 0, 3),
        op(load, 16 + 8 * arg), op(jeq, value, 0, 1),
        op(ret, fail),
        op(ret, allow),
    ])
    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
    buf = ctypes.create_string_buffer(prog, len(prog))
    fprog = Prog(len(prog) // 8, ctypes.addressof(buf))
    libc = ctypes.CDLL(None, use_errno=True)
    ulong = ctypes.c_ulong
    if libc.prctl(38, ulong(1), ulong(0), ulong(0), ulong(0)) != 0:  # PR_SET_NO_NEW_PRIVS
        raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
    if libc.prctl(22, ulong(2), ctypes.byref(fprog), ulong(0), ulong(0)) != 0:  # seccomp filter
        raise OSError(ctypes.get_errno(), "PR_SET_SECCOMP")

if mode != "plain":
    refuse_ipv6(mode)

def two_sockets(port):
    # The probe as it was: 0.0.0.0 and [::] with IPV6_V6ONLY, both with
    # SO_REUSEADDR, each error read as it was (a family the host lacks is
    # skipped; EADDRINUSE is in use; any other refusal makes the port unusable).
    answers = []
    for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                s.bind((host, port))
            answers.append("free")
        except OSError as e:
            if e.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT):
                answers.append("free")
            elif e.errno == errno.EADDRINUSE:
                answers.append("taken")
            else:
                answers.append("unusable")
    return "free" if answers == ["free", "free"] else "taken"

from dynamic_port_manager import DynamicPortManager, NoFreePortError
from dynamic_port_manager._core import _refresh_thread_running

def library(port):
    with DynamicPortManager(
        port, port, f"{folder}/{port}.json", refresh_interval=3600, console_log=False,
        registry_dir=registry, skip_unsafe=False,
    ) as m:
        try:
            picked = m.pick_port()
        except NoFreePortError:
            return "taken"
        assert picked == port, (picked, port)
        m.release_port()
        return "free"

out = {}
for port in map(int, ports):
    before = two_sockets(port)
    answer = library(port)
    out[port] = {"oracle": before, "library": answer, "oracle after": two_sockets(port)}
assert not _refresh_thread_running(), "a refresh thread ran: a scan may have answered"
print(json.dumps(out))
"""


def probe_in_child(mode: str, tmp: Path, ports: list[int]) -> dict[int, dict[str, str]]:
    folder = tmp / f"child-{mode}"
    folder.mkdir(exist_ok=True)
    result = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(folder), str(tmp / "registry")]
        + [str(p) for p in ports],
        capture_output=True,
        text=True,
        timeout=60,
        # No thread can get the stack the Rust runtime asks for: no refresh
        # thread, so nothing but the pick's own probe looks at the port.
        env={**os.environ, "RUST_MIN_STACK": str(1 << 48)},
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.splitlines()[-1])
    return {int(port): answers for port, answers in out.items()}


Ports = Callable[[], int]
Hold = Callable[[ExitStack, int, Ports], None]


def bound(
    host: str, *, listen: bool, reuse: bool, v6only: bool | None = None, reuseport: bool = False
) -> Hold:
    """A socket bound to ``host``:P, listening if ``listen``."""

    def hold(stack: ExitStack, port: int, ports: Ports) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        s = stack.enter_context(socket.socket(family, socket.SOCK_STREAM))
        if reuse:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if v6only is not None:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
        s.bind((host, port))
        if listen:
            s.listen()

    return hold


def tcp_states(port: int) -> set[str]:
    """The kernel's TCP states (hex, /proc/net/tcp*) of sockets whose local port is ``port``."""
    states = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port:
                    states.add(fields[3])
    return states


ESTABLISHED, TIME_WAIT = "01", "06"


def client(host: str, *, reuse: bool) -> Hold:
    """A connected client socket whose local port is P (bound to it first)."""

    def hold(stack: ExitStack, port: int, ports: Ports) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        server = stack.enter_context(socket.socket(family, socket.SOCK_STREAM))
        server.bind((host, ports()))
        server.listen()
        c = stack.enter_context(socket.socket(family, socket.SOCK_STREAM))
        if reuse:
            c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        c.bind((host, port))
        c.connect(server.getsockname())
        stack.enter_context(server.accept()[0])
        assert ESTABLISHED in tcp_states(port)

    return hold


def time_wait(host: str, *, reuse: bool) -> Hold:
    """A TIME_WAIT on P, left by an accepted connection its server closed first
    (as after a server restart); the listener is gone."""

    def hold(stack: ExitStack, port: int, ports: Ports) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as listener:
            if reuse:
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((host, port))
            listener.listen()
            with socket.create_connection((host, port), timeout=10) as c:
                accepted, _ = listener.accept()
                accepted.close()
                assert c.recv(1) == b""  # the server's FIN has arrived
        # The client's FIN turns the server's side into TIME_WAIT.
        for _ in range(1000):
            if TIME_WAIT in tcp_states(port):
                break
            time.sleep(0.002)
        assert TIME_WAIT in tcp_states(port)

    return hold


def nothing(stack: ExitStack, port: int, ports: Ports) -> None:
    pass


# Each kind of other socket on P, and what a server asking to bind P (with
# SO_REUSEADDR, as servers do) is told.
CASES: dict[str, tuple[Hold, str]] = {
    "nothing": (nothing, "free"),
    **{
        f"listening on {name}{', SO_REUSEADDR' if reuse else ''}": (
            bound(host, listen=True, reuse=reuse, v6only=v6only),
            "taken",
        )
        for name, host, v6only in (
            ("127.0.0.1", "127.0.0.1", None),
            ("0.0.0.0", "0.0.0.0", None),
            ("::1", "::1", None),
            ("::", "::", False),
            (":: with V6ONLY", "::", True),
            ("::ffff:127.0.0.1", "::ffff:127.0.0.1", False),
        )
        for reuse in (False, True)
    },
    **{
        f"bound to {name}, not listening{', SO_REUSEADDR' if reuse else ''}": (
            bound(host, listen=False, reuse=reuse, v6only=v6only),
            # Two SO_REUSEADDR sockets may share a port until one listens.
            "free" if reuse else "taken",
        )
        for name, host, v6only in (
            ("127.0.0.1", "127.0.0.1", None),
            ("0.0.0.0", "0.0.0.0", None),
            ("::1", "::1", None),
            ("::", "::", False),
            (":: with V6ONLY", "::", True),
            ("::ffff:127.0.0.1", "::ffff:127.0.0.1", False),
        )
        for reuse in (False, True)
    },
    **{
        f"SO_REUSEPORT listener on {host}": (
            bound(host, listen=True, reuse=False, reuseport=True),
            "taken",
        )
        for host in ("127.0.0.1", "0.0.0.0", "::")
    },
    **{
        f"connected client on {host}{', SO_REUSEADDR' if reuse else ''}": (
            client(host, reuse=reuse),
            "free" if reuse else "taken",
        )
        for host in ("127.0.0.1", "::1")
        for reuse in (False, True)
    },
    **{
        f"TIME_WAIT of a closed accepted connection on {host}{', SO_REUSEADDR' if reuse else ''}": (
            time_wait(host, reuse=reuse),
            # A TIME_WAIT keeps the listener's SO_REUSEADDR.
            "free" if reuse else "taken",
        )
        for host in ("127.0.0.1", "::1")
        for reuse in (False, True)
    },
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_probe_answers_as_the_two_socket_probe(
    case: str, free_port_factory: Ports, tmp_path: Path
) -> None:
    hold, expected = CASES[case]
    port = free_port_factory()
    with ExitStack() as stack:
        hold(stack, port, free_port_factory)
        answers = probe_in_child("plain", tmp_path, [port])[port]
    assert answers == {"oracle": expected, "library": expected, "oracle after": expected}


# Where the kernel refuses IPv6 to the process: a family missing or an
# address unbindable is skipped (IPv4 alone answers, and an IPv6-only
# listener cannot matter there); a refusal by policy makes every port
# unusable, as it did with two sockets.
REFUSED = {
    "no-ipv6-family": {"nothing": "free", "v4": "taken", "v4 bound": "taken", "v6only": "free"},
    "no-ipv6-address": {"nothing": "free", "v4": "taken", "v4 bound": "taken", "v6only": "free"},
    "ipv6-forbidden": {"nothing": "taken", "v4": "taken", "v4 bound": "taken", "v6only": "taken"},
}
HELD: dict[str, Hold] = {
    "nothing": nothing,
    "v4": bound("127.0.0.1", listen=True, reuse=True),
    "v4 bound": bound("0.0.0.0", listen=False, reuse=False),
    "v6only": bound("::", listen=True, reuse=True, v6only=True),
}


@pytest.mark.parametrize("mode", list(REFUSED))
def test_without_ipv6_the_probe_answers_as_the_two_socket_probe(
    mode: str, free_port_factory: Ports, tmp_path: Path
) -> None:
    if os.uname().machine not in ("x86_64", "aarch64"):
        pytest.skip("the seccomp filter knows x86_64 and aarch64 system call numbers")
    with ExitStack() as stack:
        ports = {}
        for name, hold in HELD.items():
            ports[name] = free_port_factory()
            hold(stack, ports[name], free_port_factory)
        answers = probe_in_child(mode, tmp_path, list(ports.values()))
    for name, port in ports.items():
        expected = REFUSED[mode][name]
        assert answers[port] == {
            "oracle": expected,
            "library": expected,
            "oracle after": expected,
        }, name
