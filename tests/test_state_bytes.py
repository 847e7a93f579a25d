"""`state_json()` and `GET /port/state` served from the core's JSON bytes.

The bytes describe exactly what `get_state()` does, and follow every change
(another process's pick too: the cache is never stale). Over a real uvicorn
server, the router's body is byte for byte what the pydantic route it replaced
answered (FastAPI validating `get_state()` against `PortState` and writing it
again), its OpenAPI schema is that route's, and errors keep their 503.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import pytest
import uvicorn
from api_ports import create_router, models
from api_ports.routes import _UNAVAILABLE, build_router
from dynamic_port_manager import DynamicPortManager
from fastapi import APIRouter, FastAPI
from router_helpers import new_manager, port_block

# (start, end): an 11-port range and the default's size, 6,001 ports.
RANGES = {"11": 11, "6001": 6001}


@pytest.fixture(params=sorted(RANGES))
def manager(request: pytest.FixtureRequest, state_path: Path) -> Iterator[DynamicPortManager]:
    start, end = port_block(RANGES[request.param])
    m = new_manager(state_path, start, end, refresh_interval=3600)
    try:
        yield m
    finally:
        m.stop()


def old_router(m: DynamicPortManager) -> APIRouter:
    """`/port/state` as the router defined it before it served the core's bytes."""
    router = APIRouter(tags=["port"], responses=_UNAVAILABLE)

    @router.get(
        "/port/state",
        response_model=models.PortState,
        summary="Full state and settings",
        operation_id="get_state",
    )
    def port_state() -> dict[str, Any]:
        return m.get_state()

    return router


