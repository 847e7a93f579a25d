"""The `api_ports` router, through FastAPI's TestClient: every endpoint and error path."""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import api_ports
import pytest
from dynamic_port_manager import DynamicPortManager
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from router_helpers import (
    ROOT,
    app_with,
    clean_env,
    lease_on,
    listening,
    new_manager,
    port_block,
)
from spec_layout import SPEC_KEYS


@pytest.fixture
def manager(state_path: Path) -> Iterator[DynamicPortManager]:
    m = new_manager(state_path, *port_block())
    yield m
    m.stop()


@pytest.fixture
def client(manager: DynamicPortManager) -> TestClient:
    return TestClient(app_with(api_ports.create_router(manager)))


def test_state_is_the_original_layout_then_the_extras(
    client: TestClient, manager: DynamicPortManager, state_path: Path
) -> None:
    response = client.get("/api/v1/port/state")
    assert response.status_code == 200
    state = response.json()
    assert list(state)[: len(SPEC_KEYS)] == SPEC_KEYS
    assert {"schema_version", "last_checked_unix", "leases", "stats", "options"} <= set(state)
    assert state["settings"] == {
        "port_range": [manager.start, manager.end],
        "json_path": str(state_path),
        "history_max": 50,
        "service": "service1",
    }
    assert sorted(state["free_ports"] + state["used_ports"]) == list(
        range(manager.start, manager.end + 1)
    )


def test_pick_takes_the_lowest_free_port_and_records_it(client: TestClient) -> None:
    lowest = client.get("/api/v1/port/free").json()["free_ports"][0]
    response = client.post("/api/v1/port/pick")
    assert response.status_code == 200
    assert response.json() == {"status": "success", "port": lowest}
    assert lowest in client.get("/api/v1/port/used").json()["used_ports"]
    assert lowest not in client.get("/api/v1/port/free").json()["free_ports"]
    history = client.get("/api/v1/port/history").json()["history"]
    assert history[-1]["prev"] is None and history[-1]["new"] == lowest
    assert client.get("/api/v1/port/state").json()["current_port"] == lowest


def test_pick_again_moves_and_release_frees(client: TestClient, registry: Path) -> None:
    first = client.post("/api/v1/port/pick").json()["port"]
    second = client.post("/api/v1/port/pick").json()["port"]
    assert second != first
    assert lease_on(first, registry) is None and lease_on(second, registry) is not None

    assert client.post("/api/v1/port/release").json() == {"status": "success"}
    assert lease_on(second, registry) is None
    state = client.get("/api/v1/port/state").json()
    assert state["current_port"] is None
    moves = [(h["prev"], h["new"]) for h in state["history"]]
    assert moves[-3:] == [(None, first), (first, second), (second, None)]
    # Nothing held: still a success, as the original answered.
    assert client.post("/api/v1/port/release").json() == {"status": "success"}


def _pick_answers_503(manager: DynamicPortManager) -> None:
    client = TestClient(app_with(api_ports.create_router(manager)))
    response = client.post("/api/v1/port/pick")
    assert response.status_code == 503
    assert "no free port" in response.json()["detail"]
    assert "no free port" in client.get("/api/v1/port/state").json()["last_error"]


def test_a_port_another_program_listens_on_answers_503(state_path: Path) -> None:
    with listening() as sock:
        taken = sock.getsockname()[1]
        with new_manager(state_path, taken, taken) as m:
            _pick_answers_503(m)


def test_a_port_another_manager_holds_answers_503(state_path: Path, tmp_path: Path) -> None:
    with new_manager(tmp_path / "other.json", *port_block()) as holder:
        held = holder.pick_port()
        with new_manager(state_path, held, held) as m:
            _pick_answers_503(m)


def test_a_stopped_manager_answers_503_not_500(
    client: TestClient, manager: DynamicPortManager
) -> None:
    manager.stop()
    response = client.post("/api/v1/port/pick")
    assert response.status_code == 503
    assert "stopped" in response.json()["detail"]
    assert client.post("/api/v1/port/release").status_code == 503
    assert client.get("/api/v1/port/state").status_code == 200


def test_backups_are_listed_and_downloaded_as_attachments(
    client: TestClient, manager: DynamicPortManager
) -> None:
    client.post("/api/v1/port/pick")
    client.post("/api/v1/port/release")
    names = client.get("/api/v1/port/backup/list").json()["backups"]
    assert names and names == manager.backups()
    for name in (names[0], names[-1]):
        response = client.get("/api/v1/port/backup/download", params={"filename": name})
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/json"
        assert response.headers["content-disposition"] == f'attachment; filename="{name}"'
        assert response.content == (manager.backup_dir / name).read_bytes()
        assert set(SPEC_KEYS) <= set(response.json())


