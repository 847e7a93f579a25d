"""Every code block of README.md and docs/*.md runs, as a reader would paste it.

- ``python``: run in a fresh interpreter, in an empty folder, with a private
  lease registry; a block that defines ``test_`` functions runs under pytest
  (with the package's plugin), and its tests must pass.
- ``sh``: run by bash with the installed console script on ``PATH``, in an
  empty folder with an ``app.py`` (a small FastAPI app) for the blocks that
  start a server. A block that starts a server (``serve``, ``http.server``,
  uvicorn, gunicorn) must answer HTTP on its port and is then stopped; any
  other block must exit 0 and print nothing on stderr.
- ``json``, ``yaml``, ``ini``: parsed. ``text``: output shown to the reader,
  not run.

A block that cannot run here says why on the line before it, as
``<!-- not-run: the reason -->``. The shell blocks of a page that another
suite runs in its own way (on ports and folders of its own) are listed in
``RUN_ELSEWHERE`` with that suite.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import NamedTuple

import pytest
import yaml
from router_helpers import cli_path

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE_RE = re.compile(
    r"^(?P<indent> *)```(?P<lang>[^\n`]*)\n(?P<code>.*?)^(?P=indent)```", re.M | re.S
)
NOT_RUN_RE = re.compile(r"<!-- not-run: (?P<reason>[^>]*\S[^>]*) -->\s*$")
# A block that starts a server and runs until it is stopped.
SERVER_RE = re.compile(r"\b(serve|http\.server|uvicorn|gunicorn)\b")
LEAN = ("-p", "no:cacheprovider", "-p", "no:schemathesis", "-p", "no:hypothesispytest")

APP = """\
from fastapi import FastAPI

app = FastAPI()


@app.get("/")
def root() -> dict[str, bool]:
    return {"ok": True}
"""


# Pages whose shell blocks another suite runs, adapted to the test's ports and
# folders (their fixed addresses are meant for a real host).
RUN_ELSEWHERE = {
    "docs/deploy.md": "tests/test_serve_deploy.py",
}


class Block(NamedTuple):
    where: str
    lang: str
    code: str
    not_run: str | None


def blocks_of(path: Path) -> list[Block]:
    text = path.read_text()
    page = str(path.relative_to(ROOT))
    found = []
    for match in FENCE_RE.finditer(text):
        before = text[: match.start()].rstrip("\n ").rsplit("\n", 1)[-1]
        marker = NOT_RUN_RE.search(before)
        line = text.count("\n", 0, match.start()) + 1
        lang = match["lang"].strip()
        elsewhere = RUN_ELSEWHERE.get(page)
        if marker is None and lang == "sh" and elsewhere and (ROOT / elsewhere).exists():
            not_run = f"run by {elsewhere}"
        else:
            not_run = marker["reason"] if marker else None
        found.append(
            Block(
                where=f"{page}:{line}",
                lang=lang,
                code=textwrap.dedent(match["code"]),
                not_run=not_run,
            )
        )
    return found


BLOCKS = [block for path in DOCS for block in blocks_of(path)]


def by_lang(*langs: str) -> list[Block]:
    return [b for b in BLOCKS if b.lang in langs]


def ids(blocks: list[Block]) -> list[str]:
    return [b.where for b in blocks]


def test_every_block_says_its_language_and_is_checked() -> None:
    known = {"python", "sh", "json", "yaml", "ini", "text"}
    unknown = [f"{b.where}: {b.lang or '(none)'}" for b in BLOCKS if b.lang not in known]
    assert not unknown, f"blocks no test checks (use one of {sorted(known)}): {unknown}"
    assert len(BLOCKS) >= 30  # README and the docs site were both read


def test_few_blocks_are_left_out_and_each_says_why() -> None:
    left_out = [b for b in BLOCKS if b.not_run and not b.not_run.startswith("run by ")]
    assert len(left_out) <= 8, [b.where for b in left_out]
    assert all(len(b.not_run or "") >= 10 for b in left_out)


@pytest.fixture
def work(tmp_path: Path, registry: Path) -> tuple[Path, dict[str, str]]:
    """An empty project folder and the environment a reader's shell would have."""
    folder = tmp_path / "project"
    folder.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DPM_", "LISTEN_"))}
    env["DPM_REGISTRY_DIR"] = str(registry)
    env["XDG_STATE_HOME"] = str(tmp_path / "xdg")
    bin_dir = str(Path(cli_path()).parent)
    env["PATH"] = os.pathsep.join([bin_dir, str(Path(sys.executable).parent), env["PATH"]])
    return folder, env


