"""Arguments from careless or hostile callers (issue 7, item 11): every bad value is
a ValueError or TypeError that names its argument, never an OverflowError, a
lease for a process that is not one, a spinning refresh thread or a path that can
never be saved; str, bytes and os.PathLike paths are taken alike."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from api_ports.settings import ManagerSettings
from dynamic_port_manager import (
    DynamicPortManager,
    NoFreePortError,
    list_backups,
    list_leases,
    port_owners,
    read_state,
    release_lease,
)
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from router_helpers import cli, port_block

HUGE = [2**31, 2**32, 2**63, 2**64, 10**400, -(2**63) - 1, -(10**400)]


@pytest.fixture
def manager(tmp_path: Path, registry: Path) -> Iterator[DynamicPortManager]:
    start, end = port_block(8)
    m = DynamicPortManager(start, end, tmp_path / "s.json", console_log=False)
    yield m
    m.stop()


def leased_ports() -> set[int]:
    return {lease["port"] for lease in list_leases()}


class BytesPath:
    """An os.PathLike that gives bytes, as os.fsdecode accepts."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw

    def __fspath__(self) -> bytes:
        return self.raw


# ---------------------------------------------------------------- pid


# "own+2**32": this process's pid plus 2**32, made inside the test so that the
# test's id is the same in every process (pytest-xdist collects in each worker).
@pytest.mark.parametrize("pid", [0, -1, -(2**31), 2**32, "own+2**32", *HUGE])
def test_a_pid_that_names_no_single_process_is_a_value_error(
    manager: DynamicPortManager, pid: int | str
) -> None:
    if pid == "own+2**32":
        pid = 2**32 + os.getpid()
    # pid 0 and -1 mean "my process group" / "every process" to kill(2): they
    # passed as running, and the port was then handed out again.
    with pytest.raises(ValueError, match=r"^pid: "):
        manager.pick_port(pid=pid)
    assert leased_ports() == set()
    assert manager.get_state()["history"] == []


@pytest.mark.parametrize("pid", [False, True, 1.0, "1", [1]])
def test_a_pid_that_is_not_an_int_is_a_type_error(manager: DynamicPortManager, pid: Any) -> None:
    # pid=True used to lease the port to pid 1 (init), pid=False to pid 0.
    with pytest.raises(TypeError, match=r"^pid: "):
        manager.pick_port(pid=pid)
    assert leased_ports() == set()


def test_a_pid_beyond_pid_max_is_refused_with_the_limit(manager: DynamicPortManager) -> None:
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    with pytest.raises(ValueError, match=rf"^pid: .*\b{pid_max - 1}\b"):
        manager.pick_port(pid=pid_max)


@pytest.mark.parametrize(("pid", "error"), [(0, ValueError), (-1, ValueError), (True, TypeError)])
def test_pick_socket_takes_pid_as_pick_port_does(
    manager: DynamicPortManager, pid: Any, error: type[Exception]
) -> None:
    with pytest.raises(error, match=r"^pid: "):
        manager.pick_socket(pid=pid)
    assert leased_ports() == set()


@pytest.mark.parametrize(("ports", "error"), [([2**64], ValueError), ([True], TypeError)])
def test_owners_name_the_ports_argument(
    manager: DynamicPortManager, ports: list[Any], error: type[Exception]
) -> None:
    with pytest.raises(error, match=r"^ports: "):
        manager.owners(ports)
    with pytest.raises(error, match=r"^ports: "):
        port_owners(ports)


def test_a_real_pid_still_works(manager: DynamicPortManager) -> None:
    port = manager.pick_port(pid=os.getpid())
    assert leased_ports() == {port}


# ---------------------------------------------------------------- numbers


OUT_OF_RANGE = [
    *(("start", v) for v in HUGE),
    *(("end", v) for v in HUGE),
    # Counts are bounds (2**32 history entries is a legal, if odd, bound).
    *((name, v) for name in ("history_max", "backup_max") for v in (-1, 2**64, *HUGE[4:])),
]


