"""One truth for every process and every version: workers and readers see the
record as the file has it, dead holders' ports are not "used", and a registry
of another format is refused at start, never shared silently.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from dynamic_port_manager import DynamicPortManager, RegistryError
from router_helpers import gunicorn_preloaded, port_block

APP = """
import os
from api_ports import router as port_router
from fastapi import FastAPI

app = FastAPI()
app.include_router(port_router, prefix="/api/v1")

@app.middleware("http")
async def say_which_worker(request, call_next):
    response = await call_next(request)
    response.headers["x-worker-pid"] = str(os.getpid())
    return response
"""

#: Which worker answered each request (the test shows it spread them).
WORKERS: set[str] = set()


def _get(url: str, method: str = "GET") -> bytes:
    request = urllib.request.Request(url, method=method)
    with urllib.request.urlopen(request, timeout=10) as response:
        WORKERS.add(response.headers["x-worker-pid"])
        body: bytes = response.read()
        return body


def _at_once(calls: list[Callable[[], bytes]]) -> list[bytes]:
    """Runs the requests concurrently, so that idle workers take them too."""
    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(lambda call: call(), calls))


@pytest.fixture
def gunicorn_app(
    tmp_path: Path, registry: Path, free_port_factory: Callable[[], int]
) -> Iterator[tuple[str, Path]]:
    pytest.importorskip("gunicorn")
    pytest.importorskip("uvicorn.workers")
    (tmp_path / "one_truth_app.py").write_text(APP)
    bind = free_port_factory()
    base, _ = port_block(21)
    state = tmp_path / "state" / "dynamic_ports_app.json"
    env = {
        **os.environ,
        "PYTHONPATH": str(tmp_path),
        "DPM_START": str(base),
        "DPM_END": str(base + 20),
        "DPM_JSON_PATH": str(state),
        "DPM_CONSOLE_LOG": "off",
    }
    url = f"http://127.0.0.1:{bind}/api/v1/port"
    with gunicorn_preloaded("one_truth_app:app", 3, bind, tmp_path, env) as server:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, server.communicate()[0]
            try:
                _get(url + "/state")
                break
            except OSError:
                assert time.monotonic() < deadline, "gunicorn did not answer"
                time.sleep(0.2)
        yield url, state


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    assert match, f"{name} not in metrics"
    return float(match.group(1))


def test_every_gunicorn_worker_answers_with_the_files_record(
    gunicorn_app: tuple[str, Path],
) -> None:
    url, state_file = gunicorn_app
    picks = 6
    WORKERS.clear()
    # One after another, as a client would: one worker may take them all.
    for _ in range(picks):
        _get(url + "/pick", method="POST")
    on_disk = json.loads(state_file.read_text())
    last: dict[str, float] = {}
    for i in range(50):
        answers = _at_once(
            [lambda: _get(url + "/history"), lambda: _get(url + "/state")] * 3
            + [lambda: _get(url + "/metrics")]
        )
        for history in answers[0:6:2]:
            # Every worker shows every pick, whichever worker made it.
            entries = json.loads(history)["history"]
            assert len(entries) == len(on_disk["history"]), (i, len(entries))
        for state in answers[1:6:2]:
            assert json.loads(state)["change_count"] == on_disk["change_count"], i
        for name in ("dpm_picks_total", "dpm_port_changes_total"):
            value = _metric(answers[6].decode(), name)
            # A counter never goes backwards for a scraper hitting any worker.
            assert value >= last.get(name, 0), (i, name, value, last)
            last[name] = value
    assert last["dpm_picks_total"] >= picks
    # The requests really were spread over the workers.
    assert len(WORKERS) >= 2, WORKERS


def test_a_dead_holders_port_is_not_used_at_the_next_read(
    state_path: Path,
) -> None:
    base, _ = port_block(3)
    code = f"""
        import sys
        from dynamic_port_manager import DynamicPortManager
        m = DynamicPortManager({base}, {base + 2}, {str(state_path)!r}, console_log=False)
        print(m.pick_port(), flush=True)
        sys.stdin.read()
    """
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None
    port = int(holder.stdout.readline())
    # A reader of the same file, with a long refresh interval: no refresh and
    # no pick will run before the read.
    reader = DynamicPortManager(
        base, base + 2, state_path, refresh_interval=3600, console_log=False
    )
    try:
        assert port in reader.get_state()["used_ports"]
        holder.kill()
        holder.wait()
        state = reader.get_state()
        assert port not in state["used_ports"], state["used_ports"]
        assert port in state["free_ports"]
    finally:
        reader.stop()


def _registry_header(registry: Path, words: list[int]) -> None:
    registry.mkdir(mode=0o700, exist_ok=True)
    (registry / "leases.lock").write_bytes(b"".join(w.to_bytes(8, "little") for w in words))


def test_a_registry_of_a_newer_format_is_refused_at_start(
    registry: Path, state_path: Path, free_port_factory: Callable[[], int]
) -> None:
    base = free_port_factory()
    # What a later build writes: the format word names version 3.
    magic = int.from_bytes(b"DPMR", "big")
    _registry_header(registry, [1, 1, 0, (magic << 32) | 3, 1, 0])
    with pytest.raises(RegistryError) as refused:
        DynamicPortManager(base, base, state_path, console_log=False)
    message = str(refused.value)
    assert "newer" in message and "3" in message, message


def test_a_registry_in_use_by_the_previous_layout_is_refused_naming_its_holders(
    registry: Path, state_path: Path, free_port_factory: Callable[[], int]
) -> None:
    base = free_port_factory()
    # The layout before format versions: a counter word alone, and a table a
    # live process of that build holds a lease in (this test's process).
    _registry_header(registry, [1])
    lease = {
        "port": base,
        "pid": os.getpid(),
        "start_time": 0,
        "owner": "/elsewhere/old.json#1.1",
        "since": "2026-12-01T00:00:00+00:00",
    }
    table = json.dumps({"version": 1, "leases": [lease]})
    for name in ("leases-0.json", "leases-1.json"):
        (registry / name).write_text(table)
        (registry / name).chmod(0o600)
    with pytest.raises(RegistryError) as refused:
        DynamicPortManager(base, base, state_path, console_log=False)
    message = str(refused.value)
    assert "older" in message and str(os.getpid()) in message, message
    # Never silent: the old build's lease is still there, untouched.
    assert json.loads((registry / "leases-1.json").read_text())["leases"] == [lease]
