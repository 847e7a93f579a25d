"""Shared fixtures: every test gets its own lease registry and state folder."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private lease registry for this test (also exported to child processes)."""
    reg = tmp_path / "registry"
    monkeypatch.setenv("DPM_REGISTRY_DIR", str(reg))
    return reg


@pytest.fixture
def state_path(tmp_path: Path, registry: Path) -> Path:
    return tmp_path / "port_state" / "dynamic_ports_service1.json"
