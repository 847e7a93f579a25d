"""What code written for the original object relies on: its attributes with
their types, exceptions that cross process boundaries, and a state that shows
a released port as free at once."""

from __future__ import annotations

import json
import multiprocessing
import pickle
import socket
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
from dynamic_port_manager import (
    DynamicPortManager,
    ManagerStoppedError,
    NoFreePortError,
    RegistryError,
)
from router_helpers import port_block

# ---- attributes ------------------------------------------------------------


def test_the_originals_attributes_have_its_types(tmp_path: Path, registry: Path) -> None:
    base = port_block(10)[0]
    given = str(tmp_path / "svc" / "ports.json")
    m = DynamicPortManager(base, base + 9, given, refresh_interval=10, history_max=5)
    try:
        assert m.json_path == given and type(m.json_path) is str
        assert m.state_path == Path(given) and m.state_path.is_absolute()
        assert m.refresh_interval == 10 and type(m.refresh_interval) is int
        assert m.history_max == 5 and type(m.history_max) is int
        assert m.current_port is None
        assert m.state == m.get_state() and isinstance(m.state, dict)
        port = m.pick_port()
        assert m.current_port == port == m.state["current_port"]
        m.release_port()
        assert m.current_port is None
    finally:
        m.stop()


def test_the_attributes_keep_what_was_given(
    tmp_path: Path, registry: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = port_block(30)[0]
    with DynamicPortManager(base, base + 9, tmp_path / "p.json", refresh_interval=0.5) as m:
        assert m.json_path == tmp_path / "p.json" and isinstance(m.json_path, Path)
        assert m.refresh_interval == 0.5 and type(m.refresh_interval) is float
    monkeypatch.chdir(tmp_path)
    with DynamicPortManager(base + 10, base + 19) as m:  # the defaults, as the original's
        assert m.json_path == "utils/port_state/dynamic_ports.json"
        assert m.state_path == tmp_path / "utils/port_state/dynamic_ports.json"
        assert m.state_path.is_file()
        assert (m.refresh_interval, m.history_max) == (10, 50)
        assert type(m.refresh_interval) is int
    with DynamicPortManager(base + 20, base + 29, "rel/p.json") as m:
        assert m.json_path == "rel/p.json"
        assert m.state_path == tmp_path / "rel" / "p.json"


@pytest.mark.parametrize(
    "name", ["json_path", "state_path", "refresh_interval", "history_max", "state", "current_port"]
)
def test_the_attributes_are_read_only(tmp_path: Path, registry: Path, name: str) -> None:
    base = port_block(10)[0]
    with DynamicPortManager(base, base + 9, tmp_path / "p.json", console_log=False) as m:
        with pytest.raises(AttributeError):
            setattr(m, name, 1)


# ---- exceptions ------------------------------------------------------------


@pytest.mark.parametrize("error", [NoFreePortError, ManagerStoppedError, RegistryError])
def test_the_exceptions_belong_to_the_package_and_pickle(error: type[Exception]) -> None:
    assert error.__module__ == "dynamic_port_manager"
    back = pickle.loads(pickle.dumps(error("no free port in range 1-2")))
    assert type(back) is error
    assert str(back) == "no free port in range 1-2"


def pick_from_a_busy_range(registry: str) -> int:
    """In a worker process: a one-port range another program listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        m = DynamicPortManager(
            busy, busy, f"{registry}/worker.json", registry_dir=registry, console_log=False
        )
        try:
            return m.pick_port()
        finally:
            m.stop()


def test_no_free_port_crosses_a_process_pool(tmp_path: Path, registry: Path) -> None:
    registry.mkdir(mode=0o700)
    # spawn: nothing is inherited, the exception must travel by pickle.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        future = pool.submit(pick_from_a_busy_range, str(registry))
        with pytest.raises(NoFreePortError, match="no free port"):
            future.result(timeout=60)


# ---- a release shows at once -------------------------------------------------


def test_a_released_port_whose_listener_closed_is_free_at_once(
    tmp_path: Path, registry: Path
) -> None:
    base = port_block(10)[0]
    path = tmp_path / "p.json"
    with DynamicPortManager(base, base + 9, path, refresh_interval=3600, console_log=False) as m:
        port = m.pick_port()
        # The service listens on its port; a refresh sees it in the kernel's table.
        with socket.socket() as service:
            service.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do
            service.bind(("127.0.0.1", port))
            service.listen()
            m.refresh()
        # Closed, then released (a clean shutdown): no refresh in between.
        assert m.release_port()
        state = m.get_state()
        assert port not in state["used_ports"] and port in state["free_ports"]
        on_disk = json.loads(path.read_text())
        assert on_disk["current_port"] is None
        assert port not in on_disk["used_ports"] and port in on_disk["free_ports"]


def test_a_released_port_still_listened_on_stays_used(tmp_path: Path, registry: Path) -> None:
    base = port_block(10)[0]
    with DynamicPortManager(base, base + 9, tmp_path / "p.json", console_log=False) as m:
        port = m.pick_port()
        with socket.socket() as service:
            service.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do
            service.bind(("127.0.0.1", port))
            service.listen()
            m.release_port()
            state = m.get_state()
            assert port in state["used_ports"] and port not in state["free_ports"]
