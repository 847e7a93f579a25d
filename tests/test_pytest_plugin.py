"""The pytest plugin, run as a user runs it: a separate pytest (pytester) that
loads it from the installed package's `pytest11` entry point."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import pytest
from dynamic_port_manager import list_leases
from router_helpers import port_block

pytest_plugins = ["pytester"]

# The inner runs need none of the test environment's other plugins, and
# hypothesis + schemathesis alone take seconds to import in each process.
LEAN = ("-p", "no:cacheprovider", "-p", "no:schemathesis", "-p", "no:hypothesispytest")


@pytest.fixture(autouse=True)
def _private_temp(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, registry: Path) -> None:
    # The plugin's per-user state file lives under the temp folder: this test's.
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()


FIXTURES = """
import os, socket
from dynamic_port_manager import list_leases

def leases():
    return {l["port"]: l["pid"] for l in list_leases()}

def test_free_port_and_factory(free_port, free_port_factory):
    more = [free_port_factory(), free_port_factory()]
    ports = [free_port, *more]
    assert len(set(ports)) == 3
    assert all(isinstance(p, int) for p in ports)
    held = leases()
    assert all(held[p] == os.getpid() for p in ports)
    print("PORTS", *ports)

def test_listening_socket(listening_socket):
    port = listening_socket.getsockname()[1]
    assert listening_socket.getsockname()[0] == "127.0.0.1"
    assert leases()[port] == os.getpid()
    with socket.create_connection(("127.0.0.1", port), timeout=10):
        conn, _ = listening_socket.accept()
        conn.close()
    print("PORTS", port)
"""


def test_fixtures_lease_ports_of_the_range_and_release_them_at_teardown(
    pytester: pytest.Pytester, tmp_path: Path
) -> None:
    start, end = port_block(8)
    pytester.makeini(f"[pytest]\ndpm_port_range = {start}-{end}\n")
    pytester.makepyfile(test_fixtures=FIXTURES)
    result = pytester.runpytest_subprocess("-s", *LEAN)
    result.assert_outcomes(passed=2)
    printed = re.findall(r"PORTS ([\d ]+)", result.stdout.str())
    ports = [int(p) for found in printed for p in found.split()]
    assert len(ports) == 4 and all(start <= p <= end for p in ports)
    assert not {lease["port"] for lease in list_leases()} & set(ports), "released at teardown"
    # The state files are in a per-user folder of the temp folder, never in
    # the project, and go with the session.
    assert not list(pytester.path.rglob("*.json"))
    [folder] = (tmp_path / "tmp").glob("dynamic-port-manager-*-pytest")
    assert not list(folder.glob("*.json"))


def test_the_readme_example_passes(pytester: pytest.Pytester) -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("## The pytest plugin") :]
    [block] = re.findall(r"```python\n(.*?)```", section, re.S)[:1]
    start, end = port_block(4)
    pytester.makepyfile(test_readme=block)  # as pasted: its imports included
    result = pytester.runpytest_subprocess(*LEAN, "--dpm-port-range", f"{start}-{end}")
    result.assert_outcomes(passed=1)


RANGES = """
import os, socket
import pytest
from dynamic_port_manager import list_leases

def leases():
    return {l["port"]: l["pid"] for l in list_leases()}

def test_blocks(free_port_range, free_port):
    a = free_port_range(3)
    b = free_port_range(1)
    assert isinstance(a, range) and (a.step, len(a), len(b)) == (1, 3, 1)
    assert not set(a) & set(b) and free_port not in set(a) | set(b)
    held = leases()
    assert all(held[p] == os.getpid() for p in [*a, *b])
    print("PORTS", *a, *b, free_port)

def test_a_port_someone_listens_on_is_never_in_a_block(free_port_range):
    with socket.create_server(("127.0.0.1", int(os.environ["BUSY"]))):
        block = free_port_range(4)
    assert int(os.environ["BUSY"]) not in block
    print("PORTS", *block)

