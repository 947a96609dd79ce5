"""docs/RESULTS.md section 7e's tables are what docs/results/varied_kinds_l6_cpu/tables.py computes from the raw
evaluate outputs kept beside it (and section 7d's, which it reads for the previous default's columns)."""

import contextlib
import importlib.util
import io
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_section_7e_tables_are_the_raw_outputs():
    spec = importlib.util.spec_from_file_location("tables_7e", REPO / "docs/results/varied_kinds_l6_cpu/tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        module.main()  # asserts the same prompt digests across the compared runs
    lines = [line for line in out.getvalue().splitlines() if line.startswith("| ")]
    results = (REPO / "docs/RESULTS.md").read_text()
    section = results[results.index("### 7e."):results.index("## 8.")]
    assert len(lines) == 2 + 16 + 2 + 2
    for line in lines:
        assert line in section, line
    assert (REPO / "docs/results/varied_kinds_l6_cpu/tables.md").read_text() == out.getvalue()


def test_section_7f_tables_are_the_raw_outputs():
    spec = importlib.util.spec_from_file_location("tables_7f", REPO / "docs/results/recall_targets_l6_cpu/tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        module.main()  # asserts the same prompt digests across the compared runs
    lines = [line for line in out.getvalue().splitlines() if line.startswith("| ")]
    results = (REPO / "docs/RESULTS.md").read_text()
    section = results[results.index("### 7f."):results.index("## 8.")]
    assert len(lines) == 2 + 16 + 2 + 2 + 2 + 3
    for line in lines:
        assert line in section, line
    assert (REPO / "docs/results/recall_targets_l6_cpu/tables.md").read_text() == out.getvalue()
