"""How a manager is configured from the environment (the router's default and the CLI).

The variables are read when a manager is created, never at import, so an app
(or a test) may set them after ``import api_ports``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ._manager import DynamicPortManager

#: Environment variable -> constructor argument.
ENV_VARS = {
    "DPM_START": "start",
    "DPM_END": "end",
    "DPM_JSON_PATH": "json_path",
    "DPM_REFRESH_INTERVAL": "refresh_interval",
    "DPM_HISTORY_MAX": "history_max",
    "DPM_CONSOLE_LOG": "console_log",
}

#: ``DPM_CONSOLE_LOG`` values: on, off, or the default rule (``auto``).
_SWITCH = {
    "1": True,
    "true": True,
    "yes": True,
    "on": True,
    "0": False,
    "false": False,
    "no": False,
    "off": False,
    "auto": None,
}


@dataclass(frozen=True)
class ManagerSettings:
    """The constructor arguments a router or the CLI passes to ``DynamicPortManager``.

    ``json_path=None`` means the core's default (``utils/port_state/dynamic_ports.json``);
    ``console_log=None`` the core's rule (the coloured line only while the
    application has not configured ``logging``).
    """

    start: int = 3000
    end: int = 9000
    json_path: str | None = None
    refresh_interval: float = 10.0
    history_max: int = 50
    console_log: bool | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ManagerSettings:
        """Settings from ``DPM_*`` variables; unset or empty ones keep the defaults.

        Raises ``ValueError`` naming the variable when a value is not a number.
        """
        env = os.environ if environ is None else environ
        base = cls()
        return cls(
            start=_integer(env, "DPM_START", base.start),
            end=_integer(env, "DPM_END", base.end),
            json_path=env.get("DPM_JSON_PATH") or base.json_path,
            refresh_interval=_number(env, "DPM_REFRESH_INTERVAL", base.refresh_interval),
            history_max=_integer(env, "DPM_HISTORY_MAX", base.history_max),
            console_log=_switch(env, "DPM_CONSOLE_LOG", base.console_log),
        )

    def create(self, **options: Any) -> DynamicPortManager:
        """A new manager with these settings (``options``: keyword-only extras,
        ``console_log`` among them overriding this one).

        Raises ``ValueError`` naming the bad argument (the core checks ranges).
        """
        options.setdefault("console_log", self.console_log)
        return DynamicPortManager(
            self.start,
            self.end,
            self.json_path,
            self.refresh_interval,
            self.history_max,
            **options,
        )


def _integer(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None


def _number(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number of seconds, got {raw!r}") from None


def _switch(env: Mapping[str, str], name: str, default: bool | None) -> bool | None:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return _SWITCH[raw.lower()]
    except KeyError:
        raise ValueError(f"{name} must be 1/true/on, 0/false/off or auto, got {raw!r}") from None
