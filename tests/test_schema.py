"""Schemathesis against the drop-in router's own OpenAPI schema: no server
error, and every response (status, content type, body) as the schema says.
Every request also carries a generated Accept header (the metrics route reads
it; the others must not mind it): no header may cause a 500.

And the schema is a contract that does not move: operationIds do not depend
on where the router is mounted, every response field is required (so no
pydantic release can make one optional), and no operation takes an `accept`
parameter (content negotiation is HTTP's, not an argument).

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
from fastapi import FastAPI
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from router_helpers import app_with, port_block, start_default_manager
from spec_layout import EXTRA_KEYS, SPEC_KEYS

# The app exists at import, and its schema is read from it directly: reading
# it over ASGI (`from_asgi`) would run the app's lifespan at import, making the
# router's manager in the current folder from an environment no test has set.
# Requests go to the app over ASGI; schemathesis runs its lifespan per test.
app = app_with(api_ports.router)
schema = schemathesis.openapi.from_dict(app.openapi())
schema.app = app


@schema.hook
def flatmap_headers(ctx: Any, headers: dict[str, Any] | None) -> st.SearchStrategy[Any]:
    # The values a scraper (or an attacker) sends as Accept, for every route.
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


#: The operationIds clients are generated with: the manager's method names.
OPERATION_IDS = {
    ("get", "/port/state"): "get_state",
    ("post", "/port/pick"): "pick_port",
    ("post", "/port/release"): "release_port",
    ("get", "/port/free"): "get_free_ports",
    ("get", "/port/used"): "get_used_ports",
    ("get", "/port/history"): "get_history",
    ("get", "/port/backup/list"): "list_backups",
    ("get", "/port/backup/download"): "download_backup",
    ("get", "/port/owners"): "get_owners",
    ("get", "/port/log/json"): "log_json",
    ("get", "/port/metrics"): "get_metrics",
}


def operation_ids(prefix: str, tmp_path: Path) -> dict[tuple[str, str], str]:
    """(method, path under the prefix) -> operationId, the router mounted at ``prefix``."""
    start, end = port_block()
    router = api_ports.create_router(start=start, end=end, json_path=tmp_path / "s.json")
    mounted = FastAPI()
    mounted.include_router(router, prefix=prefix)
    paths = mounted.openapi()["paths"]
    return {
        (method, path.removeprefix(prefix)): operation["operationId"]
        for path, operations in paths.items()
        for method, operation in operations.items()
    }


def test_operation_ids_are_the_same_wherever_the_router_is_mounted(
    tmp_path: Path, registry: Path
) -> None:
    assert operation_ids("/api/v1", tmp_path) == OPERATION_IDS
    assert operation_ids("/ops/ports/v2", tmp_path) == OPERATION_IDS


def test_no_operation_takes_an_accept_parameter() -> None:
    for path, operations in app.openapi()["paths"].items():
        for method, operation in operations.items():
            names = [p["name"].lower() for p in operation.get("parameters", [])]
            assert "accept" not in names, (method, path)
            assert all(p["in"] == "query" for p in operation.get("parameters", [])), path


def test_every_response_field_is_required_and_the_state_lists_each_key() -> None:
    components = app.openapi()["components"]["schemas"]
    # One schema per model: a default would split a model into `-Input` and
    # `-Output` variants under some pydantic releases, with different `required`.
    assert not [name for name in components if name.endswith(("-Input", "-Output"))]
    ours = {
        name: schema
        for name, schema in components.items()
        if name not in ("HTTPValidationError", "ValidationError")
    }
    for name, schema in ours.items():
        assert sorted(schema.get("required", [])) == sorted(schema["properties"]), name
    assert components["PortState"]["required"] == SPEC_KEYS + EXTRA_KEYS
    assert components["PickResponse"]["required"] == ["status", "port"]
    assert components["SuccessResponse"]["required"] == ["status"]
    assert components["OkResponse"]["required"] == ["status"]
    assert components["HistoryEntry"]["required"] == ["time", "prev", "new"]
