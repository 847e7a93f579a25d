"""The README never lies: its Python examples run as written.

Every ```python block runs in a fresh interpreter, in an empty folder, with a
private lease registry; a block that cannot (it needs a server, say) is marked
with an HTML comment `<!-- not-run: the reason -->` on the line before it.
Some blocks are also checked for what they do.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import NamedTuple

import pytest
from router_helpers import port_block

ROOT = Path(__file__).resolve().parent.parent

# A fenced block, indented or not (inside a list item), and what precedes it.
BLOCK_RE = re.compile(r"^(?P<indent> *)```python\n(?P<code>.*?)^(?P=indent)```", re.M | re.S)
NOT_RUN_RE = re.compile(r"<!-- not-run: (?P<reason>[^>]*\S[^>]*) -->\s*$")


class Block(NamedTuple):
    line: int
    code: str
    not_run: str | None


def readme_blocks() -> list[Block]:
    text = (ROOT / "README.md").read_text()
    blocks = []
    for match in BLOCK_RE.finditer(text):
        before = text[: match.start()].rstrip("\n ").rsplit("\n", 1)[-1]
        marker = NOT_RUN_RE.search(before)
        blocks.append(
            Block(
                line=text.count("\n", 0, match.start()) + 1,
                code=textwrap.dedent(match["code"]),
                not_run=marker["reason"] if marker else None,
            )
        )
    return blocks


BLOCKS = readme_blocks()


def test_the_readme_has_python_blocks_and_runs_most() -> None:
    assert len(BLOCKS) >= 5
    # Sparingly: most blocks run; a skipped one says why.
    assert sum(b.not_run is not None for b in BLOCKS) <= 2


@pytest.mark.parametrize("block", BLOCKS, ids=[f"README.md:{b.line}" for b in BLOCKS])
def test_every_python_block_runs(block: Block, tmp_path: Path, registry: Path) -> None:
    if block.not_run:
        pytest.skip(f"marked not-run: {block.not_run}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DPM_")}
    env["DPM_REGISTRY_DIR"] = str(registry)
    work = tmp_path / "project"
    work.mkdir()
    result = subprocess.run(
        [sys.executable, "-c", block.code],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"README.md:{block.line} failed:\n{result.stderr}"


def python_blocks(section: str, page: str = "README.md") -> list[str]:
    text = (ROOT / page).read_text()
    start = text.index(f"## {section}")
    end = text.find("\n## ", start + 1)
    body = text[start : end if end != -1 else len(text)]
    return [textwrap.dedent(m["code"]) for m in BLOCK_RE.finditer(body)]


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
    start, end = port_block(10)
    monkeypatch.setenv("DPM_START", str(start))
    monkeypatch.setenv("DPM_END", str(end))
    blocks = python_blocks("The FastAPI router") + python_blocks(
        "A manager of your own", "docs/router.md"
    )
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


def test_the_migration_router_serves_its_own_file_from_start_up(
    tmp_path: Path, registry: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fastapi.testclient import TestClient

    monkeypatch.chdir(tmp_path)
    for name in ("DPM_START", "DPM_END", "DPM_JSON_PATH"):
        monkeypatch.delenv(name, raising=False)
    block = next(b for b in python_blocks("Moving from the original") if "create_router" in b)
    namespace: dict[str, object] = {}
    exec(compile(block, "README.md", "exec"), namespace)
    state_file = tmp_path / "utils/port_state/dynamic_ports_service1.json"
    assert not state_file.exists()
    with TestClient(namespace["app"]) as client:  # type: ignore[arg-type]
        assert state_file.is_file()  # before any request
        settings = client.get("/api/v1/port/state").json()["settings"]
        assert settings["json_path"] == "utils/port_state/dynamic_ports_service1.json"
        assert settings["port_range"] == [3000, 9000]


def test_the_readme_is_a_front_door() -> None:
    text = (ROOT / "README.md").read_text()
    assert len(text.encode()) < 15_000
    for section in (
        "Set up",
        "Install",
        "Quick start",
        "Moving from the original",
        "The FastAPI router",
        "The command line",
        "The pytest plugin",
        "Deployment",
        "What it guarantees",
        "Upgrading",
        "Links",
    ):
        assert f"\n## {section}\n" in text, section
    # Images by relative path break on a package index page.
    assert not re.search(r"!\[[^]]*\]\((?!https://)", text)


def test_the_set_up_commands_are_the_ci_run_and_its_pytest() -> None:
    text = (ROOT / "README.md").read_text()
    start = text.index("## Set up")
    section = text[start : text.index("\n## ", start + 1)]
    commands = re.findall(r"```sh\n(.*?)```", section, re.S)
    assert [c.strip() for c in commands] == [
        "bash .ci/run",
        ".venv-ci/bin/python -m pytest -q -p no:cacheprovider -n 2 tests",
    ]
    ci = (ROOT / ".ci/run").read_text()
    assert "venv=${DPM_CI_VENV:-$root/.venv-ci}" in ci
    assert "python -m pytest -q -p no:cacheprovider -n 2 tests " in ci


def test_the_endpoint_table_lists_every_route() -> None:
    from api_ports import create_router
    from fastapi.routing import APIRoute

    text = (ROOT / "README.md").read_text()
    routes = [
        (method, "/api/v1" + r.path)
        for r in create_router(start=3000, end=3001).routes
        if isinstance(r, APIRoute) and "{" not in r.path  # the dashboard's asset files
        for method in sorted(r.methods)
    ]
    assert len(routes) >= 12
    for method, path in routes:
        assert re.search(rf"^\| `{method} {re.escape(path)}[`?\[]", text, re.M), (method, path)


HISTORY = re.compile(
    r"this round|previous build|until this round|earlier builds?|before this|"
    r"the last build|no longer (?!needed)",
    re.I,
)


def test_user_docs_tell_what_it_does_now_not_its_history() -> None:
    pages = [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]
    found = [
        f"{page.name}: {m.group(0)!r}" for page in pages for m in HISTORY.finditer(page.read_text())
    ]
    assert not found, found
