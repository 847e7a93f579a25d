"""The house rules of src/, checked from the files themselves.

    python .ci/check_layout.py [--graph]

- No import circle between the crate's top-level modules (a module is a file
  `src/x.rs` or a folder `src/x/`; `crate::x` anywhere in one module is an
  edge to `x`).
- The pure modules (data and formatting, no file, socket or process) use no
  module outside the pure set.
- No source file over MAX_LINES lines (tests included: a file that long has
  more than one job).
- `unsafe` code only under src/sys/.

- docs/layout.md shows the graph as it is (the block under "## Module
  dependencies").

With `--graph`, prints each module's dependencies (that block). Exits 1
naming every rule broken.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
LAYOUT_DOC = SRC.parent / "docs" / "layout.md"
MAX_LINES = 500
# Data and formatting only: no file, socket, process or thread of their own.
PURE = {
    "clock",
    "kept",
    "config",
    "error",
    "lease",
    "port_list",
    "port_set",
    "state",
    "state_json",
    "state_view",
    "names",
}
# The crate root and the binding sit above everything; `sys` below.
IGNORED = {"lib", "python"}
# Pure functions that live in `sys` because their body is unsafe.
PURE_IN_SYS = {"string_from_ascii"}

USE = re.compile(r"\bcrate::(?:\{([^}]*)\}|([a-z_][a-z0-9_]*))")
UNSAFE = re.compile(r"\bunsafe\s*(\{|impl\b|fn\b)")


def module_of(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0].removesuffix(".rs")


def code_of(text: str) -> str:
    """The production code: without line comments (doc comments name modules
    freely) and without the `#[cfg(test)]` module at the file's end."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip() == "#[cfg(test)]" and i + 1 < len(lines) and "mod " in lines[i + 1]:
            lines = lines[:i]
            break
    return "\n".join(line.split("//", 1)[0] for line in lines)


def uses_only_pure_sys(path_texts: list[str]) -> bool:
    """Whether every `crate::sys::` path in these texts names a pure function."""
    named = set()
    for text in path_texts:
        named.update(re.findall(r"crate::sys::([a-z_][a-z0-9_]*)", text))
    return named <= PURE_IN_SYS


def graph() -> dict[str, set[str]]:
    modules = {module_of(p) for p in SRC.rglob("*.rs")}
    deps: dict[str, set[str]] = {m: set() for m in modules}
    for path in SRC.rglob("*.rs"):
        here = module_of(path)
        for group, single in USE.findall(code_of(path.read_text())):
            names = [single] if single else re.findall(r"\b([a-z_][a-z0-9_]*)\b", group)
            for name in names:
                if name in modules and name != here:
                    deps[here].add(name)
    return deps


def cycles(deps: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected set of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(deps[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(deps):
        if v not in index:
            visit(v)
    return found


def main() -> int:
    deps = graph()
    problems: list[str] = []
    considered = {m: d - IGNORED for m, d in deps.items() if m not in IGNORED}
    for group in cycles(considered):
        problems.append(f"import circle: {' <-> '.join(group)}")
    for m in sorted(PURE & considered.keys()):
        texts = [code_of(p.read_text()) for p in SRC.rglob("*.rs") if module_of(p) == m]
        allowed = PURE | ({"sys"} if uses_only_pure_sys(texts) else set())
        impure = sorted(considered[m] - allowed)
        if impure:
            problems.append(f"pure module {m} uses {', '.join(impure)}")
    for path in sorted(SRC.rglob("*.rs")):
        lines = len(path.read_text().splitlines())
        if lines > MAX_LINES:
            problems.append(f"{path.relative_to(SRC.parent)}: {lines} lines (over {MAX_LINES})")
        if path.relative_to(SRC).parts[0] != "sys" and UNSAFE.search(code_of(path.read_text())):
            problems.append(f"{path.relative_to(SRC.parent)}: unsafe outside src/sys/")
    lines = [
        f"{m:<14} -> {', '.join(sorted(considered[m])) or '(nothing)'}" for m in sorted(considered)
    ]
    doc = LAYOUT_DOC.read_text().split("## Module dependencies", 1)
    shown = re.search(r"```text\n(.*?)```", doc[1], re.S) if len(doc) == 2 else None
    if shown is None or shown.group(1).splitlines() != lines:
        problems.append(
            "docs/layout.md: the block under '## Module dependencies' is not the graph "
            "(paste the output of: python .ci/check_layout.py --graph)"
        )
    if "--graph" in sys.argv:
        print("\n".join(lines))
    for p in problems:
        print(p, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
