"""`serve` as a service: a fixed port outside the range, a socket systemd
passes (LISTEN_FDS/LISTEN_PID), readiness on $NOTIFY_SOCKET, `/metrics` with
the process metrics. Real processes, real sockets, a real datagram socket in
systemd's place."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from dynamic_port_manager.service import notify, systemd_fd
from router_helpers import cli, cli_path, port_block, running_server

pytestmark = pytest.mark.usefixtures("cli_env")

# What systemd does between fork and exec: the socket at fd 3, LISTEN_FDS=1,
# LISTEN_PID = the pid that execs the service (exec keeps the pid).
LAUNCHER = """
import os, socket, sys
sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.bind(("127.0.0.1", int(sys.argv[1])))
sock.listen()
if sock.fileno() == 3:
    os.set_inheritable(3, True)
else:
    os.dup2(sock.fileno(), 3)
os.environ["LISTEN_FDS"] = "1"
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.argv[2], sys.argv[2:])
"""


def block_without(port: int) -> str:
    """A managed range (START-END) that leaves ``port`` out."""
    for _ in range(100):
        start, end = port_block()
        if not start <= port <= end:
            return f"{start}-{end}"
    raise AssertionError(f"no block without {port}")


@contextmanager
def notify_socket(address: str) -> Iterator[socket.socket]:
    """A datagram socket in systemd's place, bound to ``address``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(address)
        sock.settimeout(60)  # a bound on a wait for a message, not a measure
        yield sock
    finally:
        sock.close()


def receive(sock: socket.socket) -> dict[str, str]:
    """One sd_notify message as its KEY=VALUE lines."""
    message = sock.recv(4096).decode()
    return dict(line.split("=", 1) for line in message.splitlines())


def sample_values(text: str) -> dict[str, float]:
    """Prometheus text format: each sample (name and labels) and its value."""
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    return {name: float(value) for name, value in (line.rsplit(" ", 1) for line in lines)}


def test_a_passed_socket_serves_and_readiness_reaches_notify_socket(
    free_port: int, tmp_path: Path
) -> None:
    abstract = f"dpm-test-{uuid.uuid4().hex}"  # `@name`: an abstract socket
    with notify_socket("\0" + abstract) as systemd:
        command = [sys.executable, "-c", LAUNCHER, str(free_port), cli_path(), "serve"]
        command += ["--range", block_without(free_port), "--state", str(tmp_path / "s.json")]
        proc = subprocess.Popen(
            command,
            env={**os.environ, "NOTIFY_SOCKET": "@" + abstract},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            ready = receive(systemd)
            assert ready["READY"] == "1"
            url = f"http://127.0.0.1:{free_port}"
            assert ready["STATUS"] == f"Serving on {url}"
            with httpx.Client(base_url=url, timeout=30) as http:
                assert "dpm_free_ports " in http.get("/metrics").text
                state = http.get("/api/v1/port/state").json()
            # The passed socket is the server's: nothing of the range is leased for it.
            assert state["leases"] == [] and free_port not in state["used_ports"]
            proc.send_signal(signal.SIGTERM)
            assert receive(systemd) == {"STOPPING": "1"}
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            _, errors = proc.communicate(timeout=30)
    assert "Traceback" not in errors


def test_serve_on_a_fixed_port_answers_metrics_with_process_metrics(
    free_port: int, tmp_path: Path
) -> None:
    command = [cli_path(), "serve", "--port", str(free_port), "--range", block_without(free_port)]
    address = str(tmp_path / "notify")
    with (
        notify_socket(address) as systemd,
        running_server(
            [*command, "--state", str(tmp_path / "s.json")],
            tmp_path,
            env={"NOTIFY_SOCKET": address},
        ) as served,
    ):
        assert served.port == free_port
        assert receive(systemd)["READY"] == "1"
        with httpx.Client(base_url=served.url, timeout=30) as http:
            picked = http.post("/api/v1/port/pick").json()["port"]
            top = http.get("/metrics")
            router = http.get("/api/v1/port/metrics")
        assert top.status_code == 200
        assert top.headers["content-type"].startswith("text/plain")
        samples = sample_values(top.text)
        assert {"process_cpu_seconds_total", "process_resident_memory_bytes"} <= set(samples)
        assert {"process_start_time_seconds", "process_open_fds"} <= set(samples)
        assert any(name.startswith("python_info{") for name in samples)
        dpm = set(sample_values(router.text))
        assert dpm and dpm <= set(samples), "every metric of the router's endpoint is in /metrics"
        # The pick over HTTP is the only change: the server's own port is not one.
        assert samples["dpm_port_changes_total"] == 1
        assert picked != free_port
        # Its full name, not the kernel's 15 bytes (`dynamic-port-ma`), for the
        # dashboard (the owners endpoint) and `who`.
        owners = httpx.get(f"{served.url}/api/v1/port/owners?port={free_port}", timeout=30)
        (row,) = owners.json()["owners"]
        assert [p["name"] for p in row["processes"]] == ["dynamic-port-manager"]
        who = json.loads(cli("who", str(free_port)).stdout)
        assert [p["name"] for p in who[0]["processes"]] == ["dynamic-port-manager"]
        served.proc.send_signal(signal.SIGTERM)
        assert served.proc.wait(timeout=30) == 0


def test_a_passed_unix_socket_serves_the_api(tmp_path: Path) -> None:
    # systemd's ListenStream=/run/dpm.sock: a Unix socket, no port at all.
    path = str(tmp_path / "api.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen()
        start, end = port_block()
        command = [cli_path(), "serve", "--range", f"{start}-{end}"]
        command += ["--state", str(tmp_path / "s.json"), "--fd", str(listener.fileno())]
        proc = subprocess.Popen(
            command,
            pass_fds=[listener.fileno()],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == f"Serving on unix:{path}"
            transport = httpx.HTTPTransport(uds=path)
            with httpx.Client(transport=transport, base_url="http://dpm", timeout=30) as http:
                assert http.get("/api/v1/port/state").json()["settings"]["port_range"] == [
                    start,
                    end,
                ]
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=30)


def test_a_port_inside_the_range_is_refused_with_a_clear_message(free_port: int) -> None:
    result = cli("serve", "--range", f"{free_port}-{free_port + 1}", "--port", str(free_port))
    assert result.returncode == 2
    assert f"--port {free_port} is inside the managed range" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_fd_that_is_not_a_listening_socket_is_refused(tmp_path: Path) -> None:
    start, end = port_block()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as unbound:
        result = cli(
            "serve",
            "--range",
            f"{start}-{end}",
            "--fd",
            str(unbound.fileno()),
            pass_fds=[unbound.fileno()],
        )
    assert result.returncode == 2
    assert "is not a listening TCP (stream) socket" in result.stderr


def test_listen_fds_of_another_process_are_not_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    # Inherited from a parent that was socket-activated: not for this process.
    monkeypatch.setenv("LISTEN_PID", str(os.getppid()))
    monkeypatch.setenv("LISTEN_FDS", "1")
    assert systemd_fd() is None
    assert os.environ["LISTEN_FDS"] == "1"


def test_listen_fds_are_taken_once_and_more_than_one_socket_is_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", "1")
    assert systemd_fd() == 3
    assert "LISTEN_FDS" not in os.environ and "LISTEN_PID" not in os.environ
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", "2")
    with pytest.raises(ValueError, match="LISTEN_FDS='2'"):
        systemd_fd()


def test_notify_without_a_listener_warns_and_never_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody"))
    assert notify("READY=1") is False
    assert "cannot notify systemd" in capsys.readouterr().err
