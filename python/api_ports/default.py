"""The routers: ``create_router(manager)`` over an app's own manager,
``create_router(start=..., end=..., json_path=..., ...)`` over a manager made
from those arguments, and the drop-in ``router`` over one manager per process
made from the ``DPM_*`` environment variables.

The last two make their manager at application start-up (the router's
lifespan, which FastAPI 0.112.2 and later runs for an included router), as
the original module did at import: the START event and the state file are
there before the first request. A manager that cannot be made (a bad
``DPM_*`` value, an unusable folder) is logged at ERROR then, and every port
endpoint answers 503 naming the cause, retrying at each request. At shutdown
the manager is stopped; the next start-up (or request) makes a fresh one.
Used without a lifespan (a ``TestClient`` outside ``with``), the manager is
made at the first request that needs it.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Callable, overload

from dynamic_port_manager import DynamicPortManager
from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from .routes import build_router
from .settings import ManagerSettings

log = logging.getLogger("api_ports")


def _enabled(logger: logging.Logger) -> logging.Logger:
    """``logger``, enabled again if it was disabled, as ``logging.config.dictConfig``
    leaves every existing logger it is not told about (its default,
    ``disable_existing_loggers=True``): the router's ERROR never vanishes."""
    if logger.disabled:
        logger.disabled = False
    return logger


class SharedManager:
    """A manager made by ``factory`` on first ``get()``, replaced once stopped."""

    def __init__(self, factory: Callable[[], DynamicPortManager]) -> None:
        self._factory = factory
        self._lock = threading.Lock()
        self._manager: DynamicPortManager | None = None

    def get(self) -> DynamicPortManager:
        # Creation holds the lock: two first requests at once make one manager.
        with self._lock:
            if self._manager is None or self._manager.stopped:
                self._manager = self._factory()
            return self._manager

    def peek(self) -> DynamicPortManager | None:
        """The manager if one is made and running, without waiting (or None)."""
        manager = self._manager
        return manager if manager is not None and not manager.stopped else None

    def close(self) -> None:
        """Stop the manager (releasing its port), if one was made."""
        with self._lock:
            manager, self._manager = self._manager, None
        if manager is not None:
            manager.stop()


def _lifespan(shared: SharedManager) -> Any:
    """Make ``shared``'s manager at start-up, stop it at shutdown."""

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        # The constructor and stop() wait on locks and the disk: not on the event loop.
        try:
            await run_in_threadpool(shared.get)
        except (ValueError, OSError) as e:
            # The app still starts (its other routes may be fine), but loudly.
            _enabled(log).error(
                "dynamic-port-manager: the port manager could not start: %s; "
                "every /port endpoint answers 503 until this is fixed",
                e,
            )
        try:
            yield
        finally:
            await run_in_threadpool(shared.close)

    return lifespan


def _managed_router(factory: Callable[[], DynamicPortManager]) -> tuple[APIRouter, SharedManager]:
    shared = SharedManager(factory)
    return build_router(shared.get, lifespan=_lifespan(shared), peek=shared.peek), shared


@overload
def create_router(manager: DynamicPortManager) -> APIRouter: ...


@overload
def create_router(
    *,
    start: int = 3000,
    end: int = 9000,
    json_path: str | os.PathLike[str] | None = None,
    refresh_interval: float = 10,
    history_max: int = 50,
    backup_max: int = 20,
    durable: bool = False,
    registry_dir: str | os.PathLike[str] | None = None,
    console_log: bool | None = None,
    skip_unsafe: bool = True,
) -> APIRouter: ...


def create_router(manager: DynamicPortManager | None = None, **arguments: Any) -> APIRouter:
    """The port endpoints over a manager.

    ``create_router(manager)``: over ``manager``, which the router never
    stops (its owner does). ``create_router(start=..., end=..., json_path=...,
    ...)``: the constructor's arguments (keyword only); the router makes the
    manager at application start-up and stops it at shutdown.
    """
    if manager is not None:
        if arguments:
            raise TypeError("create_router: pass a manager or its arguments, not both")
        return build_router(lambda: manager, peek=lambda: manager)
    router, _ = _managed_router(lambda: DynamicPortManager(**arguments))
    return router


router, shared = _managed_router(lambda: ManagerSettings.from_env().create())


def get_manager() -> DynamicPortManager:
    """The manager behind ``router`` (made now from ``DPM_*`` if there is none)."""
    return shared.get()


def close_manager() -> None:
    """Stop the manager behind ``router``, as app shutdown does; the next use makes a new one."""
    shared.close()
