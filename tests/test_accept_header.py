"""No request, header included, can cause a 500 (issue 7, item 12): any Accept
header, sent to every endpoint of the drop-in router. `/port/metrics` answered
500 to `application/openmetrics-text; version=abc` (prometheus_client compared
the version as a tuple of ints and strings); a value it cannot read now gets
the plain text format, as a scraper that asks for nothing does."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import api_ports
import pytest
from accept_values import ACCEPT, MALFORMED
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from router_helpers import app_with, start_default_manager

TEXT_FORMAT = "text/plain; version=0.0.4; charset=utf-8"


@pytest.fixture
def client(
    monkeypatch: pytest.MonkeyPatch, registry: Path, state_path: Path
) -> Iterator[TestClient]:
    start_default_manager(monkeypatch, state_path)
    # Server errors as responses, not exceptions: the status is what is checked.
    with TestClient(app_with(api_ports.router), raise_server_exceptions=False) as c:
        yield c
    api_ports.close_manager()


def every_endpoint(client: TestClient) -> list[tuple[str, str]]:
    """(method, url) of every operation the router's schema lists."""
    backup = client.get("/api/v1/port/backup/list").json()["backups"][0]
    found = []
    for path, operations in client.get("/openapi.json").json()["paths"].items():
        for method in operations:
            url = path + (f"?filename={backup}" if path.endswith("/download") else "")
            found.append((method.upper(), url))
    return found


@pytest.mark.parametrize("accept", MALFORMED)
def test_a_malformed_accept_gets_the_text_format_not_a_500(client: TestClient, accept: str) -> None:
    response = client.get("/api/v1/port/metrics", headers={"Accept": accept})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == TEXT_FORMAT
    assert "dpm_free_ports " in response.text


def test_a_well_formed_openmetrics_accept_still_gets_openmetrics(client: TestClient) -> None:
    response = client.get(
        "/api/v1/port/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert response.headers["content-type"].startswith(
        "application/openmetrics-text; version=1.0.0"
    )
    assert response.text.endswith("# EOF\n")


@settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(accept=ACCEPT)
def test_no_accept_value_causes_a_server_error_anywhere(
    client: TestClient, accept: str | bytes
) -> None:
    endpoints = every_endpoint(client)
    assert len(endpoints) >= 10
    for method, url in endpoints:
        response = client.request(method, url, headers={"Accept": accept})
        assert response.status_code < 500, (method, url, accept, response.text)
        # Whatever was asked, the Content-Type echoed back is a clean header.
        content_type = response.headers.get("content-type", "")
        assert content_type.isascii() and content_type.isprintable(), content_type
