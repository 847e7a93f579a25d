"""Schemathesis against the drop-in router's own OpenAPI schema: no server
error, and every response (status, content type, body) as the schema says.
Every request also carries a generated Accept header (the metrics route
declares it; the others must not mind it): no header may cause a 500.

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
from accept_values import ACCEPT_FOR_REQUESTS
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from router_helpers import app_with, start_default_manager

# The app exists at import, and its schema is read from it directly: reading
# it over ASGI (`from_asgi`) would run the app's lifespan at import, making the
# router's manager in the current folder from an environment no test has set.
# Requests go to the app over ASGI; schemathesis runs its lifespan per test.
app = app_with(api_ports.router)
schema = schemathesis.openapi.from_dict(app.openapi())
schema.app = app


@schema.hook
def flatmap_headers(ctx: Any, headers: dict[str, Any] | None) -> st.SearchStrategy[Any]:
    # Schemathesis draws the metrics route's declared `accept` as any string;
    # these are the values a scraper (or an attacker) sends, for every route.
    generated = headers or {}
    return st.one_of(
        st.just(generated), ACCEPT_FOR_REQUESTS.map(lambda accept: {**generated, "accept": accept})
    )


@pytest.fixture(autouse=True)
def _manager_per_test(
    monkeypatch: pytest.MonkeyPatch, registry: Path, state_path: Path
) -> Iterator[None]:
    start_default_manager(monkeypatch, state_path)
    yield
    api_ports.close_manager()


@schema.parametrize()
@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_every_response_matches_the_schema(case: Any) -> None:
    # Passed explicitly: schemathesis's ASGI client would put its own default
    # `Accept: */*` over the generated header (schemathesis 4.32).
    accept = (case.headers or {}).get("accept")
    case.call_and_validate(headers=None if accept is None else {"Accept": accept})
