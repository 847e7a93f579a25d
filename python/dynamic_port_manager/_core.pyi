"""Type stubs for the Rust extension module ``dynamic_port_manager._core``."""

import os
import socket
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Union

from typing_extensions import Self, disjoint_base

__all__ = [
    "__version__",
    "DynamicPortManager",
    "NoFreePortError",
    "ManagerStoppedError",
    "RegistryError",
    "_shutdown",
    "_refresh_thread_running",
    "release_lease",
    "list_leases",
    "service_instances",
    "read_state",
    "list_backups",
    "port_owners",
]

__version__: str

class NoFreePortError(RuntimeError):
    """Every port of the manager's range is held or in use."""

class ManagerStoppedError(RuntimeError):
    """The manager was stopped and hands out nothing any more."""

class RegistryError(OSError):
    """The host-wide lease registry could not be read or written; no port was handed out."""

# Taken as os.fsdecode takes a path: bytes (also non-UTF-8) are kept byte for byte.
_Path = Union[str, bytes, "os.PathLike[str]", "os.PathLike[bytes]"]

@disjoint_base
class DynamicPortManager:
    """Hands out free TCP ports from ``start..=end`` and records every change.

    Two managers of the same user on one host never hold the same port at once,
    whatever their ``json_path``, across threads and processes. The state
    (``get_state()``) is also saved, atomically and with a backup, to
    ``json_path``.
    """

    def __new__(
        cls,
        start: int = 3000,
        end: int = 9000,
        json_path: _Path | None = None,
        refresh_interval: float = 10,
        history_max: int = 50,
        *,
        backup_max: int = 20,
        durable: bool = False,
        registry_dir: _Path | None = None,
        console_log: bool | None = None,
        skip_unsafe: bool = True,
        service: str | None = None,
    ) -> Self:
        """Open (or create) the state file and join the host's lease registry.

        ``start``/``end``: the inclusive port range (1..65535).
        ``json_path``: the state file (default ``utils/port_state/dynamic_ports.json``).
        ``refresh_interval``: seconds between background re-scans (int or float,
        from 0.05 to a year; bool, NaN and infinity are refused).
        ``history_max``: history entries kept (>= 0). ``backup_max``: backups kept.
        ``durable``: fsync file and folder on each save.
        ``registry_dir``: where leases live (default ``$DPM_REGISTRY_DIR`` or
        ``/tmp/dynamic-port-manager-<uid>``). ``console_log``: the coloured
        event line on stderr; ``None`` prints it only while the application has
        not configured ``logging`` (no handler but ``NullHandler`` on the
        ``dynamic_port_manager`` logger's chain, root included), so each event
        reaches a terminal once; ``True``/``False`` force it on/off. Every
        event is also a record of the ``dynamic_port_manager`` logger.
        ``skip_unsafe``: never hand out the ports web browsers refuse to open
        (ERR_UNSAFE_PORT); they are listed in the state's ``skipped_ports``
        instead of ``free_ports``.
        ``service``: the name clients look this service up by (``lookup``), in
        its leases and the state's ``settings.service``: 1 to 63 of ``A-Z a-z
        0-9 . _ -``, starting with a letter or digit. Default: from the state
        file's name, as the original named files (``dynamic_ports_orders.json``
        is ``orders``, any other file its stem, other characters as ``_``).

        Raises ``ValueError`` naming the bad argument (out of range, also a
        number too large for any type, or a path with a NUL byte),
        ``TypeError`` naming it for a value of the wrong type, ``RegistryError``
        when the registry folder is unusable.
        """

    def pick_port(self, *, pid: int | None = None) -> int:
        """Pick the lowest free port of the range and make it the active port.

        A second call moves to another free port and frees the previous one.
        With ``pid``, the lease is held by that process until it exits, and this
        manager's active port is unchanged. ``pid`` is an int >= 1 of a running
        process (``ValueError`` otherwise; a bool is a ``TypeError``).

        Raises ``NoFreePortError`` when no port is free, ``ManagerStoppedError``
        after ``stop()``, ``RegistryError`` if the lease cannot be recorded.
        """

    def pick_socket(
        self,
        *,
        pid: int | None = None,
        host: str | None = None,
        backlog: int | None = None,
        reuse_port: bool = False,
    ) -> socket.socket:
        """Pick as ``pick_port()`` does and return a socket listening on the port.

        The socket is bound before it is returned, so no other program can take
        the port between the pick and its use. Default address: dual-stack
        ``[::]`` (``IPV6_V6ONLY=0``) where the host has IPv6, else ``0.0.0.0``;
        ``host`` binds its first passive address instead. ``backlog`` defaults
        to ``socket.SOMAXCONN``; ``reuse_port`` sets ``SO_REUSEPORT``. A port
        another program binds between pick and bind is given back and another
        picked (a few times, then ``OSError(EADDRINUSE)``). Closing the socket
        does not release the lease: ``release_port()`` does (or, with ``pid``,
        that process's exit or ``release_lease()``).
        """

    def owners(self, ports: Sequence[int] | None = None) -> list[dict[str, Any]]:
        """Who holds each used port of the range (or of ``ports``), in port order.

        Each dict: ``port``, ``listening``, ``sockets`` (TCP sockets on it, not
        TIME_WAIT), ``processes`` (``pid``, ``name``, ``cmdline``, ``uid``; None
        where unreadable), ``unknown_uids`` (sockets whose process this user
        cannot see) and ``lease`` (``pid``, ``state_file``, ``owner``,
        ``since``, ``alive``; None if not leased). Unused ports are left out.
        """

    def release_port(self) -> bool:
        """Free the active port. Returns False if there was none."""

    def get_state(self) -> dict[str, Any]:
        """The full state: the original module's keys plus ``leases``, ``stats``,
        ``options`` and ``schema_version``."""

    def state_json(self) -> bytes:
        """``get_state()`` as compact JSON, UTF-8: the same keys in the same
        order, so ``json.loads(m.state_json()) == m.get_state()``. Serialized
        again only when the state changed (the same object while it did not)."""

    def _state_json_nowait(self) -> bytes | None:
        """``state_json()`` for an event loop: None where answering would wait
        (a lock, a read of what another process saved, a dead holder's port
        to take back); the caller then calls ``state_json()`` off the loop."""

    def log_json(self) -> dict[str, Any]:
        """Write one ECS JSON line to stdout and return it: ECS fields
        (``@timestamp``, ``log.level``, ``message``, ``ecs.version``,
        ``log.origin.*``, ``process.pid``...) at the top level, the manager's
        own under ``dpm.`` (``dpm.port``, ``dpm.state_file``...)."""

    def refresh(self) -> None:
        """Re-scan the range now, as the background thread does every
        ``refresh_interval``: kernel socket tables, dead leases reclaimed,
        ``free_ports``/``used_ports``/``last_checked`` updated and saved."""

    def stop(self) -> None:
        """Stop refreshing and release the active port. Idempotent."""

    def backups(self) -> list[str]:
        """File names of this state file's backups, oldest first."""

    def backup_path(self, name: str) -> Path | None:
        """The path of backup ``name`` if it is one of this state file's backups, else None."""

    def read_backup(self, name: str) -> bytes | None:
        """The bytes of backup ``name``, or None unless it is one of this state file's
        backups, a regular file (never read through a link) and still the file read."""

    @property
    def active_port(self) -> int | None:
        """The port this manager holds, or None."""

    @property
    def json_path(self) -> _Path:
        """The state file as given to the constructor (``str`` by default),
        as the original module kept it."""

    @property
    def state_path(self) -> Path:
        """The absolute path of the state file."""

    @property
    def refresh_interval(self) -> float:
        """Seconds between refreshes, ``int`` or ``float`` as given."""

    @property
    def history_max(self) -> int:
        """History entries kept."""

    @property
    def current_port(self) -> int | None:
        """The active port (the state's ``current_port``), or None."""

    @property
    def state(self) -> dict[str, Any]:
        """The full state, as ``get_state()`` returns it."""

    @property
    def service(self) -> str:
        """The service's name (given, or from the state file's name)."""

    @property
    def start(self) -> int:
        """First port of the range."""

    @property
    def end(self) -> int:
        """Last port of the range (inclusive)."""

    @property
    def stopped(self) -> bool:
        """True once ``stop()`` was called."""

    @property
    def registry_dir(self) -> Path:
        """The folder of the host-wide lease registry."""

    @property
    def backup_dir(self) -> Path:
        """The folder holding this state file's backups."""

    def __enter__(self) -> Self: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

