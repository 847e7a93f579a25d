"""Hands out free TCP ports to the services of one host, never the same port twice.

``DynamicPortManager`` is implemented in Rust (``dynamic_port_manager._core``);
this package re-exports it (as a subclass that can also announce its port in
etcd, see ``discovery``), offers ``lookup(name)``, and stops the shared
refresh thread at interpreter exit, before Python's logging is torn down.

Each event is a ``logging`` record of the ``dynamic_port_manager`` logger and,
while the application has not configured logging, a coloured line on stderr
(``console_log=None``, the default; ``True``/``False`` force the line on/off).
"""

from __future__ import annotations

import atexit
import logging

from ._core import (
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
    service_instances,
)
from ._manager import DynamicPortManager
from .discovery import DiscoveryError
from .lookup import lookup

__all__ = [
    "DiscoveryError",
    "DynamicPortManager",
    "ManagerStoppedError",
    "NoFreePortError",
    "RegistryError",
    "__version__",
    "list_backups",
    "list_leases",
    "lookup",
    "port_owners",
    "read_state",
    "release_lease",
    "service_instances",
]

# As libraries do: with logging unconfigured, records stop here instead of
# reaching Python's last-resort handler (the console line says it already).
logging.getLogger(__name__).addHandler(logging.NullHandler())

atexit.register(_shutdown)