@pytest.mark.parametrize("n", [0, -1, True, 2.0])
def test_bad_sizes(free_port_range, n):
    with pytest.raises(ValueError, match="free_port_range: n must be an int >= 1"):
        free_port_range(n)

def test_too_long(free_port_range):
    from dynamic_port_manager import NoFreePortError
    with pytest.raises(NoFreePortError, match="no 7 consecutive free ports"):
        free_port_range(7)
"""


def test_free_port_range_leases_consecutive_blocks_and_releases_them(
    pytester: pytest.Pytester,
    free_port_range: Callable[[int], range],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    outer = free_port_range(6)
    # A listener on the second port: the one block of 4 left is the last 4.
    busy = outer.start + 1
    monkeypatch.setenv("BUSY", str(busy))
    pytester.makepyfile(test_ranges=RANGES)
    result = pytester.runpytest_subprocess(
        "-s", *LEAN, "--dpm-port-range", f"{outer.start}-{outer[-1]}"
    )
    result.assert_outcomes(passed=7)
    printed = re.findall(r"PORTS ([\d ]+)", result.stdout.str())
    blocks = [[int(p) for p in found.split()] for found in printed]
    assert all(set(block) <= set(outer) for block in blocks)
    assert blocks[1] == list(outer[2:])
    assert not {lease["port"] for lease in list_leases()} & set(outer), "released at teardown"


def test_the_command_line_option_wins_over_the_ini_file(pytester: pytest.Pytester) -> None:
    start, end = port_block(4)
    pytester.makeini("[pytest]\ndpm_port_range = 1-2\n")
    pytester.makepyfile(test_one="def test_it(free_port):\n    print('PORT', free_port)\n")
    result = pytester.runpytest_subprocess("-s", *LEAN, "--dpm-port-range", f"{start}-{end}")
    result.assert_outcomes(passed=1)
    [port] = map(int, re.findall(r"PORT (\d+)", result.stdout.str()))
    assert start <= port <= end


def test_a_bad_range_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_one="def test_it(free_port):\n    pass\n")
    result = pytester.runpytest_subprocess(*LEAN, "--dpm-port-range", "9-3")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "dpm_port_range" in "\n".join(result.errlines)


def test_dash_p_no_turns_it_off(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_one="def test_it(free_port):\n    pass\n")
    result = pytester.runpytest_subprocess(*LEAN, "-p", "no:dynamic_port_manager")
    result.assert_outcomes(errors=1)
    assert "fixture 'free_port' not found" in "\n".join(result.outlines)


# Each test starts a real server process on its port and listens, so any port
# another holder listens on (or is bound to) fails it. With SO_REUSEADDR, as
# servers set it: closed connections an earlier test left in TIME_WAIT on a
# port (the kernel keeps them 60 s, and no one holds them) are no collision.
SERVERS = """
import subprocess, sys
import pytest

SERVER = (
    "import socket, sys; s = socket.socket(); "
    "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
    "s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen(); print('served', sys.argv[1])"
)

@pytest.mark.parametrize("n", range(200))
def test_server(free_port, n):
    run = subprocess.run(
        [sys.executable, "-I", "-S", "-c", SERVER, str(free_port)],
        capture_output=True, text=True, timeout=60,
    )
    assert run.returncode == 0, run.stderr
"""


@pytest.mark.slow
def test_200_servers_under_xdist_never_collide(pytester: pytest.Pytester) -> None:
    pytest.importorskip("xdist")
    start, end = port_block(64)
    pytester.makepyfile(test_servers=SERVERS)
    result = pytester.runpytest_subprocess("-n", "4", *LEAN, "--dpm-port-range", f"{start}-{end}")
    output = "\n".join(result.outlines + result.errlines)
    assert not re.search(r"Address already in use|EADDRINUSE", output)
    result.assert_outcomes(passed=200)
