"""Cargo.toml's `rust-version` is at least what the locked dependencies need.

Reads `cargo metadata` (the packages Cargo.lock resolves for this host) and
compares the newest `rust-version` among them with the project's own. A new
dependency or a `cargo update` that needs a newer Rust fails here, naming the
crates, instead of failing a user's source build with an older toolchain.
"""

from __future__ import annotations

import json
import subprocess
import sys


def version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def main() -> int:
    host = next(
        line.split(": ", 1)[1]
        for line in subprocess.run(
            ["rustc", "-vV"], check=True, capture_output=True, text=True
        ).stdout.splitlines()
        if line.startswith("host: ")
    )
    metadata = json.loads(
        subprocess.run(
            ["cargo", "metadata", "--format-version", "1", "--locked", "--filter-platform", host],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    root_id = metadata["resolve"]["root"]
    packages = {p["id"]: p for p in metadata["packages"]}
    ours = packages[root_id].get("rust_version")
    if not ours:
        print("Cargo.toml has no rust-version", file=sys.stderr)
        return 1
    # Only what the build resolves for this host: every node of the resolve graph.
    needed = [
        (version(p["rust_version"]), p["name"], p["version"])
        for node in metadata["resolve"]["nodes"]
        if node["id"] != root_id and (p := packages[node["id"]]).get("rust_version")
    ]
    newest = max(v for v, _, _ in needed)
    by = ", ".join(f"{name} {ver}" for v, name, ver in sorted(needed) if v == newest)
    shown = ".".join(map(str, newest))
    if version(ours) < newest:
        print(f"rust-version {ours} in Cargo.toml, but {by} need Rust {shown}", file=sys.stderr)
        return 1
    if version(ours) > newest:
        # Allowed (the project's own code may need more; clippy's incompatible_msrv
        # lint checks that against this value), but said.
        print(f"rust-version {ours}; the locked dependencies need {shown} ({by})")
        return 0
    print(f"rust-version {ours}: the newest the locked dependencies need ({by})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
