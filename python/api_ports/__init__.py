"""The FastAPI router of the original ``api_ports.py``, as a drop-in.

    from fastapi import FastAPI
    from api_ports import router as port_router

    app = FastAPI()
    app.include_router(port_router, prefix="/api/v1")

``router`` serves one manager per process, made at app start-up from
``DPM_START``, ``DPM_END``, ``DPM_JSON_PATH``, ``DPM_REFRESH_INTERVAL``,
``DPM_HISTORY_MAX`` and ``DPM_CONSOLE_LOG``, and stopped at app shutdown.
``create_router(start=..., end=..., json_path=..., ...)`` does the same with
the constructor's arguments; ``create_router(manager)`` serves a manager the
app made (and stops) itself. ``get_manager()``/``close_manager()`` reach the
manager behind ``router``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .settings import ENV_VARS, ManagerSettings

__all__ = [
    "ENV_VARS",
    "ManagerSettings",
    "close_manager",
    "create_router",
    "get_manager",
    "router",
]

# FastAPI loads on first use of these, not on `import api_ports.settings`: the
# command line reads its settings from here and starts in a tenth of the time.
_ROUTING = frozenset({"close_manager", "create_router", "get_manager", "router"})

if TYPE_CHECKING:
    from .default import close_manager, create_router, get_manager, router


def __getattr__(name: str) -> Any:
    if name in _ROUTING:
        from . import default

        return getattr(default, name)
    raise AttributeError(f"module 'api_ports' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_ROUTING})
