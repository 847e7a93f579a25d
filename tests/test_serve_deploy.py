"""docs/deploy.md and docs/deploy/ hold: the commands it shows run (gunicorn,
uvicorn, serve; on free ports, in a private registry), the systemd units pass
`systemd-analyze verify` and agree with each other, and the container's
command serves and passes its own health check. What cannot run here
(systemctl, docker build without a daemon) is checked by reading it."""

from __future__ import annotations

import configparser
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from dynamic_port_manager import list_leases
from dynamic_port_manager.cli import build_parser
from router_helpers import ROOT, cli_path, port_block, running_server, wait_until

pytestmark = pytest.mark.usefixtures("cli_env")

DOCS = ROOT / "docs"
DEPLOY = DOCS / "deploy"
UNITS = ("dynamic-port-manager.socket", "dynamic-port-manager.service")


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", (DOCS / "deploy.md").read_text(), re.S)


def command_line(program: str) -> str:
    """The one line of the doc's shell blocks that runs ``program``."""
    found = [
        line
        for block in blocks("sh")
        for line in block.splitlines()
        if re.match(rf"(\w+=\S+ )*{re.escape(program)} ", line)
    ]
    assert len(found) == 1, (program, found)
    return found[0]


def block_without(*ports: int) -> tuple[int, int]:
    for _ in range(100):
        start, end = port_block()
        if not any(start <= port <= end for port in ports):
            return start, end
    raise AssertionError(f"no block without {ports}")


def localised(line: str, port: int, block: tuple[int, int], folder: Path) -> list[str]:
    """The doc's command on this test's port, range and folder."""
    start, end = block
    for doc, here in (
        ("DPM_START=3000 DPM_END=9000", f"DPM_START={start} DPM_END={end}"),
        ("--range 3000-9000", f"--range {start}-{end}"),
        ("127.0.0.1:8000", f"127.0.0.1:{port}"),
        ("--port 8000", f"--port {port}"),
        ("--port 9400", f"--port {port}"),
        ("/tmp/dpm-deploy/", f"{folder}/"),
    ):
        line = line.replace(doc, here)
    return shlex.split(line)


def with_env(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """Leading NAME=value words as the environment; the program from this venv."""
    env = dict(os.environ)
    while "=" in argv[0]:
        name, _, value = argv.pop(0).partition("=")
        env[name] = value
    local = Path(sys.executable).parent / argv[0]
    return [str(local) if local.exists() else argv[0], *argv[1:]], env


@contextmanager
def running(argv: list[str], env: dict[str, str]) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=60)


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def test_the_apps_code_in_the_doc_is_the_shipped_app() -> None:
    (code,) = blocks("python")
    shipped = (DEPLOY / "app.py").read_text()
    assert shipped.endswith(code), "docs/deploy/app.py is the doc's block, after its docstring"


@pytest.mark.slow
@pytest.mark.parametrize("program", ["gunicorn", "uvicorn"])
def test_the_worker_commands_serve_the_router(
    program: str, free_port: int, tmp_path: Path, registry: Path
) -> None:
    pytest.importorskip(program)
    block = block_without(free_port)
    argv, env = with_env(localised(command_line(program), free_port, block, tmp_path))
    url = f"http://127.0.0.1:{free_port}/api/v1/port"
    with running(argv, env) as proc:
        assert wait_until(lambda: answers(f"{url}/state"), timeout=120), proc.stderr
        picked = httpx.post(f"{url}/pick", timeout=30).json()["port"]
        assert block[0] <= picked <= block[1]
        assert "dpm_picks_total" in httpx.get(f"{url}/metrics", timeout=30).text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    # Every worker's manager stopped with the app: no lease of the range is left.
    assert list_leases(registry_dir=registry) == []


def test_the_serve_command_serves_metrics_on_its_fixed_port(free_port: int, tmp_path: Path) -> None:
    block = block_without(free_port, 9400)
    argv, _ = with_env(localised(command_line("dynamic-port-manager"), free_port, block, tmp_path))
    assert argv[1] == "serve"
    with running_server([cli_path(), *argv[1:]], tmp_path) as served:
        assert served.port == free_port
        text = httpx.get(f"{served.url}/metrics", timeout=30).text
        assert "process_cpu_seconds_total" in text and "dpm_free_ports" in text


