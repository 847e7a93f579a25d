"""The install story tells the truth: release workflow, changelog, package metadata."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
BUILD_FLAGS = "maturin build --release --locked --zig"


def test_the_release_workflow_builds_the_wheel_and_sdist_as_ci_does() -> None:
    workflow = yaml.safe_load((ROOT / ".github/workflows/release.yml").read_text())
    jobs = workflow["jobs"]
    wheel_steps = "\n".join(step.get("run", "") for step in jobs["wheel"]["steps"])
    sdist_steps = "\n".join(step.get("run", "") for step in jobs["sdist"]["steps"])
    ci = (ROOT / ".ci/run").read_text()
    for text in (wheel_steps, ci):
        assert BUILD_FLAGS in text and "--compatibility manylinux2014" in text
        assert "libgcc_s" in text and "objdump -T" in text
    assert "maturin sdist" in sdist_steps
    # Publishing is one switch away, and off.
    assert jobs["publish"]["if"] is False
    assert set(jobs["publish"]["needs"]) == {"wheel", "sdist"}


def test_every_script_of_the_release_workflow_is_valid_bash() -> None:
    workflow = yaml.safe_load((ROOT / ".github/workflows/release.yml").read_text())
    scripts = [s["run"] for job in workflow["jobs"].values() for s in job["steps"] if "run" in s]
    assert len(scripts) >= 6
    for script in scripts:
        checked = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
        assert checked.returncode == 0, f"{script}\n{checked.stderr}"


def test_the_changelog_keeps_a_changelog() -> None:
    text = (ROOT / "CHANGELOG.md").read_text()
    assert text.startswith("# Changelog\n")
    assert "\n## [Unreleased]\n" in text
    versions = re.findall(r"^## \[(\d+\.\d+\.\d+)\] - \d{4}-\d{2}-\d{2}$", text, re.M)
    cargo = re.search(r'^version = "([^"]+)"', (ROOT / "Cargo.toml").read_text(), re.M)
    assert cargo and cargo.group(1) in versions
    for version in ("Unreleased", *versions):
        assert re.search(rf"^\[{re.escape(version)}\]: \S+$", text, re.M), version
    kinds = set(re.findall(r"^### (\w+)", text, re.M))
    assert kinds <= {"Added", "Changed", "Deprecated", "Removed", "Fixed", "Security"}


def test_the_package_metadata_says_what_it_is() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    floor = re.search(r'^requires-python = ">=3\.(\d+)"', text, re.M)
    assert floor
    minors = sorted(
        int(m) for m in re.findall(r'"Programming Language :: Python :: 3\.(\d+)"', text)
    )
    assert minors[0] == int(floor.group(1)) and minors == list(range(minors[0], minors[-1] + 1))
    for classifier in ("Typing :: Typed", "Framework :: Pytest", "Framework :: FastAPI"):
        assert f'"{classifier}"' in text
    assert re.search(r"^\[project\.urls\]\nHomepage = ", text, re.M)
    assert '"prometheus_client>=0.23"' in text


def test_the_readme_names_the_rust_version_cargo_toml_declares() -> None:
    cargo = re.search(r'^rust-version = "([^"]+)"', (ROOT / "Cargo.toml").read_text(), re.M)
    assert cargo
    assert f"Rust **{cargo.group(1)}** or later" in (ROOT / "README.md").read_text()
    assert f"Rust {cargo.group(1)} or later" in (ROOT / "docs/index.md").read_text()
