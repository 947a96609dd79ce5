"""reference/compare_evals.py: the adoption rule on hand-checked cases, and on the 2026-12-01 candidate, whose
rejection (worse at 4,096 tokens) the card records."""

import json
from pathlib import Path

from reference.compare_evals import cells, main, verdict

REPO = Path(__file__).resolve().parent.parent


def _blob(accuracies: dict) -> dict:
    return {"topk64": {f"{t}@{n}": {"task": t, "length": n, "accuracy": a, "n": 40}
                       for (t, n), a in accuracies.items()}}


def test_adopt_only_when_at_least_as_good_at_every_shared_length():
    reference = cells(_blob({("a", 4096): 1.0, ("b", 4096): 0.5, ("a", 8192): 0.2}))
    better = cells(_blob({("a", 4096): 0.9, ("b", 4096): 0.7, ("a", 8192): 0.2, ("a", 65536): 0.0}))
    rows, adopt = verdict(better, reference)
    # 4096: means 0.75 vs 0.80; 8192: 0.2 vs 0.2; 65536 is not shared
    assert [(n, round(r, 3), round(c, 3)) for n, _, r, c in rows] == [(4096, 0.75, 0.8), (8192, 0.2, 0.2)]
    assert adopt
    worse = cells(_blob({("a", 4096): 1.0, ("b", 4096): 0.4, ("a", 8192): 0.9}))
    assert verdict(worse, reference)[1] is False
    assert verdict(cells(_blob({("c", 4096): 1.0})), reference) == ([], False)  # nothing shared: no adoption


def test_the_rejected_long_context_candidate_is_rejected(tmp_path, capsys):
    candidate = REPO / "reference" / "work" / "long2" / "eval_candidate.json"
    if not candidate.is_file():  # the work folder is git-ignored; rebuild the 4K cells the card reports
        candidate = tmp_path / "candidate.json"
        candidate.write_text(json.dumps(_blob({("multivalue_number_code", 4096): 0.85,
                                               ("single_uuid_code", 4096): 0.30, ("vt_noise", 4096): 0.425})))
    assert main([str(candidate)]) == 1
    assert "keep the reference" in capsys.readouterr().out
