"""Announcing active ports in etcd, so services can be found across hosts.

Opt-in: ``DynamicPortManager(..., discovery="etcd://127.0.0.1:2379/dpm")`` or
``DPM_DISCOVERY``. Each active port is the key
``<prefix>/services/<service>/<host>:<port>`` with a JSON value (host, port,
pid, service, state_file, started), attached to an etcd lease of its own whose
TTL (default 3 x ``refresh_interval``, whole seconds) a background thread
keeps alive. A move or release revokes the old lease (the key goes with it);
a process killed outright stops renewing and etcd drops the key at expiry.

etcd is never on the critical path: a pick only tells this module's thread
that something changed. The thread talks to etcd's v3 JSON gateway
(``/v3/kv/put``, ``/v3/lease/grant`` ...) through the standard library's
``http.client`` with a short timeout, records failures (``status()``, a log
record of the ``dynamic_port_manager.discovery`` logger) and tries again at
the next tick; a lease etcd no longer knows (etcd lost its data, or the lease
expired while etcd was unreachable) is granted anew and the key written again.

Addresses: see ``etcd_client``.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import threading
import time
import weakref
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable

from .etcd_client import (
    DiscoveryError,
    EtcdClient,
    EtcdConfig,
    check_host,
    parse_discovery,
    service_key_prefix,
)

__all__ = [
    "DISCOVERY_ENV",
    "ADVERTISE_HOST_ENV",
    "DiscoveryError",
    "EtcdConfig",
    "EtcdClient",
    "Announcer",
    "parse_discovery",
    "check_host",
    "service_key_prefix",
]

DISCOVERY_ENV = "DPM_DISCOVERY"
ADVERTISE_HOST_ENV = "DPM_ADVERTISE_HOST"
log = logging.getLogger("dynamic_port_manager.discovery")


def _now_iso() -> str:
    return datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")


@dataclass
class _Announced:
    port: int
    key: str
    lease: str
    ttl: int
    renewed: float


class Announcer:
    """Keeps one manager's active port announced in etcd, from a daemon thread.

    ``current()`` says which port should be announced (None: none, and the
    announcer ends once that is true of etcd, or after ``close``). ``poke()``
    makes the thread look now instead of at its next tick.
    """

    def __init__(
        self,
        config: EtcdConfig,
        *,
        service: str,
        host: str,
        state_file: str,
        interval: float,
        ttl: int | None,
        current: Callable[[], int | None],
    ) -> None:
        self.config = config
        self.service = service
        self.host = host
        self.state_file = state_file
        self.interval = interval
        self.ttl = ttl if ttl is not None else max(1, int(-(-3 * interval // 1)))
        self._current = current
        self._up: bool | None = None
        self._error: str | None = None
        self._error_time: str | None = None
        self._start()

    def _start(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()  # a forked child's copy may be held
        self._wake = threading.Event()
        self._closing = False
        self._announced: _Announced | None = None
        # Leases to revoke; after `until` etcd has dropped them by itself.
        self._orphans: list[tuple[str, float]] = []
        self._client = EtcdClient(self.config)
        self._thread = threading.Thread(
            target=self._run, name=f"dpm-discovery-{self.service}", daemon=True
        )
        _live.add(self)
        self._thread.start()

    # ---- called by the manager's thread (never waits on etcd) --------------

    def poke(self) -> None:
        if self._pid != os.getpid():
            # A forked child: the thread stayed in the parent, and so do its
            # leases (never revoked from here). Announce afresh.
            self._start()
        self._wake.set()

    def close(self, wait: float) -> None:
        """Revokes the announced key (waiting ``wait`` seconds at most) and ends."""
        if self._pid != os.getpid():
            return
        self._closing = True
        self._wake.set()
        if threading.current_thread() is not self._thread:
            self._thread.join(wait)

    def status(self) -> dict[str, Any]:
        """``up`` (None before the first contact), ``last_error``, ``last_error_time``,
        ``endpoint``, ``key`` (None while nothing is announced) and ``ttl``."""
        with self._lock:
            announced = self._announced
            return {
                "endpoint": self.config.describe(),
                "up": self._up,
                "last_error": self._error,
                "last_error_time": self._error_time,
                "key": announced.key if announced else None,
                "ttl": announced.ttl if announced else self.ttl,
            }

    # ---- the thread ----------------------------------------------------------

    def _run(self) -> None:
        retry_at = 0.0  # while etcd fails: no new try before this (a poke waits for it)
        while True:
            self._wake.wait(self._tick() if not retry_at else retry_at - time.monotonic())
            self._wake.clear()
            if time.monotonic() < retry_at and not self._closing:
                continue  # a poke while etcd fails: the next try comes at retry_at
            closing = self._closing
            try:
                wanted = None if closing else self._current()
            except Exception:  # the manager is gone or stopped
                wanted = None
            try:
                self._sync(wanted)
                self._report(None)
                retry_at = 0.0
            except Exception as e:  # whatever etcd answered, the thread goes on
                self._report(str(e) or type(e).__name__)
                retry_at = time.monotonic() + self.interval
            if closing or (wanted is None and self._announced is None and self._gone()):
                _live.discard(self)
                return

    def _gone(self) -> bool:
        """The manager was stopped or collected: nothing will be announced again."""
        try:
            self._current()
        except Exception:
            return True
        return False

    def _tick(self) -> float:
        """Seconds until the next look: the refresh interval, or sooner so a
        lease is renewed at a third of its TTL."""
        announced = self._announced
        if announced is None:
            return self.interval
        due = announced.renewed + announced.ttl / 3 - time.monotonic()
        return max(0.01, min(self.interval, due))

    def _sync(self, wanted: int | None) -> None:
        client = self._client
        announced = self._announced
        now = time.monotonic()
        if announced is not None and announced.port != wanted:
            with self._lock:
                self._announced = None
            self._orphans.append((announced.lease, now + announced.ttl))
        for lease, until in list(self._orphans):
            if time.monotonic() < until:
                client.revoke(lease)
            self._orphans.remove((lease, until))
        if wanted is None:
            return
        announced = self._announced
        if announced is not None and now - announced.renewed >= min(
            self.interval * 0.9, announced.ttl / 3
        ):
            ttl = client.keepalive(announced.lease)
            if ttl > 0:
                announced.renewed = time.monotonic()
            else:
                log.warning(
                    "discovery: etcd lost the lease of %s; announcing it again", announced.key
                )
                with self._lock:
                    self._announced = announced = None
        if announced is None:
            self._announce(wanted)

    def _announce(self, port: int) -> None:
        key = f"{service_key_prefix(self.config.prefix, self.service)}{self.host}:{port}"
        value = json.dumps(
            {
                "host": self.host,
                "port": port,
                "pid": os.getpid(),
                "service": self.service,
                "state_file": self.state_file,
                "started": _now_iso(),
            }
        )
        lease, ttl = self._client.grant(self.ttl)
        try:
            self._client.put(key, value, lease)
        except DiscoveryError:
            self._orphans.append((lease, time.monotonic() + ttl))
            raise
        with self._lock:
            self._announced = _Announced(port, key, lease, ttl, time.monotonic())

    def _report(self, error: str | None) -> None:
        with self._lock:
            was_up = self._up
            self._up = error is None
            if error is not None:
                self._error = f"discovery ({self.config.describe()}): {error}"
                self._error_time = _now_iso()
        if error is not None and was_up is not False:
            log.warning("%s; retrying every %ss", self._error, self.interval)
        elif error is None and was_up is False:
            log.info("discovery: etcd at %s answers again", self.config.describe())


_live: weakref.WeakSet[Announcer] = weakref.WeakSet()


def _close_all() -> None:
    """At exit: revoke every announced key, a moment at most for all of them."""
    deadline = time.monotonic() + 1.5
    announcers = list(_live)
    for a in announcers:
        a._closing = True
        a._wake.set()
    for a in announcers:
        if a._pid == os.getpid():
            a._thread.join(max(0.0, deadline - time.monotonic()))


atexit.register(_close_all)


def default_host() -> str:
    """``$DPM_ADVERTISE_HOST``, else this machine's host name."""
    return os.environ.get(ADVERTISE_HOST_ENV) or socket.gethostname()