def _shutdown() -> None:
    """Stop the refresh thread and wait for it (registered with atexit)."""

def _refresh_thread_running() -> bool:
    """Whether this process's refresh thread is running."""

def release_lease(port: int, *, registry_dir: _Path | None = None) -> bool:
    """Remove the lease on ``port`` (1..65535, else ``ValueError``) from the registry;
    True if there was one."""

def list_leases(*, registry_dir: _Path | None = None) -> list[dict[str, Any]]:
    """Every lease in the registry: port, pid, start_time, owner, since, service, alive."""

def service_instances(
    name: str | None = None, *, registry_dir: _Path | None = None
) -> list[dict[str, Any]]:
    """The live holders of service ``name`` (None: of every named service) on this
    host, from the registry alone: service, port, pid, command, state_file, since;
    by service and port. A bad name is a ``ValueError``."""

def read_state(
    start: int = 3000,
    end: int = 9000,
    json_path: _Path | None = None,
    history_max: int = 50,
    *,
    registry_dir: _Path | None = None,
) -> dict[str, Any]:
    """The state a manager with these settings would show now (the file's record,
    current leases, a fresh scan) without writing anything: no lease, no save,
    no backup. A damaged file is reported in ``last_error`` and shown from its
    newest valid backup."""

def list_backups(json_path: _Path | None = None) -> list[str]:
    """Names of the backups of the state file ``json_path``, oldest first."""

def port_owners(ports: Sequence[int], *, registry_dir: _Path | None = None) -> list[dict[str, Any]]:
    """``DynamicPortManager.owners`` without a manager: who holds each used port
    of ``ports`` (processes, and leases of the registry ``registry_dir``)."""
