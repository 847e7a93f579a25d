"""The routers: ``create_router(manager)`` over an app's own manager, and the
drop-in ``router`` over one manager per process, created on first use from
the ``DPM_*`` environment variables and stopped when the app shuts down.

Created lazily (not at import, not at startup) so that importing or including
the router costs nothing until a port endpoint is called, and so the
variables may be set after import. After a shutdown, the next request (of
this app started again, or of another app) creates a fresh manager.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from dynamic_port_manager import DynamicPortManager
from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from .routes import build_router
from .settings import ManagerSettings


class SharedManager:
    """A manager created on first ``get()``, replaced once stopped."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._manager: DynamicPortManager | None = None

    def get(self) -> DynamicPortManager:
        # Creation holds the lock: two first requests at once make one manager.
        with self._lock:
            if self._manager is None or self._manager.stopped:
                self._manager = ManagerSettings.from_env().create()
            return self._manager

    def close(self) -> None:
        """Stop the manager (releasing its port), if one was created."""
        with self._lock:
            manager, self._manager = self._manager, None
        if manager is not None:
            manager.stop()


shared = SharedManager()


@asynccontextmanager
async def _lifespan(app: Any) -> AsyncIterator[None]:
    try:
        yield
    finally:
        # stop() waits on locks and the disk: not on the event loop.
        await run_in_threadpool(shared.close)


def create_router(manager: DynamicPortManager) -> APIRouter:
    """The port endpoints over ``manager``. The router never stops it: its owner does."""
    return build_router(lambda: manager)


def get_manager() -> DynamicPortManager:
    """The manager behind ``router`` (created now from ``DPM_*`` if there is none)."""
    return shared.get()


def close_manager() -> None:
    """Stop the manager behind ``router``, as app shutdown does; the next use makes a new one."""
    shared.close()


router: APIRouter = build_router(shared.get, lifespan=_lifespan)
