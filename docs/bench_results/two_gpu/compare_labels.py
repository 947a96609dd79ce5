"""Compare two label directories table for table: every row of rows/*.arrow keyed by (doc_index, layer, position)
and every keys/*.arrow table by file name. Reads the Arrow files with pyarrow alone (no datasets).
Prints one line; exit 0 when equal, 1 otherwise.

    python docs/bench_results/two_gpu/compare_labels.py DIR_A DIR_B [--what NAME]
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository root

from indexer_train.shards import read_key_tables, read_label_rows  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--what", default="labels")
    args = parser.parse_args()
    a, b = Path(args.a), Path(args.b)
    ra, rb = read_label_rows(a), read_label_rows(b)
    ka, kb = read_key_tables(a), read_key_tables(b)
    problems = []
    if not ra:
        problems.append(f"{a} holds no label rows")
    if ra.keys() != rb.keys():
        problems.append(f"row keys differ ({len(ra)} vs {len(rb)} rows)")
    else:
        diff = [k for k in ra if ra[k] != rb[k]]
        if diff:
            cols = sorted({c for k in diff[:20] for c in ra[k] if ra[k][c] != rb[k][c]})
            problems.append(f"{len(diff)} of {len(ra)} rows differ (columns {cols}; first {diff[0]})")
    if ka.keys() != kb.keys():
        problems.append(f"key files differ ({sorted(ka)} vs {sorted(kb)})")
    else:
        bad = [name for name in ka if not ka[name].equals(kb[name])]
        if bad:
            problems.append(f"{len(bad)} of {len(ka)} key tables differ (first {bad[0]})")
    if problems:
        print(f"{args.what}: DIFFERENT: " + "; ".join(problems))
        sys.exit(1)
    print(f"{args.what}: EQUAL: {len(ra)} label rows, {len(ka)} key tables")


if __name__ == "__main__":
    main()
