"""``lookup(name)``: where a service listens, on this host or across hosts.

Without discovery the answer comes from this host's lease registry alone
(one call into the core, no state file read): every live holder of a port
leased under that service name. With discovery (``discovery=`` or
``$DPM_DISCOVERY``) it comes from etcd: every host's announcement.
"""

from __future__ import annotations

import json
import os
import re
import socket
from typing import Any

from ._core import service_instances
from .discovery import DISCOVERY_ENV, EtcdClient, parse_discovery, service_key_prefix

__all__ = ["lookup", "find", "check_name"]


def lookup(
    name: str,
    discovery: str | None = None,
    *,
    registry_dir: str | os.PathLike[str] | None = None,
) -> list[dict[str, Any]]:
    """The live instances of the service ``name``, each a dict: ``service``,
    ``host``, ``port``, ``pid``, ``state_file``, ``since`` (when the port was
    taken), ``command`` (the holder's command line; None from etcd) and
    ``source`` (``"local"`` or ``"etcd"``); by host and port. Empty when
    there is none.

    ``discovery``: an ``etcd://`` address to ask instead of this host's
    registry (default ``$DPM_DISCOVERY``; ``""`` forces the local registry).
    Raises ``ValueError`` for a bad name or address, ``DiscoveryError`` (an
    ``OSError``) when etcd cannot answer, ``RegistryError`` when the registry
    cannot be read.
    """
    check_name(name)
    return find(name, discovery, registry_dir=registry_dir)


def find(
    name: str | None,
    discovery: str | None = None,
    *,
    registry_dir: str | os.PathLike[str] | None = None,
) -> list[dict[str, Any]]:
    """``lookup``, or with ``name`` None every named service's instances (by
    service, host and port)."""
    if discovery is None:
        discovery = os.environ.get(DISCOVERY_ENV) or ""
    if not discovery:
        host = socket.gethostname()
        return [
            {
                "service": i["service"],
                "host": host,
                "port": i["port"],
                "pid": i["pid"],
                "state_file": i["state_file"],
                "since": i["since"],
                "command": i["command"],
                "source": "local",
            }
            for i in service_instances(name, registry_dir=registry_dir)
        ]
    config = parse_discovery(discovery)
    prefix = (
        f"{config.prefix}/services/" if name is None else service_key_prefix(config.prefix, name)
    )
    instances = []
    for _key, raw in EtcdClient(config).get_prefix(prefix):
        try:
            value = json.loads(raw)
            instances.append(
                {
                    "service": str(value["service"]),
                    "host": str(value["host"]),
                    "port": int(value["port"]),
                    "pid": int(value["pid"]),
                    "state_file": str(value.get("state_file", "")),
                    "since": str(value.get("started", "")),
                    "command": None,
                    "source": "etcd",
                }
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            continue  # not written by this package: skipped
    instances.sort(key=lambda i: (i["service"], i["host"], i["port"]))
    return instances


_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


def check_name(name: str) -> None:
    """The core's rule for service names (``ValueError`` naming ``name``)."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ValueError(
            "name: must be 1 to 63 characters of A-Z, a-z, 0-9, '.', '_' and '-', "
            f"starting with a letter or digit, got {name!r}"
        )
