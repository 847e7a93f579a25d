"""A service has a name, and ``lookup(name)`` finds its live holders on this
host from the lease registry alone: the module function, the CLI, the router."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import api_ports
import dynamic_port_manager as dpm
import pytest
from fastapi.testclient import TestClient
from router_helpers import app_with, cli, port_block

HOLDER = """
import sys, time
import dynamic_port_manager as dpm
m = dpm.DynamicPortManager(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3],
                           console_log=False, service="orders")
print(m.pick_port(), flush=True)
time.sleep(300)
"""


@pytest.fixture(autouse=True)
def _no_discovery(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DPM_DISCOVERY", raising=False)


def manager(path: Path, **options: object) -> dpm.DynamicPortManager:
    start, end = port_block()
    return dpm.DynamicPortManager(start, end, path, console_log=False, **options)  # type: ignore[arg-type]


def test_the_name_is_given_or_comes_from_the_state_file(tmp_path: Path, registry: Path) -> None:
    with manager(tmp_path / "dynamic_ports_orders.json") as derived:
        assert derived.service == "orders"
        assert derived.get_state()["settings"]["service"] == "orders"
    with manager(tmp_path / "billing.json") as stem:
        assert stem.service == "billing"
    with manager(tmp_path / "x.json", service="payments-v2.eu_1") as named:
        port = named.pick_port()
        assert named.get_state()["settings"]["service"] == "payments-v2.eu_1"
        on_disk = json.loads((tmp_path / "x.json").read_text())
        assert on_disk["settings"]["service"] == "payments-v2.eu_1"
        (lease,) = [x for x in dpm.list_leases() if x["port"] == port]
        assert lease["service"] == "payments-v2.eu_1"


@pytest.mark.parametrize("bad", ["", "a b", "-x", "a/b", "x" * 64, "ä"])
def test_a_bad_name_is_a_value_error_saying_what_is_allowed(
    tmp_path: Path, registry: Path, bad: str
) -> None:
    with pytest.raises(ValueError, match=r"service: must be 1 to 63 characters of A-Z"):
        manager(tmp_path / "x.json", service=bad)
    assert not (tmp_path / "x.json").exists()
    with pytest.raises(ValueError, match=r"name: must be 1 to 63"):
        dpm.lookup(bad)


def test_lookup_lists_live_holders_and_forgets_released_ones(
    tmp_path: Path, registry: Path
) -> None:
    assert dpm.lookup("orders") == []
    with (
        manager(tmp_path / "a.json", service="orders") as a,
        manager(tmp_path / "b.json", service="orders") as b,
        manager(tmp_path / "c.json", service="billing") as c,
    ):
        pa, pb, pc = a.pick_port(), b.pick_port(), c.pick_port()
        found = dpm.lookup("orders")
        assert [(i["port"], i["state_file"]) for i in found] == sorted(
            [(pa, str(a.state_path)), (pb, str(b.state_path))]
        )
        for i in found:
            assert i["service"] == "orders" and i["pid"] == os.getpid()
            assert i["source"] == "local" and i["since"]
            assert i["command"] and Path(i["command"][0]).name.startswith("python")
        assert [i["port"] for i in dpm.lookup("billing")] == [pc]
        a.release_port()
        assert [i["port"] for i in dpm.lookup("orders")] == [pb]
        moved = b.pick_port()
        assert [i["port"] for i in dpm.lookup("orders")] == [moved]
    assert dpm.lookup("orders") == [] and dpm.lookup("billing") == []


def test_a_killed_holder_is_not_listed(tmp_path: Path, registry: Path) -> None:
    start, end = port_block()
    child = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(start), str(end), str(tmp_path / "o.json")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        port = int(child.stdout.readline())
        assert [(i["port"], i["pid"]) for i in dpm.lookup("orders")] == [(port, child.pid)]
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    # The lease is still in the registry, its holder gone: not an instance.
    assert any(lease["port"] == port for lease in dpm.list_leases())
    assert dpm.lookup("orders") == []


def test_the_command_line_exits_1_when_there_is_none(
    tmp_path: Path, registry: Path, cli_env: None
) -> None:
    none = cli("lookup", "orders")
    assert none.returncode == 1
    assert "no live instance of service 'orders'" in none.stderr
    assert json.loads(none.stdout) == []
    assert cli("lookup", "no/such").returncode == 2
    with manager(tmp_path / "dynamic_ports_orders.json") as m:
        port = m.pick_port()
        found = cli("lookup", "orders", "--json")
        assert found.returncode == 0, found.stderr
        (instance,) = json.loads(found.stdout)
        assert (instance["port"], instance["pid"]) == (port, os.getpid())
        who = json.loads(cli("who", str(port)).stdout)
        assert who[0]["lease"]["service"] == "orders"


def test_the_router_lists_services_by_name(tmp_path: Path, registry: Path) -> None:
    with (
        manager(tmp_path / "api.json", service="api") as own,
        manager(tmp_path / "o.json", service="orders") as other,
    ):
        port = other.pick_port()
        with TestClient(app_with(api_ports.create_router(own))) as client:
            assert client.get("/api/v1/port/state").json()["settings"]["service"] == "api"
            every = client.get("/api/v1/port/services").json()["instances"]
            assert [(i["service"], i["port"]) for i in every] == [("orders", port)]
            one = client.get("/api/v1/port/services/orders")
            assert one.status_code == 200
            assert one.json()["service"] == "orders"
            assert [i["port"] for i in one.json()["instances"]] == [port]
            assert client.get("/api/v1/port/services/api").status_code == 404
            assert client.get("/api/v1/port/services/bad name").status_code == 422
