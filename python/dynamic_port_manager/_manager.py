"""``DynamicPortManager``: the core's class, plus announcing its port in etcd.

The subclass adds ``discovery=``, ``advertise_host=`` and ``discovery_ttl=``.
Without discovery (the default, and ``$DPM_DISCOVERY`` unset) each method is
the core's, behind one attribute test.
"""

from __future__ import annotations

import json
import os
import socket
import weakref
from types import TracebackType
from typing import TYPE_CHECKING, Any

from . import _core
from .discovery import (
    DISCOVERY_ENV,
    Announcer,
    check_host,
    default_host,
    parse_discovery,
)

if TYPE_CHECKING:
    from typing_extensions import Self

# How long stop() waits for etcd to drop the key (it expires by TTL otherwise).
STOP_WAIT = 2.0


class DynamicPortManager(_core.DynamicPortManager):
    __doc__ = _core.DynamicPortManager.__doc__

    _announcer: Announcer | None
    _discovery: str | None

    def __new__(
        cls,
        start: int = 3000,
        end: int = 9000,
        json_path: _core._Path | None = None,
        refresh_interval: float = 10,
        history_max: int = 50,
        *,
        backup_max: int = 20,
        durable: bool = False,
        registry_dir: _core._Path | None = None,
        console_log: bool | None = None,
        skip_unsafe: bool = True,
        service: str | None = None,
        discovery: str | None = None,
        advertise_host: str | None = None,
        discovery_ttl: int | None = None,
    ) -> Self:
        """The core's arguments (see ``_core.DynamicPortManager``), and:

        ``discovery``: an ``etcd://`` address to announce the active port at
        (default ``$DPM_DISCOVERY``; see ``dynamic_port_manager.discovery``).
        ``advertise_host``: the host name in the announcement (default
        ``$DPM_ADVERTISE_HOST``, else the machine's host name).
        ``discovery_ttl``: the etcd lease's TTL in whole seconds (default
        3 x ``refresh_interval``, rounded up).
        """
        # Checked before the core makes the manager (which writes the state file).
        if discovery is None:
            discovery = os.environ.get(DISCOVERY_ENV) or None
        config = parse_discovery(discovery) if discovery else None
        host = check_host(advertise_host) if advertise_host is not None else None
        if discovery_ttl is not None and (
            isinstance(discovery_ttl, bool)
            or not isinstance(discovery_ttl, int)
            or not 1 <= discovery_ttl <= 86_400
        ):
            raise ValueError(
                f"discovery_ttl: must be whole seconds from 1 to 86400, got {discovery_ttl!r}"
            )
        self = super().__new__(
            cls,
            start,
            end,
            json_path,
            refresh_interval,
            history_max,
            backup_max=backup_max,
            durable=durable,
            registry_dir=registry_dir,
            console_log=console_log,
            skip_unsafe=skip_unsafe,
            service=service,
        )
        self._announcer = None
        self._discovery = discovery if config is not None else None
        if config is not None:
            ref = weakref.ref(self)

            def current() -> int | None:
                manager = ref()
                if manager is None or manager.stopped:
                    raise LookupError("the manager was stopped")
                return manager.active_port

            self._announcer = Announcer(
                config,
                service=self.service,
                host=host or default_host(),
                state_file=os.fsdecode(self.state_path),
                interval=float(self.refresh_interval),
                ttl=discovery_ttl,
                current=current,
            )
        return self

    def pick_port(self, *, pid: int | None = None) -> int:
        port = super().pick_port(pid=pid)
        if self._announcer is not None:
            self._announcer.poke()
        return port

    def pick_socket(
        self,
        *,
        pid: int | None = None,
        host: str | None = None,
        backlog: int | None = None,
        reuse_port: bool = False,
    ) -> socket.socket:
        sock = super().pick_socket(pid=pid, host=host, backlog=backlog, reuse_port=reuse_port)
        if self._announcer is not None:
            self._announcer.poke()
        return sock

    def release_port(self) -> bool:
        released = super().release_port()
        if self._announcer is not None:
            self._announcer.poke()
        return released

    def stop(self) -> None:
        super().stop()
        if self._announcer is not None:
            self._announcer.close(STOP_WAIT)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def get_state(self) -> dict[str, Any]:
        """The core's state; with discovery, also ``discovery`` (see
        ``discovery_status``), and an etcd failure in ``last_error`` while the
        state file has none in effect."""
        state = super().get_state()
        if self._announcer is not None:
            status = self._announcer.status()
            state["discovery"] = status
            if status["up"] is False and not state.get("error_active"):
                state["last_error"] = status["last_error"]
                state["last_error_time"] = status["last_error_time"]
                state["error_active"] = True
        return state

    def state_json(self) -> bytes:
        """``get_state()`` as compact JSON, UTF-8 (the core's bytes, made
        again only when the state changed; with discovery, from ``get_state()``)."""
        if self._announcer is None:
            return super().state_json()
        state = self.get_state()
        return json.dumps(state, ensure_ascii=False, separators=(",", ":")).encode()

    def _state_json_nowait(self) -> bytes | None:
        # With discovery the state is get_state()'s, made in Python: not here.
        return super()._state_json_nowait() if self._announcer is None else None

    @property
    def state(self) -> dict[str, Any]:
        return self.get_state()

    @property
    def discovery(self) -> str | None:
        """The etcd address this manager announces to (``discovery=`` or
        ``$DPM_DISCOVERY``), or None."""
        return self._discovery

    @property
    def discovery_status(self) -> dict[str, Any] | None:
        """None without discovery; else ``endpoint``, ``up`` (None before the
        first answer), ``last_error``, ``last_error_time``, ``key`` and ``ttl``."""
        return None if self._announcer is None else self._announcer.status()
