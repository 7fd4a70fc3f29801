"""docs/faults.md names, for every fault tried, the test that produces it:
every test it names must exist (renaming or removing one fails here)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TABLE = ROOT / "docs" / "faults.md"
# `tests/test_x.py::test_name` or, after one, `::test_other` (same file).
_REF = re.compile(r"`(tests/[\w/]+\.py)?::(\w+)(?:\[[^\]`]*\])?`")


def _tests_in(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {node.name for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)}


def test_every_test_the_faults_table_names_exists() -> None:
    rows = [line for line in TABLE.read_text().splitlines() if line.startswith("|")][2:]
    assert rows, "docs/faults.md has no rows"
    missing = []
    named = 0
    for row in rows:
        current: str | None = None
        for path, name in _REF.findall(row):
            current = path or current
            if current is None:
                missing.append(f"{name} (no file before it) in: {row[:80]}")
                continue
            named += 1
            test_file = ROOT / current
            if not test_file.exists() or name not in _tests_in(test_file):
                missing.append(f"{current}::{name}")
    assert not missing, "docs/faults.md names tests that do not exist: " + ", ".join(missing)
    assert named >= len(rows)