PYTHON = [b for b in by_lang("python") if "def test_" not in b.code]
PYTEST = [b for b in by_lang("python") if "def test_" in b.code]


@pytest.mark.parametrize("block", PYTHON, ids=ids(PYTHON))
def test_python_block_runs(block: Block, work: tuple[Path, dict[str, str]]) -> None:
    if block.not_run:
        pytest.skip(f"marked not-run: {block.not_run}")
    folder, env = work
    result = subprocess.run(
        [sys.executable, "-c", block.code],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"{block.where} failed:\n{result.stderr}"


@pytest.mark.parametrize("block", PYTEST, ids=ids(PYTEST))
def test_pytest_block_passes(block: Block, pytester: pytest.Pytester) -> None:
    assert not block.not_run
    pytester.makepyfile(test_from_docs=block.code)
    result = pytester.runpytest_subprocess(*LEAN)
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed", 0) == block.code.count("def test_"), result.stdout.str()
    assert not outcomes.get("failed") and not outcomes.get("errors"), result.stdout.str()


SHELL = by_lang("sh")
COMMANDS = [b for b in SHELL if not b.not_run and not SERVER_RE.search(b.code)]
SERVERS = [b for b in SHELL if not b.not_run and SERVER_RE.search(b.code)]


@pytest.mark.parametrize("block", COMMANDS, ids=ids(COMMANDS))
def test_shell_block_runs_cleanly(block: Block, work: tuple[Path, dict[str, str]]) -> None:
    folder, env = work
    result = subprocess.run(
        ["bash", "-c", block.code], cwd=folder, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"{block.where}:\n{result.stderr}"
    assert result.stderr == "", f"{block.where} printed on stderr:\n{result.stderr}"
    if "api_ports.__file__" in block.code:
        # The packaged router, not a file of the folder it was run from.
        assert not Path(result.stdout.strip()).resolve().is_relative_to(folder.resolve())


def _answer(port: int, path: str) -> int | None:
    """The HTTP status the server on ``port`` answers, None while nothing listens."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def _stop(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:  # a worker that outlived its parent
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.parametrize("block", SERVERS, ids=ids(SERVERS))
def test_shell_block_serves_http(
    block: Block, work: tuple[Path, dict[str, str]], free_port: int, tmp_path: Path
) -> None:
    folder, env = work
    (folder / "app.py").write_text(APP)
    # The range is one port, leased to this test by the plugin: the block's
    # pick can only be that one, so the test knows where to knock.
    env["DPM_START"] = env["DPM_END"] = str(free_port)
    path = "/api/v1/port/state" if re.search(r"\bserve\b", block.code) else "/"
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["bash", "-c", block.code],
            cwd=folder,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    status = None
    try:
        deadline = time.monotonic() + 90
        while status is None and proc.poll() is None and time.monotonic() < deadline:
            status = _answer(free_port, path)
            if status is None:
                time.sleep(0.1)
    finally:
        _stop(proc)
    assert status == 200, f"{block.where}: no answer on {free_port}:\n{log.read_text()}"


STRUCTURED = by_lang("json", "yaml", "ini")


@pytest.mark.parametrize("block", STRUCTURED, ids=ids(STRUCTURED))
def test_structured_block_parses(block: Block) -> None:
    if block.lang == "json":
        assert isinstance(json.loads(block.code), dict)
    elif block.lang == "yaml":
        assert isinstance(yaml.safe_load(block.code), dict)
    else:
        parser = configparser.ConfigParser(strict=False, interpolation=None)
        parser.read_string(block.code)
        assert parser.sections()


def test_the_state_file_example_has_the_keys_the_core_writes(
    tmp_path: Path, registry: Path, free_port: int
) -> None:
    from dynamic_port_manager import DynamicPortManager

    [example] = [b for b in by_lang("json") if b.where.startswith("docs/state-file.md")]
    with DynamicPortManager(free_port, free_port, json_path=tmp_path / "s.json") as pm:
        pm.pick_port()
        written = json.loads((tmp_path / "s.json").read_text())
    assert list(json.loads(example.code)) == list(written)  # every key, in the file's order