@pytest.mark.parametrize(("argument", "value"), OUT_OF_RANGE)
def test_out_of_range_integers_are_value_errors_never_overflow_errors(
    tmp_path: Path, registry: Path, argument: str, value: int
) -> None:
    kwargs: dict[str, Any] = {"json_path": tmp_path / "s.json", "console_log": False}
    kwargs[argument] = value
    with pytest.raises(ValueError, match=rf"^{argument}: "):
        DynamicPortManager(**kwargs)


@pytest.mark.parametrize(
    "value", [10**400, -(10**400), 2**1024, 1e-9, 0.049, 0, 2**32, 86_400 * 366, 1e308]
)
def test_a_refresh_interval_out_of_range_is_a_value_error(
    tmp_path: Path, registry: Path, value: float
) -> None:
    # 10**400 raised OverflowError (int too large to convert to float); 1e-9
    # was accepted and the refresh thread saved 2,000 times in 3 s.
    path = tmp_path / "s.json"
    with pytest.raises(ValueError, match=r"^refresh_interval: "):
        DynamicPortManager(21000, 21001, path, refresh_interval=value, console_log=False)
    assert not path.exists()


def test_a_refresh_interval_without_a_float_value_is_a_value_error_naming_it(
    tmp_path: Path, registry: Path
) -> None:
    with pytest.raises(ValueError, match=r"^refresh_interval: "):
        DynamicPortManager(21000, 21001, tmp_path / "s.json", refresh_interval=Decimal("sNaN"))
    with pytest.raises(ValueError, match=r"^refresh_interval: "):
        DynamicPortManager(21000, 21001, tmp_path / "s.json", refresh_interval=Fraction(10**400))


def test_the_refresh_interval_floor_is_named_in_the_error(tmp_path: Path, registry: Path) -> None:
    with pytest.raises(ValueError, match=r"0\.05"):
        DynamicPortManager(21000, 21001, tmp_path / "s.json", refresh_interval=0.01)


@pytest.mark.parametrize("value", [True, False, "10", b"10", None, [10], 1j])
def test_a_refresh_interval_that_is_no_number_is_a_type_error(
    tmp_path: Path, registry: Path, value: Any
) -> None:
    with pytest.raises(TypeError, match=r"^refresh_interval: "):
        DynamicPortManager(21000, 21001, tmp_path / "s.json", refresh_interval=value)


def test_the_refresh_interval_floor_itself_is_accepted(tmp_path: Path, registry: Path) -> None:
    start, end = port_block(2)
    with DynamicPortManager(
        start, end, tmp_path / "s.json", refresh_interval=0.05, console_log=False
    ) as m:
        assert m.get_state()["options"]["refresh_interval"] == 0.05


@pytest.mark.parametrize("port", [70000, 65536, 0, -1, 2**32, 2**64, 10**400])
def test_release_lease_of_a_port_out_of_range_is_a_value_error(registry: Path, port: int) -> None:
    with pytest.raises(ValueError, match=r"^port: "):
        release_lease(port)


def test_release_lease_of_a_bool_is_a_type_error(registry: Path) -> None:
    with pytest.raises(TypeError, match=r"^port: "):
        release_lease(True)


# ---------------------------------------------------------------- paths


def nul_paths(base: Path) -> list[Any]:
    text = str(base / "a\0b.json")
    return [text, os.fsencode(text), BytesPath(os.fsencode(text)), Path(text)]


def test_a_json_path_with_a_nul_byte_is_a_value_error(tmp_path: Path, registry: Path) -> None:
    # It was accepted, and then no save ever succeeded.
    for path in nul_paths(tmp_path):
        with pytest.raises(ValueError, match=r"^json_path: .*NUL"):
            DynamicPortManager(21000, 21001, path, console_log=False)
        with pytest.raises(ValueError, match=r"^json_path: .*NUL"):
            read_state(21000, 21001, path)
        with pytest.raises(ValueError, match=r"^json_path: .*NUL"):
            list_backups(path)
    assert not list(tmp_path.glob("a*"))


