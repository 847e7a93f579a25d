"""Schemathesis against the drop-in router's own OpenAPI schema: no server
error, and every response (status, content type, body) as the schema says.

Bounded: a few dozen generated requests per operation, no deadline per example
(a pick waits on file locks; speed belongs in benchmarks).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import api_ports
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from router_helpers import app_with, clean_env, port_block

# The app exists at import (schemathesis reads its schema then); its manager
# only on the first request of each test, from that test's environment.
app = app_with(api_ports.router)
schema = schemathesis.openapi.from_asgi("/openapi.json", app)


@pytest.fixture(autouse=True)
def _manager_per_test(
    monkeypatch: pytest.MonkeyPatch, registry: Path, state_path: Path
) -> Iterator[None]:
    clean_env(monkeypatch)
    start, end = port_block(3)
    monkeypatch.setenv("DPM_START", str(start))
    monkeypatch.setenv("DPM_END", str(end))
    monkeypatch.setenv("DPM_JSON_PATH", str(state_path))
    api_ports.close_manager()
    manager = api_ports.get_manager()
    manager.pick_port()  # some history and backups to list and download
    manager.release_port()
    yield
    api_ports.close_manager()


@schema.parametrize()
@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_every_response_matches_the_schema(case: Any) -> None:
    case.call_and_validate()
