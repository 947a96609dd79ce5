"""bench/bench_prefill.py on the bundled tiny model: its profile accounts for the prefill it times, by operator
and input shape, under both attentions (which agree on the first token)."""

import json


def test_prefill_profile_is_by_operator_and_shape(tmp_path, capsys):
    from bench.bench_prefill import main

    out = tmp_path / "prefill.json"
    main(["--model", "tiny", "--lengths", "384", "--chunk-size", "128", "--modes", "full", "--device", "cpu",
          "--attention", "eager,window", "--top", "5", "--json", str(out)])
    run, window = json.loads(out.read_text())["runs"]
    assert (run["attention"], window["attention"]) == ("eager", "window")
    assert run["first_token"] == window["first_token"]  # two exact forms of one attention, fp32
    assert run["mode"] == "full" and run["length"] == 384 and run["prefill_seconds"] > 0
    ops = run["ops"]
    assert abs(sum(op["seconds"] for op in ops) - run["profiled_seconds"]) < 1e-6
    assert [op["seconds"] for op in ops] == sorted((op["seconds"] for op in ops), reverse=True)
    # three chunks of 128 queries: the projections see [1, 128, hidden] inputs, three calls per layer and weight
    assert any(op["op"] in ("aten::mm", "aten::addmm", "aten::linear", "aten::bmm") and "128" in op["shapes"]
               and op["calls"] % 3 == 0 for op in ops)
    printed = capsys.readouterr().out
    rows = [line for line in printed.splitlines() if line.startswith("| ") and not line.startswith(("| op", "| ---"))]
    assert "### full, 384 tokens, eager attention: prefill" in printed and len(rows) == 2 * 5