def test_a_registry_dir_with_a_nul_byte_is_a_value_error(tmp_path: Path, registry: Path) -> None:
    for path in nul_paths(tmp_path):
        with pytest.raises(ValueError, match=r"^registry_dir: .*NUL"):
            DynamicPortManager(21000, 21001, tmp_path / "s.json", registry_dir=path)
        with pytest.raises(ValueError, match=r"^registry_dir: .*NUL"):
            read_state(21000, 21001, tmp_path / "s.json", registry_dir=path)
        with pytest.raises(ValueError, match=r"^registry_dir: .*NUL"):
            list_leases(registry_dir=path)
        with pytest.raises(ValueError, match=r"^registry_dir: .*NUL"):
            release_lease(21000, registry_dir=path)
        with pytest.raises(ValueError, match=r"^registry_dir: .*NUL"):
            port_owners([21000], registry_dir=path)


@pytest.mark.parametrize("value", [3, 1.5, ["a.json"], bytearray(b"a.json"), object()])
def test_a_path_of_another_type_is_a_type_error_naming_it(
    tmp_path: Path, registry: Path, value: Any
) -> None:
    with pytest.raises(TypeError, match=r"^json_path: "):
        DynamicPortManager(21000, 21001, value)
    with pytest.raises(TypeError, match=r"^registry_dir: "):
        list_leases(registry_dir=value)


def test_a_str_that_cannot_name_a_file_is_a_value_error(tmp_path: Path, registry: Path) -> None:
    # A lone surrogate that surrogateescape did not make: no bytes to give the OS.
    with pytest.raises(ValueError, match=r"^json_path: "):
        DynamicPortManager(21000, 21001, str(tmp_path / "\ud800.json"))


def test_bytes_and_path_like_paths_name_the_same_file_as_str(
    tmp_path: Path, registry: Path
) -> None:
    # Bytes were refused ("'bytes' object is not an instance of 'str'"). A name
    # that is not UTF-8 must stay that exact name, as os.fsdecode keeps it.
    raw = os.fsencode(tmp_path) + b"/st\xff\xfeate.json"
    start, end = port_block(4)
    forms: list[Any] = [raw, BytesPath(raw), os.fsdecode(raw), Path(os.fsdecode(raw))]
    saved = 0
    for form in forms:
        with DynamicPortManager(start, end, form, console_log=False) as m:
            assert os.fsencode(m.state_path) == raw
            assert m.get_state()["change_count"] == saved  # the same file each time
            m.pick_port()
        saved = json.loads(Path(os.fsdecode(raw)).read_bytes())["change_count"]
    assert saved >= len(forms)
    assert os.listdir(os.fsencode(tmp_path)).count(b"st\xff\xfeate.json") == 1
    assert read_state(start, end, raw)["change_count"] == saved
    assert read_state(start, end, BytesPath(raw))["change_count"] == saved
    assert list_backups(raw) == list_backups(os.fsdecode(raw)) != []


def test_bytes_registry_dirs_are_taken_by_every_function(tmp_path: Path, registry: Path) -> None:
    raw = os.fsencode(tmp_path) + b"/reg\xe9"  # Latin-1, not UTF-8
    start, end = port_block(2)
    with DynamicPortManager(
        start, end, tmp_path / "s.json", registry_dir=raw, console_log=False
    ) as m:
        assert os.fsencode(m.registry_dir) == raw
        port = m.pick_port()
        assert [lease["port"] for lease in list_leases(registry_dir=raw)] == [port]
        assert [lease["port"] for lease in list_leases(registry_dir=BytesPath(raw))] == [port]
        assert release_lease(port, registry_dir=raw)
        assert list_leases(registry_dir=raw) == []


# ---------------------------------------------------------------- callers


