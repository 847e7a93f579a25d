"""The FastAPI router of the original ``api_ports.py``, as a drop-in.

    from fastapi import FastAPI
    from api_ports import router as port_router

    app = FastAPI()
    app.include_router(port_router, prefix="/api/v1")

``router`` serves one manager per process, configured from ``DPM_START``,
``DPM_END``, ``DPM_JSON_PATH``, ``DPM_REFRESH_INTERVAL`` and
``DPM_HISTORY_MAX`` when it is first needed, and stopped at app shutdown.
``create_router(manager)`` serves a manager the app made (and stops) itself.
"""

from __future__ import annotations

from dynamic_port_manager import DynamicPortManager
from fastapi import APIRouter

from .default import default_router, shared
from .routes import build_router
from .settings import ENV_VARS, ManagerSettings

__all__ = [
    "ENV_VARS",
    "ManagerSettings",
    "close_manager",
    "create_router",
    "get_manager",
    "router",
]


def create_router(manager: DynamicPortManager) -> APIRouter:
    """The port endpoints over ``manager``. The router never stops it: its owner does."""
    return build_router(lambda: manager)


def get_manager() -> DynamicPortManager:
    """The manager behind ``router`` (created now from ``DPM_*`` if there is none)."""
    return shared.get()


def close_manager() -> None:
    """Stop the manager behind ``router``, as app shutdown does; the next use makes a new one."""
    shared.close()


router: APIRouter = default_router()
