"""The Python API of ``DynamicPortManager``: what a program using the class relies on.

Real sockets on 127.0.0.1 and ::1, a private lease registry per test (the
``registry`` fixture) and ports leased through the pytest plugin (``port_block``).
"""

from __future__ import annotations

import datetime as dt
import errno
import gc
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import dynamic_port_manager
import pytest
from dynamic_port_manager import (
    DynamicPortManager,
    ManagerStoppedError,
    NoFreePortError,
    list_leases,
)
from router_helpers import port_block
from spec_layout import EXTRA_KEYS, SPEC_KEYS

WEEKDAYS = ["doshanbe", "seshanbe", "chaharshanbe", "panjshanbe", "jome", "shanbe", "yekshanbe"]
JALALI_RE = re.compile(
    r"^(\d{4})/(\d{2})/(\d{2}) (\d{2}):(\d{2}) "
    r"(shanbe|yekshanbe|doshanbe|seshanbe|chaharshanbe|panjshanbe|jome)$"
)
BACKUP_RE = re.compile(r"^(?P<stem>.+)_(?P<date>\d{8})_(?P<time>\d{6})(?:_(?P<n>\d+))?\.json$")

Factory = Callable[..., DynamicPortManager]


def gregorian_to_jalali(gy: int, gm: int, gd: int) -> tuple[int, int, int]:
    """The arithmetic Solar Hijri conversion (independent of the core's ICU one)."""
    g_d_m = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334]
    gy2 = gy + 1 if gm > 2 else gy
    days = (
        355666
        + 365 * gy
        + (gy2 + 3) // 4
        - (gy2 + 99) // 100
        + (gy2 + 399) // 400
        + gd
        + g_d_m[gm - 1]
    )
    jy = -1595 + 33 * (days // 12053)
    days %= 12053
    jy += 4 * (days // 1461)
    days %= 1461
    if days > 365:
        jy += (days - 1) // 365
        days = (days - 1) % 365
    if days < 186:
        return jy, 1 + days // 31, 1 + days % 31
    return jy, 7 + (days - 186) // 30, 1 + (days - 186) % 30


def jalali_of(t: dt.datetime) -> str:
    y, m, d = gregorian_to_jalali(t.year, t.month, t.day)
    return f"{y:04}/{m:02}/{d:02} {t.hour:02}:{t.minute:02} {WEEKDAYS[t.weekday()]}"


# The SPEC's own example pins the helper: 2024-07-22 (a Monday) is 1403/05/01 doshanbe.
assert jalali_of(dt.datetime(2024, 7, 22, 12, 10)) == "1403/05/01 12:10 doshanbe"


def jalali_around(call: Callable[[], Any]) -> tuple[Any, set[str]]:
    """Runs ``call``; returns its result and the local Jalali minutes it may have seen."""
    before = dt.datetime.now()
    result = call()
    after = dt.datetime.now()
    return result, {jalali_of(before), jalali_of(after)}


def ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def listen(host: str, port: int) -> socket.socket:
    """A real listening socket on ``host:port`` (the test fails if the port is busy)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.bind((host, port))
        s.listen()
    except OSError as e:
        s.close()
        if e.errno == errno.EADDRINUSE:
            pytest.fail(f"port {port} is busy on this machine; the test needs it free")
        raise
    return s


HOSTS = [
    "127.0.0.1",
    pytest.param(
        "::1", marks=pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback here")
    ),
]


@pytest.fixture
def make(state_path: Path) -> Iterator[Factory]:
    """Creates managers (quiet, on the test's state file by default) and stops them all."""
    made: list[DynamicPortManager] = []

    def factory(*args: Any, **kwargs: Any) -> DynamicPortManager:
        kwargs.setdefault("console_log", False)
        if len(args) < 3:
            kwargs.setdefault("json_path", state_path)
        m = DynamicPortManager(*args, **kwargs)
        made.append(m)
        return m

    yield factory
    for m in made:
        m.stop()


def leased_ports() -> set[int]:
    return {lease["port"] for lease in list_leases()}


# ---------------------------------------------------------------- constructor


def test_defaults_are_the_original_modules(
    tmp_path: Path, registry: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    m = DynamicPortManager(console_log=False)
    try:
        assert (m.start, m.end) == (3000, 9000)
        assert m.state_path == tmp_path / "utils" / "port_state" / "dynamic_ports.json"
        assert m.state_path.is_file()
        state = m.get_state()
        assert state["settings"] == {
            "port_range": [3000, 9000],
            "json_path": "utils/port_state/dynamic_ports.json",
            "history_max": 50,
            "service": "dynamic_ports",
        }
        assert state["options"]["refresh_interval"] == 10.0
        assert state["options"]["backup_max"] == 20
        assert Path(state["options"]["registry_dir"]) == registry
        assert m.registry_dir == registry
        assert m.backup_dir == m.state_path.parent / "backups"
        assert m.active_port is None
        assert m.stopped is False
    finally:
        m.stop()


def test_positional_arguments_in_the_original_order(make: Factory, tmp_path: Path) -> None:
    base = port_block(10)[0]
    path = tmp_path / "svc" / "positional.json"
    m = make(base, base + 9, str(path), 2.5, 7)
    assert (m.start, m.end) == (base, base + 9)
    assert m.state_path == path
    state = m.get_state()
    assert state["settings"] == {
        "port_range": [base, base + 9],
        "json_path": str(path),
        "history_max": 7,
        "service": "positional",
    }
    assert state["options"]["refresh_interval"] == 2.5
    assert json.loads(path.read_text())["settings"]["port_range"] == [base, base + 9]


def test_keyword_arguments_and_path_objects(make: Factory, tmp_path: Path) -> None:
    base = port_block(10)[0]
    path = tmp_path / "kw.json"
    m = make(
        start=base,
        end=base + 9,
        json_path=path,
        refresh_interval=3,
        history_max=4,
        backup_max=2,
        durable=True,
    )
    state = m.get_state()
    assert state["settings"]["port_range"] == [base, base + 9]
    assert state["settings"]["history_max"] == 4
    assert state["options"]["backup_max"] == 2
    assert state["options"]["durable"] is True
    assert state["options"]["refresh_interval"] == 3.0
    assert m.state_path == path


def test_extra_options_are_keyword_only(registry: Path, tmp_path: Path) -> None:
    base = port_block(10)[0]
    with pytest.raises(TypeError):
        DynamicPortManager(base, base + 9, str(tmp_path / "s.json"), 10, 50, 20)  # type: ignore[misc]


def test_a_single_port_range_is_allowed(make: Factory) -> None:
    base = port_block(1)[0]
    m = make(base, base)
    assert m.pick_port() == base


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"start": 0}, "start"),
        ({"start": -1}, "start"),
        ({"start": 65536, "end": 65536}, "start"),
        ({"end": 65536}, "end"),
        ({"end": 0}, "end"),
        ({"start": 21041, "end": 21040}, "start"),
        ({"refresh_interval": 0}, "refresh_interval"),
        ({"refresh_interval": -1.5}, "refresh_interval"),
        ({"refresh_interval": float("nan")}, "refresh_interval"),
        ({"refresh_interval": float("inf")}, "refresh_interval"),
        ({"history_max": -1}, "history_max"),
        ({"backup_max": -1}, "backup_max"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_argument(
    registry: Path, tmp_path: Path, kwargs: dict[str, Any], argument: str
) -> None:
    path = tmp_path / "bad.json"
    with pytest.raises(ValueError, match=rf"\b{argument}\b"):
        DynamicPortManager(**{"json_path": path, "console_log": False, **kwargs})
    # Nothing was started: no state file, no lease.
    assert not path.exists()
    assert leased_ports() == set()


def test_start_greater_than_end_mentions_both(registry: Path, tmp_path: Path) -> None:
    base = port_block(2)[0]
    with pytest.raises(ValueError, match="start") as info:
        DynamicPortManager(base + 1, base, tmp_path / "s.json", console_log=False)
    assert "end" in str(info.value)


@pytest.mark.parametrize("argument", ["start", "end"])
def test_huge_integers_raise_value_error_naming_the_argument(
    registry: Path, tmp_path: Path, argument: str
) -> None:
    with pytest.raises(ValueError, match=argument):
        DynamicPortManager(
            **{argument: 2**64, "json_path": tmp_path / "s.json", "console_log": False}
        )


def test_history_max_zero_is_allowed(make: Factory) -> None:
    base = port_block(10)[0]
    m = make(base, base + 9, history_max=0)
    m.pick_port()
    m.pick_port()
    state = m.get_state()
    assert state["history"] == []
    assert state["change_count"] == 2


# ---------------------------------------------------------------- picking


def test_pick_returns_the_lowest_free_port_and_records_it(make: Factory) -> None:
    base = port_block(10)[0]
    m = make(base, base + 9)
    port = m.pick_port()
    assert port == base
    assert m.active_port == base
    state = m.get_state()
    assert state["current_port"] == base
    assert base in state["used_ports"] and base not in state["free_ports"]
    assert state["port_usage"] == {str(base): 1}
    assert state["change_count"] == 1
    assert [(h["prev"], h["new"]) for h in state["history"]] == [(None, base)]
    assert leased_ports() == {base}
    # The state file says the same as get_state().
    assert json.loads(m.state_path.read_text()) == state


def test_a_second_pick_moves_and_frees_the_old_port(make: Factory, tmp_path: Path) -> None:
    base = port_block(10)[0]
    m = make(base, base + 9)
    first = m.pick_port()
    second = m.pick_port()
    assert second != first
    assert base <= second <= base + 9
    assert m.active_port == second
    assert leased_ports() == {second}
    state = m.get_state()
    assert [(h["prev"], h["new"]) for h in state["history"]] == [
        (None, first),
        (first, second),
    ]
    assert state["port_usage"] == {str(first): 1, str(second): 1}
    assert state["change_count"] == 2
    assert first in state["free_ports"] and second in state["used_ports"]
    # The old port really is free again: another manager gets it.
    other = make(base, base + 9, json_path=tmp_path / "other.json")
    assert other.pick_port() == first


def test_two_managers_never_share_a_port(make: Factory, tmp_path: Path) -> None:
    base = port_block(10)[0]
    a = make(base, base + 9, json_path=tmp_path / "a.json")
    b = make(base, base + 9, json_path=tmp_path / "b.json")
    pa, pb = a.pick_port(), b.pick_port()
    assert pa != pb
    assert {pa, pb} == {base, base + 1}
    # b's state sees a's lease as used even though it is not b's port.
    assert pa in b.get_state()["used_ports"]


def test_release_returns_true_then_false(make: Factory, tmp_path: Path) -> None:
    base = port_block(10)[0]
    m = make(base, base + 9)
    assert m.release_port() is False
    port = m.pick_port()
    assert m.release_port() is True
    assert m.active_port is None
    assert m.release_port() is False
    state = m.get_state()
    assert state["current_port"] is None
    assert state["history"][-1]["prev"] == port
    assert state["history"][-1]["new"] is None
    assert port in state["free_ports"]
    assert leased_ports() == set()
    assert make(base, base + 9, json_path=tmp_path / "other.json").pick_port() == port


@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize("when", ["before", "after"])
def test_a_port_with_a_real_listener_is_never_picked(make: Factory, host: str, when: str) -> None:
    base = port_block(11)[0]
    base = base if host == "127.0.0.1" else base + 10
    base += 5 if when == "after" else 0
    if when == "before":
        listener = listen(host, base)
        m = make(base, base + 2)
    else:
        # The manager's first scan did not see the listener; the pick's probe must.
        m = make(base, base + 2)
        listener = listen(host, base)
    with listener:
        assert m.pick_port() == base + 1
        assert base in m.get_state()["used_ports"]
        assert m.pick_port() == base + 2


@pytest.mark.parametrize("host", HOSTS)
def test_a_listener_alone_in_the_range_means_no_free_port(make: Factory, host: str) -> None:
    base = port_block(2)[0]
    port = base if host == "127.0.0.1" else base + 1
    with listen(host, port):
        m = make(port, port)
        with pytest.raises(NoFreePortError):
            m.pick_port()
        assert m.active_port is None
    # Once the listener is gone the port is handed out.
    assert m.pick_port() == port


def test_no_free_port_when_listeners_and_other_managers_hold_the_range(
    make: Factory, tmp_path: Path
) -> None:
    base = port_block(4)[0]
    lo, hi = base, base + 3
    other = make(lo, hi, json_path=tmp_path / "other.json")
    held = other.pick_port()
    assert held == lo
    listeners = [listen("127.0.0.1", lo + 1)]
    if ipv6_loopback():
        listeners.append(listen("::1", lo + 2))
    else:
        listeners.append(listen("127.0.0.1", lo + 2))
    third = make(lo, hi, json_path=tmp_path / "third.json")
    try:
        assert third.pick_port() == hi
        m = make(lo, hi)
        with pytest.raises(NoFreePortError) as info:
            m.pick_port()
        assert isinstance(info.value, RuntimeError)
        assert str(lo) in str(info.value) and str(hi) in str(info.value)
        state = m.get_state()
        assert state["last_error"] is not None and "no free port" in state["last_error"]
        assert JALALI_RE.match(state["last_error_time"])
        assert state["current_port"] is None and m.active_port is None
        assert state["free_ports"] == []
        # A manager that frees its port makes it available again.
        assert other.release_port() is True
        assert m.pick_port() == lo
    finally:
        for s in listeners:
            s.close()


def test_a_time_wait_socket_does_not_make_a_port_used(make: Factory) -> None:
    base = port_block(1)[0]
    port = base
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", port))
    server.listen()
    client = socket.create_connection(("127.0.0.1", port), timeout=5)
    accepted, _ = server.accept()
    accepted.close()  # the server side closes first and keeps the TIME_WAIT
    client.close()
    server.close()
    # Wait (bounded) until only TIME_WAIT sockets remain on the port.
    deadline = time.monotonic() + 10
    while True:
        states = tcp_states(port)
        if states and states <= {"06"}:
            break
        if not states:
            pytest.skip("the kernel kept no TIME_WAIT socket for the port")
        assert time.monotonic() < deadline, f"port {port} stuck in states {states}"
        time.sleep(0.02)
    m = make(port, port)
    assert m.pick_port() == port


def tcp_states(port: int) -> set[str]:
    """The kernel's TCP state codes of sockets whose local port is ``port``."""
    states = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port:
                states.add(fields[3])
    return states


# ---------------------------------------------------------------- state


def test_get_state_has_exactly_the_spec_keys_and_types(make: Factory) -> None:
    base = port_block(11)[0]
    m = make(base, base + 9, history_max=10)
    m.pick_port()
    m.pick_port()
    state = m.get_state()
    assert set(state) == set(SPEC_KEYS) | set(EXTRA_KEYS)
    assert isinstance(state["current_port"], int)
    for key in ("free_ports", "used_ports"):
        assert isinstance(state[key], list)
        assert all(type(p) is int for p in state[key])
        assert state[key] == sorted(state[key])
    assert sorted(state["free_ports"] + state["used_ports"]) == list(range(base, base + 10))
    assert all(isinstance(k, str) and k.isdigit() for k in state["port_usage"])
    assert all(type(v) is int for v in state["port_usage"].values())
    assert isinstance(state["history"], list)
    for entry in state["history"]:
        assert set(entry) == {"time", "prev", "new"}
        assert JALALI_RE.match(entry["time"])
        assert entry["prev"] is None or type(entry["prev"]) is int
        assert entry["new"] is None or type(entry["new"]) is int
    assert JALALI_RE.match(state["last_checked"])
    assert type(state["change_count"]) is int
    assert state["last_error"] is None and state["last_error_time"] is None
    settings = state["settings"]
    assert set(settings) == {"port_range", "json_path", "history_max", "service"}
    assert settings["port_range"] == [base, base + 9]
    assert isinstance(settings["json_path"], str)
    assert settings["history_max"] == 10
    # Extras live under keys of their own.
    assert type(state["schema_version"]) is int
    assert isinstance(state["leases"], list)
    (lease,) = state["leases"]
    assert lease["port"] == state["current_port"]
    assert lease["pid"] == os.getpid()
    assert set(state["stats"]) >= {"picks", "releases", "errors"}
    assert state["stats"]["picks"] == 2
    assert set(state["options"]) >= {"refresh_interval", "backup_max", "durable", "registry_dir"}
    # The file on disk has the same layout.
    assert json.loads(m.state_path.read_text()) == state


def test_times_are_local_jalali(make: Factory) -> None:
    base = port_block(10)[0]
    m = make(base, base + 9)
    port, minutes = jalali_around(m.pick_port)
    state = m.get_state()
    assert state["history"][-1]["new"] == port
    assert state["history"][-1]["time"] in minutes
    assert state["last_checked"] in minutes


def test_a_second_manager_on_the_same_file_continues_history_and_counts(
    make: Factory, state_path: Path
) -> None:
    base = port_block(10)[0]
    first = make(base, base + 9)
    a = first.pick_port()
    b = first.pick_port()
    first.stop()
    before = first.get_state()
    assert before["change_count"] == 3  # two picks and the release at stop
    second = make(base, base + 9)
    state = second.get_state()
    assert state["change_count"] == 3
    assert state["history"] == before["history"]
    assert state["port_usage"] == {str(a): 1, str(b): 1}
    c = second.pick_port()
    assert c == base
    state = second.get_state()
    assert state["change_count"] == 4
    assert state["history"][:3] == before["history"]
    assert state["history"][3]["new"] == c
    assert state["port_usage"][str(c)] == before["port_usage"].get(str(c), 0) + 1
    assert json.loads(state_path.read_text())["change_count"] == 4


def test_two_live_managers_on_one_file_share_its_record(make: Factory, state_path: Path) -> None:
    base = port_block(10)[0]
    a = make(base, base + 9)
    b = make(base, base + 9)
    pa = a.pick_port()
    pb = b.pick_port()
    assert pa != pb
    pa2 = a.pick_port()
    on_disk = json.loads(state_path.read_text())
    assert on_disk["change_count"] == 3
    assert [(h["prev"], h["new"]) for h in on_disk["history"]] == [
        (None, pa),
        (None, pb),
        (pa, pa2),
    ]


def test_history_is_bounded_at_history_max(make: Factory) -> None:
    base = port_block(10)[0]
    m = make(base, base + 9, history_max=3)
    picked = [m.pick_port() for _ in range(7)]
    state = m.get_state()
    assert state["change_count"] == 7
    assert len(state["history"]) == 3
    # The newest three changes are kept, the oldest dropped.
    assert [(h["prev"], h["new"]) for h in state["history"]] == list(zip(picked[3:6], picked[4:7]))
    assert sum(state["port_usage"].values()) == 7
    assert len(json.loads(m.state_path.read_text())["history"]) == 3


def test_a_smaller_history_max_trims_a_longer_saved_history(
    make: Factory, state_path: Path
) -> None:
    base = port_block(10)[0]
    first = make(base, base + 9, history_max=10)
    for _ in range(5):
        first.pick_port()
    first.stop()
    second = make(base, base + 9, history_max=2)
    state = second.get_state()
    assert len(state["history"]) == 2
    assert state["history"] == first.get_state()["history"][-2:]
    assert state["change_count"] == 6


# ---------------------------------------------------------------- backups


def test_every_save_backs_up_the_previous_file_under_the_stem(make: Factory) -> None:
    base = port_block(10)[0]
    before = dt.datetime.now()
    m = make(base, base + 9, backup_max=50)
    snapshots = [json.loads(m.state_path.read_text())]
    for _ in range(4):
        m.pick_port()
        snapshots.append(json.loads(m.state_path.read_text()))
    after = dt.datetime.now()
    names = m.backups()
    on_disk = sorted(p.name for p in m.backup_dir.iterdir())
    assert sorted(names) == on_disk
    assert len(names) == len(set(names))
    stamps = {before.strftime("%Y%m%d_%H%M%S"), after.strftime("%Y%m%d_%H%M%S")}
    for name in names:
        match = BACKUP_RE.match(name)
        assert match, name
        assert match["stem"] == m.state_path.stem
        stamp = f"{match['date']}_{match['time']}"
        assert min(stamps) <= stamp <= max(stamps), (name, stamps)
    # Oldest first, and each one is the file as it was before a save: the newest
    # backup is the state just before the last pick.
    counts = [json.loads((m.backup_dir / n).read_text())["change_count"] for n in names]
    assert counts == sorted(counts)
    assert counts[-1] == 3
    assert json.loads((m.backup_dir / names[-1]).read_text()) == snapshots[-2]
    assert m.backup_path(names[-1]) == m.backup_dir / names[-1]


def test_backups_are_bounded_at_backup_max(make: Factory) -> None:
    base = port_block(10)[0]
    m = make(base, base + 9, backup_max=3)
    for _ in range(10):
        m.pick_port()
    names = m.backups()
    assert len(names) == 3
    assert len(list(m.backup_dir.iterdir())) == 3
    # The newest are kept.
    counts = [json.loads((m.backup_dir / n).read_text())["change_count"] for n in names]
    assert counts == [7, 8, 9]


def test_default_backup_max_is_twenty(make: Factory) -> None:
    base = port_block(10)[0]
    m = make(base, base + 9)
    for _ in range(25):
        m.pick_port()
    assert len(m.backups()) == 20


def test_backup_max_zero_keeps_no_backups(make: Factory) -> None:
    base = port_block(10)[0]
    m = make(base, base + 9, backup_max=0)
    for _ in range(3):
        m.pick_port()
    assert m.backups() == []
    assert not m.backup_dir.exists() or list(m.backup_dir.iterdir()) == []


def test_backup_path_names_only_this_files_backups(make: Factory, tmp_path: Path) -> None:
    base = port_block(10)[0]
    m = make(base, base + 9)
    m.pick_port()
    (name,) = m.backups()
    assert m.backup_path(name) == m.backup_dir / name
    assert m.backup_path("../" + name) is None
    assert m.backup_path(m.state_path.name) is None
    other = make(base, base + 9, json_path=m.state_path.parent / "other.json")
    other.pick_port()
    (other_name,) = other.backups()
    assert m.backup_path(other_name) is None
    assert m.backups() == [name]


# ---------------------------------------------------------------- log_json


def test_log_json_prints_one_ecs_line_and_returns_it(
    make: Factory, capsys: pytest.CaptureFixture[str]
) -> None:
    base = port_block(10)[0]
    m = make(base, base + 9)
    port = m.pick_port()
    capsys.readouterr()
    record, minutes = jalali_around(m.log_json)
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0]) == record
    stamp = dt.datetime.fromisoformat(record["@timestamp"])
    assert stamp.tzinfo is not None
    assert abs((dt.datetime.now(dt.timezone.utc) - stamp).total_seconds()) < 300
    assert record["log.level"] == "info"
    assert record["ecs.version"] == "8.11.0"
    assert record["event.action"]
    assert record["dpm.jalali_time"] in minutes
    assert record["dpm.active_port"] == port
    assert record["dpm.free_count"] == 9
    assert record["dpm.used_count"] == 1
    assert Path(record["dpm.state_file"]) == m.state_path
    assert record["dpm.change_count"] == 1


# ---------------------------------------------------------------- lifecycle


def test_stop_releases_the_port_and_is_idempotent(make: Factory, tmp_path: Path) -> None:
    base = port_block(10)[0]
    m = make(base, base + 9)
    port = m.pick_port()
    m.stop()
    assert m.stopped is True
    assert m.active_port is None
    assert leased_ports() == set()
    state = m.get_state()
    assert state["current_port"] is None
    assert state["history"][-1] == {"time": state["history"][-1]["time"], "prev": port, "new": None}
    m.stop()
    m.stop()
    assert m.get_state()["change_count"] == state["change_count"]
    assert make(base, base + 9, json_path=tmp_path / "o.json").pick_port() == port


def test_pick_after_stop_raises_manager_stopped_error(make: Factory) -> None:
    base = port_block(10)[0]
    m = make(base, base + 9)
    m.stop()
    with pytest.raises(ManagerStoppedError) as info:
        m.pick_port()
    assert isinstance(info.value, RuntimeError)
    assert "stop" in str(info.value)
    assert leased_ports() == set()


def test_context_manager_stops_on_exit(registry: Path, tmp_path: Path) -> None:
    base = port_block(10)[0]
    with DynamicPortManager(base, base + 9, tmp_path / "s.json", console_log=False) as m:
        assert isinstance(m, DynamicPortManager)
        port = m.pick_port()
        assert leased_ports() == {port}
    assert m.stopped
    assert leased_ports() == set()
    with pytest.raises(ManagerStoppedError):
        m.pick_port()


def test_context_manager_stops_when_the_body_raises(registry: Path, tmp_path: Path) -> None:
    base = port_block(10)[0]
    with pytest.raises(KeyError):
        with DynamicPortManager(base, base + 9, tmp_path / "s.json", console_log=False) as m:
            m.pick_port()
            raise KeyError("boom")
    assert m.stopped
    assert leased_ports() == set()


def test_repr_shows_range_file_port_and_status(make: Factory) -> None:
    base = port_block(10)[0]
    m = make(base, base + 9)
    port = m.pick_port()
    text = repr(m)
    assert text.startswith("DynamicPortManager(")
    for part in (str(base), str(base + 9), str(m.state_path), str(port), "stopped=False"):
        assert part in text, (part, text)
    m.stop()
    assert "stopped=True" in repr(m)


def test_the_package_exports_the_api() -> None:
    for name in (
        "DynamicPortManager",
        "NoFreePortError",
        "ManagerStoppedError",
        "RegistryError",
        "list_leases",
        "release_lease",
        "__version__",
    ):
        assert hasattr(dynamic_port_manager, name), name
    assert issubclass(dynamic_port_manager.RegistryError, OSError)
    assert issubclass(NoFreePortError, RuntimeError)
    assert issubclass(ManagerStoppedError, RuntimeError)


def test_list_and_release_lease(make: Factory) -> None:
    base = port_block(10)[0]
    m = make(base, base + 9)
    port = m.pick_port()
    (lease,) = list_leases()
    assert lease["port"] == port
    assert lease["pid"] == os.getpid()
    assert lease["alive"] is True
    assert dynamic_port_manager.release_lease(port) is True
    assert dynamic_port_manager.release_lease(port) is False
    assert list_leases() == []


def test_a_lease_names_its_holder_by_pid_and_start_time(make: Factory) -> None:
    base = port_block(10)[0]
    m = make(base, base + 9)
    m.pick_port()
    (lease,) = list_leases()
    stat = Path(f"/proc/{os.getpid()}/stat").read_text()
    start_time = int(stat[stat.rindex(")") + 2 :].split()[19])  # field 22
    assert lease["pid"] == os.getpid()
    assert lease["start_time"] == start_time


def test_an_explicit_registry_dir_is_used_instead_of_the_environment(
    make: Factory, tmp_path: Path, registry: Path
) -> None:
    base = port_block(10)[0]
    own = tmp_path / "own-registry"
    m = make(base, base + 9, registry_dir=own)
    assert m.registry_dir == own
    port = m.pick_port()
    assert [lease["port"] for lease in list_leases(registry_dir=own)] == [port]
    assert list_leases() == []
    assert m.get_state()["options"]["registry_dir"] == str(own)


def test_pick_for_another_pid_leases_the_port_to_that_process(
    make: Factory, tmp_path: Path
) -> None:
    base = port_block(10)[0]
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        m = make(base, base + 9)
        port = m.pick_port(pid=child.pid)
        assert port == base
        assert m.active_port is None
        (lease,) = list_leases()
        assert (lease["port"], lease["pid"], lease["alive"]) == (port, child.pid, True)
        # The manager's own pick gets another port; the pid's lease stays.
        assert m.pick_port() == base + 1
        assert sorted(lease["port"] for lease in list_leases()) == [base, base + 1]
        assert m.release_port() is True
        assert [lease["port"] for lease in list_leases()] == [port]
    finally:
        child.kill()
        child.wait(timeout=10)
    # The process is gone: its lease is dead and the port goes out again.
    other = make(base, base, json_path=tmp_path / "other.json")
    assert other.pick_port() == port


def test_pick_for_a_pid_that_does_not_exist_names_the_argument(make: Factory) -> None:
    base = port_block(10)[0]
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(timeout=30)
    m = make(base, base + 9)
    with pytest.raises(ValueError, match="pid"):
        m.pick_port(pid=gone.pid)
    assert list_leases() == []


def test_two_state_files_in_one_folder_keep_their_own_backups(
    make: Factory, tmp_path: Path
) -> None:
    base = port_block(10)[0]
    folder = tmp_path / "shared"
    a = make(base, base + 9, json_path=folder / "dynamic_ports.json", backup_max=2)
    b = make(base, base + 9, json_path=folder / "dynamic_ports_service1.json", backup_max=3)
    for _ in range(5):
        a.pick_port()
        b.pick_port()
    assert a.backup_dir == b.backup_dir
    assert len(a.backups()) == 2 and len(b.backups()) == 3
    assert all(BACKUP_RE.match(n)["stem"] == "dynamic_ports" for n in a.backups())
    assert all(BACKUP_RE.match(n)["stem"] == "dynamic_ports_service1" for n in b.backups())
    assert sorted(a.backups() + b.backups()) == sorted(p.name for p in a.backup_dir.iterdir())
    assert set(a.backups()).isdisjoint(b.backups())


def test_a_manager_dropped_without_stop_gives_its_lease_back(
    registry: Path, tmp_path: Path
) -> None:
    base = port_block(10)[0]
    m = DynamicPortManager(base, base + 9, tmp_path / "s.json", console_log=False)
    port = m.pick_port()
    assert leased_ports() == {port}
    del m
    gc.collect()
    deadline = time.monotonic() + 10
    while leased_ports():
        assert time.monotonic() < deadline, list_leases()
        time.sleep(0.01)


TZ_CHILD = """
import datetime as dt, json, sys
from dynamic_port_manager import DynamicPortManager

m = DynamicPortManager(int(sys.argv[2]), int(sys.argv[2]) + 9, sys.argv[1], console_log=False)
before = dt.datetime.now()
m.pick_port()
state = m.get_state()
record = m.log_json()
after = dt.datetime.now()
m.stop()
print(json.dumps({
    "before": before.isoformat(), "after": after.isoformat(),
    "offset": dt.datetime.now().astimezone().strftime("%z"),
    "time": state["history"][-1]["time"], "last_checked": state["last_checked"],
    "jalali": record["dpm.jalali_time"], "timestamp": record["@timestamp"],
}))
"""


@pytest.mark.parametrize("tz", ["Asia/Tehran", "Pacific/Kiritimati", "UTC"])
def test_times_follow_the_local_time_zone(registry: Path, tmp_path: Path, tz: str) -> None:
    if not Path("/usr/share/zoneinfo", tz).exists():
        pytest.skip(f"no zoneinfo for {tz} here")
    base = port_block(10)[0]
    env = {**os.environ, "TZ": tz}
    result = subprocess.run(
        [sys.executable, "-c", TZ_CHILD, str(tmp_path / "s.json"), str(base)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.splitlines()[-1])
    minutes = {
        jalali_of(dt.datetime.fromisoformat(out["before"])),
        jalali_of(dt.datetime.fromisoformat(out["after"])),
    }
    assert out["time"] in minutes
    assert out["last_checked"] in minutes
    assert out["jalali"] in minutes
    stamp = dt.datetime.fromisoformat(out["timestamp"])
    offset = stamp.strftime("%z")
    assert offset == out["offset"], (out["timestamp"], out["offset"])


def bound_only(port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", port))  # bound, never listening: a server about to start
    return s


def dual_stack(port: int) -> socket.socket:
    return socket.create_server(("::", port), family=socket.AF_INET6, dualstack_ipv6=True)


def v6_only_wildcard(port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind(("::", port))
    s.listen()
    return s


def v4_wildcard(port: int) -> socket.socket:
    return socket.create_server(("0.0.0.0", port))


NEEDS_V6 = pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 here")


@pytest.mark.parametrize(
    "opener",
    [
        bound_only,
        v4_wildcard,
        pytest.param(dual_stack, marks=NEEDS_V6),
        pytest.param(v6_only_wildcard, marks=NEEDS_V6),
    ],
    ids=["bound-not-listening", "0.0.0.0", "dual-stack-[::]", "v6only-[::]"],
)
def test_a_port_taken_by_any_socket_is_never_picked(
    make: Factory, opener: Callable[[int], socket.socket]
) -> None:
    base = port_block(2)[0]
    m = make(base, base + 1)
    with opener(base):
        assert m.pick_port() == base + 1
        lonely = make(base, base, json_path=m.state_path.with_name("lonely.json"))
        with pytest.raises(NoFreePortError):
            lonely.pick_port()


def test_a_relative_json_path_stays_where_it_was_when_the_cwd_changes(
    registry: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = port_block(10)[0]
    home = tmp_path / "service"
    elsewhere = tmp_path / "elsewhere"
    home.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(home)
    m = DynamicPortManager(base, base + 9, "state/ports.json", console_log=False)
    try:
        assert m.state_path == home / "state" / "ports.json"
        monkeypatch.chdir(elsewhere)
        port = m.pick_port()
        assert json.loads((home / "state" / "ports.json").read_text())["current_port"] == port
        assert list(elsewhere.iterdir()) == []
        assert m.get_state()["settings"]["json_path"] == "state/ports.json"
    finally:
        m.stop()


def test_a_pick_for_a_pid_is_recorded_without_breaking_the_active_port_chain(
    make: Factory,
) -> None:
    base = port_block(10)[0]
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        m = make(base, base + 9)
        first = m.pick_port()
        handed = m.pick_port(pid=child.pid)
        second = m.pick_port()
        state = m.get_state()
        pairs = [(h["prev"], h["new"]) for h in state["history"]]
        # Every pick is recorded; the one for another process has no prev and
        # does not break the chain of this manager's own active port.
        assert pairs == [(None, first), (None, handed), (first, second)]
        assert state["current_port"] == second
        assert state["change_count"] == 3
        assert state["port_usage"][str(handed)] == 1
    finally:
        child.kill()
        child.wait(timeout=10)