def test_the_router_settings_report_a_bad_interval_by_name(registry: Path, tmp_path: Path) -> None:
    env = {"DPM_JSON_PATH": str(tmp_path / "s.json")}
    for raw in ("1e-9", "1e400", "nan"):
        s = ManagerSettings.from_env({**env, "DPM_REFRESH_INTERVAL": raw})
        with pytest.raises(ValueError, match=r"^refresh_interval: "):
            s.create(console_log=False)
    s = ManagerSettings.from_env({**env, "DPM_START": "1" + "0" * 400})
    with pytest.raises(ValueError, match=r"^start: "):
        s.create(console_log=False)


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["pick", "--pid", "99999999"], {}, "pid: must be a process id between 1 and"),
        (["pick"], {"DPM_REFRESH_INTERVAL": "1e-9"}, "refresh_interval: must be a number"),
        (["pick"], {"DPM_REFRESH_INTERVAL": "1e400"}, "refresh_interval: must be a number"),
        (["pick"], {"DPM_HISTORY_MAX": "9" * 30}, "history_max: "),
    ],
)
def test_the_cli_reports_bad_input_clearly(
    tmp_path: Path, registry: Path, args: list[str], env: dict[str, str], expected: str
) -> None:
    done = cli(
        "--state",
        str(tmp_path / "s.json"),
        *args,
        env={**os.environ, "DPM_START": "21000", "DPM_END": "21001", **env},
    )
    assert done.returncode == 2, done
    assert done.stderr.startswith(f"dynamic-port-manager: error: {expected}"), done.stderr
    assert "Traceback" not in done.stderr


def test_the_cli_writes_control_characters_of_an_error_out(tmp_path: Path) -> None:
    # A registry under a regular file cannot be made; the error names the path.
    (tmp_path / "file").write_text("")
    forged = str(tmp_path / "file" / "x\n\x1b[31mFORGED\u2028")
    done = cli(
        "--state",
        str(tmp_path / "s.json"),
        "--range",
        "21000-21001",
        "pick",
        env={**os.environ, "DPM_REGISTRY_DIR": forged},
    )
    assert done.returncode == 1, done
    assert done.stderr.count("\n") == 1, done.stderr
    assert "\x1b" not in done.stderr and "\u2028" not in done.stderr
    assert r"x\n\x1b[31mFORGED\u2028" in done.stderr


# ---------------------------------------------------------------- any value at all

# File names, never "/", "." or "..", nor "backups" (the folder beside a state file).
NAMES = st.one_of(
    st.text(st.characters(exclude_characters="/", codec="utf-8"), max_size=40).map(os.fsencode),
    st.binary(max_size=40),  # also not UTF-8, also with NUL
).filter(lambda b: b"/" not in b and b not in (b"", b".", b"..", b"backups"))

# Values of every kind but text: any of them may be given for any argument.
# The values at the edges, drawn half of the time.
EDGES = [
    *(0, 1, -1, 65535, 65536, 2**31, 2**32, 2**63, 2**64, 10**400, -(10**400), 2**1024),
    *(float("nan"), float("inf"), -float("inf"), 0.05, 0.0499, 1e-9, 0.0, 1e308),
    *(True, False, None, "", b"", "1", b"\0", "\0"),
]
# Values of every kind but text: any of them may be given for any argument.
NOT_PATHS = st.one_of(
    st.sampled_from([e for e in EDGES if not isinstance(e, (str, bytes))]),
    st.one_of(
        st.integers(),
        st.floats(),
        st.complex_numbers(),
        st.decimals(),
        st.fractions(),
        st.lists(st.integers(), max_size=3),
        st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
        st.builds(object),
        st.builds(bytearray, st.binary(max_size=5)),
        st.sampled_from([int, ..., NotImplemented, range(3), memoryview(b"x"), print]),
    ),
)
# Text too, which as a path could point anywhere (as root, too): paths are
# drawn by `paths` below, always inside the test's folder.
ANYTHING = st.one_of(
    st.sampled_from(EDGES),
    st.one_of(NOT_PATHS, st.text(max_size=10), st.binary(max_size=10)),
)


