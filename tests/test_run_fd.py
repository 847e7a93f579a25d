"""`dynamic-port-manager run --fd`: the command gets the listening socket as fd 3
(systemd's LISTEN_FDS convention), real servers serve from it."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from router_helpers import LineReader, can_bind, cli, cli_path, lease_on, port_block

pytestmark = pytest.mark.usefixtures("cli_env")


@pytest.fixture
def block() -> str:
    start, end = port_block()
    return f"{start}-{end}"


# An http.server that never binds: it serves two requests from the socket at fd 3.
FD3_SERVER = """
import http.server, json, os, socket, sys

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({
            "pid": os.getpid(),
            "env": {k: os.environ.get(k) for k in ("LISTEN_PID", "LISTEN_FDS", "PORT_FD", "PORT")},
            "argv": sys.argv[1:],
            "family": int(self.server.socket.family),
            "nodelay": self.connection.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY),
        }).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

server = http.server.HTTPServer(("", 0), Handler, bind_and_activate=False)
server.socket.close()
server.socket = socket.socket(fileno=3)
print("serving", flush=True)
server.handle_request()
server.handle_request()
"""


def test_a_child_serves_http_from_fd_3_with_listen_pid_its_own(block: str, registry: Path) -> None:
    proc = subprocess.Popen(
        [cli_path(), "run", "--fd", "--range", block, "--"]
        + [sys.executable, "-c", FD3_SERVER, "{fd}", "{port}"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        LineReader(proc.stdout).wait_for("serving")  # type: ignore[arg-type]
        start, end = map(int, block.split("-"))
        port = next(p for p in range(start, end + 1) if (lease := lease_on(p, registry)))
        assert lease is not None and lease["pid"] == proc.pid  # held by `run` itself
        assert not can_bind(port), "bound before the command even started"
        seen = httpx.get(f"http://127.0.0.1:{port}/", timeout=30).json()
        assert seen["env"] == {
            "LISTEN_PID": str(seen["pid"]),
            "LISTEN_FDS": "1",
            "PORT_FD": "3",
            "PORT": str(port),
        }
        assert seen["argv"] == ["3", str(port)]
        assert seen["family"] == socket.AF_INET6  # dual-stack: IPv4 above, IPv6 here
        # Inherited from the socket handed over: a server that takes fd 3 for
        # a Unix socket (uvicorn --fd) never sets it, and waited ~40 ms per answer.
        assert seen["nodelay"] == 1
        assert httpx.get(f"http://[::1]:{port}/", timeout=30).json()["pid"] == seen["pid"]
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert lease_on(port, registry) is None


APP = """
async def app(scope, receive, send):
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"served through fd 3"})
"""


def test_uvicorn_serves_through_fd(block: str, registry: Path, tmp_path: Path) -> None:
    (tmp_path / "fdapp.py").write_text(APP)
    proc = subprocess.Popen(
        [cli_path(), "run", "--fd", "--host", "127.0.0.1", "--range", block, "--"]
        + [sys.executable, "-m", "uvicorn", "fdapp:app", "--fd", "{fd}"],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        log = LineReader(proc.stderr)  # type: ignore[arg-type]
        log.wait_for("Uvicorn running")
        start, end = map(int, block.split("-"))
        port = next(p for p in range(start, end + 1) if lease_on(p, registry))
        reply = httpx.get(f"http://127.0.0.1:{port}/", timeout=30)
        assert reply.status_code == 200 and reply.text == "served through fd 3"
        proc.send_signal(signal.SIGTERM)  # passed on; uvicorn shuts down cleanly
        log.wait_for("Finished server process")
        # uvicorn re-raises the signal once it has shut down: 128 + SIGTERM.
        assert proc.wait(timeout=30) in (0, 128 + signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert lease_on(port, registry) is None
    assert can_bind(port)


def test_run_fd_reports_a_missing_command_as_without_fd(block: str) -> None:
    result = cli("run", "--fd", "--range", block, "--", "no-such-command-dpm", "{fd}")
    assert result.returncode == 127
    assert "command not found: no-such-command-dpm" in result.stderr


def test_without_fd_no_socket_is_announced(block: str) -> None:
    script = "import json, os, sys; print(json.dumps([os.environ.get('LISTEN_FDS'), sys.argv[1]]))"
    result = cli("run", "--range", block, "--", sys.executable, "-c", script, "{fd}")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [None, "{fd}"]


def test_host_without_fd_is_bad_usage(block: str) -> None:
    result = cli("run", "--host", "127.0.0.1", "--range", block, "--", "true")
    assert result.returncode == 2 and "--fd" in result.stderr
