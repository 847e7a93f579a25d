"""Hands out free TCP ports to the services of one host, never the same port twice.

``DynamicPortManager`` is implemented in Rust (``dynamic_port_manager._core``);
this package re-exports it and stops the shared refresh thread at interpreter
exit, before Python's logging is torn down.
"""

from __future__ import annotations

import atexit

from ._core import (
    DynamicPortManager,
    ManagerStoppedError,
    NoFreePortError,
    RegistryError,
    __version__,
    _shutdown,
    list_backups,
    list_leases,
    port_owners,
    read_state,
    release_lease,
)

__all__ = [
    "DynamicPortManager",
    "ManagerStoppedError",
    "NoFreePortError",
    "RegistryError",
    "__version__",
    "list_backups",
    "list_leases",
    "port_owners",
    "read_state",
    "release_lease",
]

atexit.register(_shutdown)
