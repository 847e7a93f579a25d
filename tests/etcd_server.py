"""A real etcd for the discovery tests: Debian's ``etcd-server`` binary on
127.0.0.1, client and peer ports from the project's own pytest plugin, data
in the test's temporary folder (imported by the tests, not a conftest)."""

from __future__ import annotations

import http.client
import shutil
import subprocess
import time
from pathlib import Path

import pytest


class Etcd:
    """One single-member etcd that can be stopped and started again."""

    def __init__(self, binary: str, folder: Path, client_port: int, peer_port: int) -> None:
        self.binary = binary
        self.folder = folder
        self.client_port = client_port
        self.peer_port = peer_port
        self.process: subprocess.Popen[bytes] | None = None
        self.prefix = "/dpm-test"

    @property
    def url(self) -> str:
        return f"etcd://127.0.0.1:{self.client_port}{self.prefix}"

    def start(self) -> None:
        client = f"http://127.0.0.1:{self.client_port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        self.folder.mkdir(parents=True, exist_ok=True)
        log = (self.folder / "etcd.log").open("ab")
        self.process = subprocess.Popen(
            [
                self.binary,
                "--name=dpm-test",
                f"--data-dir={self.folder / 'data'}",
                f"--listen-client-urls={client}",
                f"--advertise-client-urls={client}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=dpm-test={peer}",
                "--log-level=warn",
            ],
            stdout=log,
            stderr=log,
        )
        log.close()
        deadline = time.monotonic() + 60
        while not self.healthy():
            if self.process.poll() is not None:
                raise RuntimeError(f"etcd exited: {(self.folder / 'etcd.log').read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("etcd did not become healthy in 60 s")
            time.sleep(0.05)

    def healthy(self) -> bool:
        conn = http.client.HTTPConnection("127.0.0.1", self.client_port, timeout=1)
        try:
            conn.request("GET", "/health")
            response = conn.getresponse()
            return response.status == 200 and b'"true"' in response.read()
        except OSError:
            return False
        finally:
            conn.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(30)
        self.process = None

    def wipe(self) -> None:
        """Its data gone, as if etcd were replaced (every lease lost)."""
        shutil.rmtree(self.folder / "data", ignore_errors=True)


def etcd_binary() -> str:
    binary = shutil.which("etcd") or ("/usr/bin/etcd" if Path("/usr/bin/etcd").exists() else None)
    if binary is None:
        pytest.skip("no etcd binary (Debian: apt-get install etcd-server; .ci/run installs it)")
    return binary
