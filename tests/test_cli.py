"""The `dynamic-port-manager` command line, through real subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from router_helpers import (
    LineReader,
    cli,
    cli_path,
    lease_on,
    listening,
    port_block,
    read_terminal,
)

SUBCOMMANDS = [
    "pick",
    "run",
    "state",
    "free",
    "used",
    "history",
    "backups",
    "who",
    "release",
    "serve",
]


pytestmark = pytest.mark.usefixtures("cli_env")


@pytest.fixture
def block() -> str:
    start, end = port_block()
    return f"{start}-{end}"


@pytest.mark.parametrize("command", [[], *([c] for c in SUBCOMMANDS)])
def test_every_command_has_help(command: list[str]) -> None:
    result = cli(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(" ".join(["usage: dynamic-port-manager", *command]))
    assert "--range" in result.stdout and "--state" in result.stdout


def test_pick_holds_the_port_for_the_caller_until_released(
    block: str, registry: Path, tmp_path: Path
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    result = cli("pick", "--range", block, cwd=work)
    assert result.returncode == 0, result.stderr
    port = int(result.stdout)
    start, end = map(int, block.split("-"))
    assert start <= port <= end
    lease = lease_on(port, registry)
    assert lease is not None and lease["pid"] == os.getpid()  # the CLI's parent: us
    # The CLI keeps its state per user, not in the working directory.
    assert list(work.iterdir()) == []
    assert (tmp_path / "xdg" / "dynamic-port-manager" / "dynamic_ports.json").is_file()

    assert cli("release", str(port)).returncode == 0
    assert lease_on(port, registry) is None
    again = cli("release", str(port))
    assert again.returncode == 1 and f"no lease on port {port}" in again.stderr


def test_port_from_a_shell_substitution_is_held_while_the_shell_lives(
    block: str, registry: Path
) -> None:
    script = f'PORT=$("{cli_path()}" pick --range {block}) && echo "$PORT $$" && read line'
    shell = subprocess.Popen(
        ["sh", "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        port, shell_pid = map(int, LineReader(shell.stdout).wait_for(" ").split())  # type: ignore[arg-type]
        lease = lease_on(port, registry)
        assert lease is not None and lease["pid"] == shell_pid == shell.pid
        # Held: a one-port range on it has nothing to give.
        assert cli("pick", "--range", f"{port}-{port}").returncode == 1
    finally:
        shell.communicate("\n", timeout=30)
    # The shell is gone: the next pick reclaims its port.
    result = cli("pick", "--range", f"{port}-{port}")
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) == port


def test_pick_for_a_pid_is_reclaimed_once_that_process_exits(block: str, registry: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    try:
        result = cli("pick", "--pid", str(holder.pid), "--range", block)
        assert result.returncode == 0, result.stderr
        port = int(result.stdout)
        lease = lease_on(port, registry)
        assert lease is not None and lease["pid"] == holder.pid
        busy = cli("pick", "--range", f"{port}-{port}")
        assert busy.returncode == 1 and "no free port" in busy.stderr
    finally:
        holder.communicate(b"", timeout=30)
    result = cli("pick", "--range", f"{port}-{port}")
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) == port
    assert lease_on(port, registry)["pid"] == os.getpid()  # type: ignore[index]


def test_pick_for_a_process_that_does_not_exist_is_bad_input(block: str) -> None:
    result = cli("pick", "--pid", "99999999", "--range", block)
    assert result.returncode == 2
    assert "pid" in result.stderr and result.stdout == ""


CHILD_BINDS_PORT = """
import json, os, socket, sys
from dynamic_port_manager import list_leases
port = int(os.environ["PORT"])
with socket.socket() as sock:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do
    sock.bind(("127.0.0.1", port))
    sock.listen(1)
    lease = [l for l in list_leases() if l["port"] == port]
    print(json.dumps({"port": port, "arg": sys.argv[1], "ppid": os.getppid(), "lease": lease}))
