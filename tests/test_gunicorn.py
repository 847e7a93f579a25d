"""gunicorn --preload: a manager made at import in the master, and a pick in
each worker's lifespan, give every worker a port of its own (issue 6).

A real `gunicorn --preload -w 4 -k uvicorn.workers.UvicornWorker` run; the
workers are forked from the master after the manager exists and has picked.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from dynamic_port_manager import list_leases
from router_helpers import gunicorn_preloaded, port_block

pytest.importorskip("gunicorn")
pytest.importorskip("uvicorn.workers")

APP = r"""
import json, os
from contextlib import asynccontextmanager
from pathlib import Path
from fastapi import FastAPI
from dynamic_port_manager import DynamicPortManager

OUT = Path(os.environ["DPM_TEST_OUT"])
START, END = map(int, os.environ["DPM_TEST_RANGE"].split("-"))
pm = DynamicPortManager(START, END, OUT / "state.json", console_log=False)
(OUT / "master.json").write_text(json.dumps({"pid": os.getpid(), "port": pm.pick_port()}))

@asynccontextmanager
async def lifespan(app):
    port = pm.pick_port()
    (OUT / f"worker-{os.getpid()}.json").write_text(json.dumps({"pid": os.getpid(), "port": port}))
    yield

app = FastAPI(lifespan=lifespan)
"""


def test_preloaded_gunicorn_workers_each_get_their_own_port(
    tmp_path: Path, registry: Path, free_port: int
) -> None:
    (tmp_path / "preload_app.py").write_text(APP)
    start, end = port_block(100)
    env = {
        **os.environ,
        "DPM_TEST_OUT": str(tmp_path),
        "DPM_TEST_RANGE": f"{start}-{end}",
        "PYTHONPATH": str(tmp_path),
    }
    with gunicorn_preloaded(
        "preload_app:app", 4, free_port, tmp_path, env, "--graceful-timeout", "5"
    ) as server:
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob("worker-*.json"))) < 4:
            assert server.poll() is None, server.communicate()[0]
            assert time.monotonic() < deadline, "the workers did not start"
            time.sleep(0.1)
        master = json.loads((tmp_path / "master.json").read_text())
        workers = [json.loads(p.read_text()) for p in tmp_path.glob("worker-*.json")]
        leases = {lease["port"]: lease["pid"] for lease in list_leases()}
    ports = [w["port"] for w in workers]
    assert len(set(ports)) == 4, ports
    assert master["port"] not in ports
    assert master["pid"] not in [w["pid"] for w in workers]
    # Each port is leased to the worker that picked it, the master's to the master.
    for w in workers:
        assert leases[w["port"]] == w["pid"], (w, leases)
    assert leases[master["port"]] == master["pid"]
    # And once everything has exited, nothing is left leased.
    deadline = time.monotonic() + 10
    while [lease for lease in list_leases() if lease["alive"]]:
        assert time.monotonic() < deadline, list_leases()
        time.sleep(0.1)
