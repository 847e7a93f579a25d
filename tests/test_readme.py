"""The README never lies: its Python examples run as written."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def python_blocks(section: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"## {section}")
    end = text.find("\n## ", start + 1)
    body = text[start : end if end != -1 else len(text)]
    return re.findall(r"```python\n(.*?)```", body, re.S)


def test_quick_start_runs_and_records_the_pick(tmp_path: Path, registry: Path) -> None:
    (block,) = python_blocks("Quick start")
    result = subprocess.run(
        [sys.executable, "-c", block],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    match = re.search(r"Selected port: (\d+)", result.stdout)
    assert match, result.stdout
    port = int(match.group(1))
    assert 3000 <= port <= 9000
    state = json.loads((tmp_path / "utils/port_state/dynamic_ports_service1.json").read_text())
    assert [h["new"] for h in state["history"]] == [port, None]
    assert state["port_usage"][str(port)] == 1
    assert state["current_port"] is None
    assert "PICK" in result.stderr  # the console line


def test_the_example_script_is_the_quick_start() -> None:
    (block,) = python_blocks("Quick start")
    assert block.strip() in (ROOT / "examples/quickstart.py").read_text()


def test_router_examples_serve_the_state(
    tmp_path: Path, registry: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fastapi.testclient import TestClient

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DPM_START", "24300")
    monkeypatch.setenv("DPM_END", "24309")
    blocks = python_blocks("The FastAPI router")
    assert len(blocks) == 2
    for block in blocks:
        namespace: dict[str, object] = {}
        exec(compile(block, "README.md", "exec"), namespace)
        with TestClient(namespace["app"]) as client:  # type: ignore[arg-type]
            picked = client.post("/api/v1/port/pick").json()
            assert picked["status"] == "success"
            state = client.get("/api/v1/port/state").json()
            assert state["current_port"] == picked["port"]
        if "pm" in namespace:
            assert namespace["pm"].stopped  # type: ignore[attr-defined]
