"""docs/DESIGN.md agrees with the code: its op table (§11) lists exactly the op table's
implementations (fastclt/ops/_registry.py) and which of them take a process group, and every file
it names exists."""
from __future__ import annotations

import pathlib
import re

from fastclt.ops import _registry

REPO = pathlib.Path(__file__).resolve().parents[1]
DESIGN = (REPO / "docs" / "DESIGN.md").read_text()


def _section(n: int) -> str:
    return DESIGN.split(f"\n## {n}. ", 1)[1].split("\n## ", 1)[0]


def _op_rows() -> dict:
    rows = {}
    for line in _section(11).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and re.fullmatch(r"`\w+`", cells[0]):
            rows[cells[0].strip("`")] = cells
    return rows


def test_the_op_table_lists_every_implementation():
    rows = _op_rows()
    assert set(rows) == {e.op for e in _registry.TABLE}
    for op, (_, file, impls, group, *_rest) in rows.items():
        entries = _registry.entries(op)
        assert [s.strip() for s in impls.split(",")] == [e.impl for e in entries], op
        assert {e.target.split(":")[0].split(".")[-1] + ".py" for e in entries} == {file.strip("`")}, op
        sharded = [e.impl for e in entries if e.sharded]
        assert group.startswith("yes") == bool(sharded), op
        if group.startswith("yes") and "not triton" in group:
            assert "triton" not in sharded and "triton" in [e.impl for e in entries], op


def test_every_named_file_exists():
    named = set(re.findall(r"`((?:fastclt|tests|benchmarks|csrc|docs)/[\w./-]+)`", DESIGN))
    named |= {f"tests/ops/{m}" for m in re.findall(r"`tests/ops/(test_\w+\.py)`", DESIGN)}
    missing = sorted(p for p in named if not (REPO / p.rstrip("/")).exists())
    assert named and not missing, missing