def paths(base: Path) -> st.SearchStrategy[Any]:
    """Paths of files inside `base`, as str, bytes or PathLike."""
    names = NAMES.map(lambda b: os.fsencode(base) + b"/" + b)
    return st.one_of(
        names,
        names.map(os.fsdecode),
        names.map(lambda b: Path(os.fsdecode(b))),
        names.map(BytesPath),
    )


ALLOWED = (TypeError, ValueError)


def check_named(error: Exception, names: tuple[str, ...]) -> None:
    assert isinstance(error, ALLOWED), f"{type(error).__name__}: {error}"
    # pyo3's own conversions (bool arguments) name the argument in a note.
    text = " ".join([str(error), *getattr(error, "__notes__", [])])
    assert any(name in text for name in names), f"no argument named in {text!r}"


@pytest.fixture
def four_ports() -> tuple[int, int]:
    """Leased once for all the examples of a test (a fixture runs once per test)."""
    return port_block(4)


@pytest.mark.slow
@settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_the_constructor_raises_only_type_and_value_errors_for_any_value(
    tmp_path: Path,
    registry: Path,
    monkeypatch: pytest.MonkeyPatch,
    four_ports: tuple[int, int],
    data: st.DataObject,
) -> None:
    monkeypatch.chdir(tmp_path)  # json_path=None makes the default relative path here
    lo, hi = four_ports
    good: dict[str, Any] = {
        "start": lo,
        "end": hi,
        "json_path": data.draw(paths(tmp_path / "state"), label="json_path"),
        "refresh_interval": data.draw(st.floats(0.05, 3600), label="refresh_interval"),
        "history_max": 50,
        "backup_max": 3,
        "durable": False,
        "registry_dir": data.draw(st.sampled_from([registry, os.fsencode(registry)])),
        "console_log": False,
        "skip_unsafe": True,
    }
    # Mostly one or two odd arguments among good ones (so that the error has
    # to name that one), sometimes none: the manager starts and picks.
    odd = data.draw(st.sets(st.sampled_from(sorted(good)), max_size=3), label="odd")
    any_value = {
        # State files and registries in folders of their own, so that neither
        # can be the other (which is no argument error).
        "json_path": st.one_of(paths(tmp_path / "state"), NOT_PATHS),
        "registry_dir": st.one_of(paths(tmp_path / "registries"), NOT_PATHS),
    }
    kwargs = {
        name: data.draw(any_value.get(name, ANYTHING), label=name) if name in odd else value
        for name, value in good.items()
    }
    try:
        m = DynamicPortManager(**kwargs)
    except Exception as e:  # noqa: BLE001 - the class is what is tested
        event(f"refused: {type(e).__name__}")
        check_named(e, tuple(good))
        return
    event("started")
    try:
        # What started is usable: saved under a name the OS takes, refreshing
        # no faster than the floor.
        assert b"\0" not in os.fsencode(m.state_path)
        assert m.state_path.is_file()
        assert m.get_state()["options"]["refresh_interval"] >= 0.05
        pid = data.draw(st.one_of(st.just(os.getpid()), ANYTHING), label="pid")
        try:
            port = m.pick_port(pid=pid)
        except NoFreePortError:
            pass  # a range of one busy port: not an argument error
        except Exception as e:  # noqa: BLE001
            check_named(e, ("pid",))
        else:
            event("picked")
            assert pid is None or (isinstance(pid, int) and not isinstance(pid, bool) and pid >= 1)
            if pid is not None:
                release_lease(port)  # held by a live process: not released by stop()
    finally:
        m.stop()


@settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(pid=ANYTHING)
def test_pick_port_raises_only_type_and_value_errors_for_any_pid(
    manager: DynamicPortManager, pid: Any
) -> None:
    try:
        port = manager.pick_port(pid=pid)
    except NoFreePortError:
        return
    except Exception as e:  # noqa: BLE001
        check_named(e, ("pid",))
        return
    if pid is None:  # the manager's own pick
        manager.release_port()
        return
    # Only a live process gets a port, and it is one process.
    assert isinstance(pid, int) and not isinstance(pid, bool) and pid >= 1
    release_lease(port)