def test_download_errors_name_what_was_wrong(client: TestClient) -> None:
    response = client.get(
        "/api/v1/port/backup/download",
        params={"filename": "dynamic_ports_service1_20000101_000000.json"},
    )
    assert response.status_code == 404
    assert "no backup named" in response.json()["detail"]
    missing = client.get("/api/v1/port/backup/download")
    assert missing.status_code == 422
    assert missing.json()["detail"][0]["loc"] == ["query", "filename"]


def test_log_json_writes_one_record_to_stdout(
    client: TestClient, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    assert client.get("/api/v1/port/log/json").json() == {"status": "ok"}
    lines = capsys.readouterr().out.splitlines()
    records = [json.loads(line) for line in lines if line.startswith("{")]
    assert len(records) == 1 and "@timestamp" in records[0]


def _samples(text: str) -> dict[str, float]:
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_are_prometheus_text_from_a_private_registry(client: TestClient) -> None:
    client.post("/api/v1/port/pick")
    client.post("/api/v1/port/release")
    state = client.get("/api/v1/port/state").json()
    response = client.get("/api/v1/port/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = _samples(response.text)
    assert samples["dpm_free_ports"] == len(state["free_ports"])
    assert samples["dpm_used_ports"] == len(state["used_ports"])
    assert samples["dpm_port_changes_total"] == state["change_count"] == 2
    assert samples["dpm_picks_total"] == 1
    assert samples["dpm_releases_total"] == 1
    assert samples["dpm_errors_total"] == 0
    assert samples["dpm_last_refresh_timestamp_seconds"] == state["last_checked_unix"]
    assert b"dpm_" not in generate_latest(REGISTRY)

    openmetrics = client.get(
        "/api/v1/port/metrics", headers={"Accept": "application/openmetrics-text"}
    )
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
    assert openmetrics.text.endswith("# EOF\n")


def test_two_routers_keep_their_own_metrics(tmp_path: Path, registry: Path) -> None:
    (a_start, a_end), (b_start, b_end) = port_block(), port_block()
    with (
        new_manager(tmp_path / "a.json", a_start, a_end) as a,
        new_manager(tmp_path / "b.json", b_start, b_end) as b,
    ):
        app = FastAPI()
        app.include_router(api_ports.create_router(a), prefix="/a")
        app.include_router(api_ports.create_router(b), prefix="/b")
        client = TestClient(app)
        client.post("/a/port/pick")
        assert _samples(client.get("/a/port/metrics").text)["dpm_picks_total"] == 1
        assert _samples(client.get("/b/port/metrics").text)["dpm_picks_total"] == 0


ENDPOINTS = {
    ("get", "state"),
    ("post", "pick"),
    ("post", "release"),
    ("get", "free"),
    ("get", "used"),
    ("get", "history"),
    ("get", "backup/list"),
    ("get", "backup/download"),
    ("get", "log/json"),
    ("get", "metrics"),
    ("get", "owners"),
    ("get", "services"),
    ("get", "services/{name}"),
}
DOWNLOAD_PARAMS = {"filename": "dynamic_ports_service1_20240721_155445.json"}


def test_openapi_documents_every_endpoint_and_its_errors(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    documented = {(m, p.removeprefix("/api/v1/port/")) for p, ms in paths.items() for m in ms}
    assert documented == ENDPOINTS
    for methods in paths.values():
        for operation in methods.values():
            ok = operation["responses"]["200"]["content"]
            assert all("schema" in body for body in ok.values())
            assert "503" in operation["responses"]
    pick = paths["/api/v1/port/pick"]["post"]["responses"]
    assert pick["200"]["content"]["application/json"]["schema"]["$ref"].endswith("PickResponse")
    download = paths["/api/v1/port/backup/download"]["get"]["responses"]
    assert {"200", "404", "422"} <= set(download)


class ThreadSpy(DynamicPortManager):
    """Records the thread each blocking call runs on."""

    threads: set[int]

    def _seen(self) -> None:
        self.threads.add(threading.get_ident())

    def get_state(self) -> dict[str, Any]:
        self._seen()
        return super().get_state()

    def pick_port(self, *, pid: int | None = None) -> int:
        self._seen()
        return super().pick_port(pid=pid)

    def release_port(self) -> bool:
        self._seen()
        return super().release_port()

    def backups(self) -> list[str]:
        self._seen()
        return super().backups()

    def log_json(self) -> dict[str, Any]:
        self._seen()
        return super().log_json()

    def owners(self, ports: Sequence[int] | None = None) -> list[dict[str, Any]]:
        self._seen()
        return super().owners(ports)


def test_blocking_calls_never_run_on_the_event_loop(state_path: Path) -> None:
    spy = ThreadSpy(*port_block(), state_path, console_log=False)
    spy.threads = set()
    app = app_with(api_ports.create_router(spy))

    @app.get("/loop-thread")
    async def loop_thread() -> int:
        return threading.get_ident()

    try:
        # One event loop thread for the whole block (a bare TestClient starts
        # one per request, and a finished thread's id may be reused).
        with TestClient(app) as client:
            loop = client.get("/loop-thread").json()
            for method, path in [
                ("post", "pick"),
                ("post", "release"),
                ("get", "state"),
                ("get", "free"),
                ("get", "backup/list"),
                ("get", "log/json"),
                ("get", "metrics"),
                ("get", "owners"),
            ]:
                assert client.request(method, f"/api/v1/port/{path}").status_code == 200
            assert spy.threads and loop not in spy.threads
    finally:
        spy.stop()


def test_api_ports_is_the_installed_typed_package() -> None:
    package = Path(api_ports.__file__).resolve().parent
    assert ROOT / "python" not in package.parents
    assert (package / "py.typed").is_file()


# ---- the default `router`: one manager per process, made at start-up ------


@pytest.fixture
def default_manager(monkeypatch: pytest.MonkeyPatch, registry: Path) -> Iterator[None]:
    clean_env(monkeypatch)
    api_ports.close_manager()
    yield
    api_ports.close_manager()


def _set_env(monkeypatch: pytest.MonkeyPatch, start: int, end: int, path: Path) -> None:
    monkeypatch.setenv("DPM_START", str(start))
    monkeypatch.setenv("DPM_END", str(end))
    monkeypatch.setenv("DPM_JSON_PATH", str(path))


def test_the_drop_in_router_reads_the_env_when_used_and_stops_at_shutdown(
    default_manager: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, registry: Path
) -> None:
    events: list[str] = []

    @asynccontextmanager
    async def own_lifespan(app: FastAPI) -> AsyncIterator[None]:
        events.append("app start")
        yield
        events.append("app stop")

    # As the original projects wrote it; the app's own lifespan still runs.
    app = app_with(api_ports.router, lifespan=own_lifespan)
    start, end = port_block()
    _set_env(monkeypatch, start, end, tmp_path / "first.json")  # after import
    with TestClient(app) as client:
        port = client.post("/api/v1/port/pick").json()["port"]
        assert start <= port <= end
        settings = client.get("/api/v1/port/state").json()["settings"]
        assert settings["port_range"] == [start, end]
        assert settings["json_path"] == str(tmp_path / "first.json")
        first = api_ports.get_manager()
        assert lease_on(port, registry) is not None
    assert events == ["app start", "app stop"]
    assert first.stopped and lease_on(port, registry) is None

    # A later start gets a fresh manager, configured from the env as it is now.
    start2, end2 = port_block()
    _set_env(monkeypatch, start2, end2, tmp_path / "second.json")
    with TestClient(app) as client:
        assert start2 <= client.post("/api/v1/port/pick").json()["port"] <= end2
        assert api_ports.get_manager() is not first


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"DPM_START": "abc"}, "DPM_START"),
        ({"DPM_REFRESH_INTERVAL": "soon"}, "DPM_REFRESH_INTERVAL"),
        ({"DPM_START": "9000", "DPM_END": "3000"}, "start"),
        ({"DPM_END": "70000"}, "end"),
        ({"DPM_HISTORY_MAX": "-1"}, "history_max"),
    ],
)
def test_bad_settings_answer_503_naming_the_setting(
    default_manager: None,
    monkeypatch: pytest.MonkeyPatch,
    state_path: Path,
    env: dict[str, str],
    named: str,
) -> None:
    monkeypatch.setenv("DPM_JSON_PATH", str(state_path))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    client = TestClient(app_with(api_ports.router))
    for method, path in ENDPOINTS:
        url = f"/api/v1/port/{path.format(name='service1')}"
        response = client.request(method, url, params=DOWNLOAD_PARAMS)
        assert response.status_code == 503, path
        assert named in response.json()["detail"]