@contextmanager
def serving(app: FastAPI, port: int) -> Iterator[str]:
    """``app`` under a real uvicorn server on 127.0.0.1:``port`` (a thread of this process)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        for _ in range(600):  # bounded: 30 s
            if server.started or not thread.is_alive():
                break
            threading.Event().wait(0.05)
        assert server.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.headers["content-type"], r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["content-type"], e.read()


def test_state_json_is_get_states_json(manager: DynamicPortManager) -> None:
    manager.pick_port()
    body = manager.state_json()
    assert isinstance(body, bytes)
    assert json.loads(body) == manager.get_state()
    # Compact, keys in get_state()'s order (the state file's).
    state = manager.get_state()
    assert body == json.dumps(state, separators=(",", ":"), ensure_ascii=False).encode()
    assert list(json.loads(body)) == list(state)


def test_the_bytes_follow_this_processs_changes(manager: DynamicPortManager) -> None:
    before = manager.state_json()
    port = manager.pick_port()
    after = manager.state_json()
    shown = json.loads(after)
    assert shown["current_port"] == port and port in shown["used_ports"]
    assert after != before
    manager.release_port()
    released = json.loads(manager.state_json())
    assert released["current_port"] is None and port not in released["used_ports"]
    assert released == manager.get_state()


CHILD = textwrap.dedent(
    """
    import sys
    from dynamic_port_manager import DynamicPortManager
    start, end, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    m = DynamicPortManager(start, end, path, refresh_interval=3600, console_log=False)
    print(m.pick_port(), flush=True)
    sys.stdin.read()  # holds the port until the test closes stdin
    m.stop()
    """
)


@contextmanager
def pick_in_child(m: DynamicPortManager) -> Iterator[int]:
    """A port picked through ``m``'s state file by another process, held for the block."""
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(m.start), str(m.end), os.fspath(m.state_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        yield int(child.stdout.readline())
        child.stdin.close()
        assert child.wait(60) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(30)


def test_another_processs_pick_and_release_show_at_once(manager: DynamicPortManager) -> None:
    mine = manager.pick_port()
    before = manager.state_json()
    assert manager.state_json() is before  # unchanged: the same bytes object
    with pick_in_child(manager) as theirs:
        during = json.loads(manager.state_json())
        assert theirs in during["used_ports"] and theirs not in during["free_ports"]
        assert during["current_port"] == mine  # this manager's, not the child's
        assert during == manager.get_state()
    after = json.loads(manager.state_json())
    assert theirs not in after["used_ports"] and theirs in after["free_ports"]
    assert after == manager.get_state()


def test_http_body_is_what_the_model_route_answered(
    manager: DynamicPortManager, free_port: int
) -> None:
    manager.pick_port()
    app = FastAPI()
    app.include_router(create_router(manager), prefix="/api/v1")
    app.include_router(old_router(manager), prefix="/old")
    with serving(app, free_port) as url:
        for _ in range(3):  # bounded: a refresh between two reads changes the state
            old1, new, old2 = (get(url + p + "/port/state") for p in ("/old", "/api/v1", "/old"))
            if old1 == old2:
                break
        assert new == old1  # status, content type and every byte
        assert new[0] == 200 and new[1] == "application/json"
        assert json.loads(new[2]) == manager.get_state()
        with pick_in_child(manager) as theirs:
            status, _, body = get(url + "/api/v1/port/state")
            assert status == 200 and theirs in json.loads(body)["used_ports"]
        status, _, body = get(url + "/api/v1/port/state")
        assert theirs not in json.loads(body)["used_ports"]


def test_openapi_schema_is_the_model_routes(state_path: Path) -> None:
    m = new_manager(state_path, *port_block(3))
    try:
        apps = [FastAPI(), FastAPI()]
        apps[0].include_router(create_router(m), prefix="/api/v1")
        apps[1].include_router(old_router(m), prefix="/api/v1")
        now, before = (app.openapi() for app in apps)
        path = "/api/v1/port/state"
        assert now["paths"][path] == before["paths"][path]
        for name, schema in before["components"]["schemas"].items():
            assert now["components"]["schemas"][name] == schema, name
    finally:
        m.stop()


class Annotated(DynamicPortManager):
    def get_state(self) -> dict[str, Any]:
        return {**super().get_state(), "note": "mine"}


def test_a_subclass_get_state_is_still_served(state_path: Path, free_port: int) -> None:
    start, end = port_block(3)
    m = Annotated(start, end, state_path, console_log=False, refresh_interval=3600)
    try:
        app = FastAPI()
        app.include_router(create_router(m), prefix="/api/v1")
        with serving(app, free_port) as url:
            status, _, body = get(url + "/api/v1/port/state")
        assert status == 200 and json.loads(body)["note"] == "mine"
    finally:
        m.stop()


def broken_source() -> Callable[[], DynamicPortManager]:
    def source() -> DynamicPortManager:
        raise ValueError("DPM_START: not a number")

    return source


def test_errors_are_503_with_detail(state_path: Path, free_port: int) -> None:
    m = new_manager(state_path, *port_block(3))
    app = FastAPI()
    app.include_router(build_router(broken_source()), prefix="/broken")
    app.include_router(create_router(m), prefix="/stopped")
    m.stop()
    with serving(app, free_port) as url:
        status, kind, body = get(url + "/broken/port/state")
        assert (status, kind) == (503, "application/json")
        assert json.loads(body) == {
            "detail": "the port manager could not start: DPM_START: not a number"
        }
        # A stopped manager still shows its last state, as get_state() does.
        status, _, body = get(url + "/stopped/port/state")
        assert status == 200 and json.loads(body) == m.get_state()


def test_with_discovery_the_bytes_carry_its_status(state_path: Path, free_port: int) -> None:
    # No etcd listens on the free port: the status is "not up", as get_state() says.
    address = f"etcd://127.0.0.1:{free_port}"
    with DynamicPortManager(*port_block(3), state_path, console_log=False, discovery=address) as m:
        shown = json.loads(m.state_json())
        assert shown["discovery"]["endpoint"] == m.get_state()["discovery"]["endpoint"]
        assert shown.keys() == m.get_state().keys()


def test_the_no_wait_read_declines_what_another_process_saved(
    manager: DynamicPortManager,
) -> None:
    # What the event loop calls: it must not read the file another process
    # wrote (it says None: the threadpool's state_json() reads it), nor answer stale.
    manager.pick_port()
    # Nor take the range's first scan: the threadpool's read takes it.
    first = manager.state_json()
    assert manager._state_json_nowait() == first
    with pick_in_child(manager) as theirs:
        assert manager._state_json_nowait() is None
        fresh = manager.state_json()
        assert theirs in json.loads(fresh)["used_ports"]
        assert manager._state_json_nowait() is fresh


# The slot of a state file in its folder's lock file, and a process holding it
# (as tests/test_folder_lock.py does): a save of that file waits while it is held.
FOLDER_LOCK = ".dynamic_port_manager.lock"
SLOT_HOLDER = """
import fcntl, sys
with open(sys.argv[1], "r+b") as f:
    fcntl.lockf(f, fcntl.LOCK_EX, 8, int(sys.argv[2]))
    print("held", flush=True)
    sys.stdin.readline()
"""


def counter_slot(name: str) -> int:
    """The slot of a state file's change counter (FNV-1a of its name, 4,096 slots)."""
    h = 0xCBF29CE484222325
    for byte in name.encode():
        h = ((h ^ byte) * 0x100000001B3) % 2**64
    return h % 4096


def test_a_save_waiting_for_its_lock_never_stalls_the_event_loop(
    tmp_path: Path, registry: Path, free_port: int
) -> None:
    m = DynamicPortManager(
        *port_block(3), tmp_path / "held.json", console_log=False, refresh_interval=3600
    )
    app = FastAPI()
    app.include_router(create_router(m), prefix="/api/v1")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            SLOT_HOLDER,
            str(tmp_path / FOLDER_LOCK),
            str(counter_slot("held.json") * 8),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    picked: list[int] = []
    pick = threading.Thread(target=lambda: picked.append(m.pick_port()))
    answers: list[tuple[int, str, bytes]] = []
    try:
        with serving(app, free_port) as url:
            assert holder.stdout and holder.stdout.readline().strip() == "held"
            pick.start()
            for _ in range(400):  # bounded: until the pick holds the manager, waiting
                if m._state_json_nowait() is None:
                    break
                threading.Event().wait(0.05)
            assert pick.is_alive() and m._state_json_nowait() is None
            # The state read waits for the save off the loop; the loop answers others.
            reader = threading.Thread(
                target=lambda: answers.append(get(url + "/api/v1/port/state"))
            )
            reader.start()
            threading.Event().wait(0.2)  # ordering only: the state request goes first
            status, _, _ = get(url + "/openapi.json")
            assert status == 200
            assert pick.is_alive() and not answers, "the loop waited for the save"
            assert holder.stdin
            holder.stdin.close()
            pick.join(60)
            reader.join(60)
        assert picked and answers and answers[0][0] == 200
        assert json.loads(answers[0][2])["current_port"] == picked[0]
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.wait(30)
        m.stop()


def test_a_killed_holders_port_is_taken_back_before_it_is_served(
    manager: DynamicPortManager, free_port: int
) -> None:
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            CHILD,
            str(manager.start),
            str(manager.end),
            str(manager.state_path),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        theirs = int(child.stdout.readline())
        manager.pick_port()  # this process now knows the child as a holder
        app = FastAPI()
        app.include_router(create_router(manager), prefix="/api/v1")
        with serving(app, free_port) as url:
            status, _, body = get(url + "/api/v1/port/state")
            assert status == 200 and theirs in json.loads(body)["used_ports"]
            child.kill()
            child.wait(30)
            status, _, body = get(url + "/api/v1/port/state")
            assert status == 200 and theirs not in json.loads(body)["used_ports"]
            assert json.loads(body) == manager.get_state()
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(30)
