"""docs/RESULTS.md sections 7e-7i: their tables are what the tables.py beside their raw evaluate outputs computes
(7e's reads section 7d's outputs for the previous default's columns; 7f's and 7g's read 7e's)."""

import contextlib
import importlib.util
import io
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _section(text: str, heading: str) -> str:
    """From ``heading`` to the next section heading."""
    start = text.index(heading)
    return text[start:min(i for i in (text.find("\n### ", start + 1), text.find("\n## ", start + 1)) if i > 0)]


@pytest.mark.parametrize("heading,folder,rows", [
    ("### 7e.", "varied_kinds_l6_cpu", 2 + 16 + 2 + 2),  # per task and length; pooled
    ("### 7f.", "recall_targets_l6_cpu", 2 + 16 + 2 + 2 + 2 + 3),  # ...; variable tracking with longer tails
    ("### 7g.", "retrigger_l6_cpu", 2 + 3 + 2 + 16 + 2 + 2),  # vt with more triggers; trained at tau 16; pooled
    ("### 7h.", "data_scaling_l6_cpu", 2 + 16 + 2 + 2),  # per task and length; pooled
    ("### 7i.", "label_votes_l6_cpu", 3 * (2 + 16 + 2 + 2)),  # 7h's tables for each of three exports
])
def test_section_tables_are_the_raw_outputs(heading, folder, rows):
    spec = importlib.util.spec_from_file_location(f"tables_{folder}", REPO / "docs/results" / folder / "tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        module.main()  # asserts the same prompt digests across the compared runs
    lines = [line for line in out.getvalue().splitlines() if line.startswith("| ")]
    section = _section((REPO / "docs/RESULTS.md").read_text(), heading)
    assert len(lines) == rows
    for line in lines:
        assert line in section, line
    assert (REPO / "docs/results" / folder / "tables.md").read_text() == out.getvalue()
