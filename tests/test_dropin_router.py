"""Moving a real project over: the routers make their manager at application
start-up (the START record and the state file exist before the first request,
as with the original), ``create_router(start=..., json_path=...)`` keeps a
project's own settings, and a bad ``DPM_*`` value is logged at start-up."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import api_ports
import pytest
from api_ports import ManagerSettings, create_router
from fastapi.testclient import TestClient
from router_helpers import app_with, clean_env, lease_on, new_manager, port_block

LOGGER = "dynamic_port_manager"


def events(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The event names of the manager's log records so far."""
    return [r.getMessage().split(" | ")[0] for r in caplog.records if r.name == LOGGER]


@pytest.fixture
def default_router(monkeypatch: pytest.MonkeyPatch, registry: Path) -> Iterator[None]:
    clean_env(monkeypatch)
    api_ports.close_manager()
    yield
    api_ports.close_manager()


def test_create_router_with_arguments_serves_its_own_file_from_start_up(
    tmp_path: Path, registry: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    start, end = port_block()
    path = tmp_path / "service1" / "ports.json"
    app = app_with(create_router(json_path=str(path), start=start, end=end, history_max=7))
    assert not path.exists() and events(caplog) == []  # nothing at import or include
    with TestClient(app) as client:
        # Started, and no request yet: the manager is there, as the original's was.
        assert events(caplog) == ["START"]
        on_disk = json.loads(path.read_text())
        assert on_disk["settings"] == {
            "port_range": [start, end],
            "json_path": str(path),
            "history_max": 7,
            "service": "ports",
        }
        port = client.post("/api/v1/port/pick").json()["port"]
        assert start <= port <= end
        state = client.get("/api/v1/port/state").json()
        assert state["current_port"] == port
        assert state["settings"]["json_path"] == str(path)
        assert lease_on(port, registry) is not None
    # Shutdown stopped it: the port is given back, and the file says so.
    assert events(caplog)[-1] == "STOP"
    assert lease_on(port, registry) is None
    assert json.loads(path.read_text())["current_port"] is None


def test_create_router_with_arguments_starts_afresh_after_a_restart(
    tmp_path: Path, registry: Path
) -> None:
    start, end = port_block()
    path = tmp_path / "ports.json"
    app = app_with(create_router(start=start, end=end, json_path=path))
    for _ in range(2):
        with TestClient(app) as client:
            assert client.post("/api/v1/port/pick").json()["port"] == start
    # One history across both runs: pick, stop, pick, stop.
    history = json.loads(path.read_text())["history"]
    assert [(h["prev"], h["new"]) for h in history] == [(None, start), (start, None)] * 2


def test_create_router_with_arguments_works_without_a_lifespan(
    tmp_path: Path, registry: Path
) -> None:
    # A TestClient outside `with` runs no lifespan: the first request makes the manager.
    start, end = port_block()
    path = tmp_path / "ports.json"
    client = TestClient(app_with(create_router(start=start, end=end, json_path=path)))
    assert not path.exists()
    assert client.get("/api/v1/port/state").json()["settings"]["port_range"] == [start, end]
    assert path.exists()
    client.post("/api/v1/port/release")  # (nothing held; keeps the registry clean)


def test_a_manager_and_arguments_together_are_refused(state_path: Path) -> None:
    m = new_manager(state_path, *port_block())
    try:
        with pytest.raises(TypeError, match="not both"):
            create_router(m, start=3000)  # type: ignore[call-overload]
    finally:
        m.stop()


def test_bad_arguments_are_logged_at_start_up_and_answer_503(
    tmp_path: Path, registry: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app = app_with(create_router(start=9000, end=3000, json_path=tmp_path / "p.json"))
    with TestClient(app) as client:
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert any("start" in r.getMessage() and "503" in r.getMessage() for r in errors)
        response = client.get("/api/v1/port/state")
        assert response.status_code == 503
        assert "greater than end" in response.json()["detail"]


def test_the_default_router_makes_its_manager_at_start_up(
    default_router: None,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    start, end = port_block()
    path = tmp_path / "from_env.json"
    monkeypatch.setenv("DPM_START", str(start))
    monkeypatch.setenv("DPM_END", str(end))
    monkeypatch.setenv("DPM_JSON_PATH", str(path))
    with TestClient(app_with(api_ports.router)) as client:
        assert events(caplog) == ["START"]
        assert json.loads(path.read_text())["settings"]["port_range"] == [start, end]
        assert client.get("/api/v1/port/state").json()["settings"]["json_path"] == str(path)
    assert events(caplog)[-1] == "STOP"


def test_a_bad_dpm_setting_is_logged_loudly_at_start_up(
    default_router: None,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("DPM_JSON_PATH", str(tmp_path / "p.json"))
    monkeypatch.setenv("DPM_START", "abc")
    with TestClient(app_with(api_ports.router)) as client:
        # Logged before any request, at ERROR, naming the variable.
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert [r.name for r in errors] == ["api_ports"]
        assert "DPM_START must be an integer, got 'abc'" in errors[0].getMessage()
        # The app is up; the port endpoints say what is wrong, as before.
        response = client.post("/api/v1/port/pick")
        assert response.status_code == 503
        assert "DPM_START" in response.json()["detail"]
        # Fixed while running: the next request makes the manager.
        start, end = port_block()
        monkeypatch.setenv("DPM_START", str(start))
        monkeypatch.setenv("DPM_END", str(end))
        assert client.get("/api/v1/port/state").status_code == 200


@pytest.mark.parametrize(
    ("value", "printed"), [("1", True), ("on", True), ("0", False), ("off", False)]
)
def test_the_default_router_reads_dpm_console_log(
    default_router: None,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    value: str,
    printed: bool,
) -> None:
    start, end = port_block()
    monkeypatch.setenv("DPM_START", str(start))
    monkeypatch.setenv("DPM_END", str(end))
    monkeypatch.setenv("DPM_JSON_PATH", str(tmp_path / "p.json"))
    monkeypatch.setenv("DPM_CONSOLE_LOG", value)
    # Under pytest the root logger has handlers (log capture), so the default
    # rule would print nothing: `1` must force the line, `0` keep it off.
    with TestClient(app_with(api_ports.router)):
        pass
    err = capsys.readouterr().err
    assert ("| START " in err) is printed, err


@pytest.mark.parametrize(
    ("value", "expected"),
    [("", None), ("auto", None), ("TRUE", True), ("yes", True), ("False", False), ("no", False)],
)
def test_dpm_console_log_values(value: str, expected: bool | None) -> None:
    assert ManagerSettings.from_env({"DPM_CONSOLE_LOG": value}).console_log is expected


def test_a_bad_dpm_console_log_is_named() -> None:
    with pytest.raises(ValueError, match="DPM_CONSOLE_LOG must be .* got 'loud'"):
        ManagerSettings.from_env({"DPM_CONSOLE_LOG": "loud"})
