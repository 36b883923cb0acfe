"""The test suite itself: no test cases hidden where a GPU run would not see them.

A size list or parametrisation that sits in a ``#`` comment (e.g. the real-size GPU cases after a
tiny CPU list) silently runs nothing on the GPU machine; so does a ``skipif`` that is always true.
These checks read the test sources, so they run (and can fail) on any machine.
"""
from __future__ import annotations

import pathlib
import re
import tokenize

TESTS = pathlib.Path(__file__).resolve().parent
# code in a comment: a GPU switch, a conditional list, or a tuple of three or more integers (a size)
CODE_IN_COMMENT = re.compile(r"\bif\s+(ON_)?GPU\b|is_available\(\)|\belse\s*\[\]|\(\s*\d+\s*,\s*\d+\s*,\s*\d+")
DEAD_MARK = re.compile(r"skipif\(\s*True\b|mark\.skip\(|^\s*if\s+(False|0)\s*:")


def _sources():
    """The test sources (every folder), this file excepted (its patterns would match themselves)."""
    return [p for p in sorted(TESTS.rglob("*.py")) if p.name != pathlib.Path(__file__).name]


def _comments(path: pathlib.Path):
    with path.open() as f:
        for tok in tokenize.generate_tokens(f.readline):
            if tok.type == tokenize.COMMENT:
                yield tok.start[0], tok.string


def test_no_test_cases_in_comments():
    found = [f"{p.relative_to(TESTS)}:{line}: {text}" for p in _sources() for line, text in _comments(p)
             if CODE_IN_COMMENT.search(text)]
    assert not found, "test cases (sizes, GPU switches) inside comments run nowhere:\n" + "\n".join(found)


def test_no_dead_skips():
    found = [f"{p.relative_to(TESTS)}:{i}: {line.strip()}" for p in _sources()
             for i, line in enumerate(p.read_text().splitlines(), 1) if DEAD_MARK.search(line)]
    assert not found, "unconditional skips / dead branches in tests:\n" + "\n".join(found)


def test_the_audit_sees_a_hidden_case(tmp_path):
    """The pattern catches the shape of the defect it guards against (a GPU size list in a comment)."""
    bad = tmp_path / "test_bad.py"
    bad.write_text("SIZES = [(3, 4, 5)]  # + ([(1031, 4099, 771, 32)] if GPU else [])\n")
    assert [t for _, t in _comments(bad) if CODE_IN_COMMENT.search(t)]
    assert not [t for _, t in _comments(TESTS / "conftest.py") if CODE_IN_COMMENT.search(t)]
