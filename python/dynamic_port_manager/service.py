"""What ``serve`` needs to run as a service: its listening socket (handed over,
on a fixed port, or picked) and systemd's readiness notification.

Both follow systemd's conventions without linking libsystemd: a passed socket
is fd 3 when ``LISTEN_FDS=1`` and ``LISTEN_PID`` is this process's pid
(``sd_listen_fds``), and readiness is a datagram to ``$NOTIFY_SOCKET``
(``sd_notify``; a leading ``@`` names an abstract socket).
"""

from __future__ import annotations

import errno
import os
import socket
import sys
from dataclasses import dataclass

from . import DynamicPortManager

#: The first fd systemd (and `dynamic-port-manager run --fd`) passes.
SD_LISTEN_FDS_START = 3


@dataclass
class Listener:
    """A listening socket, the URL it answers on, and whether its port is a
    lease of this process (given back at exit)."""

    sock: socket.socket
    url: str
    port: int
    leased: bool = False


def open_listener(
    manager: DynamicPortManager,
    *,
    host: str | None = None,
    port: int | None = None,
    fd: int | None = None,
) -> Listener:
    """The socket ``serve`` listens on: ``fd``, else systemd's, else one bound
    to ``port`` on ``host``, else one on a port the manager picks and leases.

    ``ValueError`` (a usage error) for a port inside the managed range, a fd
    that is not a listening stream socket, or two sources at once."""
    activated = systemd_fd()
    if activated is not None and (fd is not None or port is not None):
        given = "--fd" if fd is not None else "--port"
        raise ValueError(
            f"{given} was given, and systemd passed a socket too (LISTEN_FDS=1): use one"
        )
    fd = fd if fd is not None else activated
    if fd is not None:
        if host is not None:
            raise ValueError("--host applies to --port (or a picked port), not a passed socket")
        return _passed(manager, fd)
    host = host or "127.0.0.1"
    if port is not None:
        _outside_range(manager, port, f"--port {port}")
        return Listener(_bind(host, port), url_of(host, port), port)
    try:
        sock = manager.pick_socket(pid=os.getpid(), host=host)
    except socket.gaierror as e:
        raise ValueError(f"--host {host!r}: {e.strerror}") from None
    except OSError as e:
        raise OSError(e.errno, f"cannot listen on {host}: {e.strerror or e}") from None
    picked: int = sock.getsockname()[1]
    return Listener(sock, url_of(host, picked), picked, leased=True)


def systemd_fd() -> int | None:
    """fd 3 if systemd passed this process one socket, else None.

    The variables are removed once read, as ``sd_listen_fds(1)`` does, so a
    child of this process does not take them for its own. ``LISTEN_PID`` of
    another process (a parent's, inherited) means nothing was passed to this one.
    """
    pid, count = os.environ.get("LISTEN_PID"), os.environ.get("LISTEN_FDS")
    if pid is None or count is None:
        return None
    if pid.strip() != str(os.getpid()):
        return None
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    if count.strip() == "0":
        return None
    if count.strip() != "1":
        raise ValueError(
            f"systemd passed LISTEN_FDS={count!r} sockets; serve listens on exactly one "
            "(give its .socket unit one ListenStream=)"
        )
    return SD_LISTEN_FDS_START


def _passed(manager: DynamicPortManager, fd: int) -> Listener:
    what = f"fd {fd}"
    try:
        sock = socket.socket(fileno=fd)
    except OSError as e:
        raise ValueError(f"{what} is not a socket ({e.strerror or e})") from None
    try:
        sock.set_inheritable(False)  # a command the app runs must not keep the port
        if sock.type != socket.SOCK_STREAM or not sock.getsockopt(
            socket.SOL_SOCKET, socket.SO_ACCEPTCONN
        ):
            raise ValueError(f"{what} is not a listening TCP (stream) socket")
        if sock.family == socket.AF_UNIX:
            path = sock.getsockname()
            name = path.decode(errors="replace") if isinstance(path, bytes) else path
            return Listener(sock, f"unix:{name}", 0)
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            raise ValueError(f"{what} is neither an IP nor a Unix socket")
        host, port = sock.getsockname()[:2]
        _outside_range(manager, port, f"the socket of {what} (port {port})")
        return Listener(sock, url_of(host, port), port)
    except BaseException:
        sock.detach()  # not ours to close: the caller passed it
        raise


def _outside_range(manager: DynamicPortManager, port: int, what: str) -> None:
    """The server's own port must not be one the manager hands out."""
    if manager.start <= port <= manager.end:
        raise ValueError(
            f"{what} is inside the managed range {manager.start}-{manager.end}: "
            "the server's own port must lie outside it (choose another port or "
            "narrow --range)"
        )


def _bind(host: str, port: int) -> socket.socket:
    """A socket listening on ``host``:``port`` (``::`` is dual-stack)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as e:
        raise ValueError(f"--host {host!r}: {e.strerror}") from None
    sock = socket.socket(family, kind, proto)
    try:
        # As every server does: a restart binds again at once over TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and address[0] == "::":
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        # Inherited by accepted connections: no ~40 ms wait per keep-alive
        # answer for a server that is handed the descriptor (see pick_socket).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(address)
        sock.listen(socket.SOMAXCONN)
    except OSError as e:
        sock.close()
        reason = e.strerror or str(e)
        if e.errno == errno.EADDRINUSE:
            reason += " (another program listens there)"
        raise OSError(e.errno, f"cannot listen on {url_of(host, port)}: {reason}") from None
    return sock


def url_of(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def notify(message: str) -> bool:
    """Send ``message`` (``READY=1``, ...) to systemd's ``$NOTIFY_SOCKET``, if set.

    A failure is reported on stderr, never raised: the server runs on, and
    systemd, which waits for ``READY=1``, says why the unit did not start."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        target = "\0" + address[1:]  # an abstract socket's name
    elif address.startswith("/"):
        target = address
    else:
        print(f"NOTIFY_SOCKET={address!r}: only Unix socket paths are supported", file=sys.stderr)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(target)
            sock.sendall(message.encode())
    except OSError as e:
        print(f"cannot notify systemd at {address!r}: {e.strerror or e}", file=sys.stderr)
        return False
    return True
