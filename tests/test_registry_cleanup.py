"""A registry folder that was deleted (a temporary folder cleaned up while the
program still ran) is not made again just to give leases back: not by
`release_port()`, `stop()`, nor the exit hook.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from router_helpers import base_for_children

# The first of this test's 10 ports (leased through the plugin), set by
# _ports; its child processes read it from $DPM_TEST_BASE.
BASE = 0


@pytest.fixture(autouse=True)
def _ports(monkeypatch: pytest.MonkeyPatch) -> None:
    global BASE
    BASE = base_for_children(monkeypatch, 10)


PROGRAM = """
import os as _os; BASE = int(_os.environ["DPM_TEST_BASE"])
import shutil, sys
from pathlib import Path
from dynamic_port_manager import DynamicPortManager
root = Path(sys.argv[1])
m = DynamicPortManager(BASE, BASE + 9, root / "state" / "s.json",
                       registry_dir=root / "registry", console_log=False)
kept = DynamicPortManager(BASE, BASE + 9, root / "state" / "t.json",
                          registry_dir=root / "registry", console_log=False)
m.pick_port()
kept.pick_port()
# The way tempfile.TemporaryDirectory and pytest clean up: everything goes.
shutil.rmtree(root)
m.release_port()
m.stop()
# `kept` still holds its port: the exit hook gives it back.
"""


def test_a_deleted_registry_folder_stays_deleted(tmp_path: Path) -> None:
    root = tmp_path / "run"
    root.mkdir()
    subprocess.run([sys.executable, "-c", PROGRAM, str(root)], check=True, timeout=60)
    assert not (root / "registry").exists(), sorted(p.name for p in root.rglob("*"))
    shutil.rmtree(root, ignore_errors=True)