sys.exit(7)
"""


def test_run_gives_the_command_a_port_it_can_bind_and_holds_it(block: str, registry: Path) -> None:
    result = cli("run", "--range", block, "--", sys.executable, "-c", CHILD_BINDS_PORT, "{port}")
    assert result.returncode == 7, result.stderr
    seen = json.loads(result.stdout)
    start, end = map(int, block.split("-"))
    assert start <= seen["port"] <= end
    assert seen["arg"] == str(seen["port"])
    # Held while the command ran (by the CLI, its parent), given back after.
    assert [lease["pid"] for lease in seen["lease"]] == [seen["ppid"]]
    assert lease_on(seen["port"], registry) is None


CHILD_WAITS_FOR_SIGNAL = """
import signal, sys, time
def stop(signum, frame):
    print("got", signal.Signals(signum).name, flush=True)
    sys.exit(40 + signum)
for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
    signal.signal(sig, stop)
print("ready", flush=True)
for _ in range(600):
    time.sleep(0.1)
sys.exit(1)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1])
def test_run_forwards_signals_and_exits_with_the_command_status(
    block: str, registry: Path, sig: signal.Signals
) -> None:
    proc = subprocess.Popen(
        [cli_path(), "run", "--range", block, "--", sys.executable, "-c", CHILD_WAITS_FOR_SIGNAL],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        output = LineReader(proc.stdout)  # type: ignore[arg-type]
        output.wait_for("ready")
        proc.send_signal(sig)
        assert proc.wait(timeout=30) == 40 + sig
        assert output.wait_for("got").split() == ["got", sig.name]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert not [lease for lease in _leases(registry) if lease["pid"] == proc.pid]


def _leases(registry: Path) -> list[dict[str, object]]:
    from dynamic_port_manager import list_leases

    return list_leases(registry_dir=registry)


def test_run_reports_a_command_killed_by_a_signal_as_128_plus_n(block: str) -> None:
    assert cli("run", "--range", block, "--", "sh", "-c", "kill -KILL $$").returncode == 137


def test_run_without_a_runnable_command_fails_clearly(block: str) -> None:
    missing = cli("run", "--range", block)
    assert missing.returncode == 2 and "no command given" in missing.stderr
    unknown = cli("run", "--range", block, "--", "no-such-command-dpm")
    assert unknown.returncode == 127
    assert "command not found: no-such-command-dpm" in unknown.stderr


def test_inspection_commands_print_json(block: str, tmp_path: Path) -> None:
    state_file = tmp_path / "svc.json"
    common = ["--range", block, "--state", str(state_file)]
    port = int(cli("pick", *common).stdout)

    state = json.loads(cli("state", *common).stdout)
    assert state["settings"]["port_range"] == list(map(int, block.split("-")))
    assert state["settings"]["json_path"] == str(state_file)
    assert port in json.loads(cli("used", *common).stdout)["used_ports"]
    assert port not in json.loads(cli("free", *common).stdout)["free_ports"]
    assert json.loads(cli("history", *common).stdout)["history"][0]["new"] == port
    backups = json.loads(cli("backups", *common).stdout)["backups"]
    assert backups and set(backups) <= {p.name for p in (tmp_path / "backups").iterdir()}


def test_inspection_commands_write_nothing(block: str, tmp_path: Path) -> None:
    state_file = tmp_path / "svc.json"
    common = ["--range", block, "--state", str(state_file)]
    port = int(cli("pick", *common).stdout)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    saved = state_file.read_bytes()
    for command in ("state", "free", "used", "history", "backups"):
        cli(command, *common)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    assert state_file.read_bytes() == saved
    # ...and still show the world as it is now: the picked port is in use.
    assert port in json.loads(cli("used", *common).stdout)["used_ports"]


def test_json_is_one_line_in_a_pipe_and_pretty_on_a_terminal(block: str) -> None:
    piped = cli("free", "--range", block).stdout
    assert piped.count("\n") == 1
    text = read_terminal([cli_path(), "free", "--range", block])
    assert json.loads(text) == json.loads(piped)
    assert '{\n  "free_ports": [\n' in text


def test_environment_variables_configure_the_cli_and_flags_win(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    start, end = port_block()
    monkeypatch.setenv("DPM_START", str(start))
    monkeypatch.setenv("DPM_END", str(end))
    monkeypatch.setenv("DPM_JSON_PATH", str(tmp_path / "env.json"))
    monkeypatch.setenv("DPM_HISTORY_MAX", "3")
    settings = json.loads(cli("state").stdout)["settings"]
    assert settings == {
        "port_range": [start, end],
        "json_path": str(tmp_path / "env.json"),
        "history_max": 3,
        "service": "env",
    }
    other = port_block()
    flagged = cli("state", "--range", f"{other[0]}-{other[1]}", "--state", str(tmp_path / "f.json"))
    settings = json.loads(flagged.stdout)["settings"]
    assert settings["port_range"] == list(other)
    assert settings["json_path"] == str(tmp_path / "f.json")


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["pick", "--range", "9000-3000"], "--range"),
        (["pick", "--range", "3000-70000"], "--range"),
        (["pick", "--range", "many"], "--range"),
        (["pick", "--pid", "-4"], "--pid"),
        (["release", "0"], "PORT"),
        (["release"], "PORT"),
        (["frobnicate"], "frobnicate"),
        ([], "COMMAND"),
    ],
)
def test_bad_usage_exits_2_naming_the_problem(args: list[str], named: str) -> None:
    result = cli(*args)
    assert result.returncode == 2
    assert named in result.stderr and result.stdout == ""