def test_the_scrape_config_targets_the_documented_address() -> None:
    yaml = pytest.importorskip("yaml")
    (block,) = blocks("yaml")
    (job,) = yaml.safe_load(block)["scrape_configs"]
    (target,) = job["static_configs"][0]["targets"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    serve = build_parser().parse_args(shlex.split(command_line("dynamic-port-manager"))[1:])
    assert target == f"{serve.host}:{serve.port}"
    assert unit(UNITS[0])["Socket"]["ListenStream"] == target


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys keep their case
    parser.read_string((DEPLOY / name).read_text())
    return parser


def served_range(argv: list[str]) -> tuple[int, int]:
    args = build_parser().parse_args(argv)
    assert args.command == "serve"
    start, end = args.range
    return start, end


def test_the_units_agree_with_each_other_and_with_serve() -> None:
    socket_unit, service = (unit(name) for name in UNITS)
    assert service["Service"]["Type"] == "notify"
    assert "dynamic-port-manager.socket" in service["Unit"]["Requires"].split()
    exec_start = shlex.split(service["Service"]["ExecStart"])
    assert Path(exec_start[0]).name == "dynamic-port-manager"
    args = build_parser().parse_args(exec_start[1:])
    # The socket comes from systemd: no address of its own.
    assert args.port is None and args.fd is None and args.host is None
    host, _, port = socket_unit["Socket"]["ListenStream"].rpartition(":")
    start, end = served_range(exec_start[1:])
    assert host and not start <= int(port) <= end, "the socket's port is outside the range"
    assert "PrivateTmp" not in service["Service"], "the lease registry in /tmp is shared"


def test_the_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed here (it comes with systemd)")
    for name in UNITS:
        # The command installed for this test run in place of /usr/local/bin's.
        text = (DEPLOY / name).read_text()
        text = text.replace("/usr/local/bin/dynamic-port-manager", cli_path())
        (tmp_path / name).write_text(text)
    result = subprocess.run(
        [analyze, "verify", *(str(tmp_path / name) for name in UNITS)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    ours = [line for line in result.stderr.splitlines() if "dynamic-port-manager" in line]
    assert result.returncode == 0 and not ours, result.stderr


def containerfile() -> dict[str, list[str]]:
    """Each instruction's arguments (continuations joined), in order, by keyword."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Containerfile").read_text())
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            keyword, _, rest = line.strip().partition(" ")
            found.setdefault(keyword.upper(), []).append(rest.strip())
    return found


@pytest.mark.slow
def test_the_containers_command_serves_and_passes_its_health_check(
    free_port: int, tmp_path: Path
) -> None:
    image = containerfile()
    (entrypoint,), (cmd,) = image["ENTRYPOINT"], image["CMD"]
    argv = json.loads(entrypoint) + json.loads(cmd)
    assert argv[:2] == ["dynamic-port-manager", "serve"]
    args = build_parser().parse_args(argv[1:])
    assert image["EXPOSE"] == [str(args.port)]
    assert not args.range[0] <= args.port <= args.range[1]
    assert any(stage.startswith("docker.io/library/python") for stage in image["FROM"])
    # The build stage's Rust is at least the one Cargo.toml asks for.
    toolchain = re.search(r"--default-toolchain (\d+)\.(\d+)", " ".join(image["RUN"]))
    needed = re.search(r'rust-version = "(\d+)\.(\d+)', (ROOT / "Cargo.toml").read_text())
    assert toolchain and needed
    assert tuple(map(int, toolchain.groups())) >= tuple(map(int, needed.groups()))

    # The container's command on this host: loopback, a free port, this test's folder.
    block = block_without(free_port)
    line = shlex.join(argv[1:]).replace("0.0.0.0", "127.0.0.1")
    line = line.replace(f"--port {args.port}", f"--port {free_port}")
    line = line.replace(f"{args.range[0]}-{args.range[1]}", f"{block[0]}-{block[1]}")
    line = line.replace("/var/lib/dynamic-port-manager/", f"{tmp_path}/")
    with running_server([cli_path(), *shlex.split(line)], tmp_path) as served:
        (check,) = image["HEALTHCHECK"]
        assert check.startswith("CMD ")
        probe = json.loads(check.removeprefix("CMD "))
        assert probe[0] == "python"
        probe = [sys.executable, *(p.replace(str(args.port), str(free_port)) for p in probe[1:])]
        assert subprocess.run(probe, timeout=60).returncode == 0
        served.proc.send_signal(signal.SIGTERM)
        assert served.proc.wait(timeout=30) == 0
