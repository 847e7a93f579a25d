"""How the router's default manager is configured from the environment: the
core package's settings (``dynamic_port_manager.settings``), under the name
the router has always offered them by."""

from dynamic_port_manager.settings import ENV_VARS, ManagerSettings

__all__ = ["ENV_VARS", "ManagerSettings"]