def test_a_bad_environment_variable_exits_2_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DPM_START", "abc")
    result = cli("state")
    assert result.returncode == 2
    assert "DPM_START" in result.stderr and "Traceback" not in result.stderr


def test_no_free_port_exits_1(block: str) -> None:
    with listening() as sock:
        taken = sock.getsockname()[1]
        for command in (["pick"], ["run", "--", "true"]):
            result = cli("--range", f"{taken}-{taken}", *command)
            assert result.returncode == 1
            assert "no free port" in result.stderr and "Traceback" not in result.stderr


def test_who_prints_the_same_rows_in_a_pipe_as_on_a_terminal(block: str) -> None:
    start, end = map(int, block.split("-"))
    common = ["--range", block]
    held = int(cli("pick", "--pid", str(os.getpid()), *common).stdout)
    free = end if held != end else start
    try:
        piped = cli("who", str(held), str(free), *common)
        assert piped.returncode == 0, piped.stderr
        lines = piped.stdout.splitlines()
        assert lines[0].split() == ["PORT", "PID", "NAME", "LEASED", "BY", "COMMAND"]
        assert lines[1].split()[:1] == [str(held)] and f"pid {os.getpid()}" in lines[1]
        assert lines[2].split() == [str(free), "-", "(free)", "-"]
        shown = read_terminal([cli_path(), "who", str(held), str(free), *common])
        assert shown == piped.stdout
        rows = json.loads(cli("who", "--json", str(held), *common).stdout)
        assert [row["port"] for row in rows] == [held]
        assert rows[0]["lease"]["pid"] == os.getpid()
    finally:
        cli("release", str(held))


def test_a_reader_that_goes_away_ends_the_output_quietly(tmp_path: Path) -> None:
    # ~380 KB of JSON: more than a pipe holds, so the write is still under
    # way when the reader closes its end after 10 bytes.
    proc = subprocess.Popen(
        [cli_path(), "free", "--range", "1024-65535", "--state", str(tmp_path / "s.json")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert len(proc.stdout.read(10)) == 10
    proc.stdout.close()
    assert proc.wait(timeout=60) == 128 + signal.SIGPIPE  # as `cat` shows it to a shell
    assert proc.stderr.read() == b""  # no "Broken pipe", no traceback
    proc.stderr.close()


def test_backups_into_head_prints_no_error(tmp_path: Path, block: str) -> None:
    state = str(tmp_path / "svc.json")
    for _ in range(3):
        assert cli("pick", "--pid", str(os.getpid()), "--range", block, "--state", state).stdout
    done = subprocess.run(
        ["bash", "-c", f'"{cli_path()}" backups --state "{state}" | head -c 10'],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and done.stderr == ""
    assert done.stdout == '{"backups"'
