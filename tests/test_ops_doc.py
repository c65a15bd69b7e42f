"""docs/ops.md is the registry's own coverage table, and every registered op has an adjoint test.

The table is `coverage_markdown()`, whose last column is the first docstring line of each rule: these tests
keep the doc from drifting from the code and make sure no rule goes undocumented or untested.
"""
from __future__ import annotations

import re
from pathlib import Path

import onnxcam.autodiff.rules  # noqa: F401  (registers the rules)
from onnxcam.autodiff.rules import coverage_markdown, supported_ops

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "ops.md"
RULE_TESTS = sorted((ROOT / "tests").glob("test_rules_*.py"))

# Rules that are not true derivatives (straight-through estimators through integer tensors) cannot have a
# finite-difference adjoint test; they are checked end to end in the named test file instead.
STRAIGHT_THROUGH_TESTS = {
    "QuantizeLinear": "test_quant.py",
    "DequantizeLinear": "test_quant.py",
}

REGENERATE = "regenerate the table in docs/ops.md with `python -m onnxcam ops --markdown`"


def _rows(table: str) -> list[list[str]]:
    """Cells of each body row of a markdown table (header and separator skipped; `\\|` is not a separator)."""
    rows = []
    for line in table.splitlines()[2:]:
        cells = re.split(r"(?<!\\)\|", line)
        assert cells[0] == "" and cells[-1] == "", f"malformed table row: {line!r}"
        rows.append([c.strip() for c in cells[1:-1]])
    return rows


def _mentions(text: str, op: str) -> bool:
    """`check_vjp("<op>"`, or the op name as a quoted string (parametrized op lists, helpers)."""
    return f'check_vjp("{op}"' in text or re.search(rf"""(["']){re.escape(op)}\1""", text) is not None


def test_doc_contains_current_coverage_table():
    table = coverage_markdown()
    doc = DOC.read_text(encoding="utf-8")
    if table not in doc:
        doc_lines = set(doc.splitlines())
        stale = [line for line in table.splitlines() if line not in doc_lines]
        raise AssertionError(f"docs/ops.md is out of date ({REGENERATE}); rows missing or changed:\n"
                             + "\n".join(stale))


def test_every_rule_has_a_description():
    rows = _rows(coverage_markdown())
    assert len(rows) == len(supported_ops())
    empty = [cells[0] for cells in rows if len(cells) != 4 or not cells[3]]
    assert not empty, f"rules without a docstring (the table's description column is empty): {empty}"


def test_every_op_has_an_adjoint_test():
    assert RULE_TESTS, "no tests/test_rules_*.py files found"
    text = "\n".join(p.read_text(encoding="utf-8") for p in RULE_TESTS)
    missing = []
    for op in supported_ops():
        if op in STRAIGHT_THROUGH_TESTS:
            other = (ROOT / "tests" / STRAIGHT_THROUGH_TESTS[op]).read_text(encoding="utf-8")
            if not _mentions(other, op):
                missing.append(f"{op} (expected in tests/{STRAIGHT_THROUGH_TESTS[op]})")
        elif not _mentions(text, op):
            missing.append(op)
    assert not missing, ("registered ops that no tests/test_rules_*.py exercises "
                         f"(no check_vjp(\"<Op>\" nor the op name as a string): {missing}")


def test_straight_through_exemptions_are_registered():
    # An exemption for an op that is no longer registered would silently widen the hole.
    stale = sorted(set(STRAIGHT_THROUGH_TESTS) - set(supported_ops()))
    assert not stale, f"STRAIGHT_THROUGH_TESTS names ops without a rule: {stale}"
