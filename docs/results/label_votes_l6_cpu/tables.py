"""The tables of docs/RESULTS.md section 7i: labels whose golden set needs 2 of the 5 CSA layers' votes instead of
the release's 3 (7e's corpus, answers and everything else unchanged), the indexer exported twice (at the recall
target 0.8 on its held-out training prompts, as 7e; and at the method's threshold 0.5), and 7e's indexer exported at
the recall target 0.99 (about the first export's footprint: the control for the budget), on 7e's prompts.

    python docs/results/label_votes_l6_cpu/tables.py > docs/results/label_votes_l6_cpu/tables.md

Section 7h's tables (its tables.py: 7e's full and lsa beside this indexer's lsa and recent, per task and length,
then pooled over the seen and the held-out tasks; every run's prompt digests checked against 7e's), once per export,
on this section's `fm-index evaluate` outputs, kept here.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("tables_7h", HERE.parent / "data_scaling_l6_cpu" / "tables.py")
T7H = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(T7H)

# outputs' suffix -> the columns' label: the 2-vote indexer at recall 0.8 and at threshold 0.5, and the control at
# the first one's footprint, 7e's own indexer exported at recall 0.99
EXPORTS = {"r80": "2 votes, recall 0.8", "t50": "2 votes, threshold 0.5", "7e_r99": "7e's indexer, recall 0.99"}


def main() -> None:
    for i, (export, label) in enumerate(EXPORTS.items()):
        if i:
            print()
        T7H.print_tables({"varied": HERE / f"eval_varied_{export}", "ruler": HERE / f"eval_ruler_{export}"}, label)


if __name__ == "__main__":
    main()
