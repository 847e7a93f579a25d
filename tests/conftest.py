"""Shared fixtures: every test gets its own lease registry and state folder."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Callable

import pytest
import router_helpers


@pytest.fixture(autouse=True)
def _port_blocks(free_port_range: Callable[[int], range]) -> Iterator[None]:
    """``router_helpers.port_block`` leases through this test's ``free_port_range``."""
    router_helpers.lease_range = free_port_range
    yield
    router_helpers.lease_range = None


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private lease registry for this test (also exported to child processes)."""
    reg = tmp_path / "registry"
    monkeypatch.setenv("DPM_REGISTRY_DIR", str(reg))
    return reg


@pytest.fixture
def state_path(tmp_path: Path, registry: Path) -> Path:
    return tmp_path / "port_state" / "dynamic_ports_service1.json"


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, registry: Path, tmp_path: Path) -> None:
    """No DPM_* settings from the caller's shell, and the CLI's per-user state
    file under this test's folder (for suites that run the CLI or `serve`)."""
    from router_helpers import clean_env

    clean_env(monkeypatch)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
