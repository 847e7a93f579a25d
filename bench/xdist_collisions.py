"""Benchmark: port collisions of a pytest-xdist suite, plugin vs socket.bind(0).

Run against the installed wheel (pytest-xdist installed):
    python bench/xdist_collisions.py [--tests 200] [--workers 4] [--rounds 3]

Writes one suite in a temporary folder: each test gets a port, starts a real
server process on it (bind without SO_REUSEADDR, listen, accept one client,
hold it ``--hold`` seconds) and connects to it. The suite runs under
``pytest -n WORKERS`` twice per round: ports from the plugin's ``free_port``
fixture (the host-wide registry), and ports from the common idiom of binding
port 0, reading the port the kernel chose and closing the socket before the
server binds it. Prints, per strategy, the tests whose server could not bind
(EADDRINUSE) and the wall time. Asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFTEST = """
import socket
import pytest

@pytest.fixture
def bind0_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
"""

SUITE = """
import socket, subprocess, sys, time
import pytest

SERVER = '''
import socket, sys, time
s = socket.socket()
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen()
print("up", flush=True)
conn, _ = s.accept()
time.sleep(float(sys.argv[2]))
'''

@pytest.mark.parametrize("n", range({tests}))
def test_server(request, n):
    port = request.getfixturevalue("{fixture}")
    server = subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", SERVER, str(port), "{hold}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    line = server.stdout.readline()
    if line.strip() != "up":
        server.wait(timeout=60)
        pytest.fail("server could not bind: " + server.stderr.read().strip().splitlines()[-1])
    with socket.create_connection(("127.0.0.1", port), timeout=30):
        assert server.wait(timeout=60) == 0
"""


STRATEGIES = (("free_port (plugin)", "free_port"), ("bind(0)+close", "bind0_port"))


def run(folder: Path, fixture: str, args: argparse.Namespace) -> tuple[int, int, int, float]:
    (folder / "test_suite.py").write_text(
        SUITE.format(tests=args.tests, fixture=fixture, hold=args.hold)
    )
    command = [sys.executable, "-m", "pytest", "-q", "-n", str(args.workers)]
    command += ["-p", "no:cacheprovider", "-p", "no:schemathesis", "-p", "no:hypothesispytest"]
    command += ["--dpm-port-range", args.range, "-rf"]
    if args.ephemeral:
        low, _, high = args.ephemeral.partition("-")
        script = 'ip link set lo up && echo "$1 $2" > /proc/sys/net/ipv4/ip_local_port_range'
        script += ' && shift 2 && exec "$@"'
        command = ["unshare", "-n", "sh", "-c", script, "sh", low, high, *command]
    started = time.monotonic()
    done = subprocess.run(
        command,
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=1800,
        env={**os.environ, "COLUMNS": "400"},  # whole summary lines
    )
    elapsed = time.monotonic() - started
    output = done.stdout + done.stderr
    collided = len(re.findall(r"FAILED .*server could not bind: .*Address already in use", output))
    failed = len(re.findall(r"^FAILED ", output, re.MULTILINE))
    passed = int(m.group(1)) if (m := re.search(r"(\d+) passed", output)) else 0
    return passed, collided, failed - collided, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tests", type=int, default=200)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hold", type=float, default=0.05, help="seconds each server holds")
    parser.add_argument("--range", default="20000-29999", help="the plugin's port range")
    parser.add_argument(
        "--ephemeral",
        metavar="LOW-HIGH",
        help="run in a network namespace with this ephemeral range",
    )
    args = parser.parse_args()
    where = f"ephemeral range {args.ephemeral} (private netns)" if args.ephemeral else "this host"
    print(
        f"{args.tests} tests x {args.rounds} rounds, pytest -n {args.workers}, "
        f"each server holds its port {args.hold}s, {where}"
    )
    totals: dict[str, list[int]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "conftest.py").write_text(CONFTEST)
        os.environ["DPM_REGISTRY_DIR"] = str(folder / "registry")
        for round_ in range(1, args.rounds + 1):
            for label, fixture in (
                ("free_port (plugin)", "free_port"),
                ("bind(0)+close", "bind0_port"),
            ):
                passed, collided, other, elapsed = run(folder, fixture, args)
                total = totals.setdefault(label, [0, 0, 0])
                total[0] += args.tests
                total[1] += collided
                total[2] += other
                print(
                    f"round {round_}  {label:<20} passed={passed:>4}/{args.tests}"
                    f"  server EADDRINUSE={collided:>3}  other failures={other:>3}"
                    f"  {elapsed:5.1f}s"
                )
    for label, (tests, collided, other) in totals.items():
        print(
            f"total  {label:<20} {collided} of {tests} servers found their port taken"
            f" (and {other} tests failed otherwise: no port to get, no port to connect from)"
        )


if __name__ == "__main__":
    main()
