"""reference/compare_evals.py: the adoption rule on hand-checked cases; on the 2026-12-01 candidate (L2), whose
rejection (worse at 4,096 tokens) the card records, against both the previous default and the current one (L6); and
on L6 itself, adopted against the previous default."""

import functools
import json
import operator
from pathlib import Path

import pytest

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


def test_equal_means_are_a_tie_whatever_the_float_rounding():
    """The 2026-12-03 case: at 16K the default's 7 tasks and run 2's (other per-task values) both average 33 / 70,
    yet their float sums differ in the last bit (Python 3.11's sum; 3.12 rounds otherwise): a tie, so adopt."""
    reference = {("t%d" % i, 16384): a for i, a in enumerate((0.25, 0.0, 0.6, 0.85, 0.95, 0.35, 0.3))}
    candidate = {("t%d" % i, 16384): a for i, a in enumerate((0.2, 0.0, 0.55, 0.9, 0.95, 0.4, 0.3))}
    naive = lambda values: functools.reduce(operator.add, values) / 7  # noqa: E731  (Python 3.11's sum)
    assert naive(reference.values()) > naive(candidate.values())  # the bits differ ...
    rows, adopt = verdict(candidate, reference)
    assert adopt and rows[0][2:] == (pytest.approx(33 / 70), pytest.approx(33 / 70))  # ... the means do not
    worse = {**candidate, ("t0", 16384): 0.15}  # one prompt of 20 fewer: worse
    assert verdict(worse, reference)[1] is False


def _stored_candidate(tmp_path, attempt: dict) -> Path:
    """An attempt's stored evaluation (training_results.json) as an evaluate_needles --out file."""
    path = tmp_path / f"{attempt['pieces'][-1]['piece']}.json"
    path.write_text(json.dumps({"topk64": attempt["needles_full"]}))
    return path


def test_the_rejected_long_context_candidate_is_rejected(tmp_path, capsys):
    results = json.loads((REPO / "data" / "reference" / "training_results.json").read_text())
    (l2,) = [a for a in results["attempts_not_adopted"] if [p["piece"] for p in a.get("pieces", [])] == ["L1", "L2"]]
    candidate = _stored_candidate(tmp_path, l2)
    work = REPO / "reference" / "work" / "long2" / "eval_candidate.json"
    if work.is_file():  # the device's file (git-ignored) is what training_results.json stores
        assert json.loads(work.read_text())["topk64"] == l2["needles_full"]
    # against the current default (the default --reference: training_results.json's needles_gpu_long, L6i) and L6 ...
    for against in ([], ["--against", "L6"]):
        assert main([str(candidate), *against]) == 1
        assert "keep the reference" in capsys.readouterr().out
    # ... and against the previous default, as it was judged on 2026-12-01: worse at 4,096 tokens
    assert main([str(candidate), "--previous-default"]) == 1
    rows, adopt = verdict(cells({"topk64": l2["needles_full"]}), cells(results["previous_default"]))
    assert not adopt and [n for n, _, ref, cand in rows if cand < ref] == [4096]


def test_the_adopted_candidate_beats_the_previous_default_and_is_the_default(tmp_path, capsys):
    results = json.loads((REPO / "data" / "reference" / "training_results.json").read_text())
    (third,) = [a for a in results["long_context"]["attempts"] if a["verdict"] == "adopt"]
    candidate = _stored_candidate(tmp_path, third)
    assert main([str(candidate), "--previous-default"]) == 0
    out = capsys.readouterr().out
    assert out == third["verdicts"]["L6"]  # the device's verdict.txt, reproduced here
    assert main([str(candidate), "--against", "previous"]) == 0 and capsys.readouterr().out == out
    # L6's evaluation is the one --against L6 reads: L6 against it has the same mean as the reference at every length
    assert main([str(candidate), "--against", "L6"]) == 0
    table = [line.split() for line in capsys.readouterr().out.splitlines()[1:6]]
    assert [row[0] for row in table] == ["4,096", "8,192", "16,384", "32,768", "65,536"]
    assert all(row[2] == row[3] for row in table)


def test_the_adopted_indexers_beat_l6_and_are_the_default(tmp_path, capsys):
    """L6i (run 5 of the indexers trained alone, 2026-12-03): its stored whole evaluation against L6 prints the
    device's verdict.txt character for character (adopt), and it is the default's evaluation that candidates are
    compared with from then on (a candidate equal to it is adopted, one prompt fewer anywhere is not)."""
    results = json.loads((REPO / "data" / "reference" / "training_results.json").read_text())
    run5 = results["diagnostics"]["indexer_alone"]["judged"]["runs"]["run5"]
    candidate = tmp_path / "run5.json"
    candidate.write_text(json.dumps(run5["results"]))
    assert main([str(candidate), "--against", "L6"]) == 0
    assert capsys.readouterr().out == run5["verdict"] == results["indexers"]["verdict"]
    raw = REPO / "docs/results/indexer_piece_h200/judge_run5"
    assert json.loads((raw / "eval_candidate.json").read_text()) == run5["results"]
    assert (raw / "verdict.txt").read_text() == run5["verdict"]
    assert results["needles_gpu_long"]["results"] == run5["results"] and results["needles_gpu_long"]["model"] == "L6i"
    assert main([str(candidate)]) == 0
    capsys.readouterr()
    worse = json.loads(candidate.read_text())
    row = worse["topk64"]["single_number_code@32768"]
    row["accuracy"] = (row["hits"].count("1") - 1) / row["n"]
    candidate.write_text(json.dumps(worse))
    assert main([str(candidate)]) == 1


@pytest.mark.parametrize("pieces, work", [(["L7", "L8"], "long7/logs"), (["L9", "L10"], "L10"),
                                         (["L11", "L12"], "L12")])
def test_the_candidate_judged_against_l6_is_rejected_as_on_the_device(tmp_path, capsys, pieces, work):
    """L8, L10 and L12 (L7 + L8 and L9 + L10 from the default L6, 2026-12-02; L11 + L12 from L10, 2026-12-03):
    against L6 (the default when they were judged) the verdict printed here is the device's verdict.txt, character
    for character: keep the reference."""
    results = json.loads((REPO / "data" / "reference" / "training_results.json").read_text())
    (attempt,) = [a for a in results["attempts_not_adopted"] if [p["piece"] for p in a.get("pieces", [])] == pieces]
    candidate = _stored_candidate(tmp_path, attempt)
    stored = REPO / "reference" / "work" / work / "eval_candidate.json"
    if stored.is_file():  # the device's file (git-ignored) is what training_results.json stores
        assert json.loads(stored.read_text())["topk64"] == attempt["needles_full"]
    assert main([str(candidate), "--against", "L6"]) == 1
    assert capsys.readouterr().out == attempt["verdicts"][pieces[1]]
