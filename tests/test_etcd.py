"""Discovery through a real etcd: each active port is a key on a lease of its
own, kept alive while its holder lives; etcd is never on a pick's path."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import api_ports
import dynamic_port_manager as dpm
import pytest
from dynamic_port_manager.discovery import EtcdClient, parse_discovery
from etcd_server import Etcd, etcd_binary
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from router_helpers import app_with, cli, port_block, wait_until

INTERVAL = 0.2  # seconds: a lease TTL of 1 s asked, etcd's minimum given

HOLDER = """
import sys, time
import dynamic_port_manager as dpm
m = dpm.DynamicPortManager(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], 0.2,
                           console_log=False, service="orders", discovery=sys.argv[4],
                           advertise_host="host-k")
print(m.pick_port(), flush=True)
time.sleep(300)
"""


@pytest.fixture
def etcd(tmp_path: Path, free_port_factory: Callable[[], int]) -> Iterator[Etcd]:
    server = Etcd(etcd_binary(), tmp_path / "etcd", free_port_factory(), free_port_factory())
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def _no_discovery_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DPM_DISCOVERY", "DPM_ADVERTISE_HOST"):
        monkeypatch.delenv(name, raising=False)


def keys(etcd: Etcd, service: str = "orders") -> dict[str, dict[str, Any]]:
    """The announcements of ``service`` as etcd has them now."""
    client = EtcdClient(parse_discovery(etcd.url))
    found = client.get_prefix(f"{etcd.prefix}/services/{service}/")
    return {key: json.loads(value) for key, value in found}


def key(etcd: Etcd, host: str, port: int, service: str = "orders") -> str:
    return f"{etcd.prefix}/services/{service}/{host}:{port}"


def announcing(
    etcd: Etcd, path: Path, host: str = "host-a", **options: Any
) -> dpm.DynamicPortManager:
    start, end = port_block()
    return dpm.DynamicPortManager(
        start,
        end,
        path,
        INTERVAL,
        console_log=False,
        service="orders",
        discovery=etcd.url,
        advertise_host=host,
        **options,
    )


def test_a_pick_is_announced_and_a_move_or_release_rewrites_at_once(
    etcd: Etcd, tmp_path: Path, registry: Path
) -> None:
    with announcing(etcd, tmp_path / "o.json") as m:
        first = m.pick_port()
        assert wait_until(lambda: list(keys(etcd)) == [key(etcd, "host-a", first)])
        value = keys(etcd)[key(etcd, "host-a", first)]
        assert {k: value[k] for k in ("host", "port", "pid", "service", "state_file")} == {
            "host": "host-a",
            "port": first,
            "pid": os.getpid(),
            "service": "orders",
            "state_file": str(m.state_path),
        }
        assert value["started"]
        status = m.discovery_status
        assert status is not None and status["up"] is True
        assert status["key"] == key(etcd, "host-a", first) and status["ttl"] >= 1

        moved = m.pick_port()
        assert wait_until(lambda: list(keys(etcd)) == [key(etcd, "host-a", moved)])
        m.release_port()
        assert wait_until(lambda: keys(etcd) == {})
        again = m.pick_port()
        assert wait_until(lambda: list(keys(etcd)) == [key(etcd, "host-a", again)])
    # stop() (the with block's end) revokes before it returns.
    assert keys(etcd) == {}


@pytest.mark.slow
def test_a_killed_holder_s_key_expires_with_its_lease(
    etcd: Etcd, tmp_path: Path, registry: Path
) -> None:
    start, end = port_block()
    child = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(start), str(end), str(tmp_path / "k.json"), etcd.url],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        port = int(child.stdout.readline())
        assert wait_until(lambda: list(keys(etcd)) == [key(etcd, "host-k", port)])
        instances = dpm.lookup("orders", etcd.url)
        assert [(i["host"], i["port"], i["pid"]) for i in instances] == [
            ("host-k", port, child.pid)
        ]
        # Alive past several TTLs: the lease is kept alive.
        client = EtcdClient(parse_discovery(etcd.url))
        lease_ttl = client.grant(1)[1]  # etcd's smallest TTL, what the holder got
        assert not wait_until(lambda: keys(etcd) == {}, timeout=3 * lease_ttl)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    # No revoke came: etcd drops the key when the lease runs out.
    assert wait_until(lambda: keys(etcd) == {}, timeout=3 * lease_ttl + 5)


def test_a_holder_that_exits_withdraws_its_key_on_the_way_out(
    etcd: Etcd, tmp_path: Path, registry: Path
) -> None:
    start, end = port_block()
    exits = HOLDER.replace("time.sleep(300)", "sys.stdin.readline()")
    child = subprocess.Popen(
        [sys.executable, "-c", exits, str(start), str(end), str(tmp_path / "e.json"), etcd.url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None and child.stdin is not None
    port = int(child.stdout.readline())
    assert wait_until(lambda: list(keys(etcd)) == [key(etcd, "host-k", port)])
    child.stdin.close()  # the script ends: a normal interpreter exit
    assert child.wait(30) == 0
    # Revoked at exit, not left to the TTL (etcd's smallest is 2 s).
    assert keys(etcd) == {}


def _discovery_up(client: TestClient) -> list[float]:
    text = client.get("/api/v1/port/metrics").text
    return [
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "dpm_discovery_up" and s.labels == {"service": "orders"}
    ]


def test_picks_go_on_while_etcd_is_down_and_the_key_returns_with_it(
    etcd: Etcd, tmp_path: Path, registry: Path
) -> None:
    with announcing(etcd, tmp_path / "o.json") as m:
        client = TestClient(app_with(api_ports.create_router(m)))
        first = m.pick_port()
        assert wait_until(lambda: list(keys(etcd)) == [key(etcd, "host-a", first)])
        assert _discovery_up(client) == [1.0]

        etcd.stop()
        ports = [m.pick_port() for _ in range(5)]
        # Each pick moved (to the lowest free port, the previous one given back).
        assert all(a != b for a, b in zip(ports, ports[1:])) and m.active_port == ports[-1]
        assert m.release_port() is True
        current = m.pick_port()
        assert wait_until(lambda: (m.discovery_status or {}).get("up") is False)
        state = m.get_state()
        assert state["discovery"]["up"] is False
        assert "etcd unreachable" in state["last_error"]
        assert state["error_active"] is True and state["last_error_time"]
        assert _discovery_up(client) == [0.0]

        etcd.start()
        # The current port is announced again, the ones picked meanwhile never
        # were, and the first one's lease was revoked or runs out.
        assert wait_until(lambda: list(keys(etcd)) == [key(etcd, "host-a", current)], 30)
        assert wait_until(lambda: (m.discovery_status or {}).get("up") is True)
        assert m.get_state()["last_error"] is None
        assert _discovery_up(client) == [1.0]


def test_a_lease_etcd_lost_is_granted_anew(etcd: Etcd, tmp_path: Path, registry: Path) -> None:
    with announcing(etcd, tmp_path / "o.json") as m:
        port = m.pick_port()
        assert wait_until(lambda: list(keys(etcd)) == [key(etcd, "host-a", port)])
        etcd.stop()
        etcd.wipe()  # a new etcd: every lease and key gone
        etcd.start()
        # (Not "keys(etcd) == {}" first: the announcer may already be back.)
        assert wait_until(lambda: list(keys(etcd)) == [key(etcd, "host-a", port)])


def test_two_hosts_announcing_one_service_are_both_found(
    etcd: Etcd, tmp_path: Path, registry: Path, cli_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The second "host" takes its address and name from the environment.
    monkeypatch.setenv("DPM_DISCOVERY", etcd.url)
    monkeypatch.setenv("DPM_ADVERTISE_HOST", "host-b")
    start, end = port_block()
    with (
        announcing(etcd, tmp_path / "a.json", host="host-a") as a,
        dpm.DynamicPortManager(
            start, end, tmp_path / "dynamic_ports_orders.json", INTERVAL, console_log=False
        ) as b,
    ):
        assert b.discovery == etcd.url and b.service == "orders"
        pa, pb = a.pick_port(), b.pick_port()
        expected = [("host-a", pa), ("host-b", pb)]
        assert wait_until(lambda: len(keys(etcd)) == 2)
        found = dpm.lookup("orders", etcd.url)
        assert [(i["host"], i["port"]) for i in found] == expected
        assert {i["source"] for i in found} == {"etcd"}
        # $DPM_DISCOVERY is the default of lookup too; "" asks this host only.
        assert [(i["host"], i["port"]) for i in dpm.lookup("orders")] == expected
        assert {i["source"] for i in dpm.lookup("orders", "")} == {"local"}

        shown = cli("lookup", "orders", "--discovery", etcd.url, "--json")
        assert shown.returncode == 0, shown.stderr
        assert [(i["host"], i["port"]) for i in json.loads(shown.stdout)] == expected
        assert cli("lookup", "billing", "--discovery", etcd.url).returncode == 1

        with TestClient(app_with(api_ports.create_router(a))) as client:
            body = client.get("/api/v1/port/services/orders").json()
            assert [(i["host"], i["port"]) for i in body["instances"]] == expected


def test_user_and_password_authenticate(etcd: Etcd, tmp_path: Path, registry: Path) -> None:
    admin = EtcdClient(parse_discovery(etcd.url))
    admin.call("/v3/auth/role/add", {"name": "root"})
    admin.call("/v3/auth/user/add", {"name": "root", "password": "s3cret"})
    admin.call("/v3/auth/user/grant", {"user": "root", "role": "root"})
    admin.call("/v3/auth/enable", {})
    with pytest.raises(dpm.DiscoveryError, match="user name is empty|not provided|permission"):
        dpm.lookup("orders", etcd.url)
    with pytest.raises(dpm.DiscoveryError, match="authentication failed"):
        dpm.lookup("orders", etcd.url.replace("etcd://", "etcd://root:wrong@"))
    url = etcd.url.replace("etcd://", "etcd://root:s3cret@")
    start, end = port_block()
    with dpm.DynamicPortManager(
        start,
        end,
        tmp_path / "o.json",
        INTERVAL,
        console_log=False,
        service="orders",
        discovery=url,
        advertise_host="host-a",
    ) as m:
        port = m.pick_port()
        assert wait_until(lambda: [i["port"] for i in dpm.lookup("orders", url)] == [port])
        assert "s3cret" not in str(m.get_state())


def test_a_lookup_with_etcd_down_is_an_os_error_naming_it(free_port: int) -> None:
    with pytest.raises(dpm.DiscoveryError, match="etcd unreachable"):
        dpm.lookup("orders", f"etcd://127.0.0.1:{free_port}/dpm")
    result = cli("lookup", "orders", "--discovery", f"etcd://127.0.0.1:{free_port}")
    assert result.returncode == 1 and "etcd unreachable" in result.stderr


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("http://127.0.0.1:2379", "scheme must be etcd://"),
        ("etcd://", "without a host"),
        ("etcd://h:99999", "out of range"),
        ("etcd://a:1/x,etcd://b:1/y", "different prefixes"),
        ("etcd://a:1?cacert=/x", "need etcds://"),
        ("etcds://a:1?cert=/x", "cert and key go together"),
        ("etcd://a:1?bogus=1", "unknown option"),
        ("etcd://a:1?timeout=0", "timeout"),
    ],
)
def test_a_bad_address_is_a_value_error_naming_discovery(
    tmp_path: Path, registry: Path, address: str, why: str
) -> None:
    with pytest.raises(ValueError, match=f"discovery: .*{why}"):
        dpm.DynamicPortManager(*port_block(), tmp_path / "x.json", discovery=address)
    assert not (tmp_path / "x.json").exists()


def test_addresses_take_several_endpoints_credentials_and_tls_options() -> None:
    config = parse_discovery("etcds://u:p%40ss@a:1,b/pre/fix?cacert=/ca.pem&timeout=0.5")
    assert config.endpoints == (("a", 1), ("b", 2379))
    assert (config.tls, config.prefix, config.cacert) == (True, "/pre/fix", "/ca.pem")
    assert (config.user, config.password, config.timeout) == ("u", "p@ss", 0.5)
    assert "p@ss" not in repr(config) and "p@ss" not in config.describe()
    listed = parse_discovery("etcd://a:1/dpm, etcd://[::1]:2")
    assert listed.endpoints == (("a", 1), ("::1", 2)) and listed.prefix == "/dpm"
    assert parse_discovery("etcd://a").prefix == "/dpm"


def test_the_ttl_is_three_refresh_intervals_or_as_given(
    etcd: Etcd, tmp_path: Path, registry: Path
) -> None:
    start, end = port_block()
    with dpm.DynamicPortManager(
        start, end, tmp_path / "t.json", 4, console_log=False, discovery=etcd.url
    ) as m:
        m.pick_port()
        assert wait_until(lambda: (m.discovery_status or {}).get("key") is not None)
        assert (m.discovery_status or {})["ttl"] == 12
    with announcing(etcd, tmp_path / "o.json", discovery_ttl=7) as m:
        m.pick_port()
        assert wait_until(lambda: (m.discovery_status or {}).get("key") is not None)
        assert (m.discovery_status or {})["ttl"] == 7
    for bad in (0, -1, True, 1.5, 86_401):
        with pytest.raises(ValueError, match="discovery_ttl: must be whole seconds"):
            announcing(etcd, tmp_path / "x.json", discovery_ttl=bad)
