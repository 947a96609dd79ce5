"""bench/bench_trigger.py runs at V4-Flash's layout on the CPU (a short context, a small rank): it scores at the
release's memory layers, and its own checks hold (the towers' graph path == eager, the fused scorer near torch's,
the memory keys streamed from the pool select the same set, the staged fetch == indexing the pool)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_trigger_runs_at_the_release_layers(tmp_path):
    out = tmp_path / "trigger.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "bench_trigger.py"), "--context", "8192", "--rank", "64",
                    "--json", str(out)], cwd=ROOT, check=True, capture_output=True, timeout=600)
    result = json.loads(out.read_text())
    assert result["memory_layers"] == [22, 26, 42]  # CSA indices 10, 12, 20 of V4-Flash (the authors' release)
    assert result["entries"] == 8192 // 4
    assert result["graph_equals_eager"] and result["pool_keys_equal"]
    assert result["score_rel_err"] < 1e-2 and result["fetch_set_differences_not_near_threshold"] == 0
    assert result["fetch"]["entries_per_layer"] == round(0.05 * 2048) and result["fetch"]["staged_ms"] > 0
