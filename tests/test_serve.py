"""`dynamic-port-manager serve`: a real uvicorn server on loopback, called over HTTP."""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from router_helpers import (
    Served,
    can_bind,
    cli_path,
    lease_on,
    port_block,
    running_server,
)

pytestmark = pytest.mark.usefixtures("cli_env")


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    start, end = port_block()
    state = tmp_path / "serve.json"
    with running_server(
        [cli_path(), "serve", "--range", f"{start}-{end}", "--state", str(state)], tmp_path
    ) as server:
        yield server


def test_serve_answers_over_http_and_stops_cleanly_on_sigterm(
    served: Served, registry: Path
) -> None:
    with httpx.Client(base_url=served.url, timeout=30) as http:
        state = http.get("/api/v1/port/state").json()
        start, end = state["settings"]["port_range"]
        assert start <= served.port <= end
        # The server's port is leased to the server process: an API pick moves
        # the manager's active port and never hands out the server's own.
        assert {"port": served.port, "pid": served.proc.pid} in [
            {"port": lease["port"], "pid": lease["pid"]} for lease in state["leases"]
        ]
        picked = http.post("/api/v1/port/pick").json()["port"]
        assert picked != served.port
        assert served.port in http.get("/api/v1/port/used").json()["used_ports"]
        docs = http.get("/docs")
        assert docs.status_code == 200 and "swagger" in docs.text.lower()
        assert "/api/v1/port/pick" in http.get("/openapi.json").json()["paths"]
        assert "dpm_picks_total" in http.get("/api/v1/port/metrics").text

    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(timeout=30) == 0
    # Both ports are given back: the server's and the one picked over HTTP.
    assert lease_on(served.port, registry) is None
    assert lease_on(picked, registry) is None
    assert can_bind(served.port)


def test_python_m_serve_stops_cleanly_on_sigint(tmp_path: Path, registry: Path) -> None:
    start, end = port_block()
    command = [sys.executable, "-m", "dynamic_port_manager", "serve", "--range", f"{start}-{end}"]
    with running_server(command, tmp_path) as served:
        response = httpx.get(f"{served.url}/api/v1/port/free", timeout=30)
        assert served.port not in response.json()["free_ports"]
        served.proc.send_signal(signal.SIGINT)
        assert served.proc.wait(timeout=30) == 0
        assert lease_on(served.port, registry) is None
    # No --state: the per-user default, not a folder in the working directory.
    assert (tmp_path / "xdg" / "dynamic-port-manager" / "dynamic_ports.json").is_file()
    assert not (tmp_path / "utils").exists()
