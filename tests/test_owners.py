"""Who holds a port: `owners()`, `port_owners()`, `GET /port/owners`, `who`,
against real sockets held by a real process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from api_ports import create_router
from dynamic_port_manager import DynamicPortManager, port_owners
from fastapi.testclient import TestClient
from router_helpers import (
    app_with,
    clean_env,
    cli,
    cli_path,
    new_manager,
    port_block,
    read_terminal,
)

# Listens on each port it reads (IPv4 and IPv6 loopback), answers "ok".
HOLDER = """
import socket, sys
held = []
for line in sys.stdin:
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        s = socket.socket(family)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do
        s.bind((host, int(line)))
        s.listen()
        held.append(s)
    print("ok", flush=True)
"""


class Holder:
    """A process named ``dpm-holder`` (its comm) that holds ports on request."""

    def __init__(self, tmp_path: Path) -> None:
        # Started through a link of that name, so /proc/<pid>/comm says it.
        link = tmp_path / "dpm-holder"
        link.symlink_to(os.path.realpath(sys.executable))
        self.proc = subprocess.Popen(
            [str(link), "-c", HOLDER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.pid = self.proc.pid

    def hold(self, port: int) -> None:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(f"{port}\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "ok"

    def close(self) -> None:
        assert self.proc.stdin
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[Holder]:
    h = Holder(tmp_path)
    try:
        yield h
    finally:
        h.close()


@pytest.fixture
def manager(state_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[DynamicPortManager]:
    clean_env(monkeypatch)
    start, end = port_block(8)
    m = new_manager(state_path, start, end)
    try:
        yield m
    finally:
        m.stop()


def check_held_by(row: dict[str, object], holder: Holder) -> None:
    assert row["listening"] is True and row["sockets"] == 2  # IPv4 and IPv6
    assert row["unknown_uids"] == []
    [process] = row["processes"]  # type: ignore[misc]
    assert process["pid"] == holder.pid
    assert process["name"] == "dpm-holder"
    assert Path(process["cmdline"][0]).name == "dpm-holder"
    assert process["cmdline"][1:3] == ["-c", HOLDER]
    assert process["uid"] == os.geteuid()


def test_a_port_held_and_leased_by_another_process_shows_both(
    manager: DynamicPortManager, holder: Holder
) -> None:
    port = manager.pick_port(pid=holder.pid)
    holder.hold(port)
    [row] = manager.owners()
    assert row["port"] == port
    check_held_by(row, holder)
    lease = row["lease"]
    assert lease["pid"] == holder.pid and lease["alive"] is True
    assert lease["state_file"] == str(manager.state_path)
    assert lease["owner"].startswith(f"{manager.state_path}#")


def test_a_lease_with_no_socket_and_a_socket_with_no_lease(
    manager: DynamicPortManager, holder: Holder
) -> None:
    leased = manager.pick_port()
    bound = manager.end if leased != manager.end else manager.start
    holder.hold(bound)
    rows = {row["port"]: row for row in manager.owners()}
    assert set(rows) == {leased, bound}, "free ports are left out"
    assert rows[leased]["processes"] == [] and rows[leased]["sockets"] == 0
    assert rows[leased]["lease"]["pid"] == os.getpid()
    check_held_by(rows[bound], holder)
    assert rows[bound]["lease"] is None
    # Narrowed to some ports (any, in or out of the range).
    assert [r["port"] for r in manager.owners([bound, manager.end + 100])] == [bound]
    assert port_owners([bound]) == [rows[bound]]


@pytest.mark.parametrize("bad", [0, 65536, -1])
def test_ports_that_are_not_tcp_ports_are_refused(manager: DynamicPortManager, bad: int) -> None:
    with pytest.raises(ValueError, match="ports"):
        manager.owners([bad])


def test_the_owners_endpoint(manager: DynamicPortManager, holder: Holder) -> None:
    port = manager.pick_port(pid=holder.pid)
    holder.hold(port)
    client = TestClient(app_with(create_router(manager)))
    body = client.get("/api/v1/port/owners").json()
    [row] = body["owners"]
    check_held_by(row, holder)
    assert row["lease"]["pid"] == holder.pid
    narrowed = client.get("/api/v1/port/owners", params={"port": [port, manager.end + 1]})
    assert narrowed.json() == body
    assert client.get("/api/v1/port/owners", params={"port": 0}).status_code == 422
    schema = client.get("/openapi.json").json()["paths"]["/api/v1/port/owners"]["get"]
    assert schema["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Owners"
    }


def test_who_prints_json_with_json_and_a_table_on_a_terminal(
    manager: DynamicPortManager, holder: Holder
) -> None:
    port = manager.pick_port(pid=holder.pid)
    holder.hold(port)
    block = f"{manager.start}-{manager.end}"
    piped = cli("who", "--json", "--range", block)
    assert piped.returncode == 0, piped.stderr
    [row] = json.loads(piped.stdout)
    check_held_by(row, holder)

    free = manager.end if port != manager.end else manager.start
    lines = read_terminal([cli_path(), "who", str(port), str(free)]).splitlines()
    assert lines[0].split() == ["PORT", "PID", "NAME", "LEASED", "BY", "COMMAND"]
    held = lines[1].split()
    assert held[:3] == [str(port), str(holder.pid), "dpm-holder"]
    assert held[3:5] == ["pid", str(holder.pid)]
    assert lines[2].split() == [str(free), "-", "(free)", "-"]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to look as another user")
def test_a_socket_of_a_process_it_cannot_see_is_reported_by_uid(holder: Holder) -> None:
    port = port_block(1)[0]
    holder.hold(port)
    # Look as `nobody`: root's /proc/<pid>/fd is closed to that user.
    registry = tempfile.mkdtemp()
    os.chown(registry, 65534, 65534)
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        try:
            os.close(read)
            os.setgid(65534)
            os.setuid(65534)
            os.write(write, json.dumps(port_owners([port], registry_dir=registry)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        seen = pipe.read()
    os.waitpid(child, 0)
    shutil.rmtree(registry)
    [row] = json.loads(seen)
    assert row["port"] == port and row["sockets"] == 2
    assert row["processes"] == [] and row["unknown_uids"] == [0]
